"""An FID-style feature extractor that needs no download: a small CNN trained on a *public* set.

Inception weights cannot be fetched offline. A classifier of the public glyphs (digits and letters
rendered from bundled fonts) gives features in which a Fréchet distance still ranks generators, but
its values are NOT comparable to Inception FID: label them so (e.g. metric name ``fid_glyph``, logged as ``test/fid_glyph``).
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from dpldm.metrics.downstream import ClassifierFeatures, load_images


def cache_dir() -> str:
    """Where dpldm keeps artifacts derived from public data only (``$DPLDM_CACHE``, default ~/.cache/dpldm)."""
    return os.environ.get("DPLDM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dpldm"))


class GlyphClassifierFeatures(nn.Module):
    """Penultimate features of a small CNN trained on the public glyphs; trained on first use and
    saved to ``path`` (later runs load it).

    Args:
        path: the classifier file (written once); default: one per setting under :func:`cache_dir`.
        image_size: glyph side, = the images scored.
        num_train: glyphs to train on.
        epochs: training epochs.
        seed: glyph rendering and training seed.
    """

    def __init__(self, path: str | None = None, image_size: int = 32, num_train: int = 10_000, epochs: int = 4,
                 seed: int = 0):
        super().__init__()
        path = path or os.path.join(cache_dir(), f"glyph-classifier-{image_size}px-{num_train}-{epochs}ep-{seed}.pt")
        self.path, self.image_size, self.num_train, self.epochs, self.seed = path, image_size, num_train, epochs, seed
        self._features: ClassifierFeatures | None = None

    def extractor(self) -> ClassifierFeatures:
        """The trained extractor (loaded, or trained on the public glyphs and saved)."""
        if self._features is None:
            if os.path.isfile(self.path):
                self._features = ClassifierFeatures.load(self.path)
            else:
                from dpldm.datamodules import GlyphsDataModule

                glyphs = GlyphsDataModule(image_size=self.image_size, num_train=self.num_train, seed=self.seed)
                images, labels = load_images(glyphs.cache_dataset())
                self._features = ClassifierFeatures.fit(images, labels, glyphs.num_classes, epochs=self.epochs,
                                                        seed=self.seed)
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self._features.save(self.path)
        return self._features

    def forward(self, images: Tensor) -> Tensor:  # [B, 1, S, S] in [-1, 1] -> [B, D]
        return self.extractor()(images)
