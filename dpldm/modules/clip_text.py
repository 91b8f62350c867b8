"""Stable Diffusion's own text encoder: a frozen transformers ``CLIPTextModel`` and its ``CLIPTokenizer``, read
from the base pipeline (``text_encoder/`` and ``tokenizer/``), as DP-LDM keeps the base model's text encoder.

The tokens are the encoder's per-token hidden states: ``last_hidden_state`` (after the final layer norm; SD 1.x,
and SD 2.x whose converted encoder already ends at the penultimate layer), or the hidden state of layer
``hidden_layer`` passed through the final layer norm (diffusers' ``clip_skip``). Captions are padded to the
tokenizer's ``model_max_length`` (77), as the base model was trained.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpldm.modules.conditioning import FrozenTextEncoder
from dpldm.modules.hub import load_pretrained

FIELD = "model.init_args.conditioner.init_args"


class CLIPTextEncoder(FrozenTextEncoder):
    """A frozen ``CLIPTextModel``; optionally a learned linear projection to the UNet's cross-attention width.

    Args:
        path: the base pipeline (local folder or hub id) holding ``text_encoder/`` and ``tokenizer/``.
        revision: hub branch, tag or commit.
        text_encoder_subfolder, tokenizer_subfolder: where they sit in ``path``.
        hidden_layer: ``None``: ``last_hidden_state``; ``k``: ``hidden_states[k]`` (e.g. -2, the penultimate
            layer) through the final layer norm.
        projection_dim: output width D of a learned projection (trained under DP when the scope includes the
            conditioner); ``None``: the text width, as the base UNet expects.
    """

    def __init__(self, path: str, revision: str | None = None, text_encoder_subfolder: str = "text_encoder",
                 tokenizer_subfolder: str = "tokenizer", hidden_layer: int | None = None,
                 projection_dim: int | None = None):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        self.text_model = load_pretrained(CLIPTextModel.from_pretrained, path, f"{FIELD}.path", "CLIP text encoder",
                                          text_encoder_subfolder, revision)
        self.tokenizer = load_pretrained(CLIPTokenizer.from_pretrained, path, f"{FIELD}.path", "CLIP tokenizer",
                                         tokenizer_subfolder, revision)
        self.context_length = self.tokenizer.model_max_length  # the latent cache's fingerprint reads it
        self.hidden_layer = hidden_layer
        self.text_model.requires_grad_(False)
        self.text_width = self.text_model.config.hidden_size
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
            return self.text_model(ids).last_hidden_state  # [B, T, W]
        out = self.text_model(ids, output_hidden_states=True)
        final_norm = getattr(self.text_model, "text_model", self.text_model).final_layer_norm  # (transformers 4: nested)
        return final_norm(out.hidden_states[self.hidden_layer])
