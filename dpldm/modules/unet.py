"""The denoiser: a diffusers ``UNet2DConditionModel`` with cross-attention to the conditioning tokens, or a
``UNet2DModel`` for an unconditional LDM (self-attention only).

:func:`build_unet` makes one from a small typed config; :func:`load_unet` loads a pretrained one (the class its
config names; :class:`~dpldm.modules.unet_updown.UpDownUNet2DConditionModel` for CompVis ``resblock_updown``
UNets). The attention modules of this UNet (its ``Transformer2DModel`` blocks; a ``UNet2DModel``'s
``Attention`` modules) are what DP-LDM fine-tunes. :func:`denoise` calls either.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from dpldm.modules.hub import dtype_of, load_pretrained
from dpldm.modules.original import is_original_file, original_unet, read_original
from dpldm.modules.unet_updown import UpDownUNet2DConditionModel

UNET_CLASSES = {cls.__name__: cls for cls in (UNet2DConditionModel, UNet2DModel, UpDownUNet2DConditionModel)}


def build_unet(
    sample_size: int = 8,
    in_channels: int = 4,
    block_out_channels: tuple[int, ...] = (64, 128),
    attention: tuple[bool, ...] = (True, True),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    cross_attention_dim: int = 64,
    transformer_layers_per_block: int = 1,
    norm_num_groups: int = 32,
    mid_block: bool = True,
) -> UNet2DConditionModel:
    """A fresh latent-space UNet; downsampling 2^(len(block_out_channels) - 1) over the latent.

    Args:
        sample_size: latent height/width (image size / autoencoder factor).
        in_channels: latent channels (output has the same).
        block_out_channels: widths, one per resolution.
        attention: per resolution, whether its blocks carry a transformer (self + cross-attention).
        layers_per_block: ResNet layers per block.
        attention_head_dim: channels per attention head.
        cross_attention_dim: width of the conditioning tokens (the conditioner's ``embed_dim``).
        transformer_layers_per_block: transformer layers inside each attention block.
        norm_num_groups: GroupNorm groups (must divide every width).
        mid_block: add the middle block (ResNet + transformer + ResNet).
    """
    if len(attention) != len(block_out_channels):
        from dpldm.errors import ConfigError

        raise ConfigError("unet.attention", attention, f"needs one entry per block ({len(block_out_channels)})")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_block else None,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim,
        cross_attention_dim=cross_attention_dim,
        transformer_layers_per_block=transformer_layers_per_block,
        norm_num_groups=norm_num_groups,
    )


def load_unet(path: str, subfolder: str | None = None, weights: bool = True, revision: str | None = None,
              variant: str | None = None, torch_dtype: str | None = None, original_config: str | None = None,
              ema: bool = True) -> UNet2DConditionModel:
    """A pretrained UNet from a local diffusers directory, a hub id or a CompVis-layout checkpoint file, loaded
    strictly.

    When ``path`` is a pipeline (a ``subfolder`` such as ``unet`` beside a ``scheduler``), the pipeline's
    scheduler config comes along as ``unet.base_scheduler_config``: :class:`~dpldm.modules.LatentDiffusion`
    trains and samples on that schedule and prediction type (epsilon, v or sample) unless told otherwise.

    A CompVis / DP-LDM ``.ckpt`` or a Stable Diffusion single file (``.safetensors``) needs the YAML that built
    it (``original_config``); its forward process comes along the same way (:mod:`dpldm.modules.original`).

    Args:
        path: directory (e.g. ``runs/quickstart/ldm/pretrained``), hub id, or checkpoint file.
        subfolder: subfolder inside ``path`` (``unet`` for a pipeline repo; ignored for a checkpoint file).
        weights: ``False``: the same architecture with fresh random weights (training from scratch).
        revision: hub branch, tag or commit.
        variant: weights variant (e.g. ``fp16``).
        torch_dtype: ``float32``, ``float16`` or ``bfloat16`` (default: as stored).
        original_config: for a checkpoint file, the YAML that built it.
        ema: for a checkpoint file with an EMA copy (``model_ema.*``), start from it (what CompVis samples with).
    """
    key = "model.init_args.unet.init_args.path"
    dtype = dtype_of(torch_dtype, "model.init_args.unet.init_args.torch_dtype")
    if is_original_file(path):
        unet = original_unet(read_original(path, original_config, key), weights, ema)
        return unet.to(dtype) if dtype is not None else unet
    config = load_pretrained(UNet2DConditionModel.load_config, path, key, "UNet config", subfolder or None, revision)
    cls = UNET_CLASSES.get(config.get("_class_name"), UNet2DConditionModel)  # the class the folder names
    if not weights:
        unet = cls.from_config(config)
    else:
        unet = load_pretrained(cls.from_pretrained, path, key, "UNet", subfolder or None, revision, variant, dtype)
    unet.base_scheduler_config = base_scheduler_config(path, revision) if subfolder else None
    return unet


def base_scheduler_config(path: str, revision: str | None = None) -> dict | None:
    """The ``scheduler/`` config of the pipeline at ``path`` (local or cached), or None if it has none."""
    from diffusers import DDPMScheduler

    try:
        return dict(DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision))
    except (OSError, ValueError):
        return None


def denoise(unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """The UNet's output for noisy latents z [B, c, h, w] at steps t [B] (or a scalar), with conditioning tokens
    [B, T, D]; ``context`` None: an unconditional ``UNet2DModel``."""
    if context is None:
        return unet(z, t).sample
    return unet(z, t, encoder_hidden_states=context).sample


def unet_downsample_factor(unet: UNet2DConditionModel) -> int:
    """How many times the UNet halves its input: the latent size must be a multiple of this."""
    return 2 ** (len(unet.config.block_out_channels) - 1)
