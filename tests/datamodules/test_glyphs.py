"""GlyphsDataModule: fonts that really draw the characters, deterministic lazy rendering."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
import torch

from dpldm.datamodules import GlyphsDataModule
from dpldm.datamodules.glyph_fonts import PIL_DEFAULT, load_font, render_ink, usable_fonts
from dpldm.errors import ConfigError

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@pytest.fixture(scope="module")
def dm():
    return GlyphsDataModule(num_train=200, num_val=50, num_test=50, batch_size=16)


def test_font_selection_drops_symbol_fonts():
    names = {os.path.basename(spec) for spec, _ in usable_fonts(CHARS)}
    assert {"DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "cmr10.ttf", PIL_DEFAULT} <= names
    # Symbol/extension fonts map ASCII to other glyphs (or none): they must be gone.
    for bad in ("cmex10.ttf", "cmsy10.ttf", "cmmi10.ttf", "LastResortHE-Regular.ttf", "STIXSizOneSymReg.ttf"):
        assert bad not in names


def test_kept_fonts_render_distinct_visible_glyphs():
    for spec, ratio in usable_fonts(CHARS):
        font = load_font(spec, 24)
        crops = [render_ink(font, c) for c in "0O8B1I"]
        assert all(crop.size and crop.max() > 127 for crop in crops), spec
        assert len({(c.shape, c.tobytes()) for c in crops}) == len(crops), spec
        assert 0.4 < ratio < 1.0, spec


def test_items_shape_range_and_labels(dm):
    ds = dm._build("train")
    assert len(ds) == 200 and dm.num_train_samples == 200 and dm.num_classes == 36
    for i in (0, 1, 37, 199):
        item = ds[i]
        image = item["image"]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert item["label"] == i % 36
        # Bright ink on a dark background: the border is near black, the glyph is bright.
        border = torch.cat([image[0, 0], image[0, -1], image[0, :, 0], image[0, :, -1]])
        assert border.mean() < -0.7 and image.max() > 0.3


def test_rendering_is_deterministic_and_split_dependent(dm):
    ds = dm._build("train")
    assert torch.equal(ds[5]["image"], ds[5]["image"])
    fresh = GlyphsDataModule(num_train=200, num_val=50, num_test=50)._build("train")
    assert torch.equal(ds[5]["image"], fresh[5]["image"])
    assert not torch.equal(ds[5]["image"], dm._build("val")[5]["image"])
    other_seed = GlyphsDataModule(num_train=200, seed=1)._build("train")
    assert not torch.equal(ds[5]["image"], other_seed[5]["image"])
    # Survives pickling (DataLoader workers) with identical output.
    assert torch.equal(pickle.loads(pickle.dumps(ds))[5]["image"], ds[5]["image"])


def test_different_classes_look_different(dm):
    ds = dm._build("train")
    # Mean image per class over 5 samples each; distinct classes must differ clearly.
    means = torch.stack([torch.stack([ds[k + 36 * j]["image"] for j in range(5)]).mean(0) for k in range(36)])
    flat = means.flatten(1)
    dist = torch.cdist(flat, flat)
    off_diagonal = dist[~torch.eye(36, dtype=torch.bool)]
    assert off_diagonal.min() > 1.0


def test_augmentations_vary_within_a_class(dm):
    ds = dm._build("train")
    same_class = [ds[3 + 36 * j]["image"] for j in range(4)]
    assert all(not torch.equal(same_class[0], other) for other in same_class[1:])


def test_custom_characters_and_image_size():
    module = GlyphsDataModule(characters="xyz", image_size=16, num_train=6)
    assert module.num_classes == 3 and module.image_size == 16
    assert module._build("train")[4]["image"].shape == (1, 16, 16)


def test_render_speed():
    ds = GlyphsDataModule(num_train=400)._build("train")
    ds[0]
    start = time.perf_counter()
    for i in range(400):
        ds[i]
    per_item_ms = (time.perf_counter() - start) / 400 * 1e3
    assert per_item_ms < 5.0  # ~0.3 ms here; generous for slow CI machines


def test_dataloader_batches(dm):
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 1, 32, 32) and batch["label"].dtype == torch.int64
    assert len(list(dm.test_dataloader())) == 4  # 50 items, batch 16, last kept


@pytest.mark.parametrize(
    "kwargs",
    [{"characters": ""}, {"characters": "AA"}, {"num_train": 0}, {"max_rotation": -1.0}, {"seed": -1}, {"image_size": 4}, {"characters": "\U0010fffd"}],
)
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        GlyphsDataModule(**kwargs)


def test_glyph_digits_resemble_private_digits_in_brightness(dm):
    # Public glyphs and private digits are both bright ink on black with a similar ink share.
    from dpldm.datamodules import DigitsDataModule

    digits = DigitsDataModule(image_size=32)._build("train").images[:200]
    glyphs = torch.stack([dm._build("train")[i]["image"] for i in range(200)])
    ink_digits, ink_glyphs = (digits > 0).float().mean(), (glyphs > 0).float().mean()
    assert 0.5 < float(ink_glyphs / ink_digits) < 2.0
    assert np.isclose(float(digits.min()), -1.0) and float(glyphs.min()) == -1.0


def test_elastic_deformation_bends_strokes_deterministically_and_keeps_the_ink():
    plain = GlyphsDataModule(characters="0123456789", num_train=40)._build("train")
    bent = GlyphsDataModule(characters="0123456789", num_train=40, elastic=2.0)._build("train")
    a, b = torch.stack([plain[i]["image"] for i in range(40)]), torch.stack([bent[i]["image"] for i in range(40)])
    assert torch.equal(b, torch.stack([bent[i]["image"] for i in range(40)]))  # same seed, same bend
    moved = (a - b).abs().mean(dim=(1, 2, 3))
    assert (moved > 0).float().mean() > 0.9  # every draw of the RMS (uniform in [0, 2] px) bends nearly all
    ink = lambda x: (x + 1).sum(dim=(1, 2, 3))  # noqa: E731 -- a smooth field moves ink, it does not erase it
    assert torch.allclose(ink(b), ink(a), rtol=0.25)
    assert [bent[i]["label"] for i in range(10)] == list(range(10))


def test_elastic_field_matches_a_brute_force_displacement():
    """The deformation samples the canvas at (row + dy, col + dx): check it on a field made by hand."""
    from PIL import Image

    ds = GlyphsDataModule(characters="01", num_train=2, elastic=3.0, elastic_smoothness=2.0)._build("train")
    canvas = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8))
    out = np.asarray(ds._deform(canvas, np.random.default_rng(1)), dtype=np.float64)
    # Re-draw the same field and move each pixel by bilinear interpolation, one pixel at a time.
    from scipy.ndimage import gaussian_filter

    rng, src = np.random.default_rng(1), np.asarray(canvas, dtype=np.float64)
    field = gaussian_filter(rng.uniform(-1, 1, (2, 64, 64)), (0, 4.0, 4.0))
    field *= rng.uniform(0, 3.0) * 2 / np.sqrt((field**2).sum(0).mean())
    assert 0 < np.sqrt((field**2).sum(0).mean()) <= 6.0  # RMS <= elastic, in output px (2 canvas px each)

    def bilinear(y, x):
        if not (0 <= y <= 63 and 0 <= x <= 63):
            return 0.0
        y0, x0 = min(int(y), 62), min(int(x), 62)
        fy, fx = y - y0, x - x0
        return ((1 - fy) * (1 - fx) * src[y0, x0] + (1 - fy) * fx * src[y0, x0 + 1]
                + fy * (1 - fx) * src[y0 + 1, x0] + fy * fx * src[y0 + 1, x0 + 1])

    for r, c in [(5, 7), (20, 40), (33, 33), (50, 12), (62, 60)]:
        expected = bilinear(r + field[0, r, c], c + field[1, r, c])
        assert abs(out[r, c] - np.clip(expected, 0, 255)) <= 1.0, (r, c)


@pytest.mark.parametrize("field, value", [("elastic", -1.0), ("max_stroke", -0.5), ("elastic_smoothness", 0.0)])
def test_bad_handwriting_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"data.init_args.{field}"):
        GlyphsDataModule(**{field: value})
