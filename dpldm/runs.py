"""Reload a finished run (its saved ``config.yaml`` + a checkpoint) for sampling or notebooks, from any folder.

A run's config holds paths as they were written at launch, usually relative to the launch folder
(``runs/quickstart/ldm/pretrained``). Reloading from elsewhere (a notebook kernel in ``notebooks/``, the run
folder moved, the public stages deleted) uses two things the fit leaves beside its ``config.yaml``:

- ``architecture/{unet,vae,scheduler}/``: the diffusers configs of the UNet, the autoencoder and the training
  schedule it built. The checkpoint holds every weight (frozen ones included), so the reload builds these
  architectures and loads the checkpoint into them: it needs no public stage on disk.
- ``launch.json``: the folder the fit was launched from. Any other relative path of the config (data roots,
  caches, metric files) that is not found from the current folder is looked up from there, or from the launch
  folder implied by where the run now lies (``trainer.default_root_dir`` is the run's own path from it).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections.abc import Iterator

import lightning.pytorch as L
import torch
import yaml

ARCHITECTURE = "architecture"  # beside config.yaml: the diffusers configs of the model's parts
LAUNCH = "launch.json"


def _latest(pattern: str | list[str], what: str, run_dir: str) -> str:
    patterns = [pattern] if isinstance(pattern, str) else pattern
    found = sorted((f for p in patterns for f in glob.glob(p)), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no {what} under {run_dir!r} (looked for {pattern!r}); did the run finish?")
    return found[-1]


def write_run_files(model: L.LightningModule, log_dir: str) -> None:
    """At fit start, beside ``config.yaml``: the model's architectures (if it has a UNet and an autoencoder) and
    the launch folder, so that :func:`load_run` works from anywhere."""
    with open(os.path.join(log_dir, LAUNCH), "w") as f:
        json.dump({"cwd": os.getcwd()}, f)
    unet, vae = getattr(model, "unet", None), getattr(getattr(model, "autoencoder", None), "vae", None)
    if unet is not None and vae is not None:
        unet.save_config(os.path.join(log_dir, ARCHITECTURE, "unet"))  # LoRA adapters: re-added by the scope
        vae.save_config(os.path.join(log_dir, ARCHITECTURE, "vae"))
        model.noise_scheduler.save_config(os.path.join(log_dir, ARCHITECTURE, "scheduler"))  # its base schedule


def _launch_dirs(cfg: dict, run_dir: str, config_dir: str) -> list[str]:
    """Where the run's relative paths may start: the recorded launch folder, then the one implied by the run's
    place (``.../runs/x/finetune`` with ``default_root_dir: runs/x/finetune`` -> ``...``)."""
    dirs = []
    launch = os.path.join(config_dir, LAUNCH)
    if os.path.isfile(launch):
        with open(launch) as f:
            dirs.append(json.load(f)["cwd"])
    root = (cfg.get("trainer") or {}).get("default_root_dir")
    here = os.path.abspath(run_dir)
    if isinstance(root, str) and not os.path.isabs(root):
        root = os.path.normpath(root)
        if here == root or here.endswith(os.sep + root):
            dirs.append(here[: len(here) - len(root)] or os.sep)
    return [d for d in dirs if os.path.isdir(d)]


def _rebased(value: object, bases: list[str]) -> object:
    """``value`` with every relative path that is missing from here but present under a base made absolute."""
    if isinstance(value, dict):
        return {k: v if k == "class_path" else _rebased(v, bases) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebased(v, bases) for v in value]
    if isinstance(value, str) and "/" in value and not os.path.isabs(value) and not os.path.exists(value):
        for base in bases:
            if os.path.exists(os.path.join(base, value)):
                return os.path.join(base, value)
    return value


def _from_architecture(cfg: dict, folder: str) -> None:
    """Build the UNet and the autoencoder from the run's own architecture files (random weights, replaced by the
    checkpoint's) instead of the public stages, and drop the public initialisation of the conditioner's trained
    part (``init_from``: the checkpoint holds it too)."""
    model = cfg["model"]["init_args"]
    autoencoder = model.get("autoencoder", {}).get("init_args", {})
    if "unet" not in model or "vae" not in autoencoder:  # not a LatentDiffusion config: rebased paths only
        return
    model["unet"] = {"class_path": "dpldm.modules.load_unet",
                     "init_args": {"path": folder, "subfolder": "unet", "weights": False}}
    autoencoder["vae"] = {"class_path": "dpldm.modules.load_autoencoder",
                          "init_args": {"path": folder, "subfolder": "vae", "weights": False}}
    conditioner = model.get("conditioner", {}).get("init_args", {})
    if "init_from" in conditioner:
        conditioner["init_from"] = None


def saved_config(run_dir: str) -> tuple[dict, str]:
    """The run's ``config.yaml`` (the newest version) as written, and the folder that holds it."""
    config = _latest([os.path.join(run_dir, "logs", "version_*", "config.yaml"),
                      os.path.join(run_dir, "config.yaml")],  # a fit without a logger writes it to the run root
                     "config.yaml", run_dir)
    with open(config) as f:
        return yaml.safe_load(f), os.path.dirname(config)


def rebased(value: object, run_dir: str) -> object:
    """``value`` (a path, or a dict or list of them) with its relative paths found from the run's launch folder
    when they are missing from the current one (reads the run's config once per call)."""
    cfg, config_dir = saved_config(run_dir)
    return _rebased(value, _launch_dirs(cfg, run_dir, config_dir))


def run_config(run_dir: str) -> dict:
    """The run's saved ``config.yaml``, minus the arguments of ``fit`` itself, with its paths made to work from
    the current folder (see the module docstring)."""
    cfg, config_dir = saved_config(run_dir)
    for key in ("ckpt_path", "weights_only"):  # arguments of `fit` itself, not of the objects
        cfg.pop(key, None)
    architecture = os.path.join(config_dir, ARCHITECTURE)
    if os.path.isdir(architecture):
        _from_architecture(cfg, os.path.abspath(architecture))
    return _rebased(cfg, _launch_dirs(cfg, run_dir, config_dir))


def load_weights(model: L.LightningModule, run_dir: str, checkpoint: str | None = None) -> str:
    """Load a checkpoint of the run (default: its newest) into ``model``; returns the file."""
    checkpoint = checkpoint or _latest([os.path.join(run_dir, "checkpoints", "*.ckpt"),  # ResumableCheckpoint
                                        os.path.join(run_dir, "logs", "version_*", "checkpoints", "*.ckpt")],
                                       "checkpoint", run_dir)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.on_load_checkpoint(state)
    return checkpoint


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's and Fabric's info lines (devices found, seed set, tips) silenced for the block."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_run(run_dir: str, checkpoint: str | None = None) -> L.LightningModule:
    """Rebuild a run's model from the ``config.yaml`` LightningCLI saved, and load its weights.

    Args:
        run_dir: the run's ``trainer.default_root_dir`` (e.g. ``runs/quickstart/finetune``), from any folder.
        checkpoint: a ``.ckpt`` file; default: the newest one of the run.

    Returns:
        The model in eval mode, on the CPU (EMA state restored when the run kept one).
    """
    return load_run_and_data(run_dir, checkpoint)[0]


def load_run_and_data(run_dir: str, checkpoint: str | None = None) -> tuple[L.LightningModule, L.LightningDataModule, str]:
    """:func:`load_run`, plus the run's DataModule (not set up) and the checkpoint file that was loaded."""
    from dpldm.commands.lightning_cli import DPLDMCLI

    cfg = run_config(run_dir)
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["callbacks"] = []
    with quiet_lightning():  # a Trainer is built, never run: no GPU/TPU, seed or tip lines
        cli = DPLDMCLI(args=cfg, run=False)
    path = load_weights(cli.model, run_dir, checkpoint)
    return cli.model.eval(), cli.datamodule, path
