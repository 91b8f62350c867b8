"""ImageNet32DataModule: npz batches, 0-indexed labels, flips on train only, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpldm.datamodules import ImageNet32DataModule
from dpldm.errors import ConfigError


def test_reads_batches_with_zero_indexed_labels(imagenet_root):
    dm = ImageNet32DataModule(root=str(imagenet_root), max_train_batches=3, flip=False, batch_size=4)
    assert dm.num_train_samples == 15  # before setup
    dm.setup()
    assert len(dm.val_dataset) == len(dm.test_dataset) == 4
    assert dm.train_dataset.labels[:5].tolist() == [0, 999, 1, 499, 2]
    assert [dm.val_dataset[i]["label"] for i in range(4)] == [0, 1, 2, 999]
    item = dm.train_dataset[6]  # batch 2, image 1: left half 200 + 20 + 1
    assert item["image"].shape == (3, 32, 32)
    assert torch.allclose(item["image"][:, :, :16], torch.full((3, 32, 16), 221 / 127.5 - 1))
    assert torch.all(item["image"][:, :, 16:] == -1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.int64
    assert (dm.num_classes, dm.channels, dm.image_size) == (1000, 3, 32)


def test_max_train_batches_limits_reading(imagenet_root):
    assert ImageNet32DataModule(root=str(imagenet_root), max_train_batches=1).num_train_samples == 5


def test_archive_subfolders_are_found(imagenet_root):
    train_dir, val_dir = imagenet_root / "Imagenet32_train_npz", imagenet_root / "Imagenet32_val_npz"
    train_dir.mkdir(), val_dir.mkdir()
    (imagenet_root / "train_data_batch_1.npz").rename(train_dir / "train_data_batch_1.npz")
    (imagenet_root / "val_data.npz").rename(val_dir / "val_data.npz")
    assert ImageNet32DataModule(root=str(imagenet_root), max_train_batches=1).num_train_samples == 5


def test_flip_only_in_train(imagenet_root):
    torch.manual_seed(0)
    dm = ImageNet32DataModule(root=str(imagenet_root), max_train_batches=1)
    dm.setup()
    mirrored = [bool(dm.train_dataset[0]["image"][0, 0, -1] > 0) for _ in range(40)]
    assert 5 < sum(mirrored) < 35
    assert not any(bool(dm.val_dataset[0]["image"][0, 0, -1] > 0) for _ in range(40))


def test_missing_files_fail_in_init_naming_the_field(imagenet_root):
    with pytest.raises(FileNotFoundError) as info:
        ImageNet32DataModule(root=str(imagenet_root))  # all 10 train batches expected
    message = str(info.value)
    assert "data.init_args.root" in message and str(imagenet_root) in message
    listed = message.split("not found: ")[1].split(". Expected")[0]
    assert listed == ", ".join(f"train_data_batch_{i}.npz" for i in range(4, 11))  # only the absent ones
    with pytest.raises(FileNotFoundError, match="val_data.npz"):
        ImageNet32DataModule(root=str(imagenet_root / "empty"), max_train_batches=1)


@pytest.mark.parametrize("value", [0, 11])
def test_bad_max_train_batches(imagenet_root, value):
    with pytest.raises(ConfigError) as info:
        ImageNet32DataModule(root=str(imagenet_root), max_train_batches=value)
    assert info.value.field == "data.init_args.max_train_batches"


def test_out_of_range_labels_are_rejected(imagenet_root):
    np.savez(imagenet_root / "val_data.npz", data=np.zeros((2, 3072), np.uint8), labels=np.array([0, 1]))
    dm = ImageNet32DataModule(root=str(imagenet_root), max_train_batches=1)
    with pytest.raises(ValueError, match="1..1000"):
        dm.setup("validate")
