"""Sample folders: every image saved, and a grid.png that stays one readable page at any sample count."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dpldm.utils.images import grid_layout, write_samples


def test_a_grid_shows_at_most_64_images_one_row_per_condition():
    index, per_row = grid_layout(10 * 1000, repeat=1000)  # `dpldm sample --labels all --repeat 1000`
    assert per_row == 8 and index == [c * 1000 + j for c in range(8) for j in range(8)]
    assert grid_layout(30, repeat=3) == ([c * 3 + j for c in range(10) for j in range(3)], 3)
    assert grid_layout(5) == ([0, 1, 2, 3, 4], 5) and grid_layout(1000) == (list(range(64)), 8)


def test_write_samples_keeps_every_image_and_a_capped_grid(tmp_path):
    x = torch.rand(300, 1, 8, 8) * 2 - 1
    conds = [c for c in range(3) for _ in range(100)]
    index, per_row = grid_layout(len(conds), repeat=100)
    uint8 = write_samples(x, conds, str(tmp_path), per_row, index)
    assert uint8.shape == (300, 8, 8, 1) and len(list(tmp_path.glob("0*.png"))) == 300
    saved = np.load(tmp_path / "samples.npz")
    assert list(saved["labels"]) == conds
    width, height = Image.open(tmp_path / "grid.png").size
    assert (width, height) == (8 * 10 + 2, 3 * 10 + 2)  # 8 a row, a row per label (8 px + 2 px padding)
