"""CLIP score (Hessel et al., 2021), as torchmetrics computes it.

For an image ``x`` and its prompt ``c``: ``100 * max(cos(E_img(x), E_txt(c)), 0)`` with a frozen open_clip
model; the score of a set is the mean over its image-prompt pairs. Which model and weights gave a score
matters as much as the number, so :attr:`CLIPScore.description` names them.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

FIELD = "the `checkpoint` argument of the CLIP score (a local open_clip checkpoint file)"


class CLIPScore:
    """CLIP score of images and their prompts with a frozen open_clip model.

    Args:
        model_name: open_clip architecture (e.g. ``ViT-B-32``), or a path to a JSON architecture file
            (registered with open_clip under the file's stem).
        pretrained: open_clip pretrained tag, or ``None`` for random weights (tests only). With a
            ``checkpoint`` it still names the weights, and a known tag gives the normalisation.
        checkpoint: a local checkpoint file; takes precedence over ``pretrained`` for the weights.
        device: where the model runs.
        batch_size: image-prompt pairs per forward pass.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k",
                 checkpoint: str | None = None, device: str = "cpu", batch_size: int = 64):
        import open_clip

        from dpldm.utils.open_clip_names import resolve_open_clip

        model_name, pretrained = resolve_open_clip(model_name, pretrained, "model_name")
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"{FIELD} = {checkpoint!r}: no such file")
        source = checkpoint if checkpoint is not None else pretrained
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if checkpoint and pretrained else {}
        try:
            model = open_clip.create_model(
                model_name, pretrained=source, load_weights=source is not None, device=device,
                force_preprocess_cfg={k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg})
        except RuntimeError as err:  # unknown tag / failed download
            raise OSError(
                f"Could not load open_clip {model_name!r} with pretrained={source!r} (offline?). Download the "
                f"checkpoint on a machine with internet and set {FIELD}. Original error: {err}") from err
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name, self.pretrained, self.checkpoint = model_name, pretrained, checkpoint
        self.device, self.batch_size = torch.device(device), batch_size
        cfg = getattr(model.visual, "preprocess_cfg", {})
        size = cfg.get("size", model.visual.image_size)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), device=device).view(1, 3, 1, 1)

    @property
    def description(self) -> str:
        """The model and weights, to report with the score: ``open_clip ViT-B-32 (laion2b_s34b_b79k)``."""
        weights = self.pretrained or "random weights"
        if self.checkpoint is not None:
            tag = f"{self.pretrained}, " if self.pretrained else ""
            weights = f"{tag}checkpoint {os.path.basename(self.checkpoint)}"
        return f"open_clip {self.model_name} ({weights})"

    def preprocess(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in [-1, 1] (C = 1 or 3) -> the model's input [B, 3, h, w]: shorter side
        resized (bicubic, antialiased), centre cropped, normalised with the model's mean and std."""
        x = images.detach().float().to(self.device).clamp(-1, 1)
        x = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x) * 0.5 + 0.5  # [B, 3, H, W] in [0, 1]
        (h, w), (in_h, in_w) = self.image_size, x.shape[-2:]
        scale = max(h / in_h, w / in_w)
        new_h, new_w = max(h, round(in_h * scale)), max(w, round(in_w * scale))
        if (new_h, new_w) != (in_h, in_w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (new_h - h) // 2, (new_w - w) // 2
        x = x[:, :, top:top + h, left:left + w]  # [B, 3, h, w]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def per_pair(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Scores [N] of images [N, C, H, W] in [-1, 1] with their prompts (``prompts[i]`` for image ``i``)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts: one prompt per image")
        if len(prompts) == 0:
            raise ValueError("no images to score")
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            img = self.model.encode_image(self.preprocess(images[i:i + self.batch_size]))  # [b, E]
            tokens = self.tokenizer(list(prompts[i:i + self.batch_size])).to(self.device)  # [b, T]
            txt = self.model.encode_text(tokens)  # [b, E]
            cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)  # [b]
            scores.append(100 * cos.clamp(min=0))
        return torch.cat(scores).cpu()

    def __call__(self, images: Tensor, prompts: list[str]) -> float:
        """Mean CLIP score over the image-prompt pairs."""
        return float(self.per_pair(images, prompts).mean())
