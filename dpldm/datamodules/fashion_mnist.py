"""Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test 28x28 grey images of 10 clothing classes.

Read from the original idx files (``.gz`` or not): on Debian-based machines ``apt-get install
dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist/``; elsewhere torchvision downloads
them (``download: true``). Intensities are scaled with the fixed constants ``/127.5 - 1`` and the images
resized to ``image_size`` once, at build time.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dpldm.datamodules.base import ImageDataModule, TensorImageDataset
from dpldm.errors import ConfigError

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str) -> np.ndarray:
    """An idx file (LeCun's MNIST format, optionally gzip-compressed) as a uint8 array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_file(root: str, name: str) -> str | None:
    for folder in (root, os.path.join(root, "FashionMNIST", "raw")):  # as given, or torchvision's layout
        for candidate in (name, name + ".gz"):
            if os.path.exists(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
    return None


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST: train = the 60,000 training images (minus ``val_size``), test = the 10,000 test images.

    Args:
        root: folder with the four idx files (or torchvision's ``FashionMNIST/raw`` under it).
        image_size: side of the square output images (bilinear, antialiased resize from 28).
        val_size: training images held out for validation (0: none; the test split is the reference).
        download: fetch the files with torchvision into ``root`` when they are missing.
        batch_size: examples per batch (>= 1).
        num_workers: DataLoader worker processes (>= 0).
        seed: seed of the validation hold-out and of the training shuffle.
    """

    num_classes = 10
    channels = 1

    def __init__(self, root: str = DEBIAN_ROOT, image_size: int = 32, val_size: int = 0, download: bool = False,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if image_size < 1:
            raise ConfigError("data.init_args.image_size", image_size, "must be >= 1")
        if not 0 <= val_size < 60_000:
            raise ConfigError("data.init_args.val_size", val_size, "must be in [0, 60000)")
        self.root, self.image_size, self.val_size, self.download = str(root), image_size, val_size, download
        missing = [n for names in FILES.values() for n in names if find_file(self.root, n) is None]
        if missing and not download:
            raise ConfigError("data.init_args.root", self.root,
                              f"has no Fashion-MNIST idx files ({', '.join(missing)}); on Debian/Ubuntu: "
                              "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), "
                              "or set data.init_args.download: true to fetch them with torchvision")
        self._splits: dict[str, TensorImageDataset] = {}

    def prepare_data(self) -> None:
        if self.download and find_file(self.root, FILES["train"][0]) is None:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(self.root, train=train, download=True)

    def _tensor(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = (read_idx(find_file(self.root, n)) for n in FILES[split])
        x = torch.from_numpy(images.copy()).unsqueeze(1).float() / 127.5 - 1.0  # fixed constants, [N, 1, 28, 28]
        if self.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(-1.0, 1.0)
        return x.contiguous(), torch.from_numpy(labels.astype(np.int64))

    def _build(self, split: str) -> Dataset:
        if split == "test":
            return TensorImageDataset(*self._tensor("test"))
        if not self._splits:
            self.prepare_data()
            images, labels = self._tensor("train")
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            val, train = perm[: self.val_size], perm[self.val_size:].sort().values
            self._splits = {"train": TensorImageDataset(images[train], labels[train]),
                            "val": TensorImageDataset(images[val], labels[val])}
        return self._splits[split]
