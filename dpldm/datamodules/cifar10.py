"""CIFAR-10 from the standard python pickles, read by a small reader of our own.

torchvision's ``CIFAR10`` class verifies md5 sums, so it cannot read the tiny stand-in
files the tests write; it is used only to download when ``download: true``. Train is the
five ``data_batch_*`` files (50000 images); validation and test are both ``test_batch``.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

from dpldm.datamodules.base import ImageDataModule, TensorImageDataset

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SUBDIR = "cifar-10-batches-py"
ROOT_FIELD = "data.init_args.root"


def find_batch_dir(root: str) -> str | None:
    """The folder holding all six batch files: ``root/cifar-10-batches-py`` or ``root``.

    Args:
        root: the configured data root.
    """
    for folder in (os.path.join(root, SUBDIR), root):
        if all(os.path.isfile(os.path.join(folder, f)) for f in TRAIN_FILES + (TEST_FILE,)):
            return folder
    return None


def read_batches(folder: str, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR pickles into ``uint8 (N, 3, 32, 32)`` images and ``(N,)`` labels.

    Args:
        folder: directory of the batch files.
        names: batch file names, read in order and concatenated.
    """
    images, labels = [], []
    for name in names:
        # The pickles are dicts with bytes keys: b"data" (N, 3072) uint8 in CHW order.
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _missing_message(root: str, extra: str) -> str:
    """Error text naming the field, the path, the expected files and the fix.

    Args:
        root: the configured data root.
        extra: a closing sentence specific to the failure.
    """
    return (
        f"{ROOT_FIELD} = {root!r}: CIFAR-10 python batches not found. Expected "
        f"{', '.join(TRAIN_FILES)} and {TEST_FILE} in {os.path.join(root, SUBDIR)!r} or in "
        f"{root!r} itself (extract cifar-10-python.tar.gz from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html there). {extra}"
    )


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10, 32x32 RGB, 10 classes; uint8 in memory, scaled per item by ``/127.5 - 1``.

    Args:
        root: folder containing ``cifar-10-batches-py/`` or the batch files themselves.
        download: fetch the dataset with torchvision when the files are missing.
        flip: random horizontal flips on the training split (never on val/test).
        batch_size: examples per batch (>= 1).
        num_workers: DataLoader worker processes (>= 0).
        seed: seed of the training shuffle.
    """

    num_classes = 10
    channels = 3
    image_size = 32

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        flip: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.root, self.download, self.flip = str(root), download, flip
        # Fail before training starts when the data is absent and may not be fetched.
        if not download and find_batch_dir(self.root) is None:
            raise FileNotFoundError(
                _missing_message(self.root, "Or set data.init_args.download: true to fetch it.")
            )
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare_data(self) -> None:
        """Download the batches if they are missing (Lightning calls this on one process)."""
        if find_batch_dir(self.root) is not None:
            return
        if not self.download:
            raise FileNotFoundError(_missing_message(self.root, "Or set data.init_args.download: true."))
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(self.root, train=True, download=True)
        except Exception as err:  # offline, proxy, disk full, ...: say what to do instead
            raise FileNotFoundError(
                _missing_message(self.root, f"Download failed ({type(err).__name__}: {err}); "
                                 "place the python batches there by hand.")
            ) from err
        if find_batch_dir(self.root) is None:
            raise FileNotFoundError(_missing_message(self.root, "Download finished without them."))

    def _build(self, split: str) -> Dataset:
        """Read one split; val and test share ``test_batch`` (read once).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
        """
        self.prepare_data()  # no-op when present; lets num_train_samples work before fit
        folder = find_batch_dir(self.root)
        if split == "train":
            images, labels = read_batches(folder, TRAIN_FILES)
            return TensorImageDataset(images, labels, flip=self.flip)
        if self._test is None:
            self._test = read_batches(folder, (TEST_FILE,))
        return TensorImageDataset(*self._test, flip=False)
