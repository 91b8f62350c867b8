"""What the data tests share: IDX files (MNIST's format) written from arrays."""

import gzip

import numpy as np

from dpldm.datamodules.mnist import LABEL_COUNTS


def write_idx(path, array, compress):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(str(path) + (".gz" if compress else ""), "wb") as f:
        f.write(data)


def write_mnist(folder, side=4, counts=None):
    """The four IDX files with MNIST's label counts (tiny images: the reader takes any side)."""
    rng = np.random.default_rng(0)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        labels = np.repeat(np.arange(10), LABEL_COUNTS[split] if counts is None else counts)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (len(labels), side, side)), False)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, False)
    return folder
