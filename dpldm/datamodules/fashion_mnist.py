"""Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test 28x28 grey images of 10 clothing classes.

On Debian-based machines ``apt-get install dataset-fashion-mnist`` puts the idx files in
``/usr/share/datasets/fashion-mnist/``; elsewhere torchvision downloads them (``download: true``).
"""

from __future__ import annotations

from dpldm.datamodules.idx import IdxDataModule
from dpldm.errors import ConfigError

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"


class FashionMNISTDataModule(IdxDataModule):
    """Fashion-MNIST (arguments of :class:`~dpldm.datamodules.idx.IdxDataModule`, and):

    Args:
        download: fetch the files with torchvision into ``root`` when they are missing.
    """

    torchvision_name = "FashionMNIST"

    def __init__(self, root: str = DEBIAN_ROOT, image_size: int = 32, val_size: int = 0, download: bool = False,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__(root, image_size, val_size, batch_size, num_workers, seed)
        self.download = download
        missing = self.missing_files()
        if missing and not download:
            raise ConfigError("data.init_args.root", self.root,
                              f"has no Fashion-MNIST idx files ({', '.join(missing)}); on Debian/Ubuntu: "
                              "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), "
                              "or set data.init_args.download: true to fetch them with torchvision")

    def prepare_data(self) -> None:
        if self.download and self.missing_files():
            self.torchvision_download()
