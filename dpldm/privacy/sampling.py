"""Poisson sampling (the sampling DP-SGD's accounting assumes): each of the N examples joins a step's
batch independently with probability q, so batch sizes vary, with mean qN and variance qN(1-q).

Under DDP each of the W ranks Poisson-samples its own disjoint shard (indices r, r + W, r + 2W, ...) at
the same rate q, from its own random stream: the union of the W local batches is exactly a Poisson sample
of all N at rate q, the logical batch the accountant sees. Every rank yields the same number of batches,
empty ones included (a rank that skipped an empty batch would desynchronise the all-reduce, and the
accounting).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from dpldm.errors import ConfigError


def collate_or_empty(items: list) -> dict:
    """Default collation; an empty Poisson batch becomes ``{}`` (a noise-only step)."""
    return default_collate(items) if items else {}


class ShardedPoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson batch sampler over one rank's shard of the dataset (all of it on one process).

    Args:
        num_samples: N, the size of the whole dataset.
        sample_rate: q.
        rank: this process's global rank.
        world_size: W, the number of processes.
        generator: the rank's own random stream (``None`` with ``secure``).
        secure: draw the inclusion bits from the OS's cryptographically secure generator.
    """

    def __init__(self, num_samples: int, sample_rate: float, rank: int = 0, world_size: int = 1,
                 generator: torch.Generator | None = None, secure: bool = False):
        self.shard = torch.arange(rank, num_samples, world_size)  # [N / W]: global indices of this rank
        super().__init__(num_samples=len(self.shard), sample_rate=sample_rate, generator=generator)
        self.total_size, self.rank, self.world_size, self.secure = num_samples, rank, world_size, secure

    def _include(self) -> torch.Tensor:
        """One Bernoulli(q) bit per example of the shard [N / W]."""
        n = len(self.shard)
        if self.secure:  # uniform 63-bit integers from os.urandom, compared with q 2^63
            draws = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64) & 0x7FFF_FFFF_FFFF_FFFF
            return draws < int(self.sample_rate * 2**63)
        return torch.rand(n, generator=self.generator) < self.sample_rate

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):  # possibly empty: a noise-only step, taken on every rank
            yield self.shard[self._include()].tolist()


def poisson_loader(dataset: Dataset, expected_batch_size: int, seed: int, num_workers: int = 0,
                   rank: int = 0, world_size: int = 1, secure: bool = False) -> DataLoader:
    """A loader whose every batch is a Poisson sample at rate q = expected_batch_size / N.

    Args:
        dataset: map-style dataset of known size N.
        expected_batch_size: B = qN, the *global* logical batch size (over all ranks).
        seed: seed of this rank's sampling randomness.
        num_workers: DataLoader workers.
        rank: this process's global rank (DDP).
        world_size: the number of processes W; each samples its shard at the same q.
        secure: cryptographically secure sampling (``secure_mode``); ``seed`` is then unused.
    """
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ConfigError("data", type(dataset).__name__,
                          "DP stages need a map-style dataset of known size N for Poisson sampling "
                          "(stream LAION-style shards into a latent cache first)")
    n = len(dataset)
    sampler = ShardedPoissonSampler(n, expected_batch_size / n, rank, world_size,
                                    generator=torch.Generator().manual_seed(seed), secure=secure)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_or_empty,
                      persistent_workers=num_workers > 0)


def poisson_rate(loader: object) -> float | None:
    """The sample rate q of a Poisson loader, ``None`` for any other loader."""
    sampler = getattr(loader, "batch_sampler", None)
    return sampler.sample_rate if isinstance(sampler, UniformWithReplacementSampler) else None
