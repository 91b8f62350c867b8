"""Downsampled ImageNet 32x32 (Chrabaszcz et al., 2017): the public set for CIFAR-10.

Reads the official npz batches ``train_data_batch_1..10.npz`` and ``val_data.npz``; each
holds ``"data"``: uint8 ``(N, 3072)`` in CHW order and ``"labels"``: 1..1000, stored here
0-indexed. Validation and test are both ``val_data.npz``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from dpldm.datamodules.base import ImageDataModule, TensorImageDataset
from dpldm.errors import ConfigError

NUM_TRAIN_BATCHES = 10
VAL_FILE = "val_data.npz"
# Folders the official archives extract to; files may also sit directly in ``root``.
SUBDIRS = ("", "Imagenet32_train_npz", "Imagenet32_val_npz", "Imagenet32_train", "Imagenet32_val")


def train_files(count: int) -> list[str]:
    """Names of the first ``count`` training batches.

    Args:
        count: how many batches (1..10).
    """
    return [f"train_data_batch_{i}.npz" for i in range(1, count + 1)]


def read_npz(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one batch into ``uint8 (N, 3, 32, 32)`` images and 0-indexed ``(N,)`` labels.

    Args:
        path: the npz file.
    """
    with np.load(path) as batch:
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1) - 1
    if labels.size and (labels.min() < 0 or labels.max() >= 1000):
        raise ValueError(f"{path}: labels must be 1..1000, got {labels.min() + 1}..{labels.max() + 1}")
    return torch.from_numpy(images), torch.from_numpy(labels)


class ImageNet32DataModule(ImageDataModule):
    """ImageNet 32x32, RGB, 1000 classes; uint8 in memory, scaled per item by ``/127.5 - 1``.

    Args:
        root: folder holding the npz batches (directly or in the archives' own subfolders).
        flip: random horizontal flips on the training split (never on val/test).
        max_train_batches: read only the first this many training batches (1..10; None = all
            10, about 1.28M images, 3.9 GB in memory).
        batch_size: examples per batch (>= 1).
        num_workers: DataLoader worker processes (>= 0).
        seed: seed of the training shuffle.
    """

    public = True  # a public pretraining set: non-DP fits are allowed

    num_classes = 1000
    channels = 3
    image_size = 32

    def __init__(
        self,
        root: str = "data/imagenet32",
        flip: bool = True,
        max_train_batches: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        count = NUM_TRAIN_BATCHES if max_train_batches is None else max_train_batches
        if not 1 <= count <= NUM_TRAIN_BATCHES:
            raise ConfigError("data.init_args.max_train_batches", max_train_batches, "must be 1..10 or null")
        self.root, self.flip, self.max_train_batches = str(root), flip, max_train_batches
        # Resolve every file now so a missing one fails before training starts.
        names = train_files(count) + [VAL_FILE]
        paths = {name: self._locate(name) for name in names}
        missing = [name for name, path in paths.items() if path is None]
        if missing:
            raise FileNotFoundError(
                f"data.init_args.root = {self.root!r}: ImageNet32 npz batches not found: "
                f"{', '.join(missing)}. Expected {', '.join(names)} in {self.root!r} (or in its "
                f"Imagenet32_train_npz/ and Imagenet32_val_npz/ subfolders). Download the 32x32 "
                "npz archives from https://image-net.org/download-images (Downsampled ImageNet) "
                "and extract them there, or lower data.init_args.max_train_batches."
            )
        self._train_paths = [paths[name] for name in train_files(count)]
        self._val_path = paths[VAL_FILE]
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None

    def _locate(self, name: str) -> str | None:
        """Path of ``name`` in ``root`` or one of the known subfolders, or None.

        Args:
            name: file name to look for.
        """
        for sub in SUBDIRS:
            path = os.path.join(self.root, sub, name)
            if os.path.isfile(path):
                return path
        return None

    def _build(self, split: str) -> Dataset:
        """Read one split; val and test share ``val_data.npz`` (read once).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
        """
        if split == "train":
            parts = [read_npz(path) for path in self._train_paths]
            images = torch.cat([p[0] for p in parts])
            labels = torch.cat([p[1] for p in parts])
            return TensorImageDataset(images, labels, flip=self.flip)
        if self._val is None:
            self._val = read_npz(self._val_path)
        return TensorImageDataset(*self._val, flip=False)
