"""The denoising loss of DDPM (Ho et al., 2020) in latent space, one value per example.

Returning a per-example loss [B] (never a batch mean) is what DP-SGD needs: with K noise/timestep
draws per example, the K losses are averaged into one per-example loss, and that example's whole
gradient is clipped once (Lyu et al., DP-LDM). Each design choice is a tiny swappable class
(timestep sampling, loss weighting), in the spirit of Stability-AI's generative-models.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from dpldm.modules.unet import denoise


class TimestepSampler:
    """Draws training timesteps t in [0, num_train_timesteps)."""

    def __call__(self, n: int, num_train_timesteps: int, device: torch.device) -> Tensor:  # -> [n] long
        raise NotImplementedError


class UniformTimesteps(TimestepSampler):
    """t ~ U{0, ..., T-1}, as in DDPM and LDM."""

    def __call__(self, n: int, num_train_timesteps: int, device: torch.device) -> Tensor:
        return torch.randint(0, num_train_timesteps, (n,), device=device)


class LossWeighting:
    """A weight w(t) per draw multiplying its squared error."""

    def __call__(self, t: Tensor, scheduler: DDPMScheduler) -> Tensor:  # [n] -> [n]
        raise NotImplementedError


class UnitWeighting(LossWeighting):
    """w(t) = 1: the "simple" loss of DDPM."""

    def __call__(self, t: Tensor, scheduler: DDPMScheduler) -> Tensor:
        return torch.ones(t.shape, device=t.device)


class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma (Hang et al., 2023): w = min(SNR(t), gamma) / SNR(t) for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v targets, min(SNR, gamma) for z_0 (``sample``) targets.

    Args:
        gamma: the SNR cap (5 in the paper).
    """

    def __init__(self, gamma: float = 5.0):
        self.gamma = gamma

    def __call__(self, t: Tensor, scheduler: DDPMScheduler) -> Tensor:
        alpha_bar = scheduler.alphas_cumprod.to(t.device)[t]
        snr = alpha_bar / (1 - alpha_bar)
        kind = scheduler.config.prediction_type
        denom = snr + 1 if kind == "v_prediction" else torch.ones_like(snr) if kind == "sample" else snr
        return snr.clamp(max=self.gamma) / denom


def denoising_loss(
    unet: torch.nn.Module,
    latents: Tensor,
    context: Tensor,
    scheduler: DDPMScheduler,
    timesteps: TimestepSampler,
    weighting: LossWeighting,
    noise_draws: int = 1,
    t: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Per-example loss: the mean over K (t, noise) draws of w(t) * ||target - net(z_t, t, c)||^2 / dim.

    Args:
        unet: denoiser, called through :func:`~dpldm.modules.unet.denoise`.
        latents: clean latents z_0 [B, c, h, w].
        context: conditioning tokens [B, T, D]; None for an unconditional UNet.
        scheduler: the forward process (betas, prediction type).
        timesteps: how t is drawn.
        weighting: w(t).
        noise_draws: K draws per example.
        t: fixed timesteps [B*K] (the K of an example adjacent) instead of drawn ones (the audit's scores).
        noise: fixed noise [B*K, c, h, w] instead of drawn noise.

    Returns:
        Loss per example [B].
    """
    b = latents.shape[0]
    z0 = latents.repeat_interleave(noise_draws, 0)  # [B*K, c, h, w], draws of one example adjacent
    ctx = None if context is None else context.repeat_interleave(noise_draws, 0)  # [B*K, T, D]
    if t is None:
        t = timesteps(z0.shape[0], scheduler.config.num_train_timesteps, z0.device)  # [B*K]
    noise = torch.randn_like(z0) if noise is None else noise
    z_t = scheduler.add_noise(z0, noise, t)
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type {kind!r}: dpldm trains epsilon, v_prediction or sample")
    target = {"epsilon": noise, "sample": z0}.get(kind)
    target = scheduler.get_velocity(z0, noise, t) if target is None else target  # v = alpha_t eps - sigma_t z_0
    pred = denoise(unet, z_t, t, ctx)
    per_draw = (pred.float() - target.float()).pow(2).flatten(1).mean(1) * weighting(t, scheduler)  # [B*K]
    return per_draw.view(b, noise_draws).mean(1)  # [B]
