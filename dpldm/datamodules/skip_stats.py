"""Counts of the records a stream of shards used, skipped and lost, shared by every DataLoader worker.

Bad records (no image, an undecodable image, no caption) are skipped and counted. Records are also lost
with unreadable shards: a shard that fails mid-read (missing file, garbage, truncated download, failed
pipe) yielded its readable prefix, and the records after the error are gone, in a number nobody read.
:class:`SkipStats` counts them as the shard's size minus the records the read yielded, and at least 1
(a failed read lost something). The size is, in order of preference:

1. the shard's own: img2dataset's sidecar ``NAME_stats.json`` next to ``NAME.tar`` (``successes``, the
   records written to the tar), or a whole read of the same shard in another pass;
2. the median size of the shards known in this dataset (read whole, or from a sidecar; empty ones
   excluded). img2dataset's shards all hold the same number of records but the last, so the median is
   that number; it is taken when the counts are read, i.e. from every shard read so far (at the end of a
   pass: all of them), and the summary says how many lost records it estimated.

A sidecar also reveals a *short* shard, one that ends early without an error (a tar cut at a member
boundary reads as a shorter whole tar): its missing records are lost too. Lost records count as bad
records against ``max_bad_fraction``: the bad fraction is (skipped + lost) / (read + lost).
"""

from __future__ import annotations

import multiprocessing
from typing import Optional

import numpy as np

from dpldm.errors import ConfigError

# Why a record or shard was skipped. Record reasons count toward the bad fraction; a shard reason
# counts reads of shards: empty ones hold no record, unreadable and short ones lost records.
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_CAPTION = "missing_caption"
EMPTY_SHARD = "empty_shard"
UNREADABLE_SHARD = "unreadable_shard"
SHORT_SHARD = "short_shard"
RECORD_REASONS = (MISSING_IMAGE, UNDECODABLE_IMAGE, MISSING_CAPTION)
SHARD_REASONS = (EMPTY_SHARD, UNREADABLE_SHARD, SHORT_SHARD)
# The other slots of the shared counter: records yielded, streams ended, records lost where the shard's
# size was known, failed reads whose loss waits for an estimate, and shard reads ever ended (a version
# of the per-shard arrays, never reset).
GOOD, STREAMS_DONE, _LOST, _PENDING, _EVENTS = "good", "streams_done", "lost", "pending", "events"
_SLOTS = RECORD_REASONS + SHARD_REASONS + (GOOD, STREAMS_DONE, _LOST, _PENDING, _EVENTS)
MAX_BAD_FIELD = "data.init_args.max_bad_fraction"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # first one present in a sample is used
CAPTION_EXTENSION = "txt"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


class SkipStats:
    """Counts of used, skipped and lost records, shared by every DataLoader worker of one dataset.

    The counters live in ``multiprocessing`` shared memory created in the main process; the dataset
    (and with it this object) is handed to worker processes at their creation (under fork, spawn and
    forkserver), so every worker adds to the same counts. Counts accumulate over passes (epochs) until
    :meth:`reset`. See the module docstring for how lost records are counted.

    Args:
        source: the shards, in words, for error messages (e.g. ``"shards/{00000..00009}.tar"``).
        num_shards: shards of the dataset (indices of :meth:`shard_read`).
        field: the config key of the bound, for errors (``...max_bad_fraction``).
    """

    def __init__(self, source: str = "the shards", num_shards: int = 1, field: str = MAX_BAD_FIELD):
        self.source, self.field = source, field
        # A lock made in a spawn context is inherited under fork and pickled under spawn and
        # forkserver; one made in a fork context refuses the latter two.
        ctx = multiprocessing.get_context("spawn")
        self._array = ctx.Array("q", len(_SLOTS))
        n = max(num_shards, 1)  # per shard, raw (guarded by the counter's lock):
        self._sizes = ctx.RawArray("q", [-1] * n)  # its records when known, -1 before
        self._fails = ctx.RawArray("q", n)  # failed reads whose loss waits for an estimate
        self._prefix = ctx.RawArray("q", n)  # records those reads yielded
        self._estimate = (-1, 0)  # (events, records) of the last estimate, per process

    def _slot(self, slot: str) -> int:
        return _SLOTS.index(slot)

    def add(self, slot: str, n: int = 1) -> int:
        """Add ``n`` to one counter (a reason in :data:`RECORD_REASONS` / :data:`SHARD_REASONS`, or
        ``"good"``) and return its new value, atomically across processes."""
        with self._array.get_lock():
            self._array[self._slot(slot)] += n
            return int(self._array[self._slot(slot)])

    def shard_read(self, index: int, records: int, failed: bool, expected: Optional[int] = None) -> None:
        """Count the end of one read of a shard, and the records it lost.

        Args:
            index: the shard's index in the dataset's list.
            records: samples the read yielded (before the error, when it ``failed``).
            failed: the read ended with an error.
            expected: the records the shard holds, when known (img2dataset's sidecar).
        """
        with self._array.get_lock():
            if failed:
                self.add(UNREADABLE_SHARD)
            elif records == 0:
                self.add(EMPTY_SHARD)
            if expected is not None:
                self._sizes[index] = expected
                lost = max(expected - records, int(failed))
                self.add(_LOST, lost)
                if lost and not failed:
                    self.add(SHORT_SHARD)
            elif failed:
                self._fails[index] += 1
                self._prefix[index] += records
                self.add(_PENDING)
            else:
                self._sizes[index] = max(self._sizes[index], records)
            self.add(_EVENTS)

    def _get(self, slot: str) -> int:
        return int(self._array[self._slot(slot)])

    def _estimated(self) -> int:
        """Records lost by failed reads of shards of unknown size (recomputed after each shard read)."""
        if not self._get(_PENDING):
            return 0
        events = self._get(_EVENTS)
        if self._estimate[0] != events:
            with self._array.get_lock():
                sizes, fails, prefix = (np.frombuffer(a, dtype=np.int64).copy()
                                        for a in (self._sizes, self._fails, self._prefix))
            known = sizes[sizes > 0]
            typical = int(np.median(known) + 0.5) if known.size else 0  # rounded half up
            size = np.where(sizes >= 0, sizes, typical)
            self._estimate = (events, int(np.maximum(fails * size - prefix, fails).sum()))
        return self._estimate[1]

    @property
    def counts(self) -> dict[str, int]:
        """Skips per reason, for every record and shard reason."""
        return {reason: self._get(reason) for reason in RECORD_REASONS + SHARD_REASONS}

    @property
    def good(self) -> int:
        """Records yielded."""
        return self._get(GOOD)

    @property
    def seen(self) -> int:
        """Records read, good and bad (empty/unreadable shards hold none)."""
        return self.good + sum(self._get(reason) for reason in RECORD_REASONS)

    @property
    def lost(self) -> int:
        """Records lost with unreadable and short shards (partly estimated, see the module docstring)."""
        return self._get(_LOST) + self._estimated()

    @property
    def expected(self) -> int:
        """Records the shards held: read plus lost."""
        return self.seen + self.lost

    @property
    def bad_fraction(self) -> float:
        """Fraction of the expected records that were skipped or lost (0 before any was known)."""
        expected = self.expected
        return (expected - self.good) / expected if expected else 0.0

    def _lost_text(self) -> str:
        lost, counts = self.lost, self.counts
        if not lost:
            return "none"
        kinds = " and ".join(f"{counts[r]:,} {word}" for r, word in ((UNREADABLE_SHARD, "unreadable"),
                                                                    (SHORT_SHARD, "short")) if counts[r])
        shards = counts[UNREADABLE_SHARD] + counts[SHORT_SHARD]
        estimated = self._estimated()
        note = f" ({estimated:,} estimated from the median shard size)" if estimated else ""
        return f"{lost:,} in {kinds} shard{'' if shards == 1 else 's'}{note}"

    def summary(self) -> str:
        """One line, e.g. ``8 of 12 records used; skipped: none; lost: 4 in 1 unreadable shard; 0 empty shards``."""
        counts = self.counts
        skipped = ", ".join(f"{counts[r]:,} {r}" for r in RECORD_REASONS if counts[r]) or "none"
        return (f"{self.good:,} of {self.expected:,} records used; skipped: {skipped}; lost: {self._lost_text()}; "
                f"{_plural(counts[EMPTY_SHARD], 'empty shard')}")

    def reset(self) -> None:
        """Zero every count and forget the shard sizes."""
        with self._array.get_lock():
            events = self._get(_EVENTS)
            self._array[:] = [0] * len(_SLOTS)
            self._array[self._slot(_EVENTS)] = events + 1  # invalidates every process's estimate
            n = len(self._sizes)
            self._sizes[:], self._fails[:], self._prefix[:] = [-1] * n, [0] * n, [0] * n

    def check(self, max_bad_fraction: float, require_good: bool = True) -> None:
        """Raise when too many records were bad or lost, or (``require_good``) when none was good.

        Args:
            max_bad_fraction: the largest tolerated fraction of bad and lost records.
            require_good: also fail when no good record at all was read.

        Raises:
            ValueError: a :class:`ConfigError` naming :attr:`field`, the fraction found and the counts;
                or a ``ValueError`` naming the shards.
        """
        if require_good and self.good == 0:
            raise ValueError(
                f"no usable image-caption record was read from {self.source} ({self.summary()}); "
                f"check the shard paths/URLs and that samples hold an image "
                f"(.{', .'.join(IMAGE_EXTENSIONS)}) and a .{CAPTION_EXTENSION} caption")
        if self.bad_fraction > max_bad_fraction:
            raise ConfigError(self.field, max_bad_fraction,
                              f"exceeded: {self.bad_fraction:.2%} of the records expected from {self.source} "
                              f"were bad or lost ({self.summary()}); repair or drop those shards, or raise the bound")
