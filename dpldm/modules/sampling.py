"""DDIM sampling (Song et al., 2021) with classifier-free guidance (Ho & Salimans, 2022).

Guided prediction: eps = eps(z, null) + s * (eps(z, c) - eps(z, null)); s = 1 is plain conditional
sampling. Conditional and unconditional halves run as one batch of 2B.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from dpldm.modules.conditioning import Conditioner


@torch.no_grad()
def sample_latents(
    unet: torch.nn.Module,
    conditioner: Conditioner,
    cond: object,
    train_scheduler: DDPMScheduler,
    shape: tuple[int, int, int],
    num_steps: int = 50,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Draw latents z_0 for a batch of conditions.

    Args:
        unet: denoiser.
        conditioner: turns ``cond`` (and its null) into tokens.
        cond: a batch of B conditions (labels [B] or B captions).
        train_scheduler: the training noise schedule; DDIM reuses its betas and prediction type.
        shape: latent shape (c, h, w).
        num_steps: DDIM steps.
        guidance_scale: s; 1 disables guidance (and halves the cost).
        eta: DDIM stochasticity (0 = deterministic).
        generator: RNG for the initial noise and eta > 0.
        progress: show a progress bar.

    Returns:
        Latents [B, c, h, w].
    """
    device = next(unet.parameters()).device
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(num_steps, device=device)
    b = len(cond)
    ctx = conditioner(cond)  # [B, T, D]
    if guidance_scale != 1.0:
        ctx = torch.cat([conditioner(conditioner.null(b)), ctx])  # [2B, T, D]: null half first
    z = torch.randn((b, *shape), generator=generator, device=device)
    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for t in steps:
        z_in = torch.cat([z, z]) if guidance_scale != 1.0 else z
        out = unet(z_in, t, encoder_hidden_states=ctx).sample
        if guidance_scale != 1.0:
            out_null, out_cond = out.chunk(2)
            out = out_null + guidance_scale * (out_cond - out_null)
        z = scheduler.step(out, t, z, eta=eta, generator=generator).prev_sample
    return z
