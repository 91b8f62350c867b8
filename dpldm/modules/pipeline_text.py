"""The base pipeline's own text encoder, frozen, as DP-LDM keeps it: Stable Diffusion's transformers
``CLIPTextModel`` + ``CLIPTokenizer``, or the LDMBert + ``BertTokenizer`` of CompVis' text-to-image LDM
(``CompVis/ldm-text2im-large-256``, DP-LDM's text base model).

The classes come from the pipeline's ``model_index.json`` (``"text_encoder": ["transformers", "CLIPTextModel"]``,
``"bert": ["latent_diffusion", "LDMBertModel"]``), so whatever diffusers loads for that pipeline is loaded here.
The tokens are the encoder's per-token output (``CLIPTextModel``: ``last_hidden_state``, after the final layer
norm; SD 2.x's converted encoder already ends at the penultimate layer), or, for CLIP, the hidden state of layer
``hidden_layer`` through the final layer norm (diffusers' ``clip_skip``). Captions are padded to 77 tokens, as
both pipelines encode them. A Stable Diffusion single file's own encoder loads with ``config`` naming the
pipeline that gives its config and tokenizer.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from dpldm.errors import ConfigError
from dpldm.modules.conditioning import FrozenTextEncoder
from dpldm.modules.hub import load_pretrained
from dpldm.modules.original import is_original_file, original_text_encoder

FIELD = "model.init_args.conditioner.init_args"
MAX_LENGTH = 77  # what SD's and LDM's pipelines pad and truncate captions to


def component_class(path: str, name: str, revision: str | None) -> type:
    """The class the pipeline at ``path`` declares for component ``name`` in its ``model_index.json``."""
    from diffusers import DiffusionPipeline

    index = load_pretrained(DiffusionPipeline.load_config, path, f"{FIELD}.path", "pipeline index (model_index.json)",
                            None, revision)
    if name not in index:
        raise ConfigError(f"{FIELD}.text_encoder", name, f"is not a component of {path!r} "
                          f"(it has {', '.join(k for k in index if not k.startswith('_'))})")
    library, cls = index[name]
    module = importlib.import_module(library if library == "transformers" else f"diffusers.pipelines.{library}")
    return getattr(module, cls)


class PipelineTextEncoder(FrozenTextEncoder):
    """A pipeline's frozen text encoder; optionally a learned linear projection to the UNet's width.

    Args:
        path: the base pipeline (local folder or hub id) with ``model_index.json``.
        revision: hub branch, tag or commit.
        text_encoder: its text encoder component (``text_encoder`` in SD, ``bert`` in CompVis' LDM).
        tokenizer: its tokenizer component.
        hidden_layer: CLIP only: ``hidden_states[k]`` (e.g. -2) through the final layer norm; ``None``: the
            encoder's output.
        projection_dim: output width D of a learned projection (trained under DP when the scope includes the
            conditioner); ``None``: the text width, as the base UNet expects.
        config: when ``path`` is a Stable Diffusion single file (``.safetensors`` / ``.ckpt``, its text encoder
            under ``cond_stage_model.*``): the diffusers pipeline of the same model (folder or hub id) that gives
            the encoder's config and the tokenizer (:func:`dpldm.modules.original.original_text_encoder`).
    """

    def __init__(self, path: str, revision: str | None = None, text_encoder: str = "text_encoder",
                 tokenizer: str = "tokenizer", hidden_layer: int | None = None, projection_dim: int | None = None,
                 config: str | None = None):
        super().__init__()
        pipeline = path
        if is_original_file(path):  # a single file holds the weights; a pipeline folder the config and tokenizer
            if config is None:
                raise ConfigError(f"{FIELD}.config", None, f"{FIELD}.path = {path!r} is a single checkpoint file: "
                                  "name the diffusers pipeline of the same model (folder or hub id) for the text "
                                  "encoder's config and the tokenizer, as from_single_file(config=...), e.g. "
                                  "stable-diffusion-v1-5/stable-diffusion-v1-5 (SD 1.x)")
            pipeline = config
        encoder_cls = component_class(pipeline, text_encoder, revision)
        if is_original_file(path):
            encoder_config = load_pretrained(encoder_cls.config_class.from_pretrained, pipeline, f"{FIELD}.config",
                                             "text encoder config", text_encoder, revision)
            self.text_model = original_text_encoder(path, encoder_cls, encoder_config, f"{FIELD}.path")
        else:
            self.text_model = load_pretrained(encoder_cls.from_pretrained, path, f"{FIELD}.path", "text encoder",
                                              text_encoder, revision)
        key = f"{FIELD}.config" if pipeline is config else f"{FIELD}.path"
        self.tokenizer = load_pretrained(component_class(pipeline, tokenizer, revision).from_pretrained, pipeline,
                                         key, "tokenizer", tokenizer, revision)
        self.context_length = MAX_LENGTH  # the latent cache's fingerprint reads it
        self.final_norm = getattr(getattr(self.text_model, "text_model", self.text_model), "final_layer_norm", None)
        if hidden_layer is not None and self.final_norm is None:
            raise ConfigError(f"{FIELD}.hidden_layer", hidden_layer, f"applies to CLIP text encoders, not "
                              f"{type(self.text_model).__name__}")
        self.hidden_layer = hidden_layer
        self.text_model.requires_grad_(False)
        config = self.text_model.config
        self.text_width = getattr(config, "hidden_size", None) or config.d_model  # CLIP / LDMBert
        self.projection = None if projection_dim is None else nn.Linear(self.text_width, projection_dim)
        self.embed_dim = projection_dim or self.text_width
        self._null: dict[torch.device, Tensor] = {}
        self.eval()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.text_model]

    @torch.no_grad()
    def frozen_features(self, captions: list[str]) -> Tensor:
        """captions -> per-token features [B, 77, W] of the frozen encoder."""
        device = next(self.text_model.parameters()).device
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt").input_ids.to(device)  # [B, T]
        if self.hidden_layer is None:
            return self.text_model(ids)[0]  # [B, T, W]
        out = self.text_model(ids, output_hidden_states=True)
        return self.final_norm(out.hidden_states[self.hidden_layer])
