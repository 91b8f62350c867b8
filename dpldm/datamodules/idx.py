"""The MNIST family's IDX files (LeCun et al., 1998): one reader and one data module for MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic (0, 0, dtype 0x08 = uint8, ndim), ndim big-endian int32 sizes, then the data.
Train = the 60,000 training images (minus ``val_size``), test = the 10,000 test images. Intensities are scaled
with the fixed constants ``/127.5 - 1`` and resized to ``image_size`` once, at build time.
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

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzip-compressed) as a uint8 array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_file(root: str, name: str, raw_folder: str) -> str | None:
    """``name`` (or ``name.gz``) in ``root`` or in torchvision's layout ``root/<raw_folder>/raw``."""
    for folder in (root, os.path.join(root, raw_folder, "raw")):
        for candidate in (name, name + ".gz"):
            if os.path.exists(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
    return None


class IdxDataModule(ImageDataModule):
    """Base class of the IDX data sets; subclasses name the torchvision class and say where the files come from.

    Args:
        root: folder with the four idx files (or torchvision's ``<Name>/raw`` under it).
        image_size: side of the square output images (bilinear, antialiased resize from 28).
        val_size: training images held out for validation (0: none; the test split is the reference).
        batch_size: examples per batch (>= 1).
        num_workers: DataLoader worker processes (>= 0).
        seed: seed of the validation hold-out and of the training shuffle.
    """

    num_classes = 10
    channels = 1
    torchvision_name = ""  # torchvision.datasets class, also its raw folder's name

    def __init__(self, root: str, image_size: int = 32, val_size: int = 0, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if image_size < 1:
            raise ConfigError("data.init_args.image_size", image_size, "must be >= 1")
        if not 0 <= val_size < 60_000:
            raise ConfigError("data.init_args.val_size", val_size, "must be in [0, 60000)")
        self.root, self.image_size, self.val_size = os.path.expanduser(str(root)), image_size, val_size
        self._splits: dict[str, TensorImageDataset] = {}

    def missing_files(self) -> list[str]:
        return [n for names in FILES.values() for n in names if find_file(self.root, n, self.torchvision_name) is None]

    def torchvision_download(self) -> None:
        import torchvision.datasets

        for train in (True, False):
            getattr(torchvision.datasets, self.torchvision_name)(self.root, train=train, download=True)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The raw (images [N, 28, 28] uint8, labels [N] uint8) of ``train`` or ``test``."""
        return tuple(read_idx(find_file(self.root, n, self.torchvision_name)) for n in FILES[split])

    def _tensor(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.arrays(split)
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
