"""Downstream accuracy ("train on synthetic, test on real") and the classifier feature extractor."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dpldm.datamodules.base import TensorImageDataset
from dpldm.errors import ConfigError
from dpldm.metrics.downstream import (
    ClassifierFeatures, SmallCNN, accuracy, downstream_accuracy, load_images, per_class_accuracy, predict,
    train_classifier,
)

FAST = dict(epochs=4, batch_size=64)


def quadrants(n: int, seed: int, size: int = 16, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes: class k is a bright square in quadrant k of a noisy dark image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = -1 + 0.3 * torch.randn(n, channels, size, size, generator=g)
    h = size // 2
    for k in range(4):
        r, c = divmod(k, 2)
        images[labels == k, :, r * h + 2:r * h + h - 2, c * h + 2:c * h + h - 2] += 1.5
    return images.clamp(-1, 1), labels


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    return quadrants(256, seed=0), quadrants(200, seed=1)


@pytest.fixture(scope="module")
def extractor(data):
    (x, y), _ = data
    return ClassifierFeatures.fit(x, y, num_classes=4, width=8, seed=0, **FAST)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 3)])
def test_small_cnn_shapes_and_no_batchnorm(size, channels):
    model = SmallCNN(channels, num_classes=10, width=8)
    x = torch.randn(2, channels, size, size)
    assert model.features(x).shape == (2, 32)
    assert model(x).shape == (2, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_separable_set_is_learned_and_shuffled_labels_are_not(data):
    (x, y), (xt, yt) = data
    assert downstream_accuracy(x, y, xt, yt, num_classes=4, seed=0, **FAST) > 0.9
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    assert downstream_accuracy(x, shuffled, xt, yt, num_classes=4, seed=0, **FAST) < 0.6


def test_training_is_deterministic_per_seed(data):
    (x, y), (xt, yt) = data
    before = torch.get_rng_state()
    a, b = (train_classifier(x, y, 4, width=8, seed=3, epochs=2) for _ in range(2))
    c = train_classifier(x, y, 4, width=8, seed=4, epochs=2)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert accuracy(a, xt, yt) == accuracy(b, xt, yt)
    assert not a.training


def test_per_class_accuracy_matches_a_brute_force_count(data):
    (x, y), (xt, yt) = data
    model = train_classifier(x, y, 4, width=8, seed=0, epochs=1)  # an imperfect classifier: errors to count
    pred = model(xt).argmax(1)
    brute = [sum(int(p == k) for p, t in zip(pred, yt) if t == k) / int((yt == k).sum()) for k in range(4)]
    assert torch.equal(predict(model, xt, batch_size=7), pred)  # batches that split classes
    got = per_class_accuracy(predict(model, xt), yt, num_classes=4)
    assert got == pytest.approx(brute) and len(set(got)) > 1
    weights = torch.bincount(yt, minlength=4) / len(yt)
    assert float((torch.tensor(got) * weights).sum()) == pytest.approx(accuracy(model, xt, yt))
    missing = per_class_accuracy(pred, yt, num_classes=5)  # a class with no test images: NaN, not 0
    assert missing[:4] == pytest.approx(got) and missing[4] != missing[4]


def test_classifier_features_frozen_and_separating(data, extractor):
    (x, y), (xt, yt) = data
    extractor.train()  # must stay in eval mode
    assert not extractor.training and not extractor.classifier.training
    assert not any(p.requires_grad for p in extractor.parameters())
    f, ft = extractor(x), extractor(xt)
    assert f.shape == (len(x), 32) and f.dtype == torch.float32 and not f.requires_grad
    means = torch.stack([f[y == k].mean(0) for k in range(4)])  # [K, D]
    nearest = torch.cdist(ft, means).argmin(1)
    assert (nearest == yt).float().mean() > 0.9
    assert "NOT comparable to Inception FID" in ClassifierFeatures.__doc__


def test_classifier_features_save_load_round_trip(data, extractor, tmp_path):
    _, (xt, _) = data
    path = tmp_path / "features.pt"
    extractor.save(str(path))
    loaded = ClassifierFeatures.load(str(path))
    assert torch.equal(loaded(xt), extractor(xt))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_shape_and_label_checks(data):
    (x, y), (xt, yt) = data
    with pytest.raises(ConfigError) as info:
        downstream_accuracy(x, y, xt.repeat(1, 3, 1, 1), yt, num_classes=4)
    assert info.value.field == "downstream"
    with pytest.raises(ConfigError):
        downstream_accuracy(x, y, xt[..., :8, :8], yt, num_classes=4)
    with pytest.raises(ValueError, match="at least 2"):
        downstream_accuracy(x, torch.zeros_like(y), xt, yt, num_classes=4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        train_classifier(x, y, num_classes=3)


def test_load_images_from_dataset_and_loader(data):
    (x, y), _ = data
    dataset = TensorImageDataset(x[:50], y[:50])
    images, labels = load_images(dataset)
    assert images.shape == (50, 1, 16, 16) and labels.dtype == torch.int64
    assert torch.equal(images, x[:50]) and torch.equal(labels, y[:50])
    images, labels = load_images(DataLoader(dataset, batch_size=16), max_items=40)
    assert images.shape == (40, 1, 16, 16) and torch.equal(labels, y[:40])
    images, labels = load_images(dataset, max_items=7)
    assert len(images) == len(labels) == 7
