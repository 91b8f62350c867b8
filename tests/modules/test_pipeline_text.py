"""Stable Diffusion's own text encoder (dpldm/modules/clip_text.py), on a tiny SD-layout folder the test writes."""

import pytest
import torch

from dpldm.modules import PipelineTextEncoder
from dpldm.modules.hub import PretrainedNotFoundError
from tests.conftest import write_tiny_sd


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"))


def test_features_are_the_frozen_encoder_s_hidden_states(sd):
    from transformers import CLIPTextModel, CLIPTokenizer

    enc = PipelineTextEncoder(str(sd))
    assert enc.embed_dim == 16 and enc.trainable_modules() == [] and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.text_model.training  # frozen means eval mode, whatever Lightning asks
    captions = ["a photograph of a dog on a beach", "a red car"]
    feats = enc(captions)
    assert feats.shape == (2, 77, 16)
    ref_model = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder")
    ids = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")(captions, padding="max_length", max_length=77,
                                                                     return_tensors="pt").input_ids
    assert ids[0, 1] != ids[1, 1] or ids[0, 2] != ids[1, 2]  # real BPE: the captions tokenize differently
    out = ref_model(ids, output_hidden_states=True)
    torch.testing.assert_close(feats, out.last_hidden_state)
    penultimate = PipelineTextEncoder(str(sd), hidden_layer=-2)(captions)
    torch.testing.assert_close(penultimate, ref_model.final_layer_norm(out.hidden_states[-2]))
    null = enc.drop(feats, torch.tensor([True, False]))  # cached features: the empty caption's, then unchanged
    torch.testing.assert_close(null[0], enc([""])[0])
    torch.testing.assert_close(null[1], feats[1])


def test_a_projection_is_the_only_trained_part(sd):
    enc = PipelineTextEncoder(str(sd), projection_dim=32)
    assert enc.embed_dim == 32 and enc.trainable_modules() == [enc.projection]


def test_offline_names_the_key(tmp_path):
    with pytest.raises(PretrainedNotFoundError, match="model.init_args.conditioner.init_args.path"):
        PipelineTextEncoder(str(tmp_path / "nowhere"))


def test_ldm_bert_of_compvis_text_to_image_ldm(tmp_path):
    """DP-LDM's text base model keeps its own LDMBert: loaded by the class its model_index.json names."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
    from transformers import BertTokenizer

    from tests.conftest import write_tiny_ldm_text

    ldm = write_tiny_ldm_text(tmp_path)
    enc = PipelineTextEncoder(str(ldm), text_encoder="bert")
    assert type(enc.text_model).__name__ == "LDMBertModel" and enc.embed_dim == 16
    captions = ["a red square", "a photo of item 3"]
    ids = BertTokenizer.from_pretrained(ldm, subfolder="tokenizer")(captions, padding="max_length", max_length=77,
                                                                      return_tensors="pt").input_ids
    torch.testing.assert_close(enc(captions), LDMBertModel.from_pretrained(ldm, subfolder="bert")(ids)[0])
    with pytest.raises(Exception, match="hidden_layer"):
        PipelineTextEncoder(str(ldm), text_encoder="bert", hidden_layer=-2)
    with pytest.raises(Exception, match="text_encoder.*is not a component"):
        PipelineTextEncoder(str(ldm))  # this pipeline calls it bert


def _sd1_file(sd, path, shift=0.5):
    """An SD 1.x single file: the tiny folder's CLIPTextModel under ``cond_stage_model.transformer.text_model.*``
    (FrozenCLIPEmbedder's names, with its ``position_ids`` buffer) + ``shift``, beside a UNet entry."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder")
    state = {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v + shift
             for k, v in model.state_dict().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    for p in model.parameters():
        p.data += shift
    return model


def _open_clip_file(sd, path):
    """An SD 2.x single file: FrozenOpenCLIPEmbedder's ``cond_stage_model.model.*`` (fused in_proj, c_fc/c_proj,
    one block more than the config (SD 2 conditions on the penultimate layer), text_projection, logit_scale),
    written from a CLIPTextModel by open_clip's names, independently of diffusers' converter."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    torch.manual_seed(1)
    model = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    inner = getattr(model, "text_model", model)
    prefix, state = "cond_stage_model.model.", {}
    state[prefix + "token_embedding.weight"] = inner.embeddings.token_embedding.weight
    state[prefix + "positional_embedding"] = inner.embeddings.position_embedding.weight
    state[prefix + "ln_final.weight"], state[prefix + "ln_final.bias"] = inner.final_layer_norm.weight, \
        inner.final_layer_norm.bias
    layers = list(inner.encoder.layers)
    for i, layer in enumerate([*layers, layers[0]]):  # the extra last block: in the file, not in SD 2's encoder
        block, att = f"{prefix}transformer.resblocks.{i}.", layer.self_attn
        state[block + "attn.in_proj_weight"] = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        state[block + "attn.in_proj_bias"] = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            module = layer.get_submodule(ours)
            state[block + theirs + ".weight"], state[block + theirs + ".bias"] = module.weight, module.bias
    state[prefix + "text_projection"] = torch.randn(16, 16)
    state[prefix + "logit_scale"] = torch.tensor(4.6)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    return model


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_a_stable_diffusion_single_file_s_own_text_encoder(sd, tmp_path, layout):
    """The weights come from the file (strictly), the config and tokenizer from the pipeline named by ``config``."""
    from dpldm.errors import ConfigError
    from dpldm.modules.hub import PretrainedMismatchError

    path = tmp_path / "model.safetensors"
    reference = (_sd1_file if layout == "sd1" else _open_clip_file)(sd, path)
    enc = PipelineTextEncoder(str(path), config=str(sd))
    captions = ["a photograph of a dog on a beach", "a red car"]
    ids = enc.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(enc(captions), reference(ids)[0])
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ConfigError, match=r"conditioner.init_args.config = None: .*single checkpoint file"):
        PipelineTextEncoder(str(path))
    if layout == "sd1":  # an entry with no place in the model is an error, not ignored
        from safetensors.torch import load_file, save_file

        state = load_file(str(path))
        state["cond_stage_model.transformer.text_model.extra.weight"] = torch.zeros(1)
        save_file(state, str(path))
        with pytest.raises(PretrainedMismatchError, match="text encoder.*unexpected .*extra.weight"):
            PipelineTextEncoder(str(path), config=str(sd))


def test_compvis_bert_embedder_inside_a_ckpt(tmp_path):
    """The text-to-image LDM's own .ckpt (the one DP-LDM's text setting starts from): its BERTEmbedder loads as
    the LDMBert of the pipeline named by ``config``, with the file's weights."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

    from tests.conftest import write_tiny_ldm_text
    from tests.modules.compvis import ldm_bert_to_compvis

    ldm = write_tiny_ldm_text(tmp_path / "ldm")
    reference = LDMBertModel.from_pretrained(ldm, subfolder="bert")
    for p in reference.parameters():
        p.data += 0.3
    state = ldm_bert_to_compvis(reference.state_dict()) | {"model.diffusion_model.out.2.bias": torch.zeros(4)}
    torch.save({"state_dict": state}, tmp_path / "txt2img.ckpt")
    enc = PipelineTextEncoder(str(tmp_path / "txt2img.ckpt"), config=str(ldm), text_encoder="bert")
    assert type(enc.text_model).__name__ == "LDMBertModel"
    captions = ["a red square", "a photo of item 3"]
    ids = enc.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(enc(captions), reference(ids)[0])
