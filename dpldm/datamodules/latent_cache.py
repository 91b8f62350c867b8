"""A DataModule over a latent cache: the private training set encoded once by the frozen encoders.

Wraps any source DataModule (CIFAR-10, digits, LAION shards...). ``prepare_data`` builds the cache
with the model's own frozen autoencoder (and text encoder) when it is missing, resumes an interrupted
build, and refuses a cache built by other encoders or preprocessing (fingerprints in ``meta.json``).
Training then reads map-style records, so a DP stage Poisson-samples exactly the cache's N records;
validation and test come from the source, as images.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dpldm.datamodules.base import ImageDataModule
from dpldm.datamodules.cache_writer import (
    FORMAT, CacheMismatchError, build_cache, check_meta, module_fingerprint, read_meta, text_encoder_fingerprint,
)
from dpldm.errors import ConfigError

log = logging.getLogger(__name__)
FIELD = "data.init_args"
# Source arguments that change how data is loaded, not which values are encoded.
_LOADER_ONLY = {"batch_size", "num_workers", "shuffle_buffer", "max_bad_fraction", "download", "flip", "val_shards"}


class LatentCacheDataset(Dataset):
    """The records of a complete cache: ``{"moments": [2c, h, w], "label"?: int, "text_features"?: [T, W]}``.

    Arrays are memory-mapped (opened lazily, once per worker process). With V = 2 views each access
    returns the image or its flip with probability 1/2 (torch's global RNG, seeded per worker).

    Args:
        path: the cache directory.
    """

    def __init__(self, path: str):
        meta = read_meta(path)
        if meta is None:
            raise FileNotFoundError(
                f"No latent cache at {path!r}: build it with `dpldm cache --config <the fit config>` "
                "(`dpldm fit` builds it too, before training).")
        self.path, self.meta = path, meta
        self.num_records, self.views = meta["num_records"], meta["views"]
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_records

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {k: np.load(os.path.join(self.path, f"{k}.npy"), mmap_mode="r") for k in self.meta["fields"]}
        return self._arrays

    def __getitem__(self, index: int) -> dict:
        arrays = self._open()
        view = int(torch.randint(self.views, ())) if self.views > 1 else 0
        item = {"moments": torch.from_numpy(np.array(arrays["moments"][index, view], dtype=np.float32))}
        if "labels" in arrays:
            item["label"] = int(arrays["labels"][index])
        for key in (k for k in arrays if k not in ("moments", "labels")):  # cached conditioner features
            item[key] = torch.from_numpy(np.array(arrays[key][index], dtype=np.float32))
        return item

    def __getstate__(self) -> dict:  # memory maps are reopened in each worker process
        return {**self.__dict__, "_arrays": None}


def source_description(source: pl.LightningDataModule) -> dict:
    """What identifies the source's encoded values: its class and its non-loader init arguments."""
    desc = {"class": f"{type(source).__module__}.{type(source).__qualname__}"}
    for name in inspect.signature(type(source).__init__).parameters:
        value = getattr(source, name, None)
        if name != "self" and name not in _LOADER_ONLY and isinstance(value, (str, int, float, bool, list, tuple)):
            desc[name] = list(value) if isinstance(value, tuple) else value
    return desc


class LatentCacheDataModule(ImageDataModule):
    """Train on a latent cache of ``source``'s training split; validate and test on the source.

    Args:
        source: the DataModule whose training split is encoded (must offer ``cache_dataset()``).
        cache_dir: where the cache lives.
        flip_views: also store the horizontal flip of each record as a second view.
        dtype: storage precision of moments and features (``float16`` halves the disk).
        on_mismatch: a complete cache built by other encoders or preprocessing: ``error`` refuses it,
            ``rebuild`` deletes and rebuilds it.
        encode_batch_size: images per encoder batch while building.
        chunk_size: records per part file while building (the granularity of resuming).
        batch_size: examples per training batch (the expected batch size under DP).
        num_workers: DataLoader workers (also used to decode the source while building).
        seed: seed of the training loader's shuffle (non-DP stages).
    """

    def __init__(self, source: pl.LightningDataModule, cache_dir: str, flip_views: bool = False,
                 dtype: Literal["float32", "float16"] = "float32",
                 on_mismatch: Literal["error", "rebuild"] = "error", encode_batch_size: int = 64,
                 chunk_size: int = 1024, batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if not hasattr(source, "cache_dataset"):
            raise ConfigError(f"{FIELD}.source", type(source).__name__,
                              "must offer cache_dataset() (its un-augmented training split)")
        for name, value in (("encode_batch_size", encode_batch_size), ("chunk_size", chunk_size)):
            if value < 1:
                raise ConfigError(f"{FIELD}.{name}", value, "must be >= 1")
        if hasattr(source, "config_prefix"):  # the source's later errors name its keys under this module
            source.config_prefix = f"{FIELD}.source.init_args"
        self.source, self.cache_dir, self.flip_views = source, str(cache_dir), flip_views
        self.dtype, self.on_mismatch = dtype, on_mismatch
        self.encode_batch_size, self.chunk_size = encode_batch_size, chunk_size
        self._expected: dict | None = None  # fingerprints computed by prepare_data, for setup

    # The geometry the model checks against is the source's.
    @property
    def image_size(self) -> int | None:  # type: ignore[override]
        return getattr(self.source, "image_size", None)

    @property
    def channels(self) -> int | None:  # type: ignore[override]
        return getattr(self.source, "channels", None)

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        return getattr(self.source, "num_classes", None)

    @property
    def public(self) -> bool:  # type: ignore[override]
        return getattr(self.source, "public", False)

    @property
    def planned_num_train_samples(self) -> int | None:
        """N, the records the cache will hold (one per training image of the source), known before it is built
        when the source has a known size (a stream of shards has none); the training set's own size once it
        exists (e.g. with an audit's canaries added)."""
        if self.train_dataset is not None:
            return len(self.train_dataset)
        return self.source.num_train_samples if hasattr(self.source, "num_train_samples") else None

    def expected_meta(self, model: torch.nn.Module) -> dict:
        """Format, views, dtype and fingerprints a cache for ``model`` must have."""
        fingerprints = {"autoencoder": module_fingerprint(model.autoencoder.vae),
                        "text_encoder": text_encoder_fingerprint(model.conditioner),
                        "preprocessing": json.dumps(source_description(self.source), sort_keys=True)}
        return {"format": FORMAT, "views": 2 if self.flip_views else 1, "dtype": self.dtype,
                "fingerprints": fingerprints}

    def build(self, model: torch.nn.Module, device: str | torch.device | None = None,
              expected: dict | None = None) -> dict:
        """Make sure a cache for ``model`` exists: keep a matching one, resume or (re)build otherwise.

        Args:
            model: the diffusion model whose frozen ``autoencoder`` and ``conditioner`` encode.
            device: where to encode; default CUDA when available.
            expected: :meth:`expected_meta` of ``model``, when already computed.

        Returns:
            The cache's metadata.
        """
        expected = expected or self.expected_meta(model)
        meta = read_meta(self.cache_dir)
        if meta is not None:
            try:
                check_meta(meta, expected, self.cache_dir, f"{FIELD}.on_mismatch")
                log.info("latent cache %s: %d records, up to date", self.cache_dir, meta["num_records"])
                return meta
            except CacheMismatchError:
                if self.on_mismatch != "rebuild":
                    raise
                log.warning("latent cache %s is stale; rebuilding it", self.cache_dir)
                shutil.rmtree(self.cache_dir)
        os.makedirs(self.cache_dir, exist_ok=True)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        parts = [p for p in (model.autoencoder, model.conditioner) if next(p.parameters(), None) is not None]
        homes = [next(p.parameters()).device for p in parts]  # (an Unconditional conditioner has none)
        for p in parts:
            p.to(device)
        try:
            self.source.prepare_data()  # e.g. a download
            dataset = self.source.cache_dataset()
            return build_cache(self.cache_dir, dataset, model.autoencoder, model.conditioner, expected,
                               self.encode_batch_size, self.num_workers, self.chunk_size, device,
                               stats=getattr(dataset, "stats", None))
        finally:
            for p, home in zip(parts, homes):
                p.to(home)

    def _model(self) -> torch.nn.Module | None:
        return self.trainer.lightning_module if self.trainer is not None else None

    def prepare_data(self) -> None:
        """Prepare the source (validation and test read it), then build the cache when missing or interrupted."""
        self.source.prepare_data()
        if self._model() is not None:
            if hasattr(self._model(), "preflight"):  # shapes, privacy settings, delta vs N: before hours of encoding
                self._model().preflight(self)
            self._expected = self.expected_meta(self._model())  # setup() of the same fit reuses it
            self.build(self._model(), expected=self._expected)

    def setup(self, stage: str | None = None) -> None:
        """Check the cache against the model (every rank), then open the splits the stage needs."""
        model, meta = self._model(), read_meta(self.cache_dir)
        if model is not None and meta is not None:  # every rank; weights are hashed once per fit
            expected, self._expected = self._expected or self.expected_meta(model), None
            check_meta(meta, expected, self.cache_dir, f"{FIELD}.on_mismatch")
        if stage in ("fit", None):
            self._ensure("train")

    def _build(self, split: str) -> Dataset:
        if split != "train":
            raise ValueError("a latent cache holds the training split only; other splits come from the source")
        return LatentCacheDataset(self.cache_dir)

    def val_dataloader(self) -> DataLoader | list:
        self.source.setup("fit")
        return self.source.val_dataloader()

    def test_dataloader(self) -> DataLoader | list:
        self.source.setup("test")
        return self.source.test_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        self.source.setup("test")
        return self.source.predict_dataloader()
