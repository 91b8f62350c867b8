"""Tiny img2dataset-style webdataset shards for tests: ``KEY.jpg|png`` + ``KEY.txt`` + ``KEY.json``."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def caption(index: int) -> str:
    """The caption written for the record with global index ``index``."""
    return f"a photo of item {index}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode ``uint8 (H, W, 3)`` pixels as ``"jpg"`` or ``"png"`` bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG" if fmt == "jpg" else "PNG")
    return buffer.getvalue()


def write_shards(root: Path, num_shards: int = 2, per_shard: int = 6, size: int = 40,
                 corrupt: Sequence[str] = (), no_caption: Sequence[str] = (),
                 empty_shard: bool = False, seed: int = 0) -> list[str]:
    """Write ``root/shard-00000.tar, ...``; keys ``000000, 000001, ...`` count across shards.

    Each record is a random RGB image of ``size x (size + 8)`` (H x W; non-square, so the
    centre crop matters), alternately JPEG (even index) and PNG (odd), a caption
    ``"a photo of item <index>"`` and ``{"key": ...}`` JSON metadata.

    Args:
        root: output folder (created if missing).
        num_shards: shards holding records.
        per_shard: records per shard.
        size: image height in pixels.
        corrupt: keys whose image bytes are garbage.
        no_caption: keys written without a ``.txt`` member.
        empty_shard: also write one last shard with no member at all.
        seed: seed of the random pixels.

    Returns:
        the shard paths, in order.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for shard in range(num_shards + int(empty_shard)):
        path = root / f"shard-{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(shard * per_shard, (shard + 1) * per_shard) if shard < num_shards else ():
                key, fmt = f"{index:06d}", ("jpg", "png")[index % 2]
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                image = b"\xde\xad\xbe\xef not an image" * 8 if key in corrupt else encode(pixels, fmt)
                _add(tar, f"{key}.{fmt}", image)
                if key not in no_caption:
                    _add(tar, f"{key}.txt", caption(index).encode())
                _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
        paths.append(str(path))
    return paths
