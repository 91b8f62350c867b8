"""Your own images: a folder of class subfolders, or of images with a captions file, as a map-style private set.

Two layouts (``root``):

- class-conditional: ``root/<class>/*.png|jpg|jpeg|webp``; classes are the subfolder names in sorted order
  (labels 0..C-1), items ``{"image", "label"}``;
- text-conditional: images anywhere under ``root`` and ``captions``, a CSV (columns ``file,caption``) or JSONL
  (``{"file": ..., "caption": ...}`` per line) file, ``file`` relative to ``root``; items
  ``{"image", "caption", "key"}``.

Images are resized (shorter side to ``image_size``, bicubic), centre-cropped and mapped to [-1, 1] by the fixed
affine x / 127.5 - 1, as the LAION shards are (:func:`dpldm.utils.images.load_image`). Bad records are
handled as there too: every record is decoded once when the split is built (with a progress bar); a missing or
undecodable image and a missing caption are skipped and counted by reason, and the build fails, naming
``max_bad_fraction``, when more than that fraction was bad. The training split's size N is then known, as
Poisson sampling and its accountant need (DP-SGD reads it map-style, by index).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional

from torch.utils.data import Dataset

from dpldm.datamodules.base import ImageDataModule
from dpldm.datamodules.skip_stats import IMAGE_EXTENSIONS, MISSING_CAPTION, MISSING_IMAGE, UNDECODABLE_IMAGE
from dpldm.errors import ConfigError
from dpldm.utils.images import load_image

FIELD = "data.init_args"


def read_captions(path: str) -> list[tuple[str, Optional[str]]]:
    """``(file, caption or None)`` pairs of a CSV (``file,caption``) or JSONL captions file, in file order."""
    field = f"{FIELD}.captions"
    if not os.path.isfile(path):
        raise ConfigError(field, path, "no such file (a CSV with columns file,caption, or JSONL)")
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f))
    if rows and not {"file", "caption"} <= set(rows[0]):
        raise ConfigError(field, path, f"needs the columns file and caption (found {sorted(rows[0])})")
    return [(r["file"], (r.get("caption") or "").strip() or None) for r in rows]


class ImageFolderDataset(Dataset):
    """Decoded, resized images of a list of checked records (``{"path", "label" or "caption"}``)."""

    def __init__(self, records: list[dict], image_size: int, mode: str):
        self.records, self.image_size, self.mode = records, image_size, mode

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        with open(record["path"], "rb") as f:
            image = load_image(f.read(), self.image_size, self.mode)  # [C, S, S] in [-1, 1]
        if "caption" in record:
            return {"image": image, "caption": record["caption"], "key": record["key"]}
        return {"image": image, "label": record["label"]}


class ImageFolderDataModule(ImageDataModule):
    """Private images from a folder (see the module docstring for the layouts).

    Args:
        root: the training images (class subfolders, or images with ``captions``).
        captions: the training captions file (CSV or JSONL); ``None``: class subfolders.
        val_root, test_root: optional folders of the same layout for validation and test (``test_root``: what
            ``dpldm predict`` and held-out metrics read); their captions files are ``val_captions`` and
            ``test_captions``.
        image_size: side of the square images the model sees.
        channels: 3 (RGB) or 1 (grey).
        max_bad_fraction: the largest tolerated fraction of bad records per split.
        batch_size, num_workers, seed: as :class:`ImageDataModule`.
    """

    def __init__(self, root: str, captions: Optional[str] = None, val_root: Optional[str] = None,
                 val_captions: Optional[str] = None, test_root: Optional[str] = None,
                 test_captions: Optional[str] = None, image_size: int = 256, channels: int = 3,
                 max_bad_fraction: float = 0.05, batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        if not os.path.isdir(root):
            raise ConfigError(f"{FIELD}.root", root, "no such folder")
        if channels not in (1, 3):
            raise ConfigError(f"{FIELD}.channels", channels, "must be 1 (grey) or 3 (RGB)")
        if image_size < 8:
            raise ConfigError(f"{FIELD}.image_size", image_size, "must be >= 8")
        if not 0 <= max_bad_fraction < 1:
            raise ConfigError(f"{FIELD}.max_bad_fraction", max_bad_fraction, "must satisfy 0 <= max_bad_fraction < 1")
        self.roots = {"train": (root, captions), "val": (val_root, val_captions), "test": (test_root, test_captions)}
        self.image_size, self.channels, self.max_bad_fraction = image_size, channels, max_bad_fraction
        self.classes = None if captions else sorted(
            d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        if self.classes is not None and not self.classes:
            raise ConfigError(f"{FIELD}.root", root, "holds no class subfolder (or set captions: a CSV/JSONL file)")
        self.num_classes = len(self.classes) if self.classes else None  # captions: no classes

    def _candidates(self, root: str, captions: Optional[str]) -> list[dict]:
        """Every record the layout names, checked or not yet."""
        if captions is not None:
            return [{"path": os.path.join(root, file), "caption": caption, "key": os.path.splitext(file)[0]}
                    for file, caption in read_captions(captions)]
        records = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            records += [{"path": os.path.join(folder, f), "label": label} for f in files
                        if f.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
        return records

    def _build(self, split: str) -> Dataset:
        from tqdm.auto import tqdm

        root, captions = self.roots[split]
        if root is None:
            return ImageFolderDataset([], self.image_size, self.mode)
        candidates, good = self._candidates(root, captions), []
        skipped = {MISSING_IMAGE: 0, UNDECODABLE_IMAGE: 0, MISSING_CAPTION: 0}
        for record in tqdm(candidates, desc=f"checking {split} images in {root}", unit="image", leave=False):
            reason = self._check(record)
            if reason:
                skipped[reason] += 1
            else:
                good.append(record)
        bad = len(candidates) - len(good)
        counts = ", ".join(f"{n:,} {r}" for r, n in skipped.items() if n) or "none"
        if not good:
            raise ConfigError(f"{FIELD}.root", root, f"no usable image ({len(candidates):,} records; skipped: {counts})")
        if bad > self.max_bad_fraction * len(candidates):
            raise ConfigError(f"{FIELD}.max_bad_fraction", self.max_bad_fraction,
                              f"exceeded: {bad / len(candidates):.2%} of the {len(candidates):,} records under "
                              f"{root} were bad (skipped: {counts}); repair or drop them, or raise the bound")
        if bad:
            print(f"{split}: {len(good):,} of {len(candidates):,} records used; skipped: {counts}")
        return ImageFolderDataset(good, self.image_size, self.mode)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def _check(self, record: dict) -> Optional[str]:
        """The reason to skip ``record``, or None when it is usable (its image decodes)."""
        if "caption" in record and record["caption"] is None:
            return MISSING_CAPTION
        if not os.path.isfile(record["path"]):
            return MISSING_IMAGE
        try:
            with open(record["path"], "rb") as f:
                load_image(f.read(), self.image_size, self.mode)
        except Exception:  # PIL raises many kinds on a corrupt or truncated file
            return UNDECODABLE_IMAGE
        return None
