"""Tiny img2dataset-style webdataset shards for tests: ``KEY.jpg|png`` + ``KEY.txt`` + ``KEY.json``, optionally
with img2dataset's ``NNNNN_stats.json`` sidecars; and a helper that truncates a shard."""

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
                 empty_shard: bool = False, seed: int = 0, stats_json: bool = False) -> list[str]:
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
        stats_json: also write img2dataset's sidecar ``shard-NNNNN_stats.json`` per shard (its
            ``successes`` is the number of records written to the tar).

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
        if stats_json:
            write_stats_json(path, per_shard if shard < num_shards else 0)
        paths.append(str(path))
    return paths


def write_stats_json(shard: Path, successes: int) -> str:
    """Write img2dataset's sidecar of ``NAME.tar``: ``NAME_stats.json`` (the fields img2dataset's
    ``write_stats`` writes; ``successes`` records were written to the tar)."""
    path = Path(str(shard)[:-len(".tar")] + "_stats.json")
    path.write_text(json.dumps({"count": successes + 1, "successes": successes, "failed_to_download": 1,
                                "failed_to_resize": 0, "duration": 1.5, "status_dict": {"success": successes}}))
    return str(path)


def truncate(shard: str, out: Path, member: int, inside: bool = True) -> str:
    """Copy the first bytes of a tar shard to ``out``: cut half-way into the data of member
    ``member`` (``inside``: reading fails there) or just before its header (the tar then ends
    early without any error).

    Returns:
        ``out``, as a string.
    """
    with tarfile.open(shard) as tar:
        info = tar.getmembers()[member]
    end = info.offset_data + info.size // 2 if inside else info.offset
    Path(out).write_bytes(Path(shard).read_bytes()[:end])
    return str(out)
