"""Weights & Biases logging that never fails a run: online when it can be, offline otherwise.

A DP sweep may run on a cluster node without network or on a laptop without an account; the run
must go on either way and be syncable later (``wandb sync DIR``). ``WANDB_MODE`` (``offline``,
``disabled``) is respected as W&B itself does.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

log = logging.getLogger(__name__)


def wandb_online_reason() -> str | None:
    """``None`` when W&B can log online; otherwise why not (no API key, no network, WANDB_MODE)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return f"WANDB_MODE={mode}"
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(url.hostname):
        return "no API key (`wandb login`, or WANDB_API_KEY)"
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=2).close()
    except OSError:
        return f"{url.hostname} unreachable"
    return None


def _netrc_has(host: str) -> bool:
    """Whether ``wandb login`` stored a key for ``host`` (in ~/.netrc or $NETRC)."""
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``, offline automatically when there is no API key or no network.

    Args:
        project: W&B project.
        name: run name (default: W&B's).
        save_dir: where the run's files go (``<save_dir>/wandb``).
        offline: force offline (``True``) or online (``False``); ``None`` decides by availability.
        group: W&B group, e.g. one per sweep.
        tags: W&B tags.
        log_model: upload checkpoints as artifacts (``False``, ``True`` at the end, ``"all"``).
        reuse_run: log into a W&B run that is already open in this process (Lightning's habit); by
            default an open run is finished first, so each fit (each quickstart stage) is its own run.
    """

    def __init__(self, project: str = "dpldm", name: str | None = None, save_dir: str = ".",
                 offline: bool | None = None, group: str | None = None, tags: list[str] | None = None,
                 log_model: bool = False, reuse_run: bool = False):
        if offline is None:
            reason = wandb_online_reason()
            offline = reason is not None
            if offline and os.environ.get("WANDB_MODE", "").lower() != "disabled":
                log.info("W&B logs offline (%s); upload later with `wandb sync %s`", reason,
                         os.path.join(save_dir, "wandb"))
        wandb = sys.modules.get("wandb")
        if not reuse_run and wandb is not None and wandb.run is not None:
            wandb.finish()
        super().__init__(name=name, save_dir=save_dir, offline=offline, project=project, log_model=log_model,
                         group=group, tags=tags)

    @property
    def experiment(self):  # noqa: ANN201 (wandb's Run)
        """The W&B run, started on first use (its folder is created only then)."""
        if self._experiment is None and self.save_dir:
            os.makedirs(self.save_dir, exist_ok=True)
        return super().experiment
