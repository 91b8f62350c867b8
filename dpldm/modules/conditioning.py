"""Conditioners: class labels or captions -> a sequence of tokens [B, T, D] for cross-attention.

Classifier-free guidance (Ho & Salimans, 2022) needs an "unconditional" input: the class embedder
has one extra learned *null class*, the text encoder uses the empty caption. ``drop`` swaps inputs
for the null one (label dropout in training); ``null`` gives a batch of them (sampling).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn


class Conditioner(nn.Module):
    """Interface: ``input_key`` names the batch entry; ``embed_dim`` is the token width D."""

    input_key: str
    embed_dim: int

    def forward(self, cond: Any) -> Tensor:  # cond -> [B, T, D]
        raise NotImplementedError

    def drop(self, cond: Any, mask: Tensor) -> Any:
        """Replace the entries where ``mask`` [B] is True by the null condition."""
        raise NotImplementedError

    def null(self, batch_size: int) -> Any:
        """A batch of null conditions."""
        raise NotImplementedError


class ClassEmbedder(Conditioner):
    """A learned embedding per class, plus a null class at index ``num_classes``.

    Each class maps to ``num_tokens`` tokens: with one token, softmax attention over a single key is
    constant, so the cross-attention queries and keys would get no gradient at all.

    Args:
        num_classes: number of real classes.
        embed_dim: token width D (= the UNet's ``cross_attention_dim``).
        num_tokens: tokens per class T.
        init_from: a *public* embedder's weights (``conditioner.pt`` of a stage-2 export, or its folder) to
            start from: public knowledge, no privacy cost.
        init_classes: for each class here, the public class whose embedding it starts from (default: the
            same index); the null class starts from the public null class.
    """

    input_key = "label"

    def __init__(self, num_classes: int, embed_dim: int = 64, num_tokens: int = 4, init_from: str | None = None,
                 init_classes: list[int] | None = None):
        super().__init__()
        self.num_classes, self.embed_dim, self.num_tokens = num_classes, embed_dim, num_tokens
        self.embedding = nn.Embedding(num_classes + 1, embed_dim * num_tokens)  # last row: null class
        if init_from is not None:
            self._init_from(init_from, init_classes or list(range(num_classes)))

    def _init_from(self, path: str, classes: list[int]) -> None:
        field = "model.init_args.conditioner.init_args"
        path = os.path.join(path, "conditioner.pt") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{field}.init_from = {path!r}: no such file (stage 2 exports conditioner.pt)")
        public = torch.load(path, map_location="cpu", weights_only=True)["embedding.weight"]  # [C_pub + 1, T*D]
        if public.shape[1] != self.embedding.weight.shape[1] or len(classes) != self.num_classes:
            raise ValueError(f"{field}: public embedding {tuple(public.shape)} and init_classes ({len(classes)}) "
                             f"do not fit {self.num_classes} classes x {self.num_tokens} tokens x {self.embed_dim}")
        with torch.no_grad():
            self.embedding.weight.copy_(public[[*classes, public.shape[0] - 1]])

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding(labels).view(labels.shape[0], self.num_tokens, self.embed_dim)

    def drop(self, labels: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask, torch.full_like(labels, self.num_classes), labels)

    def null(self, batch_size: int) -> Tensor:
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.embedding.weight.device)


class OpenCLIPTextEncoder(Conditioner):
    """A frozen open_clip text transformer; returns its per-token features (after ``ln_final``).

    Args:
        model_name: open_clip architecture (e.g. ``ViT-H-14``).
        pretrained: open_clip pretrained tag (e.g. ``laion2b_s32b_b79k``), or ``None`` for random weights.
        checkpoint: a local checkpoint file; takes precedence over ``pretrained``.
    """

    input_key = "caption"

    def __init__(self, model_name: str = "ViT-H-14", pretrained: str | None = "laion2b_s32b_b79k",
                 checkpoint: str | None = None):
        super().__init__()
        import open_clip

        source = checkpoint if checkpoint is not None else pretrained
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise FileNotFoundError(
                f"model.init_args.conditioner.init_args.checkpoint = {checkpoint!r}: no such file")
        try:
            model = open_clip.create_model(model_name, pretrained=source, load_weights=source is not None)
        except RuntimeError as err:  # unknown tag / failed download
            raise OSError(
                f"Could not load open_clip {model_name!r} with pretrained={source!r} (offline?). Download the "
                "checkpoint on a machine with internet and set `model.init_args.conditioner.init_args.checkpoint` "
                f"to the file. Original error: {err}") from err
        self.tokenizer = open_clip.get_tokenizer(model_name)
        # Keep only the text tower: the image tower is never used here.
        self.token_embedding, self.transformer, self.ln_final = model.token_embedding, model.transformer, model.ln_final
        self.register_buffer("positional_embedding", model.positional_embedding.detach().clone(), persistent=False)
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.embed_dim = self.ln_final.weight.shape[0]
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "OpenCLIPTextEncoder":
        return super().train(False)  # always frozen

    @torch.no_grad()
    def forward(self, captions: list[str]) -> Tensor:
        tokens = self.tokenizer(list(captions)).to(self.positional_embedding.device)  # [B, T]
        x = self.token_embedding(tokens) + self.positional_embedding  # [B, T, D]
        x = self.transformer(x, attn_mask=self.attn_mask)
        return self.ln_final(x)  # [B, T, D]

    def drop(self, captions: list[str], mask: Tensor) -> list[str]:
        return ["" if m else c for c, m in zip(captions, mask.tolist())]

    def null(self, batch_size: int) -> list[str]:
        return [""] * batch_size
