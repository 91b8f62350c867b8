"""Image-caption pairs streamed from img2dataset-style webdataset tar shards (e.g. LAION).

Each sample in a shard is ``KEY.jpg`` (or ``.jpeg``/``.png``/``.webp``), ``KEY.txt`` (the
caption) and optionally ``KEY.json`` (ignored). Items are
``{"image": FloatTensor[3, S, S] in [-1, 1], "caption": str, "key": str}``: the shorter side
is resized to ``S`` (bicubic), the centre ``S x S`` cropped, intensities mapped by the fixed
affine ``x / 127.5 - 1``. Bad records and shards are skipped and counted in a
:class:`SkipStats` shared by all DataLoader workers, with the records lost in unreadable or
short shards (from img2dataset's ``NNNNN_stats.json`` when present, else estimated: see
:mod:`dpldm.datamodules.skip_stats`); a stream fails when too many records were bad or lost. The size of a stream is unknown, so DP stages must read through the latent cache,
which :meth:`LaionDataModule.cache_dataset` feeds.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
from typing import Optional, Union

import lightning.pytorch as pl
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.shardlists import expand_urls as wds_expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from dpldm.datamodules.skip_stats import (  # noqa: F401  (re-exported: the reasons, SkipStats)
    CAPTION_EXTENSION, EMPTY_SHARD, GOOD, IMAGE_EXTENSIONS, MAX_BAD_FIELD, MISSING_CAPTION, MISSING_IMAGE,
    RECORD_REASONS, SHARD_REASONS, SHORT_SHARD, STREAMS_DONE, UNDECODABLE_IMAGE, UNREADABLE_SHARD, SkipStats,
)
from dpldm.errors import ConfigError
from dpldm.utils.images import load_image

logger = logging.getLogger(__name__)

EARLY_CHECK_RECORDS = 1000  # fail mid-stream once this many records were seen and too many were bad
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, file:, s3://, gs://, http(s)://, ...
FIELD = "data.init_args"  # where a LaionDataModule's arguments sit in a config of its own


def _check_settings(image_size: int, shuffle_buffer: int, max_bad_fraction: float, field: str = FIELD) -> None:
    """Reject bad dataset settings with the config field at fault (under the key ``field``)."""
    if image_size < 8:
        raise ConfigError(f"{field}.image_size", image_size, "must be >= 8")
    if shuffle_buffer < 0:
        raise ConfigError(f"{field}.shuffle_buffer", shuffle_buffer, "must be >= 0 (0: no shuffle)")
    if not 0 <= max_bad_fraction < 1:
        raise ConfigError(f"{field}.max_bad_fraction", max_bad_fraction, "must satisfy 0 <= max_bad_fraction < 1")


def open_shard(url: str):
    """Open one shard for reading: webdataset's ``gopen`` for local paths and the schemes it
    knows (``pipe:``, ``file:``, ``http(s)://``, ``gs://``, ...), fsspec for others (``s3://``, ...).

    Args:
        url: a local path or URL.
    """
    match = _SCHEME.match(url)
    if match is None or match.group(0)[:-1] in set(wds.gopen_schemes) | {"file"}:
        return wds.gopen(url, "rb")
    import fsspec  # optional: only for schemes webdataset 1.0.2 cannot open itself

    return fsspec.open(url, "rb").open()


def read_sidecar(url: str) -> Optional[int]:
    """The records img2dataset wrote to shard ``NAME.tar``: ``successes`` in its ``NAME_stats.json``.

    ``None`` without a readable sidecar (other writers, ``pipe:`` URLs, a missing local file). Remote
    shards cost one more small request each.

    Args:
        url: the shard's path or URL.
    """
    if not url.endswith(".tar") or url.startswith("pipe:"):
        return None
    path = url[:-len(".tar")] + "_stats.json"
    if _SCHEME.match(path) is None and not os.path.isfile(path):
        return None
    try:
        stream = open_shard(path)
        try:
            successes = int(json.load(stream)["successes"])
        finally:
            stream.close()
    except Exception as err:  # unreadable, not JSON, no successes, a failed pipe...
        logger.debug("no usable img2dataset stats for %s: %s: %s", url, type(err).__name__, err)
        return None
    return successes if successes >= 0 else None


def _describe(urls: list[str]) -> str:
    """A short name for a list of shards, for messages."""
    return urls[0] if len(urls) == 1 else f"{len(urls)} shards {urls[0]} ... {urls[-1]}"


class WebImageTextDataset(IterableDataset):
    """Stream of ``{"image": FloatTensor[3, S, S] in [-1, 1], "caption": str, "key": str}``.

    Shards are split across nodes (ranks) when ``split_by_node``, and across DataLoader
    workers always. With ``shuffle_buffer == 0`` the order is the shard order, then the member
    order (per worker); a latent cache that resumes by skipping its first ``n`` records relies
    on it. Otherwise shard order and samples (in a buffer of encoded samples) are shuffled from
    ``seed`` and the epoch, which counts calls to ``__iter__`` per process (persistent workers
    keep it) unless :meth:`set_epoch` sets it.

    Args:
        urls: expanded shard paths/URLs (see :func:`expand_urls`).
        image_size: side ``S`` of the square images (>= 8).
        shuffle_buffer: samples held for shuffling; 0 keeps the order deterministic.
        seed: seed of the shard and sample shuffles.
        split_by_node: give each rank its own shards (off for a pass that must see all shards).
        max_bad_fraction: the largest tolerated fraction of bad and lost records, in ``[0, 1)``
            (records lost with unreadable shards count: see :mod:`dpldm.datamodules.skip_stats`).
        field: the config key holding these settings, for errors (``data.init_args``, or
            ``data.init_args.source.init_args`` under a latent cache).
    """

    def __init__(self, urls: list[str], image_size: int, shuffle_buffer: int = 0, seed: int = 0,
                 split_by_node: bool = True, max_bad_fraction: float = 0.01, field: str = FIELD):
        super().__init__()
        _check_settings(image_size, shuffle_buffer, max_bad_fraction, field)
        if not urls:
            raise ValueError("WebImageTextDataset needs at least one shard URL")
        self.urls, self.image_size, self.shuffle_buffer = list(urls), image_size, shuffle_buffer
        self.seed, self.split_by_node, self.max_bad_fraction = seed, split_by_node, max_bad_fraction
        self.epoch = 0
        self._index = {url: i for i, url in reversed(list(enumerate(self.urls)))}  # first place of each shard
        self.stats = SkipStats(_describe(self.urls), len(self.urls), f"{field}.max_bad_fraction")

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass's shuffle (in the process that iterates)."""
        self.epoch = epoch

    def _samples(self, shards):
        """Raw samples (dicts of encoded members) of each shard; counts each shard read and its losses."""
        for shard in shards:
            url, count, failed = shard["url"], 0, False
            try:
                stream = open_shard(url)
                try:
                    for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                        count += 1
                        yield sample
                finally:
                    stream.close()  # a failed pipe (curl, aws s3 cp) reports its exit status here
            except Exception as err:  # missing file, bad tar, truncated download, failed pipe, ...
                failed = True
                logger.warning("skipping unreadable shard %s after %d samples: %s: %s",
                               url, count, type(err).__name__, err)
            self._shard_done(url, count, failed)

    def _shard_done(self, url: str, count: int, failed: bool) -> None:
        """Count one read of shard ``url`` (and the records it lost), warn about an empty or short one."""
        expected = read_sidecar(url)
        if not failed and count == 0:
            logger.warning("shard %s holds no samples", url)
        elif not failed and expected is not None and count < expected:
            logger.warning("shard %s ended after %d samples; its img2dataset stats list %d", url, count, expected)
        self.stats.shard_read(self._index[url], count, failed, expected)

    def _item(self, sample: dict) -> Optional[dict]:
        """The item of one raw sample, or ``None`` (counted) when it is bad."""
        image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        caption = sample.get(CAPTION_EXTENSION, b"").decode("utf-8", errors="replace").strip()
        reason = MISSING_IMAGE if image is None else MISSING_CAPTION if not caption else None
        if reason is None:
            try:
                pixels = load_image(image, self.image_size)
            except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                reason = UNDECODABLE_IMAGE
        self.stats.add(reason or GOOD)
        return None if reason else {"image": pixels, "caption": caption, "key": sample["__key__"]}

    def __iter__(self):
        """Yield this rank's and worker's items; fail at the end (or after 1000 records) when too many were bad."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        rank, _, worker, num_workers = wds.utils.pytorch_worker_info()
        shuffle = self.shuffle_buffer > 0
        # Same shard order on every rank and worker (before splitting), new each epoch.
        shards = iter(wds.SimpleShardList(self.urls, seed=f"{self.seed}-{epoch}" if shuffle else None))
        if self.split_by_node:
            shards = wds.split_by_node(shards)
        samples = self._samples(wds.split_by_worker(shards))
        if shuffle:  # buffer holds encoded samples (small), decoded after shuffling
            rng = random.Random(f"{self.seed}-{epoch}-{rank}-{worker}")
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        for sample in samples:
            item = self._item(sample)
            if item is not None:
                yield item
            if self.stats.seen >= EARLY_CHECK_RECORDS:
                self.stats.check(self.max_bad_fraction, require_good=False)
        # The last stream of this pass to end judges the whole pass (and fails when no worker read a good
        # record); an earlier one sees the other workers' counts half-way and judges only a large sample.
        last = self.stats.add(STREAMS_DONE) % num_workers == 0
        if last or self.stats.seen >= EARLY_CHECK_RECORDS:
            self.stats.check(self.max_bad_fraction, require_good=last)
        if last:
            logger.info("%s: %s", self.stats.source, self.stats.summary())


def expand_urls(spec: Union[str, list[str]], field: str = "data.init_args.train_shards") -> list[str]:
    """Expand a shard spec into a list of paths/URLs.

    ``::`` joins several specs, braces expand (``shards/{00000..00009}.tar``), ``${VAR}``
    reads ``WDS_VAR`` (webdataset's rules); local globs (``shards/*.tar``) expand sorted. URLs
    with a scheme pass through unchecked.

    Args:
        spec: one spec string, or a list of them.
        field: the config field holding ``spec``, for errors.

    Raises:
        ConfigError: a local pattern or path matches no file.
    """
    urls = []
    for part in [spec] if isinstance(spec, str) else list(spec):
        for url in wds_expand_urls(part):
            if _SCHEME.match(url):
                urls.append(url)
                continue
            matches = sorted(glob.glob(url))
            if not matches:
                raise ConfigError(field, spec, f"{url!r} matches no file")
            urls.extend(matches)
    if not urls:
        raise ConfigError(field, spec, "names no shard")
    return urls


class LaionDataModule(pl.LightningDataModule):
    """Text-conditional image data streamed from webdataset shards (LAION / img2dataset layout).

    Batches are ``{"image": FloatTensor[B, 3, S, S], "caption": list[str], "key": list[str]}``.
    Shard specs are expanded in :meth:`setup`, so a config instantiates without the files.
    The stream has no known size, hence no ``num_train_samples``: DP stages read the latent
    cache built from :meth:`cache_dataset`.

    Args:
        train_shards: shard spec of the training set (see :func:`expand_urls`).
        val_shards: shard spec of the validation set, or ``None`` for no validation.
        image_size: side ``S`` of the square images (>= 8).
        batch_size: examples per batch (>= 1).
        num_workers: DataLoader worker processes (>= 0); shards are split among them.
        shuffle_buffer: training samples held for shuffling (0: deterministic order).
        max_bad_fraction: the largest tolerated fraction of bad records and of records lost with
            unreadable shards, in ``[0, 1)``.
        seed: seed of the training shuffle.
    """

    channels = 3
    # The config key of this module's arguments, named by errors raised after construction: a
    # LatentCacheDataModule whose source this is sets it to ``data.init_args.source.init_args``.
    config_prefix = FIELD

    def __init__(self, train_shards: str, val_shards: Optional[str] = None, image_size: int = 256,
                 batch_size: int = 64, num_workers: int = 0, shuffle_buffer: int = 1000,
                 max_bad_fraction: float = 0.01, seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ConfigError("data.init_args.batch_size", batch_size, "must be >= 1")
        if num_workers < 0:
            raise ConfigError("data.init_args.num_workers", num_workers, "must be >= 0")
        _check_settings(image_size, shuffle_buffer, max_bad_fraction)
        self.train_shards, self.val_shards, self.image_size = train_shards, val_shards, image_size
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.max_bad_fraction, self.seed = max_bad_fraction, seed
        self.train_dataset: Optional[WebImageTextDataset] = None
        self.val_dataset: Optional[WebImageTextDataset] = None

    def _dataset(self, spec: str, name: str, shuffle_buffer: int, split_by_node: bool) -> WebImageTextDataset:
        """The stream of the shards of argument ``name`` (``train_shards``/``val_shards``) = ``spec``."""
        return WebImageTextDataset(expand_urls(spec, f"{self.config_prefix}.{name}"), self.image_size,
                                   shuffle_buffer=shuffle_buffer, seed=self.seed, split_by_node=split_by_node,
                                   max_bad_fraction=self.max_bad_fraction, field=self.config_prefix)

    def setup(self, stage: Optional[str] = None) -> None:
        """Expand the shard specs and build the streams the stage needs (kept once built).

        Training shards are shuffled and split across ranks. Every rank reads all validation
        shards in order, so ranks run the same number of validation batches.

        Args:
            stage: Lightning stage, or ``None`` for all.
        """
        if stage in ("fit", None) and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_shards, "train_shards",
                                               self.shuffle_buffer, split_by_node=True)
        if stage in ("fit", "validate", None) and self.val_shards is not None and self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_shards, "val_shards", 0, split_by_node=False)

    def cache_dataset(self) -> WebImageTextDataset:
        """A fresh deterministic full pass over the training shards, for the latent cache.

        No shuffle and no split across ranks: the cache is written by one process and must see
        every shard, in shard then member order (interleaved by batch across ``num_workers``
        workers; a resumed cache build with other batching or workers starts over).
        """
        return self._dataset(self.train_shards, "train_shards", 0, split_by_node=False)

    def _loader(self, dataset: WebImageTextDataset) -> DataLoader:
        # default_collate stacks images to (B, 3, S, S) and gathers captions/keys into lists.
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled stream over this rank's training shards."""
        self.setup("fit")
        return self._loader(self.train_dataset)

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Ordered stream over the validation shards; ``[]`` without ``val_shards``."""
        if self.val_shards is None:
            return []
        self.setup("validate")
        return self._loader(self.val_dataset)
