"""ImageDataModule: config checks, lazy idempotent setup, loaders and their batches."""

from __future__ import annotations

import pytest
import torch

from dpldm.datamodules.base import ImageDataModule, TensorImageDataset
from dpldm.errors import ConfigError


class CountingModule(ImageDataModule):
    """Splits of 10/4/3 random images; counts how often each split is built."""

    num_classes, channels, image_size = 5, 2, 4

    def __init__(self, batch_size: int = 4, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.builds = {"train": 0, "val": 0, "test": 0}

    def _build(self, split):
        self.builds[split] += 1
        n = {"train": 10, "val": 4, "test": 3}[split]
        images = torch.linspace(-1, 1, n * 32).reshape(n, 2, 4, 4)
        return TensorImageDataset(images, torch.arange(n) % 5)


@pytest.mark.parametrize("field,kwargs", [("batch_size", {"batch_size": 0}), ("num_workers", {"num_workers": -1})])
def test_bad_loader_settings_raise_config_error(field, kwargs):
    with pytest.raises(ConfigError) as info:
        CountingModule(**kwargs)
    assert info.value.field == f"data.init_args.{field}"
    assert isinstance(info.value, ValueError)


def test_num_train_samples_before_setup_and_setup_is_idempotent():
    dm = CountingModule()
    assert dm.num_train_samples == 10  # no setup() yet
    dm.setup("fit")
    dm.setup("fit")
    dm.setup(None)
    assert dm.builds == {"train": 1, "val": 1, "test": 1}


def test_setup_builds_only_what_the_stage_needs():
    dm = CountingModule()
    dm.setup("test")
    assert dm.train_dataset is None and dm.val_dataset is None and dm.test_dataset is not None


def test_loaders_yield_dict_batches_and_only_train_shuffles():
    dm = CountingModule(batch_size=4)
    dm.setup()
    train = list(dm.train_dataloader())
    assert [len(b["label"]) for b in train] == [4, 4, 2]  # drop_last=False
    assert train[0]["image"].shape == (4, 2, 4, 4) and train[0]["image"].dtype == torch.float32
    assert sorted(torch.cat([b["label"] for b in train]).tolist()) == sorted((torch.arange(10) % 5).tolist())
    val = torch.cat([b["image"] for b in dm.val_dataloader()])
    assert torch.equal(val, dm.val_dataset.images)  # in order
    order = torch.cat([b["image"][:, 0, 0, 0] for b in train])
    assert not torch.equal(order, torch.sort(order).values)  # shuffled (fixed seed, checked)


def test_train_shuffle_is_seeded():
    def first_batch(seed):
        return next(iter(CountingModule(seed=seed).train_dataloader()))["image"]

    assert torch.equal(first_batch(3), first_batch(3))
    assert not torch.equal(first_batch(3), first_batch(4))


def test_loader_settings_are_passed_through():
    loader = CountingModule(batch_size=3, num_workers=2).train_dataloader()
    assert loader.batch_size == 3 and loader.num_workers == 2 and loader.persistent_workers
    assert not CountingModule().val_dataloader().persistent_workers


def test_uint8_images_use_fixed_scaling():
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).reshape(1, 1, 1, 3)
    item = TensorImageDataset(images, torch.tensor([7]))[0]
    assert item["label"] == 7 and isinstance(item["label"], int)
    assert torch.allclose(item["image"].flatten(), torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
