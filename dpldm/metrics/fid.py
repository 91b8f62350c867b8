"""Fréchet Inception Distance (Heusel et al., 2017), computed the clean-fid way (Parmar et al., CVPR 2022).

Mode ``clean``: every image is quantised to 8 bits (as if saved to PNG), resized to 299 x 299 with PIL's
bicubic filter on float channels, and embedded by clean-fid's Inception-v3 torchscript model (2048-d pool
features). Statistics are Gaussians ``(mu, sigma)`` of the features; FID is clean-fid's Fréchet distance
``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)``. Any other ``extractor`` (tests, offline use) plugs in the
same way, but its numbers are not comparable with published FIDs.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dpldm.errors import ConfigError
from dpldm.utils.images import load_image

T = TypeVar("T")
INCEPTION_DIR = "./" if platform.system() == "Windows" else "/tmp"  # where cleanfid.features looks
INCEPTION_FILE = "inception-2015-12-05.pt"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
OWN_STATS = ("set `reference_dir` to a folder of real images, leave `reference` unset so the real images of the "
             "DataModule are used, or set `stats_path` to an .npz written by FeatureStats.save")


class InceptionUnavailableError(OSError):
    """clean-fid's Inception-v3 weights are neither on disk nor downloadable."""


class ReferenceStatsUnavailableError(OSError):
    """clean-fid's precomputed reference statistics are neither on disk nor downloadable."""


class FeatureExtractor(Protocol):
    """Interface: images [B, C, H, W] in [-1, 1] -> float features [B, D]. Any ``nn.Module`` or function fits."""

    def __call__(self, images: Tensor) -> Tensor: ...


def _fetch(fetch: Callable[[], T], path: str, timeout: float) -> T:
    """Run a clean-fid download with a socket timeout; remove a partial ``path`` if it fails."""
    existed, old = os.path.exists(path), socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # clean-fid's urlopen has none: a silent firewall would hang forever
    try:
        return fetch()
    except BaseException:
        if not existed and os.path.exists(path):
            with contextlib.suppress(OSError):
                os.remove(path)  # a truncated file would be taken for the real one next time
        raise
    finally:
        socket.setdefaulttimeout(old)


class InceptionFeatures:
    """clean-fid's Inception-v3 pool features [B, 2048] behind its ``clean`` resize.

    Args:
        device: where the network runs.
        weights_dir: folder holding ``inception-2015-12-05.pt`` (clean-fid's own: ``/tmp``, ``./`` on Windows).
        timeout: seconds a download may stall before it fails.

    Raises:
        InceptionUnavailableError: the weights are not in ``weights_dir`` and could not be downloaded.
    """

    dim = 2048

    def __init__(self, device: str = "cpu", weights_dir: str = INCEPTION_DIR, timeout: float = 5.0):
        from cleanfid.downloads_helper import check_download_inception, inception_url
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import make_resizer

        path = os.path.abspath(os.path.join(weights_dir, INCEPTION_FILE))
        try:
            _fetch(lambda: check_download_inception(fpath=weights_dir), path, timeout)
            self.model = InceptionV3W(weights_dir, download=False, resize_inside=False).to(device).eval()
        except (OSError, RuntimeError) as err:  # URLError, timeouts, unwritable folder; a corrupt file
            reason = ("exists but could not be loaded (a truncated download? delete it)" if os.path.exists(path)
                      else f"is missing and could not be downloaded from {inception_url} (offline?)")
            raise InceptionUnavailableError(
                f"clean-fid's Inception-v3 weights {path} {reason}. Download {inception_url} on a machine with "
                f"internet and copy it to {path} (clean-fid looks for {INCEPTION_FILE} in {INCEPTION_DIR}), "
                f"or pass your own `extractor` to FID (tests, offline use; its values are then not comparable "
                f"with published FIDs). Original error: {type(err).__name__}: {err}") from err
        self.device = torch.device(device)
        self.resize = make_resizer("PIL", False, "bicubic", (299, 299))  # clean-fid's `clean` mode

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:  # [B, C, H, W] in [-1, 1] -> [B, 2048]
        x = images.detach().float().cpu().clamp(-1, 1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey -> RGB, as PIL's convert("RGB")
        pixels = ((x + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)  # [B, H, W, 3], 8-bit
        resized = np.stack([self.resize(p) for p in pixels])  # [B, 299, 299, 3] float32 in [0, 255]
        batch = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)  # [B, 3, 299, 299]
        return self.model(batch).float().cpu()


@dataclass
class FeatureStats:
    """A Gaussian fit of features: ``mu`` [D], ``sigma`` [D, D] (float64), from ``count`` samples (0: unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int = 0

    @classmethod
    def from_features(cls, feats: Tensor | np.ndarray) -> FeatureStats:
        """Mean and (unbiased) covariance of features [N, D]; warns when N < D (rank-deficient covariance)."""
        f = feats.detach().cpu().double().numpy() if isinstance(feats, Tensor) else np.asarray(feats, np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
        n, d = f.shape
        if n < d:
            warnings.warn(f"FID statistics from N = {n} samples of D = {d}-dim features: the covariance is "
                          f"rank-deficient (N < D), so FID is biased upwards; use more than {d} samples",
                          stacklevel=2)
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), n)

    def save(self, path: str) -> str:
        """Write ``mu``, ``sigma``, ``count`` to an .npz at exactly ``path``; returns the path."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
            np.savez(f, mu=self.mu, sigma=self.sigma, count=self.count)
        return path

    @classmethod
    def load(cls, path: str) -> FeatureStats:
        """Read an .npz with ``mu`` and ``sigma`` (ours, or clean-fid's)."""
        with np.load(path) as z:
            count = int(z["count"]) if "count" in z else 0
            return cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), count)


def _module_device(extractor: FeatureExtractor) -> torch.device | None:
    param = next(extractor.parameters(), None) if isinstance(extractor, nn.Module) else None
    return None if param is None else param.device


def features_of(images: Tensor | Iterable, extractor: FeatureExtractor, batch_size: int = 64) -> np.ndarray:
    """Features [N, D] (float64) of images [N, C, H, W], or of an iterable of batches (tensors, or dicts
    with an ``"image"`` entry, e.g. a DataLoader), all in [-1, 1]."""
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    device, feats = _module_device(extractor), []
    with torch.no_grad():
        for batch in batches:
            batch = batch["image"] if isinstance(batch, dict) else batch
            batch = batch if device is None else batch.to(device)
            feats.append(torch.as_tensor(extractor(batch)).detach().float().cpu().reshape(len(batch), -1))
    if not feats:
        raise ValueError("no images to compute features of")
    return torch.cat(feats).double().numpy()  # [N, D]


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """clean-fid's Fréchet distance between two Gaussians."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"statistics of {a.mu.shape[0]}-dim and {b.mu.shape[0]}-dim features do not compare "
                         f"(computed with different extractors? delete the stale `stats_path` file)")
    mu1, s1, mu2, s2 = a.mu, np.atleast_2d(a.sigma), b.mu, np.atleast_2d(b.sigma)
    if mu1.shape[0] == 1:  # scipy's sqrtm(disp=False) returns no error estimate for 1 x 1 matrices: add a
        mu1, mu2 = np.append(mu1, 0.0), np.append(mu2, 0.0)  # dimension equal in both (it adds exactly 0)
        s1, s2 = np.diag([s1[0, 0], 1.0]), np.diag([s2[0, 0], 1.0])
    with warnings.catch_warnings():  # clean-fid passes scipy's deprecated `disp` (hence scipy < 1.18)
        warnings.filterwarnings("ignore", "The `disp` argument is deprecated", DeprecationWarning)
        return float(cleanfid_frechet(mu1, s1, mu2, s2))


def named_reference_stats(name: str, split: str = "train", resolution: int = 32,
                          timeout: float = 5.0) -> FeatureStats:
    """clean-fid's precomputed Inception statistics of a dataset (mode ``clean``), e.g. ``cifar10``.

    Raises:
        ConfigError: clean-fid has no statistics for this name / split / resolution (HTTP 404).
        ReferenceStatsUnavailableError: they are not cached and could not be downloaded.
    """
    import urllib.error

    import cleanfid
    from cleanfid.features import get_reference_statistics

    res = "na" if split == "custom" else resolution
    path = os.path.join(os.path.dirname(cleanfid.__file__), "stats", f"{name}_clean_{split}_{res}.npz".lower())
    url = f"https://www.cs.cmu.edu/~clean-fid/stats/{os.path.basename(path)}"
    try:
        mu, sigma = _fetch(lambda: get_reference_statistics(name, resolution, mode="clean", split=split), path,
                           timeout)
    except urllib.error.HTTPError as err:
        if err.code != 404:
            raise ReferenceStatsUnavailableError(f"Could not download {url}: {err}; {OWN_STATS}") from err
        raise ConfigError("reference", name, f"clean-fid has no statistics for split {split!r} at resolution "
                          f"{resolution} ({url} not found): check reference / reference_split / "
                          f"reference_resolution (e.g. cifar10, train or test, 32), or {OWN_STATS}") from err
    except OSError as err:
        raise ReferenceStatsUnavailableError(
            f"clean-fid's FID statistics for {name!r} (split {split!r}, resolution {resolution}) are not in "
            f"{path} and could not be downloaded from {url} (offline?). Download the file on a machine with "
            f"internet and copy it there, or {OWN_STATS}. Original error: {type(err).__name__}: {err}") from err
    return FeatureStats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64))


def _image_files(path: str) -> list[str]:
    """The image files under ``path`` (recursively, sorted); ConfigError naming ``reference_dir`` if none."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ConfigError("reference_dir", path, f"has no image files ({', '.join(IMAGE_EXTENSIONS)}): point it at "
                          f"a folder of real images")
    return files


def folder_images(path: str, image_size: int, channels: int, batch_size: int = 64) -> Iterator[Tensor]:
    """Batches [B, C, S, S] in [-1, 1] of the images of a folder: shorter side resized to S (bicubic), centre
    cropped, ``x / 127.5 - 1``. Raises ConfigError naming ``reference_dir`` at once when it has no images."""
    if channels not in (1, 3):
        raise ConfigError("channels", channels, "must be 1 (grey) or 3 (RGB)")
    files, mode = _image_files(path), "L" if channels == 1 else "RGB"

    def batches() -> Iterator[Tensor]:
        for i in range(0, len(files), batch_size):
            yield torch.stack([load_image(f, image_size, mode) for f in files[i:i + batch_size]])

    return batches()


class FID:
    """FID of generated images against reference statistics, as the callbacks use it.

    Reference statistics come from, in order: ``stats_path`` if that file exists; clean-fid's precomputed
    ``reference`` (only with the default Inception extractor); the images of ``reference_dir``; the real
    images the caller passes (e.g. a DataModule's test split). Computed statistics are kept in memory and
    written to ``stats_path`` when set.

    Args:
        extractor: images -> features; default: :class:`InceptionFeatures`, built on first use.
        reference: a clean-fid dataset name (e.g. ``cifar10``).
        reference_split: its split (``train``, ``test``, ...).
        reference_resolution: its resolution.
        reference_dir: a folder of real images (png/jpg).
        stats_path: an .npz of reference statistics, read if it exists, else written once computed.
        batch_size: images per extractor call.
        image_size: side the ``reference_dir`` images are read at (set it to the generated images' side);
            default: the shorter side of the folder's first image.
        channels: channels the ``reference_dir`` images are read with (1 or 3).
    """

    def __init__(self, extractor: FeatureExtractor | None = None, reference: str | None = None,
                 reference_split: str = "train", reference_resolution: int = 32, reference_dir: str | None = None,
                 stats_path: str | None = None, batch_size: int = 64, image_size: int | None = None,
                 channels: int = 3):
        if reference is not None and extractor is not None:
            raise ConfigError("reference", reference, "clean-fid's statistics are of Inception features and would "
                              "not match a custom `extractor`: use `reference_dir` or `stats_path` with it")
        if batch_size < 1:
            raise ConfigError("batch_size", batch_size, "must be >= 1")
        self.extractor, self.reference, self.reference_dir = extractor, reference, reference_dir
        self.reference_split, self.reference_resolution = reference_split, reference_resolution
        self.stats_path, self.batch_size, self.image_size, self.channels = stats_path, batch_size, image_size, channels
        self._reference: FeatureStats | None = None

    @property
    def features(self) -> FeatureExtractor:
        """The extractor; the default Inception network is built (and maybe downloaded) on first use."""
        if self.extractor is None:
            self.extractor = InceptionFeatures()
        return self.extractor

    def stats(self, images: Tensor | Iterable) -> FeatureStats:
        """Statistics of the features of images [N, C, H, W] in [-1, 1] (or an iterable of batches)."""
        return FeatureStats.from_features(features_of(images, self.features, self.batch_size))

    def needs_images(self) -> bool:
        """Whether :meth:`reference_stats` needs real images from the caller (nothing else is set or cached)."""
        return (self._reference is None and self.reference is None and self.reference_dir is None
                and not (self.stats_path is not None and os.path.isfile(self.stats_path)))

    def reference_stats(self, images: Tensor | Iterable | None = None) -> FeatureStats:
        """The reference statistics (see the class docstring for their source).

        Args:
            images: real images [N, C, H, W] in [-1, 1] or batches of them, used when nothing else is set.
        """
        if self._reference is not None:
            return self._reference
        if self.stats_path is not None and os.path.isfile(self.stats_path):
            self._reference = FeatureStats.load(self.stats_path)
        elif self.reference is not None:
            self._reference = named_reference_stats(self.reference, self.reference_split, self.reference_resolution)
        else:
            if self.reference_dir is not None:
                size = self.image_size
                if size is None:
                    with Image.open(_image_files(self.reference_dir)[0]) as first:
                        size = min(first.size)
                images = folder_images(self.reference_dir, size, self.channels, self.batch_size)
            elif images is None:
                raise ConfigError("reference", None, "no reference statistics: set `reference` (a clean-fid dataset, "
                                  "e.g. cifar10), `reference_dir` (a folder of real images) or `stats_path` (an "
                                  ".npz from FeatureStats.save), or give real images")
            self._reference = self.stats(images)
            if self.stats_path is not None:
                self._reference.save(self.stats_path)
        return self._reference

    def __call__(self, images: Tensor | Iterable, reference: FeatureStats) -> float:
        """FID of generated images [N, C, H, W] in [-1, 1] against reference statistics."""
        return frechet_distance(self.stats(images), reference)
