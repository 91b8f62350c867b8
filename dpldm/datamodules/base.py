"""Shared base class for the image data modules and a small in-memory dataset.

Every data module yields map-style datasets whose items are dicts
``{"image": FloatTensor[C, H, W] in [-1, 1], "label": int}``. Intensities are mapped to
``[-1, 1]`` with fixed constants only (``/255``, ``/16``): a scale computed from the data
(mean/std normalisation) would itself leak information about the private set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from dpldm.errors import ConfigError

SPLITS = ("train", "val", "test")

# Which splits each Lightning stage needs; ``None`` (a manual ``setup()``) builds all of them.
_STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: SPLITS,
}


class TensorImageDataset(Dataset):
    """Images held as one tensor in memory, returned as ``{"image", "label"}`` dicts.

    Args:
        images: ``(N, C, H, W)`` tensor; ``uint8`` in ``0..255`` (mapped to ``[-1, 1]`` per item
            by the fixed affine map ``x / 127.5 - 1``) or floating point already in ``[-1, 1]``.
        labels: ``(N,)`` integer tensor of class indices.
        flip: flip each image horizontally with probability 1/2 (training augmentation). The
            coin comes from torch's global RNG, which Lightning seeds per worker.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flip: bool = False):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.flip = images, labels.long(), flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        # Fixed-constant scaling only: uint8 0..255 -> [-1, 1]; float tensors are stored scaled.
        image = self.images[index]
        if image.dtype == torch.uint8:
            image = image.float() / 127.5 - 1.0
        # Random horizontal flip (width is the last axis).
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, "label": int(self.labels[index])}


class ImageDataModule(pl.LightningDataModule):
    """Base class: validates loader settings, builds splits lazily and serves loaders.

    Subclasses set the class attributes ``num_classes``, ``channels`` and ``image_size``
    (``image_size`` may be overridden per instance) and implement :meth:`_build`.

    Args:
        batch_size: examples per batch (>= 1). Under DP-SGD this is the expected batch size.
        num_workers: DataLoader worker processes (>= 0); 0 loads in the main process.
        seed: seed for the fixed train/val/test split (where a module draws one), for
            procedurally generated data, and for the training loader's shuffle order.
    """

    num_classes: int = 0
    channels: int = 0
    image_size: int = 0
    # Public data (pretraining sets) may be fit without DP; anything else is private by default, and a fit on it
    # without DP-SGD is refused unless the model declares allow_non_private (dpldm.privacy.check_private_data).
    public: bool = False
    # Set by a DP model before training: who builds the training loader from the training set and the number of
    # workers (the DP engine: Poisson sampling at the accounted q, dpldm.privacy.DPSGDEngine.train_loader).
    # None: shuffled batches.
    train_loader_factory: Optional[Callable[[Dataset, int], DataLoader]] = None

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__()
        # Reject bad loader settings before any data is touched.
        if batch_size < 1:
            raise ConfigError("data.init_args.batch_size", batch_size, "must be >= 1")
        if num_workers < 0:
            raise ConfigError("data.init_args.num_workers", num_workers, "must be >= 0")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None
        self.test_dataset: Optional[Dataset] = None

    def _build(self, split: str) -> Dataset:
        """Build the dataset of one split (``"train"``, ``"val"`` or ``"test"``).

        Args:
            split: which split to build.
        """
        raise NotImplementedError

    def _ensure(self, split: str) -> Dataset:
        """Return the dataset of ``split``, building it on first use (idempotent).

        Args:
            split: which split to return.
        """
        attr = f"{split}_dataset"
        if getattr(self, attr) is None:
            setattr(self, attr, self._build(split))
        return getattr(self, attr)

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets the stage needs; datasets built earlier are kept.

        Args:
            stage: Lightning stage (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``) or
                ``None`` for all splits.
        """
        for split in _STAGE_SPLITS.get(stage, SPLITS):
            self._ensure(split)

    @property
    def num_train_samples(self) -> int:
        """Number of training examples (builds the training split if needed)."""
        return len(self._ensure("train"))

    def cache_dataset(self) -> Dataset:
        """The training split without random augmentation, in a fixed order: what a latent cache
        (:class:`dpldm.datamodules.LatentCacheDataModule`) encodes; flips become cached views."""
        dataset = self._ensure("train")
        if isinstance(dataset, TensorImageDataset) and dataset.flip:
            return TensorImageDataset(dataset.images, dataset.labels, flip=False)
        return dataset

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """Wrap ``dataset`` in a DataLoader with this module's settings.

        Args:
            dataset: the split to serve.
            shuffle: reshuffle every epoch (training only), from a generator seeded by ``seed``.
        """
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the training split; in DP stages the one ``train_loader_factory`` builds."""
        if self.train_loader_factory is not None:
            return self.train_loader_factory(self._ensure("train"), self.num_workers)
        return self._loader(self._ensure("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader over the validation split, in order."""
        return self._loader(self._ensure("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader over the test split, in order."""
        return self._loader(self._ensure("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """``dpldm predict``: the test split's conditions, in order (a synthetic copy of the test set)."""
        return self.test_dataloader()
