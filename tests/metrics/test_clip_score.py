"""CLIP score with a tiny random open_clip model built from a JSON architecture (no download)."""

from __future__ import annotations


import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dpldm.metrics import CLIPScore
from tests.conftest import write_tiny_clip

PROMPTS = ["a red car", "a dog", "the digit seven", "a glyph", "an empty room", "two cats"]


@pytest.fixture(scope="module")
def score(tmp_path_factory):
    """CLIPScore of a tiny architecture given as a JSON file (registered under its stem), random weights."""
    path = write_tiny_clip(tmp_path_factory.mktemp("clip"), "dpldm-tiny-clip-score")
    torch.manual_seed(0)
    return CLIPScore(path, pretrained="null", batch_size=4)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(len(PROMPTS), 3, 32, 32, generator=g) * 2 - 1


def manual_cosines(score, images, prompts):
    """Cosine matrix [N_img, N_txt] from the model's own encoders, with OpenAI's mean/std written out."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = score.model.encode_image(((images + 1) / 2 - mean) / std)
        txt = score.model.encode_text(open_clip.get_tokenizer("dpldm-tiny-clip-score")(prompts))
    return F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T


def test_frozen_and_formula_matches_manual_computation(score, images):
    assert not score.model.training and not any(p.requires_grad for p in score.model.parameters())
    expected = 100 * manual_cosines(score, images, PROMPTS).diagonal().clamp(min=0)
    per_pair = score.per_pair(images, PROMPTS)
    assert per_pair.shape == (6,) and torch.allclose(per_pair, expected, atol=1e-4)
    assert score(images, PROMPTS) == pytest.approx(float(expected.mean()), abs=1e-4)


def test_negative_cosines_clamp_to_zero(score, images, monkeypatch):
    # unnormalised fixed embeddings with cosines +0.5 and -0.3
    img = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[0.5, 0.75 ** 0.5], [0.91 ** 0.5, -0.3]]) * 7
    monkeypatch.setattr(score.model, "encode_image", lambda x: img[: len(x)])
    monkeypatch.setattr(score.model, "encode_text", lambda t: txt[: len(t)])
    assert torch.allclose(score.per_pair(images[:2], PROMPTS[:2]), torch.tensor([50.0, 0.0]), atol=1e-4)
    assert score(images[:2], PROMPTS[:2]) == pytest.approx(25.0, abs=1e-4)


def test_each_image_is_scored_with_its_own_prompt(score, images):
    full = 100 * manual_cosines(score, images, PROMPTS).clamp(min=0)  # [image, prompt]
    perm = [2, 0, 5, 1, 3, 4]
    permuted = score.per_pair(images, [PROMPTS[j] for j in perm])
    assert torch.allclose(permuted, full[torch.arange(6), perm], atol=1e-4)
    assert not torch.allclose(permuted, full.diagonal(), atol=1e-2)  # the pairing does change the scores


def test_resize_and_crop_match_open_clip_preprocessing(score):
    """A 48 x 40 image: shorter side -> 32, centre crop, normalised, like open_clip's own transform."""
    g = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.rand(1, 3, 6, 5, generator=g), size=(48, 40), mode="bilinear")  # [0, 1]
    pixels = (smooth * 255).round()
    ours = score.preprocess(pixels / 127.5 - 1)
    transform = open_clip.image_transform(32, is_train=False)  # bicubic, shortest side, centre crop, OpenAI stats
    theirs = transform(Image.fromarray(pixels[0].permute(1, 2, 0).numpy().astype(np.uint8)))[None]
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.01 and (ours - theirs).abs().max() < 0.1


def test_grey_images_and_length_mismatch(score, images):
    grey = images[:, :1]
    assert torch.allclose(score.per_pair(grey, PROMPTS), score.per_pair(grey.expand(-1, 3, -1, -1), PROMPTS))
    with pytest.raises(ValueError, match="6 images but 5 prompts"):
        score.per_pair(images, PROMPTS[:5])


def test_description_checkpoint_and_offline_error(score, images, tmp_path):
    assert score.description == "open_clip dpldm-tiny-clip-score (random weights)"
    path = tmp_path / "tiny.pt"
    torch.save(score.model.state_dict(), path)
    loaded = CLIPScore("dpldm-tiny-clip-score", pretrained="my_tag", checkpoint=str(path))
    assert loaded.description == "open_clip dpldm-tiny-clip-score (my_tag, checkpoint tiny.pt)"
    assert torch.allclose(loaded.per_pair(images, PROMPTS), score.per_pair(images, PROMPTS), atol=1e-5)
    with pytest.raises(OSError, match="`checkpoint` argument of the CLIP score"):
        CLIPScore("dpldm-tiny-clip-score", pretrained="laion2b_s34b_b79k")  # not cached, no network
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        CLIPScore("dpldm-tiny-clip-score", checkpoint=str(tmp_path / "missing.pt"))
