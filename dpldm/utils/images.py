"""Image grids."""

from __future__ import annotations

import os

import torch
import torchvision


def save_grid(images: torch.Tensor, path: str, nrow: int) -> str:
    """Write images [N, C, H, W] in [-1, 1] as one PNG grid; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torchvision.utils.save_image((images.float().cpu() + 1) / 2, path, nrow=nrow, padding=2, pad_value=0.5)
    return path
