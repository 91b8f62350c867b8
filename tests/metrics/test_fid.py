"""FID the clean-fid way: statistics, Fréchet distance, reference sources, offline errors (no network)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dpldm.errors import ConfigError
from dpldm.metrics import (
    FID,
    FeatureStats,
    InceptionFeatures,
    InceptionUnavailableError,
    ReferenceStatsUnavailableError,
    features_of,
    folder_images,
    frechet_distance,
    named_reference_stats,
)
from dpldm.metrics.fid import INCEPTION_DIR, INCEPTION_FILE


class TinyExtractor(nn.Module):
    """A fixed random conv, |.|, global average pooling: images -> 16 features."""

    def __init__(self, channels: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, 16, 3).requires_grad_(False)

    def forward(self, x):  # [B, C, H, W] -> [B, 16]
        return self.conv(x).abs().mean(dim=(2, 3))


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 3, 16, 16] in [-1, 1]: upsampled 4x4 noise, so added noise changes the features."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 1.6 - 0.8
    return nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def images():
    return smooth_images(400)


def random_stats(d: int, rng: np.random.Generator) -> FeatureStats:
    a = rng.normal(size=(d, d))
    return FeatureStats(rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d), 100)


def test_fid_is_zero_against_itself_and_grows_with_noise(images):
    fid = FID(extractor=TinyExtractor(), batch_size=128)
    ref = fid.reference_stats(images)
    assert ref.count == 400 and ref.mu.shape == (16,) and ref.sigma.shape == (16, 16)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=g)
    levels = [fid(images + s * noise, ref) for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(levels, levels[1:])), levels
    assert abs(fid(images, ref)) < 1e-3 * levels[0]
    assert abs(fid(images, ref)) < 1e-6 * np.trace(ref.sigma)


def test_frechet_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = random_stats(5, rng), random_stats(5, rng)
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix: eigenvalues only.
    w, v = np.linalg.eigh(a.sigma)
    half = v @ np.diag(np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(half @ b.sigma @ half), 0, None)).sum()
    expected = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # 1-D closed form: (m1 - m2)^2 + (s1 - s2)^2
    one = FeatureStats(np.array([1.0]), np.array([[4.0]])), FeatureStats(np.array([3.0]), np.array([[9.0]]))
    assert frechet_distance(*one) == pytest.approx(4.0 + 1.0)
    with pytest.raises(ValueError, match="different extractors"):
        frechet_distance(a, random_stats(4, rng))


def test_feature_stats_save_load_round_trip_and_small_sample_warning(tmp_path):
    stats = random_stats(6, np.random.default_rng(1))
    path = str(tmp_path / "sub" / "ref.stats")  # no .npz suffix: written at exactly this path
    assert stats.save(path) == path
    back = FeatureStats.load(path)
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma) and back.count == 100
    with pytest.warns(UserWarning, match=r"N = 8 .*D = 16"):
        FeatureStats.from_features(torch.randn(8, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FeatureStats.from_features(np.random.default_rng(0).normal(size=(32, 16)))


def test_features_of_batches_tensors_and_dict_batches(images):
    ext = TinyExtractor()
    whole = features_of(images[:50], ext, batch_size=16)
    assert whole.shape == (50, 16) and whole.dtype == np.float64
    loader = [{"image": images[i:min(i + 20, 50)], "label": torch.zeros(20)} for i in range(0, 50, 20)]
    assert np.allclose(features_of(loader, ext), whole, atol=1e-6)
    assert np.allclose(features_of([images[:25], images[25:50]], ext), whole, atol=1e-6)


def test_reference_stats_priority(images, tmp_path):
    ext, path = TinyExtractor(), str(tmp_path / "ref.npz")
    computed = FID(extractor=ext, stats_path=path).reference_stats(images[:100])  # no file yet: computed, saved
    expected = FeatureStats.from_features(features_of(images[:100], ext))
    assert np.allclose(computed.mu, expected.mu) and np.allclose(computed.sigma, expected.sigma)
    assert np.allclose(FeatureStats.load(path).mu, expected.mu)
    stored = random_stats(16, np.random.default_rng(2))
    stored.save(path)
    fid = FID(extractor=ext, stats_path=path)  # the file exists: it wins over the images
    assert np.array_equal(fid.reference_stats(images[:100]).mu, stored.mu)
    assert fid.reference_stats() is fid.reference_stats()  # cached in memory
    with pytest.raises(ConfigError, match="reference.*extractor"):
        FID(extractor=ext, reference="cifar10")
    with pytest.raises(ConfigError, match="reference"):
        FID(extractor=ext).reference_stats()
    assert FID().extractor is None  # the Inception network is only built on first use


def test_folder_images_grey_and_rgb(tmp_path):
    Image.new("L", (20, 12), 255).save(tmp_path / "white.png")
    Image.new("RGB", (16, 16), (0, 0, 0)).save(tmp_path / "black.png")
    Image.new("RGB", (10, 14), (255, 0, 0)).save(tmp_path / "red.jpg", quality=100)
    (tmp_path / "notes.txt").write_text("not an image")
    batches = list(folder_images(str(tmp_path), image_size=8, channels=3, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    black, red, white = torch.cat(batches)  # sorted file names
    assert torch.equal(black, -torch.ones(3, 8, 8)) and torch.equal(white, torch.ones(3, 8, 8))
    assert red[0].min() > 0.95 and red[1:].max() < -0.95
    grey = torch.cat(list(folder_images(str(tmp_path), image_size=6, channels=1)))
    assert grey.shape == (3, 1, 6, 6) and grey.min() >= -1 and grey.max() <= 1
    # reference_dir feeds FID's reference (size: the first image's shorter side) and beats given images
    with pytest.warns(UserWarning, match="N = 3"):
        stats = FID(extractor=TinyExtractor(), reference_dir=str(tmp_path)).reference_stats(torch.zeros(5, 3, 8, 8))
    assert stats.count == 3


def test_empty_folder_names_reference_dir(tmp_path):
    with pytest.raises(ConfigError, match="reference_dir"):
        folder_images(str(tmp_path), image_size=8, channels=3)  # at once, not on the first batch


def _offline(*args, **kwargs):
    raise urllib.error.URLError("no network (test)")


def test_inception_offline_error_is_fast_and_actionable(tmp_path, monkeypatch):
    from cleanfid.downloads_helper import inception_url

    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    start = time.monotonic()
    with pytest.raises(InceptionUnavailableError) as info:
        InceptionFeatures(weights_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    message = str(info.value)
    for part in (inception_url, str(tmp_path / INCEPTION_FILE), INCEPTION_DIR, "offline", "`extractor`"):
        assert part in message
    assert isinstance(info.value, OSError) and not (tmp_path / INCEPTION_FILE).exists()
    (tmp_path / INCEPTION_FILE).write_bytes(b"truncated")
    with pytest.raises(InceptionUnavailableError, match="truncated"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in torch 2.14
        InceptionFeatures(weights_dir=str(tmp_path))


def test_named_reference_stats_offline_and_unknown(tmp_path, monkeypatch):
    import cleanfid

    monkeypatch.setattr(cleanfid, "__file__", str(tmp_path / "cleanfid" / "__init__.py"))  # no cached stats
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    with pytest.raises(ReferenceStatsUnavailableError, match=r"'cifar10' \(split 'test'.*reference_dir.*stats_path"):
        named_reference_stats("cifar10", split="test")

    def not_found(url, *args, **kwargs):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", not_found)
    with pytest.raises(ConfigError, match="reference = 'cifar11'.*reference_split"):
        named_reference_stats("cifar11")
    np.savez(tmp_path / "cleanfid" / "stats" / "cifar10_clean_train_32.npz", mu=np.zeros(3), sigma=np.eye(3))
    stats = FID(reference="cifar10").reference_stats()  # found locally: no download
    assert np.array_equal(stats.sigma, np.eye(3))


def test_inception_input_matches_clean_fid_on_saved_pngs(tmp_path, monkeypatch):
    """In-memory images reach the network exactly as clean-fid's folder pipeline feeds their PNGs."""
    import cleanfid.downloads_helper
    import cleanfid.inception_torchscript
    from cleanfid.utils import ResizeDataset

    class Recorder(nn.Module):  # stands in for the torchscript Inception: records its input
        def __init__(self, *args, **kwargs):
            super().__init__()
            self.inputs = []

        def forward(self, x):
            self.inputs.append(x)
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", lambda fpath: fpath)
    monkeypatch.setattr(cleanfid.inception_torchscript, "InceptionV3W", Recorder)
    ext = InceptionFeatures(weights_dir=str(tmp_path))
    g = torch.Generator().manual_seed(0)
    rgb, grey = torch.rand(2, 3, 20, 20, generator=g) * 2 - 1, torch.rand(1, 1, 20, 20, generator=g) * 2 - 1
    assert ext(rgb).shape == (2, 2048) and ext(grey).shape == (1, 2048)
    files = []
    for i, img in enumerate([*rgb, *grey]):
        pixels = ((img + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(pixels).save(files[-1])
    reference = torch.stack([ResizeDataset(files, mode="clean")[i] for i in range(3)])  # [3, 3, 299, 299]
    ours = torch.cat(ext.model.inputs)
    assert ours.shape == (3, 3, 299, 299) and torch.allclose(ours, reference, atol=1e-4)
