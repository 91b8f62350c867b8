"""PublicClassifierFeatures: trained once on the public set it is given, reloaded only for the same data,
and never trained on a set that is not declared public."""

import pytest
import torch

from dpldm.datamodules.base import TensorImageDataset
from dpldm.errors import ConfigError
from dpldm.metrics import ClassifierFeatures, LabelledImages, PublicClassifierFeatures


class _Set:
    """A tiny labelled set: two classes, bright vs dark 8x8 images."""

    num_classes = 2

    def __init__(self, public: bool = True, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(32) % 2
        images = (labels.float() * 2 - 1).view(-1, 1, 1, 1) * 0.8 + 0.1 * torch.randn(32, 1, 8, 8, generator=g)
        self.public, self.dataset = public, TensorImageDataset(images.clamp(-1, 1), labels)

    def cache_dataset(self):
        return self.dataset


def test_a_private_set_is_refused():
    assert isinstance(_Set(), LabelledImages)
    with pytest.raises(ConfigError, match=r"extractor\.init_args\.public.*must be a public set"):
        PublicClassifierFeatures(_Set(public=False))


def test_trained_once_per_training_data_then_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("DPLDM_CACHE", str(tmp_path))
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    first = PublicClassifierFeatures(_Set(), epochs=1)(images)
    (saved,) = tmp_path.glob("public-classifier-*-1ep-0.pt")

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(ClassifierFeatures, "fit", no_training)
    assert torch.equal(PublicClassifierFeatures(_Set(), epochs=1)(images), first)  # loaded, same features
    with pytest.raises(AssertionError, match="trained again"):  # other data: its own file, so a new training
        PublicClassifierFeatures(_Set(seed=1), epochs=1)(images)
    assert [p.name for p in tmp_path.glob("*.pt")] == [saved.name]


def test_a_file_trained_on_other_data_is_an_error(tmp_path):
    path = str(tmp_path / "features.pt")
    PublicClassifierFeatures(_Set(), path=path, epochs=1).extractor()
    with pytest.raises(ValueError, match="trained on other data"):
        PublicClassifierFeatures(_Set(seed=1), path=path, epochs=1).extractor()
