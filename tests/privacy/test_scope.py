import pytest
import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from dpldm.errors import ConfigError
from dpldm.modules import ClassEmbedder, build_unet
from dpldm.privacy.scope import TrainableScope, attention_blocks, block_resolution, merged_unet
from tests.conftest import TINY_UNET


def _parts():
    torch.manual_seed(0)
    return build_unet(**TINY_UNET), ClassEmbedder(10, embed_dim=16)


def _trained_names(unet, emb):
    return {f"unet.{n}" for n, p in unet.named_parameters() if p.requires_grad} | \
        {f"cond.{n}" for n, p in emb.named_parameters() if p.requires_grad}


def test_attention_scope_is_exactly_the_transformer_blocks_plus_conditioner():
    unet, emb = _parts()
    TrainableScope("attention").apply(unet, emb)
    expected = {f"unet.{n}.{pn}" for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)
                for pn, _ in m.named_parameters()} | {"cond.embedding.weight"}
    assert _trained_names(unet, emb) == expected
    assert any("resnets" in n for n, p in unet.named_parameters() if not p.requires_grad)


def test_blocks_are_counted_input_middle_output():
    unet, _ = _parts()
    names = [n for n, _ in attention_blocks(unet)]
    assert names[0].startswith("down_blocks.0") and names[-1].startswith("up_blocks")
    assert [n for n in names if n.startswith("mid_block")] == ["mid_block.attentions.0"]
    mid = names.index("mid_block.attentions.0")
    assert all(n.startswith("down_blocks") for n in names[:mid])
    assert block_resolution(unet, "down_blocks.1.attentions.0") == 2
    assert block_resolution(unet, "up_blocks.0.attentions.0") == 2  # first up block = lowest resolution


def test_self_and_cross_attention_scopes():
    unet, emb = _parts()
    TrainableScope("cross_attention", conditioner=False).apply(unet, emb)
    names = _trained_names(unet, emb)
    assert names and all(".attn2." in n or ".norm2." in n for n in names)
    unet, emb = _parts()
    TrainableScope("self_attention", conditioner=False).apply(unet, emb)
    names = _trained_names(unet, emb)
    assert names and all(".attn1." in n or ".norm1." in n for n in names)


def test_block_index_and_resolution_selection():
    unet, emb = _parts()
    blocks = attention_blocks(unet)
    TrainableScope("attention", blocks=[0], conditioner=False).apply(unet, emb)
    assert all(n.startswith(f"unet.{blocks[0][0]}.") for n in _trained_names(unet, emb))
    unet, emb = _parts()
    TrainableScope("attention", resolutions=[2], conditioner=False).apply(unet, emb)
    names = _trained_names(unet, emb)
    assert names and not any(n.startswith("unet.down_blocks.0.") for n in names)
    with pytest.raises(ConfigError, match="scope.blocks"):
        TrainableScope("attention", blocks=[99]).apply(*_parts())


def test_full_scope_trains_everything_and_reduction_is_large_for_attention():
    unet, emb = _parts()
    TrainableScope("full").apply(unet, emb)
    assert all(p.requires_grad for p in unet.parameters())
    total = sum(p.numel() for p in unet.parameters())
    unet, emb = _parts()
    TrainableScope("attention", conditioner=False).apply(unet, emb)
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert 0 < trained < total


def test_batchnorm_in_scope_is_rejected():
    unet, emb = _parts()
    emb.norm = torch.nn.BatchNorm1d(4)
    with pytest.raises(ConfigError, match="BatchNorm"):
        TrainableScope("attention").apply(unet, emb)


def test_text_conditioner_contributes_only_its_projection():
    from pathlib import Path

    from dpldm.modules import OpenCLIPTextEncoder

    arch = Path(__file__).resolve().parents[2] / "configs" / "laion" / "tiny-clip.json"
    unet, text = build_unet(**TINY_UNET), OpenCLIPTextEncoder(str(arch), pretrained=None, projection_dim=16)
    trained = TrainableScope("attention").apply(unet, text)
    assert trained[-1] is text.projection
    assert {n for n in _trained_names(unet, text) if n.startswith("cond.")} == {"cond.projection.weight",
                                                                               "cond.projection.bias"}
    TrainableScope("attention", conditioner=False).apply(unet, text)
    assert not any(p.requires_grad for p in text.parameters())


def test_lora_trains_only_adapters_on_the_attention_projections_and_merges_exactly():
    from tests.privacy.common import perturb_lora

    unet, emb = _parts()
    base = {n: p.clone() for n, p in unet.named_parameters()}
    TrainableScope("lora", lora_rank=2, blocks=[0]).apply(unet, emb)
    first = attention_blocks(unet)[0][0]
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(first + ".") and (".lora_A." in n or ".lora_B." in n) for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} >= {"to_q", "to_k", "to_v"}
    assert all(p.shape[0] == 2 or p.shape[1] == 2 for n, p in unet.named_parameters() if n in names)  # rank 2
    x, ctx = torch.randn(2, 4, 4, 4), emb(torch.tensor([1, 2]))
    untouched = unet(x, 10, encoder_hidden_states=ctx).sample  # B = 0: the public model
    perturb_lora(unet)
    adapted = unet(x, 10, encoder_hidden_states=ctx).sample
    assert not torch.allclose(adapted, untouched)
    merged = merged_unet(unet)
    assert type(merged) is type(unet) and set(merged.state_dict()) == set(base)  # a plain UNet again
    torch.testing.assert_close(merged(x, 10, encoder_hidden_states=ctx).sample, adapted, rtol=1e-4, atol=1e-5)
    assert any(".lora_A." in n for n, _ in unet.named_parameters())  # the training copy keeps its adapters


def test_lora_settings_name_the_field():
    with pytest.raises(ConfigError, match="scope.lora_rank"):
        TrainableScope("lora", lora_rank=0)
    unet, emb = _parts()
    with pytest.raises(ConfigError, match="scope.lora_targets"):
        TrainableScope("lora", lora_targets=["nowhere"]).apply(unet, emb)
