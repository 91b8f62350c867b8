"""The forward process q(z_t | z_0) a model trains and samples on, and what its UNet predicts.

A pretrained UNet was trained on one schedule (betas, number of steps) to predict one target: the noise
(``epsilon``), the velocity v = alpha_t eps - sigma_t z_0 (``v_prediction``, Salimans & Ho 2022; SD 2.x 768)
or z_0 itself (``sample``). Fine-tuning it against another target silently trains a different model, so the
default is the base pipeline's own scheduler config, and a configured schedule that contradicts it is refused.
"""

from __future__ import annotations

from diffusers import DDPMScheduler

from dpldm.errors import ConfigError

FIELD = "model.init_args.noise_scheduler"
KEYS = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end")  # what must agree


def ldm_noise_schedule() -> DDPMScheduler:
    """The schedule of LDM/Stable Diffusion: 1000 steps, scaled-linear betas 0.00085 -> 0.012."""
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def training_schedule(configured: DDPMScheduler | None, base: dict | None) -> DDPMScheduler:
    """The schedule to train on.

    Args:
        configured: the config's ``noise_scheduler`` (None: not set).
        base: the base pipeline's scheduler config (``unet.base_scheduler_config``), None if it has none.

    Raises:
        ConfigError: ``configured`` disagrees with ``base`` on the prediction type or the betas.
    """
    if configured is None:
        return DDPMScheduler.from_config(base) if base else ldm_noise_schedule()
    if base:
        base_schedule = DDPMScheduler.from_config(base).config  # the base's values, with DDPM's defaults
        for key in KEYS:
            if configured.config[key] != base_schedule[key]:
                raise ConfigError(f"{FIELD}.init_args.{key}", configured.config[key],
                                  f"the base model was trained with {key} = {base_schedule[key]!r}; remove "
                                  f"{FIELD} to use the base model's scheduler")
    return configured
