"""Fixtures: tiny stand-ins for the CIFAR-10 pickles and the ImageNet32 npz batches."""

from __future__ import annotations

import pickle

import numpy as np
import pytest


def asymmetric_images(n: int, offset: int = 0) -> np.ndarray:
    """``(n, 3072)`` uint8 CHW images: left half bright (200 + k), right half 0.

    The left/right asymmetry makes a horizontal flip visible; ``k`` tells images apart.

    Args:
        n: number of images.
        offset: added to ``k`` so different files hold different images.
    """
    images = np.zeros((n, 3, 32, 32), np.uint8)
    for k in range(n):
        images[k, :, :, :16] = 200 + offset + k
    return images.reshape(n, 3072)


@pytest.fixture
def cifar_root(tmp_path):
    """A root with ``cifar-10-batches-py/``: 5 train batches of 4 images, 1 test batch of 6."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        batch = {b"data": asymmetric_images(4, offset=4 * (i - 1)), b"labels": [(4 * (i - 1) + k) % 10 for k in range(4)]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": asymmetric_images(6), b"labels": [9, 8, 7, 6, 5, 4]}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    return tmp_path


@pytest.fixture
def imagenet_root(tmp_path):
    """A root with 3 train batches of 5 images (labels 1..1000) and a val batch of 4."""
    for i in range(1, 4):
        labels = np.array([1, 1000, 2, 500, 3])
        np.savez(tmp_path / f"train_data_batch_{i}.npz", data=asymmetric_images(5, 10 * i), labels=labels)
    np.savez(tmp_path / "val_data.npz", data=asymmetric_images(4), labels=np.array([1, 2, 3, 1000]))
    return tmp_path
