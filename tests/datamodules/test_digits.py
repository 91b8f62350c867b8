"""DigitsDataModule: sklearn digits scaled by fixed constants, resized, split with a seed."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from dpldm.datamodules import DigitsDataModule
from dpldm.errors import ConfigError


@pytest.fixture(scope="module")
def dm():
    module = DigitsDataModule(batch_size=32)
    module.setup()
    return module


def test_split_sizes_and_num_train_samples():
    fresh = DigitsDataModule()
    assert fresh.num_train_samples == 1437  # before setup
    fresh.setup()
    assert (len(fresh.val_dataset), len(fresh.test_dataset)) == (180, 180)


def test_items_shape_range_labels(dm):
    images, labels = dm.train_dataset.images, dm.train_dataset.labels
    assert images.shape == (1437, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.max() > 0.9 and images.min() == -1
    assert set(labels.tolist()) == set(range(10))
    item = dm.train_dataset[0]
    assert item["image"].shape == (1, 32, 32) and isinstance(item["label"], int)
    assert (dm.num_classes, dm.channels, dm.image_size) == (10, 1, 32)


def _keys(ds):
    """Images as hashable bytes, to compare splits."""
    return {bytes(x.numpy().tobytes()) for x in ds.images}


def test_splits_disjoint_and_deterministic(dm):
    train, val, test = _keys(dm.train_dataset), _keys(dm.val_dataset), _keys(dm.test_dataset)
    assert not (train & val) and not (train & test) and not (val & test)
    again = DigitsDataModule(seed=0)
    again.setup()
    assert torch.equal(again.val_dataset.images, dm.val_dataset.images)
    other = DigitsDataModule(seed=1)
    other.setup()
    assert not torch.equal(other.val_dataset.images, dm.val_dataset.images)


def test_fixed_constant_scaling_at_native_size():
    module = DigitsDataModule(image_size=8, val_fraction=0.0, test_fraction=0.0)
    module.setup("fit")
    raw = load_digits()
    expected = torch.as_tensor(raw.images, dtype=torch.float32) / 16 * 2 - 1
    # Same set of images (the split permutes them), each mapped by /16*2-1 exactly.
    got = module.train_dataset.images[:, 0]
    order = torch.argsort(module._indices["train"])
    assert torch.allclose(got[order], expected)


def test_dataloader_batches(dm):
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 1, 32, 32) and batch["label"].shape == (32,)


@pytest.mark.parametrize("kwargs", [{"val_fraction": -0.1}, {"test_fraction": 1.0}, {"val_fraction": 0.6, "test_fraction": 0.5}, {"image_size": 0}, {"batch_size": 0}])
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        DigitsDataModule(**kwargs)
