"""An FID-style feature extractor that needs no download: a small CNN trained on a *public* labelled set.

Inception weights cannot be fetched offline. A classifier of a public set (e.g. the glyphs: digits and
letters rendered from bundled fonts, :class:`dpldm.datamodules.GlyphsDataModule`) gives features in which
a Fréchet distance still ranks generators, but its values are NOT comparable to Inception FID: label them
so (e.g. metric name ``fid_glyph``, logged as ``test/fid_glyph``).

The extractor takes its training set as an object (any :class:`LabelledImages`); metrics import no
datamodule. Training it on the private data would put a statistic of that data outside DP (privacy
invariant 4), so a set that does not declare itself public (``public = True``) is refused.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dpldm.errors import ConfigError
from dpldm.metrics.downstream import ClassifierFeatures, load_images


def cache_dir() -> str:
    """Where dpldm keeps artifacts derived from public data only (``$DPLDM_CACHE``, default ~/.cache/dpldm)."""
    return os.environ.get("DPLDM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dpldm"))


@runtime_checkable
class LabelledImages(Protocol):
    """A labelled image set a feature extractor can train on (every dpldm datamodule is one).

    ``public`` must be True (a public pretraining set); ``cache_dataset()`` gives its training split
    without random augmentation, in a fixed order, as ``{"image", "label"}`` items.
    """

    num_classes: int

    def cache_dataset(self) -> Dataset: ...


def data_fingerprint(images: Tensor, labels: Tensor) -> str:
    """A SHA-256 of the training images and labels: the extractor is a function of these (and its seed)."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


class PublicClassifierFeatures(nn.Module):
    """Penultimate features of a small CNN trained on a public labelled set; trained on first use and
    saved to ``path`` (later runs load it, after checking it was trained on the same data).

    Args:
        public: the training set, e.g. ``{class_path: dpldm.datamodules.GlyphsDataModule,
            init_args: {num_train: 10000}}``; must declare ``public = True``.
        path: the classifier file (written once); default: one per training data (its fingerprint),
            epochs and seed under :func:`cache_dir`.
        epochs: training epochs.
        seed: training seed.
    """

    def __init__(self, public: LabelledImages, path: str | None = None, epochs: int = 4, seed: int = 0):
        super().__init__()
        if not getattr(public, "public", False):
            raise ConfigError(
                "extractor.init_args.public", type(public).__name__,
                "must be a public set (`public = True`): a feature extractor trained on private data "
                "puts a statistic of it outside DP")
        if epochs < 1:
            raise ConfigError("extractor.init_args.epochs", epochs, "must be >= 1")
        self.public, self.path, self.epochs, self.seed = public, path, epochs, seed
        self._features: ClassifierFeatures | None = None

    def extractor(self) -> ClassifierFeatures:
        """The trained extractor (loaded, or trained on the public set and saved)."""
        if self._features is None:
            images, labels = load_images(self.public.cache_dataset())
            fingerprint = data_fingerprint(images, labels)
            path = self.path or os.path.join(
                cache_dir(), f"public-classifier-{fingerprint[:16]}-{self.epochs}ep-{self.seed}.pt")
            if os.path.isfile(path):
                self._features = ClassifierFeatures.load(path, expect_data=fingerprint)
            else:
                self._features = ClassifierFeatures.fit(images, labels, self.public.num_classes,
                                                        epochs=self.epochs, seed=self.seed)
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                self._features.save(path, data=fingerprint)
        return self._features

    def forward(self, images: Tensor) -> Tensor:  # [B, 1, S, S] in [-1, 1] -> [B, D]
        return self.extractor()(images)
