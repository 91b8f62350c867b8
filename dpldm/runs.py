"""Reload a finished run (its saved ``config.yaml`` + a checkpoint) for sampling or notebooks."""

from __future__ import annotations

import glob
import os

import lightning.pytorch as L
import torch
import yaml


def _latest(pattern: str | list[str], what: str, run_dir: str) -> str:
    patterns = [pattern] if isinstance(pattern, str) else pattern
    found = sorted((f for p in patterns for f in glob.glob(p)), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no {what} under {run_dir!r} (looked for {pattern!r}); did the run finish?")
    return found[-1]


def run_config(run_dir: str) -> dict:
    """The run's saved ``config.yaml`` (the newest version), minus the arguments of ``fit`` itself."""
    config = _latest(os.path.join(run_dir, "logs", "version_*", "config.yaml"), "config.yaml", run_dir)
    with open(config) as f:
        cfg = yaml.safe_load(f)
    for key in ("ckpt_path", "weights_only"):  # arguments of `fit` itself, not of the objects
        cfg.pop(key, None)
    return cfg


def load_weights(model: L.LightningModule, run_dir: str, checkpoint: str | None = None) -> str:
    """Load a checkpoint of the run (default: its newest) into ``model``; returns the file."""
    checkpoint = checkpoint or _latest([os.path.join(run_dir, "checkpoints", "*.ckpt"),  # ResumableCheckpoint
                                        os.path.join(run_dir, "logs", "version_*", "checkpoints", "*.ckpt")],
                                       "checkpoint", run_dir)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.on_load_checkpoint(state)
    return checkpoint


def load_run(run_dir: str, checkpoint: str | None = None) -> L.LightningModule:
    """Rebuild a run's model from the ``config.yaml`` LightningCLI saved, and load its weights.

    Args:
        run_dir: the run's ``trainer.default_root_dir`` (e.g. ``runs/quickstart/finetune``).
        checkpoint: a ``.ckpt`` file; default: the newest one of the run.

    Returns:
        The model in eval mode, on the CPU (EMA state restored when the run kept one).
    """
    return load_run_and_data(run_dir, checkpoint)[0]


def load_run_and_data(run_dir: str, checkpoint: str | None = None) -> tuple[L.LightningModule, L.LightningDataModule, str]:
    """:func:`load_run`, plus the run's DataModule (not set up) and the checkpoint file that was loaded."""
    from dpldm.cli import DPLDMCLI

    cfg = run_config(run_dir)
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["callbacks"] = []
    cli = DPLDMCLI(args=cfg, run=False)
    path = load_weights(cli.model, run_dir, checkpoint)
    return cli.model.eval(), cli.datamodule, path
