"""Shared fixtures: tiny models built from configs, never downloaded weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup must fail fast, not retry for ~47 s
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch

from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_autoencoder, build_unet

torch.set_num_threads(min(2, torch.get_num_threads()))

# Tiny geometry: 8x8x1 images -> 4x4x4 latents (f = 2) -> UNet with 2 resolutions.
TINY_AE = dict(in_channels=1, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4)
TINY_UNET = dict(sample_size=4, in_channels=4, block_out_channels=(16, 32), attention=(True, True),
                 attention_head_dim=8, cross_attention_dim=16, norm_num_groups=8)


@pytest.fixture
def tiny_vae():
    torch.manual_seed(0)
    return build_autoencoder(**TINY_AE)


@pytest.fixture
def tiny_model(tiny_vae):
    torch.manual_seed(0)
    return LatentDiffusion(
        unet=build_unet(**TINY_UNET),
        autoencoder=FrozenAutoencoder(tiny_vae),
        conditioner=ClassEmbedder(num_classes=10, embed_dim=16),
    )


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, "label": torch.arange(6) % 10}
