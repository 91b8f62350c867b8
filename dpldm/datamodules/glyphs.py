"""Procedurally rendered characters: a *public* dataset that needs no download.

Each sample is one character drawn in a random bundled font (see :mod:`glyph_fonts`) with
random size, affine jitter, stroke width, blur and noise, as bright ink on black, like the
private digits. Optionally the strokes are bent by an elastic deformation (Simard, Steinkraus
and Platt, ICDAR 2003: a random displacement field smoothed by a Gaussian), the standard way
to make printed characters vary like handwriting. Sample ``i`` of a split is rendered from a
RNG seeded by ``(seed, split, i)``, so the dataset is map-style, reproducible and rendered lazily in ``__getitem__``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

from dpldm.datamodules.base import SPLITS, ImageDataModule
from dpldm.datamodules.glyph_fonts import load_font, usable_fonts
from dpldm.errors import ConfigError

DEFAULT_CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class GlyphDataset(Dataset):
    """``length`` rendered characters; item ``i`` has label ``i % len(characters)``.

    Args:
        characters: the classes; class ``k`` is ``characters[k]``.
        fonts: ``(spec, height_ratio)`` pairs from :func:`glyph_fonts.usable_fonts`.
        length: number of samples.
        image_size: output side in pixels; glyphs are drawn at twice this and downsampled.
        seed: base seed (>= 0).
        split_id: index of the split, mixed into every sample's seed.
        max_rotation: largest rotation in degrees (either direction).
        max_stroke: largest extra outline width, in output pixels.
        elastic: largest RMS displacement of the elastic deformation, in output pixels (0: none).
        elastic_smoothness: standard deviation of the Gaussian that smooths the displacement field,
            in output pixels (larger: broader, gentler bends).
    """

    def __init__(
        self, characters: str, fonts: tuple, length: int, image_size: int,
        seed: int, split_id: int, max_rotation: float, max_stroke: float,
        elastic: float, elastic_smoothness: float,
    ):
        self.characters, self.fonts, self.length = characters, fonts, length
        self.image_size, self.canvas = image_size, 2 * image_size
        self.seed, self.split_id, self.max_rotation = seed, split_id, max_rotation
        self.max_stroke, self.elastic, self.elastic_smoothness = max_stroke, elastic, elastic_smoothness
        self._font_cache: dict = {}  # (font index, size) -> FreeTypeFont; per process

    def __getstate__(self) -> dict:
        # Font objects (Pillow's default one wraps a BytesIO) are rebuilt in each worker.
        return {**self.__dict__, "_font_cache": {}}

    def __len__(self) -> int:
        return self.length

    def _font(self, index: int, size: int):
        """Cached font ``index`` at ``size`` px.

        Args:
            index: position in ``self.fonts``.
            size: font size in pixels.
        """
        key = (index, size)
        if key not in self._font_cache:
            self._font_cache[key] = load_font(self.fonts[index][0], size)
        return self._font_cache[key]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.split_id, index])
        label = index % len(self.characters)
        S = self.canvas
        # Draw the random augmentation parameters (all from this sample's own RNG).
        font_idx = int(rng.integers(len(self.fonts)))
        height = rng.uniform(0.68, 0.92) * S  # target ink height on the canvas
        stroke = int(rng.integers(0, round(2 * self.max_stroke) + 1))  # outline width, canvas px
        ink = int(rng.uniform(200, 256))
        angle = math.radians(rng.uniform(-self.max_rotation, self.max_rotation))
        shear = rng.uniform(-0.2, 0.2)
        aspect = rng.uniform(0.85, 1.15)
        shift = rng.uniform(-0.06, 0.06, size=2) * S
        blur = rng.uniform(0.5, 2.5)  # Gaussian radius, canvas px
        noise = rng.uniform(0.0, 0.04)
        # Render at a font size giving the target height, then locate the ink.
        size = max(6, round(height / self.fonts[font_idx][1]))
        side = 2 * size + 4 * stroke + 8
        glyph = Image.new("L", (side, side), 0)
        ImageDraw.Draw(glyph).text(
            (side / 2, side / 2), self.characters[label], fill=ink, anchor="mm",
            font=self._font(font_idx, size), stroke_width=stroke, stroke_fill=ink,
        )
        x0, y0, x1, y1 = glyph.getbbox() or (0, 0, side, side)
        # Linear part: rotation @ shear @ scale; shrink wide glyphs so they stay on canvas.
        fit = min(1.0, 0.9 * S / max((x1 - x0) * aspect, 1), 0.95 * S / max(y1 - y0, 1))
        cos, sin = math.cos(angle), math.sin(angle)
        a, b = cos * aspect * fit, (cos * shear - sin) * fit
        c, d = sin * aspect * fit, (sin * shear + cos) * fit
        # PIL's AFFINE maps output pixels to input pixels, so pass the inverse transform.
        det = a * d - b * c
        ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
        ox, oy = S / 2 + shift[0], S / 2 + shift[1]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        coeffs = (ia, ib, cx - ia * ox - ib * oy, ic, id_, cy - ic * ox - id_ * oy)
        out = glyph.transform((S, S), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
        if self.elastic > 0:
            out = self._deform(out, rng)
        # Soften the strokes, then downsample 2x with antialiasing.
        out = out.filter(ImageFilter.GaussianBlur(blur))
        out = out.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        # Fixed-constant scaling /255, a little additive noise, clip, map to [-1, 1].
        pixels = np.asarray(out, dtype=np.float32) / 255.0
        pixels = pixels + rng.normal(0.0, noise, pixels.shape).astype(np.float32)
        image = torch.from_numpy(np.clip(pixels, 0.0, 1.0) * 2.0 - 1.0).unsqueeze(0)
        return {"image": image, "label": label}

    def _deform(self, canvas: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Elastic deformation (Simard et al. 2003): move each pixel by a smooth random field.

        The field is uniform noise in [-1, 1] per axis, smoothed by a Gaussian of std
        ``elastic_smoothness`` and rescaled to an RMS displacement drawn in [0, ``elastic``].

        Args:
            canvas: the glyph on the canvas (2x the output side).
            rng: this sample's RNG.
        """
        from scipy.ndimage import gaussian_filter, map_coordinates

        S, scale = self.canvas, self.canvas / self.image_size  # canvas px per output px
        smooth = scale * self.elastic_smoothness
        field = gaussian_filter(rng.uniform(-1, 1, (2, S, S)), (0, smooth, smooth))
        rms = float(np.sqrt((field**2).sum(0).mean())) or 1.0
        field *= rng.uniform(0, self.elastic) * scale / rms  # [2, S, S], canvas px
        rows, cols = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
        pixels = map_coordinates(np.asarray(canvas, np.float32), (rows + field[0], cols + field[1]), order=1)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class GlyphsDataModule(ImageDataModule):
    """Characters rendered from bundled fonts; classes are positions in ``characters``.

    Args:
        characters: the characters to draw, one class each (no repeats).
        image_size: side of the square output images, in pixels.
        num_train: training samples.
        num_val: validation samples.
        num_test: test samples.
        max_rotation: largest random rotation in degrees, in [0, 180].
        max_stroke: largest extra outline width in output pixels (>= 0): thicker pens.
        elastic: largest RMS displacement in output pixels (>= 0) of the elastic deformation that bends
            printed strokes towards handwriting (Simard et al. 2003); 0 draws the fonts unbent.
        elastic_smoothness: std in output pixels (> 0) of the Gaussian smoothing the displacement field.
        batch_size: examples per batch (>= 1).
        num_workers: DataLoader worker processes (>= 0).
        seed: seed (>= 0) of every sample's rendering and of the training shuffle.
    """

    public = True  # a public pretraining set: non-DP fits are allowed

    channels = 1

    def __init__(
        self,
        characters: str = DEFAULT_CHARACTERS,
        image_size: int = 32,
        num_train: int = 20000,
        num_val: int = 1000,
        num_test: int = 1000,
        max_rotation: float = 12.0,
        max_stroke: float = 1.5,
        elastic: float = 0.0,
        elastic_smoothness: float = 4.0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        # Validate everything before any font is opened.
        if not characters or len(set(characters)) != len(characters):
            raise ConfigError("data.init_args.characters", characters, "must be non-empty, no repeats")
        if image_size < 8:
            raise ConfigError("data.init_args.image_size", image_size, "must be >= 8")
        for field, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ConfigError(f"data.init_args.{field}", value, "must be >= 1")
        if not 0.0 <= max_rotation <= 180.0:
            raise ConfigError("data.init_args.max_rotation", max_rotation, "must be in [0, 180]")
        for field, value in (("max_stroke", max_stroke), ("elastic", elastic)):
            if value < 0:
                raise ConfigError(f"data.init_args.{field}", value, "must be >= 0")
        if elastic_smoothness <= 0:
            raise ConfigError("data.init_args.elastic_smoothness", elastic_smoothness, "must be > 0")
        if seed < 0:
            raise ConfigError("data.init_args.seed", seed, "must be >= 0")
        self.characters, self.image_size, self.max_rotation = characters, image_size, max_rotation
        self.max_stroke, self.elastic, self.elastic_smoothness = max_stroke, elastic, elastic_smoothness
        self.num_classes = len(characters)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        # Fail now, not mid-epoch, if no bundled font can draw the characters.
        self.fonts = usable_fonts(characters)
        if not self.fonts:
            raise ConfigError(
                "data.init_args.characters", characters,
                "no bundled font (matplotlib's ttf fonts, Pillow's default) draws all of them",
            )

    def _build(self, split: str) -> Dataset:
        """Return the lazily rendered dataset of one split.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
        """
        return GlyphDataset(
            self.characters, self.fonts, self.sizes[split], self.image_size,
            self.seed, SPLITS.index(split), self.max_rotation, self.max_stroke,
            self.elastic, self.elastic_smoothness,
        )
