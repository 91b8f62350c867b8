"""Files written whole or not at all, and the small text files users hand in."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import IO

from dpldm.errors import ConfigError


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Open ``path.part`` for writing and rename it over ``path`` when the block ends without an error (atomic
    on POSIX file systems): a reader, or a resumed run after a crash, never sees half a file."""
    part = path + ".part"
    try:
        with open(part, mode) as f:
            yield f
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.remove(part)


def read_prompts(path: str, field: str) -> list[str]:
    """The prompts of a file, one a line (blank lines skipped).

    Raises:
        ConfigError: naming ``field``, when the file is missing or holds no prompt.
    """
    if not os.path.isfile(path):
        raise ConfigError(field, path, "no such file (one prompt a line)")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError(field, path, "holds no prompt (one a line)")
    return prompts


def files_digest(files: list[str]) -> str:
    """sha256 (first 16 hex digits) of the files' bytes, in the order given: a short name for a set of weights."""
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
