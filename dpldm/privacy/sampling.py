"""Poisson sampling (the sampling DP-SGD's accounting assumes): each of the N examples joins a step's
batch independently with probability q, so batch sizes vary, with mean qN and variance qN(1-q).
"""

from __future__ import annotations

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from dpldm.errors import ConfigError


def collate_or_empty(items: list) -> dict:
    """Default collation; an empty Poisson batch becomes ``{}`` (a noise-only step)."""
    return default_collate(items) if items else {}


def poisson_loader(dataset: Dataset, expected_batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """A loader whose every batch is a Poisson sample at rate q = expected_batch_size / N.

    Args:
        dataset: map-style dataset of known size N.
        expected_batch_size: B = qN.
        seed: seed of the sampling randomness.
        num_workers: DataLoader workers.
    """
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ConfigError("data", type(dataset).__name__,
                          "DP stages need a map-style dataset of known size N for Poisson sampling "
                          "(stream LAION-style shards into a latent cache first)")
    n = len(dataset)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=expected_batch_size / n,
                                            generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_or_empty,
                      persistent_workers=num_workers > 0)


def poisson_rate(loader: object) -> float | None:
    """The sample rate q of a Poisson loader, ``None`` for any other loader."""
    sampler = getattr(loader, "batch_sampler", None)
    return sampler.sample_rate if isinstance(sampler, UniformWithReplacementSampler) else None
