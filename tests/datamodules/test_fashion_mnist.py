"""Fashion-MNIST from idx files the test writes (the real ones come from Debian's dataset-fashion-mnist)."""

import numpy as np
import pytest
import torch

from dpldm.datamodules import FashionMNISTDataModule
from dpldm.datamodules.idx import read_idx
from dpldm.errors import ConfigError
from tests.datamodules.common import write_idx


@pytest.fixture
def fashion_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n, compress in (("train", 50, True), ("t10k", 20, False)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    return tmp_path


def test_reads_idx_files_scaled_by_fixed_constants(fashion_root):
    raw = read_idx(str(fashion_root / "train-images-idx3-ubyte.gz"))
    dm = FashionMNISTDataModule(root=str(fashion_root), image_size=28, val_size=5)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (45, 5, 20)
    assert dm.num_train_samples == 45
    first = dm.test_dataset[3]
    assert first["label"] == 3 and first["image"].shape == (1, 28, 28)
    test_raw = read_idx(str(fashion_root / "t10k-images-idx3-ubyte"))
    torch.testing.assert_close(first["image"][0], torch.from_numpy(test_raw[3].astype(np.float32)) / 127.5 - 1)
    train_images = torch.stack([dm.train_dataset[i]["image"][0] for i in range(45)])
    all_raw = torch.from_numpy(raw.astype(np.float32)) / 127.5 - 1
    assert all(any(torch.equal(img, r) for r in all_raw) for img in train_images[:5])


def test_resized_to_the_image_size_within_range(fashion_root):
    dm = FashionMNISTDataModule(root=str(fashion_root), image_size=32)
    dm.setup("fit")
    x = dm.train_dataset[0]["image"]
    assert x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1 and len(dm.train_dataset) == 50


def test_missing_files_name_the_field_and_the_package(tmp_path):
    with pytest.raises(ConfigError, match="data.init_args.root.*apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path))
