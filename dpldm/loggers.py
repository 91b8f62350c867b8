"""Weights & Biases logging that never fails a run: online when it can be, offline otherwise, off when told.

A DP sweep may run on a cluster node without network or on a laptop without an account; the run
must go on either way and be syncable later (``wandb sync DIR``). ``WANDB_MODE=offline`` forces offline;
``WANDB_MODE=disabled`` (or ``WANDB_DISABLED=true``) means no W&B at all: the CLI adds no W&B logger and
drops any the config names, and a :class:`WandbLogger` made by hand writes and logs nothing.

Under ``wandb agent`` (:func:`sweep_run`) every run gets its own folder and name (:func:`run_name`).
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)


def wandb_disabled() -> bool:
    """Whether W&B is switched off (``WANDB_MODE=disabled`` or ``WANDB_DISABLED=true``), as W&B reads it."""
    return (os.environ.get("WANDB_MODE", "").lower() == "disabled"
            or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"))


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


@dataclass
class SweepRun:
    """A run that ``wandb agent`` started.

    Args:
        id: the W&B run id the agent assigned (``WANDB_RUN_ID``; unique within the project).
        params: the swept values the agent handed out (config key -> value).
    """

    id: str
    params: dict[str, Any]


def sweep_run() -> SweepRun | None:
    """The ``wandb agent`` run this process is, or ``None``.

    The agent sets ``WANDB_RUN_ID`` and ``WANDB_SWEEP_PARAM_PATH`` (the YAML of the values it handed out)
    for every command it starts; a plain ``WANDB_RUN_ID`` (resuming a run by hand) is not a sweep run.
    """
    run_id, path = os.environ.get("WANDB_RUN_ID"), os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not run_id or not path:
        return None
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        doc = {}
    params = {k: v.get("value") for k, v in doc.items() if isinstance(v, dict) and "value" in v}
    return SweepRun(run_id, params)


def run_name(root: str) -> str:
    """The W&B name of a run in ``root``: the folder; under ``wandb agent`` also the swept values, by their
    last key part (``runs/sweeps/quickstart-wandb/ab12cd34 epsilon=2 max_grad_norm=0.1``).

    Args:
        root: the run's ``trainer.default_root_dir``.
    """
    run = sweep_run()
    params = run.params if run else {}
    return " ".join([os.path.normpath(root), *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in params.items())])


class _PendingRun:
    """What ``WandbLogger.experiment`` gives before the W&B run has started: the run starts on the first
    attribute used (``.log``, ``.config``, ...), not when Lightning merely touches ``experiment``."""

    def __init__(self, logger: WandbLogger):
        self._logger = logger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger.start(), name)


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``, offline automatically when there is no API key or no network.

    Its W&B run (and ``<save_dir>/wandb``) starts on first use: a logged value or the run's config, not
    Lightning's touch of ``experiment`` before the setup hooks. So a run that fails its config checks in
    setup (the data, the DP plan) leaves no W&B run behind. Under ``WANDB_MODE=disabled`` its run is W&B's
    no-op run: nothing is written or logged.

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
        self.disabled = wandb_disabled()
        if not self.disabled and offline is None:
            reason = wandb_online_reason()
            offline = reason is not None
            if offline:
                log.info("W&B logs offline (%s); upload later with `wandb sync %s`", reason,
                         os.path.join(save_dir, "wandb"))
        self.mode = "disabled" if self.disabled else "offline" if offline else "online"
        wandb = sys.modules.get("wandb")
        if not reuse_run and wandb is not None and wandb.run is not None:
            wandb.finish()
        super().__init__(name=name, save_dir=save_dir, offline=self.mode == "offline", project=project,
                         log_model=log_model, group=group, tags=tags)  # (Lightning refuses offline + log_model)
        # The mode goes to wandb.init itself: Lightning would set WANDB_MODE=dryrun for the whole process (W&B on
        # again under `disabled`), and W&B reads the environment only once per process.
        self._offline = False
        self._wandb_init["mode"] = None if self.mode == "online" else self.mode  # online: as W&B's settings say
        if self.disabled:  # W&B's no-op run; with a `dir` W&B would still create that folder
            self._wandb_init["dir"] = None
        self._pending_config: dict = {}

    @property
    @rank_zero_experiment
    def experiment(self):  # noqa: ANN201 (wandb's Run)
        """The W&B run; before its first use, a stand-in that starts it on first attribute access."""
        return self._experiment if self._experiment is not None else _PendingRun(self)

    def start(self):  # noqa: ANN201 (wandb's Run)
        """Start the W&B run now (once): its folder, then ``wandb.init``, then the config given so far."""
        if self._experiment is None:
            if self.save_dir and not self.disabled:
                os.makedirs(self.save_dir, exist_ok=True)
            run = _LightningWandbLogger.experiment.fget(self)
            if self._pending_config:
                run.config.update(self._pending_config, allow_val_change=True)
        return self._experiment

    def add_config(self, config: dict) -> None:
        """Put ``config`` into the run's W&B config: now if the run has started, else when it starts."""
        if self._experiment is not None:
            self._experiment.config.update(config, allow_val_change=True)
        else:
            self._pending_config.update(config)

    @property
    def version(self) -> str | None:
        """The W&B run id; asking for it starts the run (as Lightning's pre-setup touch did), e.g. for a
        ModelCheckpoint that puts its files under the first logger's version."""
        if self._experiment is None and self._id is None and not self.disabled:
            self.start()
        return super().version

    def __getstate__(self) -> dict:
        self.start()  # Lightning's spawn hack: the run is made in the main process, attached to in workers
        return super().__getstate__()
