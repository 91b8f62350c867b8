import json

import open_clip
import pytest
import torch

from dpldm.modules import ClassEmbedder, OpenCLIPTextEncoder
from tests.conftest import write_tiny_clip


def test_class_embedder_tokens_and_null_class():
    emb = ClassEmbedder(num_classes=3, embed_dim=8, num_tokens=4)
    labels = torch.tensor([0, 2, 1])
    assert emb(labels).shape == (3, 4, 8)
    dropped = emb.drop(labels, torch.tensor([True, False, True]))
    assert dropped.tolist() == [3, 2, 3]  # index num_classes is the null class
    assert emb.null(2).tolist() == [3, 3]
    # the null class has its own learned embedding, distinct from every real class
    table = emb(torch.arange(4))
    assert all(not torch.equal(table[3], table[i]) for i in range(3))


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    """A tiny open_clip architecture registered from a JSON config (random weights, no download)."""
    open_clip.add_model_config(write_tiny_clip(tmp_path_factory.mktemp("clip"), "dpldm-tiny-clip"))
    return "dpldm-tiny-clip"


def test_text_encoder_is_frozen_and_returns_tokens(tiny_clip_name):
    enc = OpenCLIPTextEncoder(tiny_clip_name, pretrained=None)
    assert enc.embed_dim == 24 and enc.trainable_modules() == []
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not any(m.training for m in enc.frozen_modules())
    out = enc(["a red car", "a dog"])
    assert out.shape == (2, 77, 24)
    assert not torch.allclose(out[0], out[1])
    assert enc.drop(["a", "b"], torch.tensor([True, False])) == ["", "b"]
    assert enc.null(2) == ["", ""]


def test_text_projection_is_the_only_trainable_part_and_takes_cached_features(tiny_clip_name):
    torch.manual_seed(0)
    enc = OpenCLIPTextEncoder(tiny_clip_name, pretrained=None, projection_dim=16)
    assert enc.embed_dim == 16 and enc.trainable_modules() == [enc.projection]
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == {"projection.weight", "projection.bias"}
    enc.train()
    assert enc.projection.training and not enc.transformer.training
    captions = ["a red car", "a dog"]
    feats = enc.frozen_features(captions)  # what a latent cache stores, [B, T, 24]
    assert feats.shape == (2, 77, 24)
    assert torch.allclose(enc(feats), enc(captions))  # cached features and captions give the same tokens
    assert enc.select({"caption": captions, "text_features": feats}) is feats
    assert enc.select({"caption": captions}) is captions
    dropped = enc.drop(feats, torch.tensor([True, False]))  # the null caption, as features
    assert torch.allclose(dropped[0], enc.frozen_features([""])[0]) and torch.equal(dropped[1], feats[1])
    enc(feats).sum().backward()
    assert enc.projection.weight.grad is not None and enc.token_embedding.weight.grad is None


def test_text_encoder_from_a_json_architecture_file(tmp_path):
    cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
           "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    path = tmp_path / "my-tiny-text.json"
    path.write_text(json.dumps(cfg))
    enc = OpenCLIPTextEncoder(str(path), pretrained=None)
    assert enc.model_name == "my-tiny-text" and enc(["hello"]).shape == (1, 12, 16)
    with pytest.raises(FileNotFoundError, match="model_name"):
        OpenCLIPTextEncoder(str(tmp_path / "missing.json"), pretrained=None)


def test_text_encoder_missing_checkpoint_names_the_key(tiny_clip_name, tmp_path):
    with pytest.raises(FileNotFoundError, match="conditioner.init_args.checkpoint"):
        OpenCLIPTextEncoder(tiny_clip_name, checkpoint=str(tmp_path / "missing.pt"))


def test_class_embedder_starts_from_public_classes(tmp_path):
    public = ClassEmbedder(num_classes=36, embed_dim=8, num_tokens=2)
    torch.save(public.state_dict(), tmp_path / "conditioner.pt")
    private = ClassEmbedder(num_classes=3, embed_dim=8, num_tokens=2, init_from=str(tmp_path), init_classes=[5, 0, 7])
    w, pw = private.embedding.weight, public.embedding.weight
    assert torch.equal(w[0], pw[5]) and torch.equal(w[1], pw[0]) and torch.equal(w[2], pw[7])
    assert torch.equal(w[3], pw[36])  # null class from the public null class
    with pytest.raises(ValueError, match="do not fit"):
        ClassEmbedder(num_classes=3, embed_dim=4, num_tokens=2, init_from=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="init_from"):
        ClassEmbedder(num_classes=3, embed_dim=8, init_from=str(tmp_path / "missing.pt"))


def test_text_encoder_unavailable_weights_name_the_checkpoint_key(tiny_clip_name):
    with pytest.raises(OSError, match=r"offline\?.*conditioner.init_args.checkpoint"):
        OpenCLIPTextEncoder(tiny_clip_name, pretrained="laion2b_s32b_b79k")
