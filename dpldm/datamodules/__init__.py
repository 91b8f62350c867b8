"""Image data modules: items are ``{"image": FloatTensor[C, H, W] in [-1, 1], "label": int}``."""

from dpldm.datamodules.base import ImageDataModule, TensorImageDataset
from dpldm.datamodules.cifar10 import CIFAR10DataModule
from dpldm.datamodules.digits import DigitsDataModule
from dpldm.datamodules.glyphs import GlyphDataset, GlyphsDataModule
from dpldm.datamodules.imagenet32 import ImageNet32DataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "GlyphDataset",
    "GlyphsDataModule",
    "ImageDataModule",
    "ImageNet32DataModule",
    "TensorImageDataset",
]
