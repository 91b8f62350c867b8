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

from dpldm.utils.open_clip_names import resolve_open_clip


class Conditioner(nn.Module):
    """Interface: ``input_key`` names the batch entry; ``embed_dim`` is the token width D.

    A conditioner with a frozen, public part (a text encoder) names a ``cache_key``: a latent cache
    stores :meth:`frozen_features` of the private condition once, and batches read from the cache
    carry them under that key instead of the raw input.
    """

    input_key: str
    embed_dim: int
    cache_key: str | None = None

    def select(self, batch: dict) -> Any:
        """The condition of a batch: cached frozen features when present, else the raw input."""
        if self.cache_key is not None and self.cache_key in batch:
            return batch[self.cache_key]
        return batch[self.input_key]

    def raw(self, batch: dict) -> Any:
        """The raw condition of a batch (labels [B] or B captions), never cached features: what sampling takes."""
        return batch[self.input_key]

    def frozen_features(self, cond: Any) -> Tensor:
        """Output of the frozen part for raw conditions (what a latent cache stores)."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen part to cache")

    def trainable_modules(self) -> list[nn.Module]:
        """The parts a trainable scope may train (never a frozen encoder)."""
        return []

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
        init_from: a *public* embedder's weights (``conditioner.pt`` of a stage-2 export, or its folder; or a
            CompVis-layout checkpoint with a ``ClassEmbedder``, whose null class starts as the mean of its classes)
            to start from: public knowledge, no privacy cost.
        init_classes: for each class here, the public class whose embedding it starts from (default: the
            same index); the null class starts from the public null class.
    """

    input_key = "label"

    def __init__(self, num_classes: int, embed_dim: int = 64, num_tokens: int = 4, init_from: str | None = None,
                 init_classes: list[int] | None = None):
        super().__init__()
        self.num_classes, self.embed_dim, self.num_tokens = num_classes, embed_dim, num_tokens
        self.embedding = nn.Embedding(num_classes + 1, embed_dim * num_tokens)  # last row: null class
        if init_from is not None and init_from.lower() not in ("none", "null", ""):  # (`null` on the CLI: "None")
            self._init_from(init_from, init_classes or list(range(num_classes)))

    def _init_from(self, path: str, classes: list[int]) -> None:
        field = "model.init_args.conditioner.init_args"
        path = os.path.join(path, "conditioner.pt") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{field}.init_from = {path!r}: no such file (stage 2 exports conditioner.pt)")
        if path.endswith(".pt") and os.path.basename(path) == "conditioner.pt":  # a dpldm stage-2 export
            public = torch.load(path, map_location="cpu", weights_only=True)["embedding.weight"]  # [C_pub + 1, T*D]
        else:  # a CompVis-layout checkpoint's ClassEmbedder (one token per class)
            from dpldm.modules.original import original_class_embedding

            public = original_class_embedding(path, f"{field}.init_from")
        if public.shape[1] != self.embedding.weight.shape[1] or len(classes) != self.num_classes:
            raise ValueError(f"{field}: public embedding {tuple(public.shape)} and init_classes ({len(classes)}) "
                             f"do not fit {self.num_classes} classes x {self.num_tokens} tokens x {self.embed_dim}")
        with torch.no_grad():
            self.embedding.weight.copy_(public[[*classes, public.shape[0] - 1]])

    def trainable_modules(self) -> list[nn.Module]:
        return [self]

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding(labels).view(labels.shape[0], self.num_tokens, self.embed_dim)

    def drop(self, labels: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask, torch.full_like(labels, self.num_classes), labels)

    def null(self, batch_size: int) -> Tensor:
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.embedding.weight.device)


class Unconditional(Conditioner):
    """No condition: an unconditional LDM (a diffusers ``UNet2DModel``, no cross-attention). The batch's labels
    or captions, if any, are ignored; a condition is a placeholder per example, so sampling takes a batch size
    (``torch.zeros(B)``) and classifier-free guidance does not apply."""

    input_key = "label"
    embed_dim = None

    def select(self, batch: dict) -> Tensor:
        images = batch["moments"] if "moments" in batch else batch["image"]
        return torch.zeros(len(images), dtype=torch.long, device=images.device)

    raw = select  # one placeholder per example

    def forward(self, cond: Any) -> None:
        return None

    def drop(self, cond: Any, mask: Tensor) -> Any:
        return cond

    def null(self, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, dtype=torch.long)


class FrozenTextEncoder(Conditioner):
    """What every frozen text encoder shares: captions (or their cached frozen features) -> tokens, the empty
    caption as the null condition, the frozen part always in eval mode, an optional trained projection.

    Subclasses set ``projection`` (an ``nn.Linear`` or None) and implement :meth:`frozen_modules` and
    :meth:`frozen_features`.
    """

    input_key = "caption"
    cache_key = "text_features"
    projection: nn.Module | None

    def frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def trainable_modules(self) -> list[nn.Module]:
        return [] if self.projection is None else [self.projection]

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        super().train(mode)
        for m in self.frozen_modules():  # the text tower is always frozen, in eval mode
            m.train(False)
        return self

    def _null_features(self, device: torch.device) -> Tensor:
        if device not in self._null:  # the empty caption through the frozen tower: a constant
            self._null[device] = self.frozen_features([""]).to(device)  # [1, T, W]
        return self._null[device]

    def forward(self, cond: list[str] | Tensor) -> Tensor:
        """Captions, or their cached frozen features [B, T, W] -> tokens [B, T, D]."""
        features = cond if isinstance(cond, Tensor) else self.frozen_features(cond)
        return features if self.projection is None else self.projection(features)

    def drop(self, cond: list[str] | Tensor, mask: Tensor) -> list[str] | Tensor:
        if isinstance(cond, Tensor):
            return torch.where(mask.view(-1, 1, 1), self._null_features(cond.device).to(cond.dtype), cond)
        return ["" if m else c for c, m in zip(cond, mask.tolist())]

    def null(self, batch_size: int) -> list[str]:
        return [""] * batch_size


class OpenCLIPTextEncoder(FrozenTextEncoder):
    """A frozen open_clip text transformer; its per-token features (after ``ln_final``), optionally
    mapped by a learned linear projection to the UNet's cross-attention width.

    The projection is the only trainable part (DP fine-tuning trains it when the scope includes the
    conditioner); the text tower is public and frozen, so a latent cache can store its features.

    Args:
        model_name: open_clip architecture (e.g. ``ViT-H-14``), or a path to a JSON architecture file
            (registered with open_clip under the file's stem; random weights unless a checkpoint is given).
        pretrained: open_clip pretrained tag (e.g. ``laion2b_s32b_b79k``), or ``None`` for random weights.
        checkpoint: a local checkpoint file; takes precedence over ``pretrained``.
        projection_dim: output width D of a learned projection (when the UNet's ``cross_attention_dim``
            differs from the text width); ``None``: no projection, D = text width.
    """

    def __init__(self, model_name: str = "ViT-H-14", pretrained: str | None = "laion2b_s32b_b79k",
                 checkpoint: str | None = None, projection_dim: int | None = None):
        super().__init__()
        import open_clip

        field = "model.init_args.conditioner.init_args"
        model_name, pretrained = resolve_open_clip(model_name, pretrained, f"{field}.model_name")
        source = checkpoint if checkpoint is not None else pretrained
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"{field}.checkpoint = {checkpoint!r}: no such file")
        try:
            model = open_clip.create_model(model_name, pretrained=source, load_weights=source is not None)
        except RuntimeError as err:  # unknown tag / failed download
            raise OSError(
                f"Could not load open_clip {model_name!r} with pretrained={source!r} (offline?). Download the "
                f"checkpoint on a machine with internet and set `{field}.checkpoint` to the file. "
                f"Original error: {err}") from err
        self.model_name = model_name
        self.tokenizer = open_clip.get_tokenizer(model_name)
        # Keep only the text tower: the image tower is never used here.
        self.token_embedding, self.transformer, self.ln_final = model.token_embedding, model.transformer, model.ln_final
        self.register_buffer("positional_embedding", model.positional_embedding.detach().clone(), persistent=False)
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.requires_grad_(False)
        self.text_width = self.ln_final.weight.shape[0]
        self.projection = None if projection_dim is None else nn.Linear(self.text_width, projection_dim)
        self.embed_dim = projection_dim or self.text_width
        self._null: dict[torch.device, Tensor] = {}
        self.eval()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.token_embedding, self.transformer, self.ln_final]

    @torch.no_grad()
    def frozen_features(self, captions: list[str]) -> Tensor:
        """captions -> per-token features [B, T, text_width] of the frozen tower."""
        tokens = self.tokenizer(list(captions)).to(self.positional_embedding.device)  # [B, T]
        x = self.token_embedding(tokens) + self.positional_embedding  # [B, T, W]
        x = self.transformer(x, attn_mask=self.attn_mask)
        return self.ln_final(x)  # [B, T, W]
