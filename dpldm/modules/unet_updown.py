"""CompVis' UNet with ``resblock_updown: true`` (the UNets of DP-LDM's public stages) as a diffusers model.

latent-diffusion's ``openaimodel.UNetModel(resblock_updown=True)`` down- and upsamples between levels with a
ResBlock (``ResBlock(down=True)`` / ``ResBlock(up=True)``: norm, SiLU, 2x average pool or nearest upsampling of
both the features and the skip path, then conv1; the timestep FiLM; conv2) where diffusers'
``UNet2DConditionModel`` has a strided or an upsampling conv. diffusers' ``ResnetBlock2D(down=True | up=True)``
computes exactly that block; this class is ``UNet2DConditionModel`` with it in those places, and nothing else
changed, so every other key, block and processor (attention, LoRA adapters) is diffusers' own.

The blocks call their resamplers without the timestep embedding (``downsampler(hidden_states)``), so each block
hands ``temb`` to its resampler through a forward pre-hook. This file imports only torch and diffusers:
``dpldm export`` copies it into the exported pipeline's ``unet/`` folder.
"""

from __future__ import annotations

import functools

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


class ResnetResample(nn.Module):
    """A block's up- or downsampler: ``ResnetBlock2D(up=True | down=True)`` with the block's timestep embedding.

    Args:
        like: a ResnetBlock2D of the same block (its channels, groups, eps, time embedding width and FiLM kind).
        up: upsample (else downsample).
    """

    def __init__(self, like: ResnetBlock2D, up: bool):
        super().__init__()
        channels = like.conv2.out_channels
        self.resnet = ResnetBlock2D(in_channels=channels, out_channels=channels,
                                    temb_channels=like.time_emb_proj.in_features, eps=like.norm1.eps,
                                    groups=like.norm1.num_groups, dropout=like.dropout.p,
                                    time_embedding_norm=like.time_embedding_norm, up=up, down=not up)
        self.temb: torch.Tensor | None = None  # set by the block's pre-hook for one forward

    def forward(self, hidden_states: torch.Tensor, output_size=None) -> torch.Tensor:  # [B, C, H, W] -> 2x or /2
        temb, self.temb = self.temb, None
        return self.resnet(hidden_states, temb)


def _hand_temb(block: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a block: its resampler receives the block's ``temb`` (passed by keyword)."""
    for resampler in (*(getattr(block, "downsamplers", None) or ()), *(getattr(block, "upsamplers", None) or ())):
        resampler.temb = kwargs.get("temb")


class UpDownUNet2DConditionModel(UNet2DConditionModel):
    """``UNet2DConditionModel`` whose levels are joined by ResBlocks (CompVis ``resblock_updown``).

    Takes exactly ``UNet2DConditionModel``'s arguments (its signature and config; ``_class_name`` names this
    class, so ``from_pretrained`` rebuilds it).
    """

    @functools.wraps(UNet2DConditionModel.__init__)  # the config's signature is UNet2DConditionModel's
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for blocks, attr, up in ((self.down_blocks, "downsamplers", False), (self.up_blocks, "upsamplers", True)):
            for block in blocks:
                if getattr(block, attr, None):
                    setattr(block, attr, nn.ModuleList([ResnetResample(block.resnets[-1], up)]))
                    block.register_forward_pre_hook(_hand_temb, with_kwargs=True)
