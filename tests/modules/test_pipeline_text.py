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
