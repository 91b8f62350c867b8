"""A class-conditional or open_clip text-conditional latent diffusion model fine-tuned by dpldm, as a diffusers
pipeline.

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


def open_clip_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids [B, T] as open_clip makes them: sot, BPE, eot (truncated to T = ``model_max_length``), then
    zeros (open_clip pads with id 0; a pad *token* "!" would also turn every "!" of a prompt into padding)."""
    length = tokenizer.model_max_length
    rows = tokenizer(list(prompts), truncation=True, max_length=length).input_ids
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return ids


class TextProjection(ModelMixin, ConfigMixin):
    """The run's learned projection of the text tokens to the UNet's cross-attention width."""

    @register_to_config
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [B, T, D]
        return self.linear(tokens)


class _GuidedLatentSampler(DiffusionPipeline):
    """The sampling both pipelines share: classifier-free guidance over the exported scheduler, then decode."""

    def _generate(self, ctx: torch.Tensor, null: torch.Tensor | None, steps: int, scale: float,
                  generator: torch.Generator | None, eta: float, output_type: str,
                  return_dict: bool) -> ImagePipelineOutput | tuple:
        """Images for the condition tokens ``ctx`` [B, T, D]; ``null`` [B, T, D]: the null condition."""
        device = ctx.device
        if scale != 1.0:
            ctx = torch.cat([null, ctx])  # [2B, T, D]: null half first
        b = len(ctx) // 2 if scale != 1.0 else len(ctx)
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


class DPLDMPipeline(_GuidedLatentSampler):
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
        labels = torch.as_tensor(class_labels, device=self._execution_device).long().reshape(-1)  # [B]
        n = self.conditioning.config.num_classes
        if ((labels < 0) | (labels >= n)).any():
            raise ValueError(f"class_labels must be in 0..{n - 1}, got {labels.tolist()}")
        null = self.conditioning(torch.full_like(labels, n))
        return self._generate(self.conditioning(labels), null, steps, scale, generator, eta, output_type,
                              return_dict)


class DPLDMTextPipeline(_GuidedLatentSampler):
    """UNet + autoencoder + scheduler + a frozen CLIP text encoder (the run's open_clip tower, converted) and
    the run's learned projection (None: the text width is the UNet's); the null condition is the empty prompt."""

    model_cpu_offload_seq = "text_encoder->projection->unet->vae"
    _optional_components = ["projection"]  # None when the text width is the UNet's (no default: diffusers saves
    # only the components its signature requires)

    def __init__(self, unet, vae, scheduler, text_encoder, tokenizer, projection, num_inference_steps: int = 50,
                 guidance_scale: float = 3.0):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, projection=projection)
        self.register_to_config(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)

    def _tokens(self, prompts: list[str]) -> torch.Tensor:  # prompts -> [B, T, D]
        ids = open_clip_ids(self.tokenizer, prompts).to(self._execution_device)
        tokens = self.text_encoder(ids)[0]
        return tokens if self.projection is None else self.projection(tokens)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None, eta: float = 0.0,
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Images for ``prompt`` (one each); ``output_type`` as :class:`DPLDMPipeline`'s."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = num_inference_steps or self.config.num_inference_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        null = self._tokens([""] * len(prompts)) if scale != 1.0 else None
        return self._generate(self._tokens(prompts), null, steps, scale, generator, eta, output_type, return_dict)
