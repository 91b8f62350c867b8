"""Image data modules: items are ``{"image": FloatTensor[C, H, W] in [-1, 1], "label": int}``
(``"caption": str`` and ``"key": str`` instead of ``"label"`` for the text-conditional LAION stream)."""

from dpldm.datamodules.base import ImageDataModule, TensorImageDataset
from dpldm.datamodules.cifar10 import CIFAR10DataModule
from dpldm.datamodules.digits import DigitsDataModule
from dpldm.datamodules.fashion_mnist import FashionMNISTDataModule
from dpldm.datamodules.glyphs import GlyphDataset, GlyphsDataModule
from dpldm.datamodules.image_folder import ImageFolderDataModule
from dpldm.datamodules.imagenet32 import ImageNet32DataModule
from dpldm.datamodules.laion import LaionDataModule, WebImageTextDataset
from dpldm.datamodules.latent_cache import LatentCacheDataModule, LatentCacheDataset
from dpldm.datamodules.mnist import MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GlyphDataset",
    "GlyphsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNet32DataModule",
    "LaionDataModule",
    "LatentCacheDataModule",
    "LatentCacheDataset",
    "MNISTDataModule",
    "TensorImageDataset",
    "WebImageTextDataset",
]
