"""CIFAR10DataModule: own pickle reader, root layouts, flips on train only, clear errors."""

from __future__ import annotations

import pytest
import torch

from dpldm.datamodules import CIFAR10DataModule
from dpldm.datamodules.cifar10 import SUBDIR


def test_reads_train_and_test(cifar_root):
    dm = CIFAR10DataModule(root=str(cifar_root), batch_size=8, flip=False)
    assert dm.num_train_samples == 20  # before setup
    dm.setup()
    assert len(dm.val_dataset) == len(dm.test_dataset) == 6
    item = dm.train_dataset[5]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    # Fixed scaling: value 205 (image 5 of train) -> 205/127.5-1; right half 0 -> -1.
    assert torch.allclose(item["image"][:, :, 0], torch.full((3, 32), 205 / 127.5 - 1))
    assert torch.all(item["image"][:, :, 16:] == -1)
    assert item["label"] == 5
    assert [dm.test_dataset[i]["label"] for i in range(6)] == [9, 8, 7, 6, 5, 4]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["label"].shape == (8,)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_root_may_hold_the_batches_directly(cifar_root):
    dm = CIFAR10DataModule(root=str(cifar_root / SUBDIR))
    assert dm.num_train_samples == 20


def _flipped(dataset, draws=40):
    """How many of ``draws`` reads of item 0 came back mirrored (bright half on the right)."""
    return sum(bool(dataset[0]["image"][0, 0, -1] > 0) for _ in range(draws))


def test_flip_only_in_train(cifar_root):
    torch.manual_seed(0)
    dm = CIFAR10DataModule(root=str(cifar_root), flip=True)
    dm.setup()
    assert 5 < _flipped(dm.train_dataset) < 35
    assert _flipped(dm.val_dataset) == 0 and _flipped(dm.test_dataset) == 0
    no_flip = CIFAR10DataModule(root=str(cifar_root), flip=False)
    assert _flipped(no_flip._build("train")) == 0


def test_missing_root_fails_in_init_naming_the_field(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10DataModule(root=str(missing))
    message = str(info.value)
    assert "data.init_args.root" in message and str(missing) in message
    assert "data_batch_1" in message and "test_batch" in message and "download" in message


def test_partial_files_count_as_missing(cifar_root):
    (cifar_root / SUBDIR / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError):
        CIFAR10DataModule(root=str(cifar_root))


def test_failed_download_names_the_field(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    dm = CIFAR10DataModule(root=str(tmp_path), download=True)  # no error before data is needed
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    assert "data.init_args.root" in str(info.value) and "network unreachable" in str(info.value)
    with pytest.raises(FileNotFoundError):
        dm.num_train_samples


def test_download_is_used_when_files_are_missing(tmp_path, cifar_root, monkeypatch):
    import shutil

    import torchvision.datasets

    def fake_download(root, train=True, download=False):
        assert download
        shutil.copytree(cifar_root / SUBDIR, f"{root}/{SUBDIR}")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    dm = CIFAR10DataModule(root=str(tmp_path / "fresh"), download=True)
    assert dm.num_train_samples == 20
