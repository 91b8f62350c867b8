"""Which parameters DP-SGD trains: the *trainable scope* (plain PyTorch, no Lightning).

DP-LDM (Lyu et al., 2024) fine-tunes only the attention modules of a pretrained LDM: every
``Transformer2DModel`` of the UNet (its GroupNorm, proj_in, self-attention, cross-attention,
feed-forward, proj_out). Fewer trained parameters means less noise in total, so a better
privacy-utility trade-off. Everything outside the scope is frozen (``requires_grad=False``) and
gets no per-sample-gradient hooks.

Blocks are counted input -> middle -> output, as in DP-LDM's ``ablation_blocks``: the UNet's
``Transformer2DModel`` modules in forward order.

``lora`` (DP-LoRA, Yu et al., 2022; Hu et al., 2022) trains no UNet weight at all: each attention projection
W (to_q, to_k, to_v, to_out.0 of the selected blocks) becomes W + (alpha / r) B A, with A [r, d_in] and
B [d_out, r] (B = 0 at the start, so the model starts as the public one), added through diffusers' PEFT adapter
API. Only A and B are trained; :func:`merged_unet` folds them into W for export.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from dpldm.errors import ConfigError

ScopeKind = Literal["attention", "self_attention", "cross_attention", "full", "lora"]
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of a diffusers Attention


def attention_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's transformer blocks in forward order: input (down) -> middle -> output (up). An unconditional
    ``UNet2DModel`` has none: its attention blocks are its (self-)``Attention`` modules, GroupNorm included."""
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    found = [(n, m) for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    if not found:
        found = [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention)]
    return sorted(found, key=lambda nm: (order.get(nm[0].split(".")[0], 3), _index_path(nm[0])))


def _index_path(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def block_resolution(unet: nn.Module, name: str) -> int:
    """Downsampling factor (1, 2, 4, ...) of the latent at which a block runs."""
    part, *rest = name.split(".")
    levels = len(unet.config.block_out_channels)
    if part == "mid_block":
        return 2 ** (levels - 1)
    index = int(rest[0])
    return 2 ** index if part == "down_blocks" else 2 ** (levels - 1 - index)


def _pick(block: nn.Module, kind: ScopeKind) -> list[nn.Module]:
    """Submodules of one transformer block that a scope kind trains."""
    if kind == "attention":
        return [block]
    if isinstance(block, Attention):  # a UNet2DModel's self-attention: no cross-attention to pick
        if kind == "cross_attention":
            raise ConfigError("scope.kind", kind, "an unconditional UNet (UNet2DModel) has no cross-attention")
        return [block]
    which = ("attn1", "norm1") if kind == "self_attention" else ("attn2", "norm2")
    return [getattr(tb, w) for tb in block.transformer_blocks for w in which if getattr(tb, w, None) is not None]


class TrainableScope:
    """What DP fine-tuning trains.

    Args:
        kind: ``attention`` (whole transformer blocks, DP-LDM), ``self_attention`` or
            ``cross_attention`` (those projections and the norm before them), ``full`` (the whole UNet:
            the full-model DP baseline), ``lora`` (low-rank adapters on the attention projections of the
            selected blocks, DP-LoRA).
        blocks: restrict to these transformer blocks, counted input -> middle -> output from 0.
        resolutions: restrict to blocks running at these downsampling factors (1, 2, 4, ...).
        conditioner: also train the conditioner's trainable parts (class embedding incl. null class; a
            text encoder's projection). A frozen text encoder is never trained.
        lora_rank: r of ``lora`` (>= 1).
        lora_alpha: the adapters' scale alpha (update (alpha / r) B A); ``None``: alpha = r.
        lora_targets: which projections of each attention module get an adapter.
    """

    def __init__(self, kind: ScopeKind = "attention", blocks: Sequence[int] | None = None,
                 resolutions: Sequence[int] | None = None, conditioner: bool = True, lora_rank: int = 4,
                 lora_alpha: float | None = None, lora_targets: Sequence[str] = LORA_TARGETS):
        self.kind, self.conditioner = kind, conditioner
        self.blocks = None if blocks is None else list(blocks)
        self.resolutions = None if resolutions is None else list(resolutions)
        if lora_rank < 1:
            raise ConfigError("scope.lora_rank", lora_rank, "must be >= 1")
        if lora_alpha is not None and not lora_alpha > 0:
            raise ConfigError("scope.lora_alpha", lora_alpha, "must be > 0")
        self.lora_rank, self.lora_alpha, self.lora_targets = lora_rank, lora_alpha, tuple(lora_targets)

    def modules(self, unet: nn.Module) -> list[nn.Module]:
        """The UNet modules whose parameters are trained."""
        if self.kind == "full":
            if self.blocks is not None or self.resolutions is not None:
                raise ConfigError("scope.blocks", self.blocks, "cannot be combined with kind: full")
            return [unet]
        blocks = attention_blocks(unet)
        if not blocks:
            raise ConfigError("scope.kind", self.kind, "the UNet has no attention blocks to train")
        if self.blocks is not None:
            bad = [b for b in self.blocks if not 0 <= b < len(blocks)]
            if bad:
                raise ConfigError("scope.blocks", self.blocks, f"indices must be in [0, {len(blocks) - 1}]")
            blocks = [blocks[b] for b in self.blocks]
        if self.resolutions is not None:
            blocks = [(n, m) for n, m in blocks if block_resolution(unet, n) in self.resolutions]
            if not blocks:
                raise ConfigError("scope.resolutions", self.resolutions, "select no attention block of this UNet")
        if self.kind == "lora":
            return [block for _, block in blocks]
        return [sub for _, block in blocks for sub in _pick(block, self.kind)]

    def apply(self, unet: nn.Module, conditioner: nn.Module) -> list[nn.Module]:
        """Freeze everything, then unfreeze the scope. Returns the top modules that are trained."""
        unet.requires_grad_(False)
        conditioner.requires_grad_(False)
        trained = self.modules(unet)
        if self.kind == "lora":
            trained = self._add_lora(unet, trained)
        for m in trained:
            m.requires_grad_(True)
        if self.conditioner:
            for m in conditioner.trainable_modules():  # a frozen text encoder offers none
                m.requires_grad_(True)
                trained.append(m)
        check_no_batchnorm(trained)
        return trained

    def _add_lora(self, unet: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
        """Adapters on the target projections inside ``blocks``; returns their A and B layers."""
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        if not hasattr(unet, "add_adapter"):  # diffusers' PEFT integration: UNet2DConditionModel, not UNet2DModel
            raise ConfigError("scope.kind", "lora", f"diffusers' {type(unet).__name__} takes no PEFT adapters; "
                              "use kind: attention")

        inside = {id(m) for b in blocks for m in b.modules()}
        names = [n for n, m in unet.named_modules() if id(m) in inside and isinstance(m, nn.Linear)
                 and any(n == t or n.endswith("." + t) for t in self.lora_targets)]
        if not names:
            raise ConfigError("scope.lora_targets", list(self.lora_targets), "match no Linear layer in the selected "
                              f"attention blocks (a diffusers Attention has {', '.join(LORA_TARGETS)})")
        unet.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha or self.lora_rank,
                                    target_modules=names, lora_dropout=0.0, init_lora_weights=True))
        unet.requires_grad_(False)  # only A and B train (requires_grad set below)
        layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
        return [ab[key] for m in layers for ab in (m.lora_A, m.lora_B) for key in ab]


def merged_unet(unet: nn.Module) -> nn.Module:
    """``unet`` itself, or, if it carries LoRA adapters, a copy with W + (alpha / r) B A folded into each W and the
    adapters removed: a plain UNet that loads without PEFT."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return unet
    import copy

    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def check_no_batchnorm(modules: Sequence[nn.Module]) -> None:
    """BatchNorm mixes examples within a batch, so per-example gradients (and DP) are undefined."""
    for top in modules:
        for name, m in top.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                raise ConfigError("scope", type(m).__name__ + (f" at {name}" if name else ""),
                                  "BatchNorm cannot be trained with DP-SGD (use GroupNorm/LayerNorm)")


def count(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
