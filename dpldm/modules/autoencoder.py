"""The autoencoder of latent diffusion (Rombach et al., 2022), frozen during diffusion training.

Two builders give a diffusers ``AutoencoderKL``: :func:`build_autoencoder` (fresh, from a small typed
config, for public stage-1 training) and :func:`load_autoencoder` (``from_pretrained``; also a ``VQModel``,
VQ-regularised as in CompVis' LDMs: its latents are the pre-quantisation encodings, quantised by the decoder).
Either is wrapped by :class:`FrozenAutoencoder`, which the diffusion model uses: no gradients, always in eval
mode, latents scaled by a factor that comes from the public model's config, never from private data.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, VQModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from dpldm.modules.hub import dtype_of, load_pretrained
from dpldm.modules.original import is_original_file, original_autoencoder, read_original


def build_autoencoder(
    in_channels: int = 3,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (64, 128, 128),
    layers_per_block: int = 1,
    norm_num_groups: int = 32,
    scaling_factor: float = 1.0,
) -> AutoencoderKL:
    """A fresh KL-regularised autoencoder; downsampling factor f = 2^(len(block_out_channels) - 1).

    Args:
        in_channels: image channels (1 for grey digits, 3 for RGB).
        latent_channels: channels of the latent z.
        block_out_channels: widths of the encoder blocks, one per resolution.
        layers_per_block: ResNet layers in each block.
        norm_num_groups: GroupNorm groups (must divide every width).
        scaling_factor: latent scale; stage 1 overwrites it from public data when it exports.
    """
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        latent_channels=latent_channels,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        scaling_factor=scaling_factor,
    )


def load_autoencoder(path: str, subfolder: str | None = None, weights: bool = True, revision: str | None = None,
                     variant: str | None = None, torch_dtype: str | None = None,
                     original_config: str | None = None) -> ModelMixin:
    """A pretrained ``AutoencoderKL`` or ``VQModel`` (as its config names it; CompVis LDMs use VQ) from a local
    diffusers directory, a hub id or a CompVis-layout checkpoint file (``first_stage_model.*``), loaded strictly.

    Args:
        path: directory (e.g. ``runs/quickstart/autoencoder/pretrained``), hub id
            (e.g. ``stabilityai/sd-vae-ft-mse``), or a CompVis / Stable Diffusion checkpoint file.
        subfolder: subfolder inside ``path`` (``vae`` for a Stable Diffusion pipeline repo).
        weights: ``False``: the architecture alone, randomly initialised (a run reloaded from its checkpoint).
        revision: hub branch, tag or commit.
        variant: weights variant (e.g. ``fp16``).
        torch_dtype: ``float32``, ``float16`` or ``bfloat16`` (default: as stored).
        original_config: for a checkpoint file, the YAML that built it (:mod:`dpldm.modules.original`).
    """
    key = "model.init_args.autoencoder.init_args.vae.init_args.path"
    dtype = dtype_of(torch_dtype, "model.init_args.autoencoder.init_args.vae.init_args.torch_dtype")
    if is_original_file(path):
        vae = original_autoencoder(read_original(path, original_config, key), weights)
        return vae.to(dtype) if dtype is not None else vae
    config = load_pretrained(AutoencoderKL.load_config, path, key, "autoencoder config", subfolder or None, revision)
    cls = VQModel if config.get("_class_name") == "VQModel" else AutoencoderKL  # what the folder says it holds
    if not weights:
        return cls.from_config(config)
    return load_pretrained(cls.from_pretrained, path, key, "autoencoder", subfolder, revision, variant, dtype)


class FrozenAutoencoder(nn.Module):
    """A public autoencoder that diffusion training never changes.

    Args:
        vae: the autoencoder, an ``AutoencoderKL`` or a ``VQModel`` (from :func:`load_autoencoder` or
            :func:`build_autoencoder`; typed by their common base so that a config may name either).
        scale_factor: latent scale; ``None`` takes ``vae.config.scaling_factor`` (public).
        sample_posterior: encode to a sample of q(z|x) rather than its mean.
    """

    def __init__(self, vae: ModelMixin, scale_factor: float | None = None, sample_posterior: bool = False):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scale_factor = float(vae.config.scaling_factor if scale_factor is None else scale_factor)
        self.sample_posterior = sample_posterior
        self.eval()

    def train(self, mode: bool = True) -> "FrozenAutoencoder":
        # Frozen means eval mode always, whatever Lightning asks for (no dropout, no norm-stat updates).
        return super().train(False)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def in_channels(self) -> int:
        return self.vae.config.in_channels

    @property
    def quantised(self) -> bool:
        """A VQ autoencoder: deterministic encodings, quantised in the decoder (no posterior to sample)."""
        return isinstance(self.vae, VQModel)

    @torch.no_grad()
    def moments(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] in [-1, 1] -> posterior moments [B, 2c, H/f, W/f]: (mean, log-variance),
        unscaled; for a VQ autoencoder its pre-quantisation encodings [B, c, H/f, W/f]. This is what a latent
        cache stores: the scale factor and the choice between sample and mean stay with the model."""
        if self.quantised:
            return self.vae.encode(images).latents
        return self.vae.encode(images).latent_dist.parameters

    @torch.no_grad()
    def from_moments(self, moments: Tensor, mean: bool = False) -> Tensor:
        """posterior moments [B, 2c, h, w] -> scaled latents [B, c, h, w] (a sample of q(z|x), or its mean when
        not ``sample_posterior`` or ``mean``); VQ encodings [B, c, h, w] -> scaled, as they are."""
        if self.quantised:
            return moments * self.scale_factor
        posterior = DiagonalGaussianDistribution(moments)
        z = posterior.sample() if self.sample_posterior and not mean else posterior.mode()
        return z * self.scale_factor

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] in [-1, 1] -> scaled latents [B, c, H/f, W/f]."""
        return self.from_moments(self.moments(images))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """scaled latents [B, c, h, w] -> images [B, C, h*f, w*f], clamped to [-1, 1]."""
        return self.vae.decode(latents / self.scale_factor).sample.clamp(-1, 1)
