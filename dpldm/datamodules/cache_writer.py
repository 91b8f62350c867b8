"""Writing a latent cache: the private set through the frozen public encoders, once.

DP-LDM re-encodes every private image through the frozen autoencoder on every step. The encoders
are public and never change, so their outputs on the private set can be computed once and stored as
a map-style table of N records: DP-SGD then Poisson-samples exactly those N records (the sampling the
accountant assumes), which a stream of tar shards cannot offer.

A cache directory:

    meta.json            N, views, shapes, dtype, fingerprints (encoder weights, preprocessing); written last
    moments.npy          [N, V, 2c, h, w]  posterior (mean, log-variance) of each view, unscaled
    labels.npy           [N]               class labels (class-conditional data)
    text_features.npy    [N, T, W]         the frozen text encoder's per-token features of the caption
    parts/               while building: finished chunks, the point a resumed build continues from

A horizontal flip is a second *view* of the same record (V = 2), never a second record: one record
stays one privacy unit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from dpldm.utils.files import atomic_write

FORMAT = 1
META, PARTS = "meta.json", "parts"
log = logging.getLogger(__name__)


class CacheMismatchError(ValueError):
    """A cache was built by other encoders, other preprocessing or other settings."""


# --- fingerprints: what the cached values depend on -------------------------------------------------

def module_fingerprint(module: nn.Module, exclude: tuple[nn.Module, ...] = ()) -> str:
    """A hash of a module's weights and buffers (names, dtypes, shapes, bytes), minus ``exclude``."""
    skip = {id(t) for m in exclude for t in [*m.parameters(), *m.buffers()]}
    h = hashlib.blake2b(digest_size=16)
    tensors = [*module.named_parameters(), *module.named_buffers()]
    for name, t in sorted(tensors, key=lambda nt: nt[0]):
        if id(t) in skip:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def text_encoder_fingerprint(conditioner: nn.Module) -> str | None:
    """Fingerprint of a conditioner's frozen part (``None`` when it has nothing to cache)."""
    if getattr(conditioner, "cache_key", None) is None:
        return None
    tokenizer = getattr(conditioner, "tokenizer", None)
    tag = f"{type(conditioner).__qualname__}:{getattr(tokenizer, 'context_length', '')}:"
    return tag + module_fingerprint(conditioner, exclude=tuple(conditioner.trainable_modules()))


def read_meta(path: str) -> dict | None:
    """The metadata of a complete cache at ``path``, ``None`` when there is none."""
    file = os.path.join(path, META)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def check_meta(meta: dict, expected: dict, path: str, field: str) -> None:
    """Refuse a cache whose fingerprints or settings differ from what this run would write.

    Args:
        meta: the cache's metadata.
        expected: ``{"format", "views", "dtype", "fingerprints": {...}}`` of this run.
        path: the cache directory (for the message).
        field: the config key that rebuilds on mismatch (for the message).
    """
    found = {"format": meta.get("format"), "views": meta.get("views"), "dtype": meta.get("dtype"),
             **meta.get("fingerprints", {})}
    want = {"format": expected["format"], "views": expected["views"], "dtype": expected["dtype"],
            **expected["fingerprints"]}
    diff = [k for k in sorted(set(found) | set(want)) if found.get(k) != want.get(k)]
    if diff:
        lines = "; ".join(f"{k}: cache has {found.get(k)!r}, this run needs {want.get(k)!r}" for k in diff)
        raise CacheMismatchError(
            f"The latent cache at {path!r} was built differently ({lines}). Delete the directory, point "
            f"the config at another one, or set `{field}: rebuild` to rebuild it.")


# --- building ---------------------------------------------------------------------------------------

def _loader(dataset: Dataset, start: int, batch_size: int, num_workers: int) -> DataLoader:
    if not isinstance(dataset, IterableDataset):  # map-style: resume by index
        dataset = Subset(dataset, range(start, len(dataset)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _parts(path: str) -> list[str]:
    folder = os.path.join(path, PARTS)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".npz")) if os.path.isdir(folder) else []


def _progress_of(path: str, expected: dict) -> tuple[int, int]:
    """(records, loader batches) already in finished parts; starts over when they were built differently
    (other fingerprints, or a stream read with other batching)."""
    state = os.path.join(path, PARTS, "building.json")
    parts = _parts(path)
    if parts and os.path.isfile(state):
        with open(state) as f:
            if json.load(f) == expected:
                done = [np.load(p) for p in parts]
                return sum(len(d["moments"]) for d in done), sum(int(d["batches"]) for d in done)
        log.warning("latent cache %s: the unfinished parts were built differently; starting over", path)
    shutil.rmtree(os.path.join(path, PARTS), ignore_errors=True)
    os.makedirs(os.path.join(path, PARTS))
    with open(state, "w") as f:
        json.dump(expected, f)
    return 0, 0


@torch.no_grad()
def _encode(batch: dict, autoencoder: nn.Module, conditioner: nn.Module | None, views: int,
            device: torch.device, dtype: np.dtype) -> dict[str, np.ndarray]:
    images = batch["image"].to(device)  # [B, C, H, W]
    moments = [autoencoder.moments(images)]  # view 0: the image, [B, 2c, h, w]
    if views == 2:
        moments.append(autoencoder.moments(images.flip(-1)))  # view 1: its horizontal flip
    out = {"moments": torch.stack(moments, 1).cpu().numpy().astype(dtype)}  # [B, V, 2c, h, w]
    if "label" in batch:
        out["labels"] = batch["label"].numpy().astype(np.int64)
    if conditioner is not None and conditioner.cache_key is not None and conditioner.input_key in batch:
        feats = conditioner.frozen_features(batch[conditioner.input_key])  # [B, T, W]
        out[conditioner.cache_key] = feats.cpu().numpy().astype(dtype)
    return out


def _write_part(path: str, index: int, fields: list[dict[str, np.ndarray]], batches: int) -> None:
    data = {k: np.concatenate([f[k] for f in fields]) for k in fields[0]}
    final = os.path.join(path, PARTS, f"{index:06d}.npz")
    with atomic_write(final, "wb") as f:  # a part exists whole or not at all
        np.savez(f, batches=np.int64(batches), **data)


def _consolidate(path: str) -> dict[str, list[int]]:
    """Concatenate the parts into one memory-mappable ``.npy`` per field; returns the shapes."""
    parts = [np.load(p) for p in _parts(path)]
    if not parts:
        raise ValueError(f"latent cache {path!r}: the source yielded no records")
    shapes = {}
    for key in (k for k in parts[0].files if k != "batches"):
        n = sum(len(p[key]) for p in parts)
        first = parts[0][key]
        out = np.lib.format.open_memmap(os.path.join(path, f"{key}.npy"), mode="w+", dtype=first.dtype,
                                        shape=(n, *first.shape[1:]))
        i = 0
        for p in parts:
            block = p[key]
            out[i:i + len(block)] = block
            i += len(block)
        out.flush()
        shapes[key] = list(out.shape)
        del out
    return shapes


def build_cache(path: str, dataset: Dataset, autoencoder: nn.Module, conditioner: nn.Module | None,
                expected: dict, batch_size: int = 64, num_workers: int = 0, chunk_size: int = 1024,
                device: str | torch.device = "cpu", stats: object | None = None) -> dict:
    """Stream ``dataset`` once through the frozen encoders into a cache at ``path`` (resumable).

    Args:
        path: the cache directory.
        dataset: the private training split, un-augmented, in a fixed order (map-style or a
            deterministic stream); items ``{"image": [C, H, W], "label"?: int, "caption"?: str}``.
        autoencoder: :class:`dpldm.modules.FrozenAutoencoder` (uses ``moments``).
        conditioner: a conditioner whose frozen part is cached (``cache_key``), or ``None``.
        expected: ``{"format", "views", "dtype", "fingerprints"}`` recorded in ``meta.json``.
        batch_size: images per encoder batch.
        num_workers: DataLoader workers decoding the source.
        chunk_size: records per part file (the granularity of resuming).
        device: where the encoders run.
        stats: the source's skip statistics (``summary()``), reported and recorded when given.

    Returns:
        The metadata written to ``meta.json``.
    """
    from tqdm.auto import tqdm

    stream = isinstance(dataset, IterableDataset)
    # A stream resumes by replaying its first batches: only valid with the same batching and workers.
    order = {"batch_size": batch_size, "num_workers": num_workers} if stream else {}
    done, done_batches = _progress_of(path, {**expected, "order": order})
    if done:
        log.info("latent cache %s: resuming after %d records", path, done)
    dtype = np.dtype(expected["dtype"])
    total = None if stream else len(dataset)
    skip = done_batches if stream else 0
    index, buffer, buffered, batches = len(_parts(path)), [], 0, 0
    start, count = time.perf_counter(), 0
    bar = tqdm(total=total, initial=done, unit="img", desc="caching latents", dynamic_ncols=True)
    for i, batch in enumerate(_loader(dataset, done, batch_size, num_workers)):
        if i < skip:
            continue
        buffer.append(_encode(batch, autoencoder, conditioner, expected["views"], device, dtype))
        n = len(buffer[-1]["moments"])
        buffered, batches, count = buffered + n, batches + 1, count + n
        bar.update(n)
        if buffered >= chunk_size:
            _write_part(path, index, buffer, batches)
            index, buffer, buffered, batches = index + 1, [], 0, 0
    if buffer:
        _write_part(path, index, buffer, batches)
    bar.close()
    seconds = time.perf_counter() - start
    meta = {**expected, "num_records": done + count, "fields": _consolidate(path),
            "source_report": stats.summary() if stats is not None else None,
            "encode_seconds": round(seconds, 2)}
    with atomic_write(os.path.join(path, META)) as f:  # complete from here on
        json.dump(meta, f, indent=2)
    shutil.rmtree(os.path.join(path, PARTS))
    log.info("latent cache %s: %d records (%d views) in %.1f s, %.1f img/s", path, meta["num_records"],
             expected["views"], seconds, count / max(seconds, 1e-9))
    return meta

