"""A class-conditional latent diffusion model fine-tuned by dpldm, as a diffusers pipeline.

`dpldm export` copies this file into the exported folder (``pipeline.py``, and ``conditioning/pipeline.py`` for
the class embedding), so the folder needs torch and diffusers only, not dpldm:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=20, guidance_scale=3.0).images

Sampling is dpldm's (``dpldm.modules.sampling``): classifier-free guidance (Ho & Salimans, 2022),
eps = eps(z, null) + s (eps(z, c) - eps(z, null)), the null and conditional halves as one batch of 2B, with the
exported scheduler (the run's solver on its training schedule), then the autoencoder's decoder.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class ClassEmbedding(ModelMixin, ConfigMixin):
    """``num_tokens`` learned tokens of width ``embed_dim`` per class; index ``num_classes`` is the null class."""

    @register_to_config
    def __init__(self, num_classes: int, embed_dim: int, num_tokens: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_classes + 1, embed_dim * num_tokens)  # last row: null class

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # [B] -> [B, T, D]
        return self.embedding(labels).view(labels.shape[0], self.config.num_tokens, self.config.embed_dim)


class DPLDMPipeline(DiffusionPipeline):
    """UNet + autoencoder + scheduler + class embedding; defaults are the run's own sampling settings."""

    model_cpu_offload_seq = "conditioning->unet->vae"

    def __init__(self, unet, vae, scheduler, conditioning, num_inference_steps: int = 50,
                 guidance_scale: float = 3.0):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, conditioning=conditioning)
        self.register_to_config(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None, eta: float = 0.0,
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Images for ``class_labels`` (one each); ``output_type`` ``pil``, ``np`` ([B, H, W, C] in [0, 1]) or
        ``pt`` ([B, C, H, W] in [-1, 1])."""
        steps = num_inference_steps or self.config.num_inference_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        device = self._execution_device
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)  # [B]
        n = self.conditioning.config.num_classes
        if ((labels < 0) | (labels >= n)).any():
            raise ValueError(f"class_labels must be in 0..{n - 1}, got {labels.tolist()}")
        b = len(labels)
        ctx = self.conditioning(labels)  # [B, T, D]
        if scale != 1.0:
            ctx = torch.cat([self.conditioning(torch.full_like(labels, n)), ctx])  # [2B, T, D]: null half first
        size = self.unet.config.sample_size
        z = torch.randn((b, self.unet.config.in_channels, size, size), generator=generator, device=device)
        self.scheduler.set_timesteps(steps, device=device)
        extra = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}  # DDIM
        for t in self.progress_bar(self.scheduler.timesteps):
            z_in = torch.cat([z, z]) if scale != 1.0 else z
            out = self.unet(z_in, t, encoder_hidden_states=ctx).sample
            if scale != 1.0:
                out_null, out_cond = out.chunk(2)
                out = out_null + scale * (out_cond - out_null)
            z = self.scheduler.step(out, t, z, generator=generator, **extra).prev_sample
        x = self.vae.decode(z / self.vae.config.scaling_factor).sample.clamp(-1, 1)  # [B, C, H, W]
        if output_type != "pt":
            x = ((x + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()  # [B, H, W, C] in [0, 1]
            if output_type == "pil":
                x = self.numpy_to_pil(x)
        return ImagePipelineOutput(images=x) if return_dict else (x,)
