"""scikit-learn's bundled handwritten digits: the quickstart's *private* dataset.

1797 grey 8x8 images with pixel values 0..16 (ink = high), shipped inside scikit-learn, so
the quickstart runs offline. Images are scaled with the fixed constants ``/16 * 2 - 1``
(bright ink on a dark background) and upsampled to ``image_size`` once, at build time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dpldm.datamodules.base import ImageDataModule, TensorImageDataset
from dpldm.errors import ConfigError


class DigitsDataModule(ImageDataModule):
    """sklearn ``load_digits()`` resized to ``image_size``, split with a fixed seed.

    Args:
        image_size: side of the square output images (bilinear, antialiased resize).
        val_fraction: share of the 1797 images held out for validation.
        test_fraction: share held out for testing; the rest (about 1437) is for training.
        batch_size: examples per batch (>= 1).
        num_workers: DataLoader worker processes (>= 0).
        seed: seed of the split permutation and of the training shuffle.
    """

    num_classes = 10
    channels = 1

    def __init__(
        self,
        image_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        # Validate the geometry and the split fractions up front.
        if image_size < 1:
            raise ConfigError("data.init_args.image_size", image_size, "must be >= 1")
        for field, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"data.init_args.{field}", value, "must be in [0, 1)")
        if val_fraction + test_fraction >= 1.0:
            raise ConfigError(
                "data.init_args.val_fraction",
                val_fraction,
                f"val_fraction + test_fraction (= {val_fraction + test_fraction}) must be < 1",
            )
        self.image_size, self.val_fraction, self.test_fraction = image_size, val_fraction, test_fraction
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._indices: dict[str, torch.Tensor] = {}

    def _load(self) -> None:
        """Load, scale, resize and split all 1797 images once (a few MB in memory)."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Fixed-constant scaling 0..16 -> [-1, 1]; never statistics of the data.
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
        if self.image_size != images.shape[-1]:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False, antialias=True,
            )
        # Bilinear weights are a convex combination, but clamp against rounding anyway.
        self._images = images.clamp_(-1.0, 1.0).contiguous()
        self._labels = torch.as_tensor(digits.target, dtype=torch.long)
        # Seeded permutation: the split depends only on ``seed`` and the fractions.
        n = len(self._labels)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val, n_test = round(n * self.val_fraction), round(n * self.test_fraction)
        self._indices = {
            "val": perm[:n_val],
            "test": perm[n_val : n_val + n_test],
            "train": perm[n_val + n_test :],
        }

    def _build(self, split: str) -> Dataset:
        """Return the in-memory dataset of one split.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
        """
        if self._images is None:
            self._load()
        idx = self._indices[split]
        return TensorImageDataset(self._images[idx], self._labels[idx])
