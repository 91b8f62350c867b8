"""Find the fonts that can draw a set of characters, using only fonts shipped with the stack.

Candidates are matplotlib's bundled TrueType fonts (DejaVu, STIX, Computer Modern, ...) and
Pillow's built-in FreeType default font. Many bundled fonts are symbol or extension fonts
(``cmex10``, ``cmsy10``, the STIX size variants) that map ASCII code points to unrelated
glyphs or to nothing, so each candidate is checked twice:

1. its character map must send every character to the glyph of that name (``"A"`` to ``A``,
   ``"0"`` to ``zero``, not ``parenlefttp`` or ``zerooldstyle``), when fontTools is present;
2. rendered, every character must leave visible ink, differ from every other requested
   character, and differ from the font's "missing glyph" box.
"""

from __future__ import annotations

import functools
import glob
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Font spec used for Pillow's embedded default font (it has no file path).
PIL_DEFAULT = "<pillow-default>"
# Size (px) at which candidates are checked and their glyph heights measured.
_PROBE_SIZE = 48
# A code point no font here defines: renders as the font's "missing glyph" box, if any.
_MISSING = "\U0010fffd"


def load_font(spec: str, size: int) -> ImageFont.FreeTypeFont:
    """Open one font at a pixel size.

    Args:
        spec: path of a TrueType file, or :data:`PIL_DEFAULT` for Pillow's default font.
        size: font size in pixels.
    """
    if spec == PIL_DEFAULT:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(spec, size)


def render_ink(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray:
    """Render ``char`` on a black canvas and return the crop to its ink (empty if none).

    Args:
        font: the font to draw with.
        char: one character.
    """
    side = int(font.size * 2) + 8
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).text((side / 2, side / 2), char, fill=255, font=font, anchor="mm")
    box = canvas.getbbox()
    return np.zeros((0, 0), np.uint8) if box is None else np.asarray(canvas.crop(box))


def _names_match(path: str, characters: str) -> bool:
    """Whether the font's character map sends each character to its standard glyph name.

    Args:
        path: TrueType file.
        characters: the characters to look up.
    """
    try:
        from fontTools.agl import UV2AGL
        from fontTools.ttLib import TTFont
    except ImportError:  # fontTools ships with matplotlib; without it rely on rendering alone.
        return True
    try:
        cmap = TTFont(path, lazy=True).getBestCmap() or {}
    except Exception:  # unreadable or exotic file: not a usable font
        return False
    for char in characters:
        name, expected = cmap.get(ord(char)), UV2AGL.get(ord(char))
        if name is None:
            return False
        aliases = {expected, f"uni{ord(char):04X}", f"u{ord(char):04X}"}
        if expected is not None and name not in aliases and not name.startswith(expected + "."):
            return False
    return True


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two ink crops look alike (same shape and nearly the same pixels).

    Args:
        a: first crop.
        b: second crop.
    """
    return a.shape == b.shape and float(np.abs(a.astype(np.int16) - b).mean()) < 8.0


def _renders_all(spec: str, characters: str) -> float | None:
    """Check by rendering; return the median ink height per pixel of font size, or None.

    Args:
        spec: font spec (see :func:`load_font`).
        characters: the characters the font must draw.
    """
    try:
        font = load_font(spec, _PROBE_SIZE)
    except (OSError, ValueError):
        return None
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow built without FreeType
        return None
    missing = render_ink(font, _MISSING)
    crops = [render_ink(font, char) for char in characters]
    for i, crop in enumerate(crops):
        # Visible: a real glyph covers more than a few pixels.
        if crop.size == 0 or int((crop > 127).sum()) < 10:
            return None
        # Distinct: not the missing-glyph box and not another requested character.
        if missing.size and _same(crop, missing):
            return None
        if any(_same(crop, other) for other in crops[:i]):
            return None
    return float(np.median([crop.shape[0] for crop in crops])) / _PROBE_SIZE


@functools.lru_cache(maxsize=8)
def usable_fonts(characters: str) -> tuple[tuple[str, float], ...]:
    """Fonts (sorted, deterministic) that draw every character, with their height ratios.

    Args:
        characters: the characters every kept font must draw.

    Returns:
        ``(spec, ratio)`` pairs: ``spec`` for :func:`load_font`; ``ratio`` is the median ink
        height of the characters divided by the font size, used to size glyphs uniformly.
    """
    import matplotlib

    pattern = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "*.ttf")
    kept = []
    for spec in sorted(glob.glob(pattern)) + [PIL_DEFAULT]:
        if spec != PIL_DEFAULT and not _names_match(spec, characters):
            continue
        ratio = _renders_all(spec, characters)
        if ratio is not None:
            kept.append((spec, ratio))
    return tuple(kept)
