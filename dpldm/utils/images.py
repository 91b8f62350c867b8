"""Images in and out: the one image loader (fixed resize and centre crop), grids, sample folders."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
import torchvision
from PIL import Image


def load_image(source: bytes | str, size: int, mode: str = "RGB") -> torch.Tensor:
    """Decode an image (encoded bytes, or a file) to ``FloatTensor[C, size, size]`` in ``[-1, 1]`` (C = 3, or 1
    for ``mode="L"``): the shorter side resized to ``size`` (bicubic, antialiased when shrinking), centre
    cropped, a fixed affine map (no statistic of the data).

    Args:
        source: the encoded image (any format PIL reads) or its path.
        size: side ``S`` of the square output.
        mode: PIL mode of the output: ``RGB`` or ``L`` (grey).
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image = image.convert(mode)  # forces the decode; grey/palette/RGBA/CMYK -> RGB (or grey)
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    pixels = np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)  # (S, S, 3) or (S, S)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0  # (C, S, S)


def save_grid(images: torch.Tensor, path: str, nrow: int) -> str:
    """Write images [N, C, H, W] in [-1, 1] as one PNG grid; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torchvision.utils.save_image((images.float().cpu() + 1) / 2, path, nrow=nrow, padding=2, pad_value=0.5)
    return path


GRID_LIMIT = 64  # images in a grid.png: a readable page at any sample count


def grid_layout(n: int, repeat: int = 1) -> tuple[list[int], int]:
    """Which of ``n`` samples a grid shows, and its row length: with each condition repeated ``repeat`` times in
    a run, one row per condition of its first (up to 8) samples, for the first 8 conditions; else the first 64,
    8 a row. At most ``GRID_LIMIT`` images at any sample count."""
    if repeat > 1:
        per = min(repeat, 8)
        return [c * repeat + j for c in range(min(n // repeat, GRID_LIMIT // per)) for j in range(per)], per
    return list(range(min(n, GRID_LIMIT))), min(8, max(n, 1))


def write_samples(x: torch.Tensor, conds: list, out: str, nrow: int = 8,
                  grid_index: list[int] | None = None) -> np.ndarray:
    """Write images [N, C, H, W] in [-1, 1] as PNGs, ``samples.npz`` (uint8 images and their conditions) and
    ``grid.png`` (of the images at ``grid_index``, ``nrow`` a row; default the first 64) to ``out``.

    Returns:
        uint8 images [N, H, W, C].
    """
    os.makedirs(out, exist_ok=True)
    save_grid(x[grid_index if grid_index is not None else slice(0, GRID_LIMIT)], os.path.join(out, "grid.png"), nrow)
    x = (x + 1) / 2
    for i, img in enumerate(x):
        torchvision.utils.save_image(img, os.path.join(out, f"{i:05d}.png"))
    uint8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    key = "prompts" if isinstance(conds[0], str) else "labels"
    np.savez(os.path.join(out, "samples.npz"), images=uint8, **{key: np.array(conds)})
    return uint8
