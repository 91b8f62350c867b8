"""``DPLDMCLI``: the LightningCLI behind ``dpldm fit``, ``validate`` and ``predict`` (YAML configs with
``class_path``/``init_args``), with dpldm's defaults: CSV + W&B logging next to the checkpoints, resumable
checkpoints, the run's config saved with what reloads it from anywhere, and samples written by ``predict``.
"""

from __future__ import annotations

import os
import sys
import warnings

import lightning.pytorch as L
import yaml
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from dpldm.callbacks.checkpoint import ResumableCheckpoint
from dpldm.callbacks.progress import LineProgress
from dpldm.callbacks.samples import SampleWriter
from dpldm.loggers import WandbLogger, run_name, sweep_run, wandb_disabled
from dpldm.runs import write_run_files

# The frozen autoencoder and text encoder are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
# Every driver passes its arguments as a list, as `dpldm` itself does: Lightning warns about that each time.
warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
# Lightning 2.6's own pytree helper calls an API torch 2.14 deprecated, once per fit: nothing a user can change.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class SaveConfigEverywhere(SaveConfigCallback):
    """``config.yaml`` next to the logs with what reloads the run from anywhere (``dpldm.runs.write_run_files``),
    and the resolved config in the W&B run (dpldm's WandbLogger takes it when its run starts, so this does not
    start it before the setup checks)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved:
            self.log_dir = trainer.log_dir  # broadcast: every rank asks, before save_config runs on rank zero
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        write_run_files(pl_module, self.log_dir)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, LightningWandbLogger)]
        if loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in loggers:
                if isinstance(logger, WandbLogger):
                    logger.add_config(config)
                else:
                    logger.experiment.config.update(config, allow_val_change=True)


def without_wandb(loggers: object) -> object:
    """The trainer's ``logger`` setting without its W&B loggers (``WANDB_MODE=disabled``: no W&B at all).

    Args:
        loggers: the instantiated ``trainer.logger`` value (a logger, a list of them, or a bool).
    """
    if isinstance(loggers, LightningWandbLogger):
        return False
    if isinstance(loggers, list):
        return [lg for lg in loggers if not isinstance(lg, LightningWandbLogger)] or False
    return loggers


class DPLDMCLI(LightningCLI):
    """LightningCLI with dpldm's defaults: any LightningModule / DataModule by ``class_path``,
    OmegaConf interpolation in configs, and the run's config saved next to its logs.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_callback=SaveConfigEverywhere,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            seed_everything_default=0,
            args=args,
            run=run,
        )

    def before_instantiate_classes(self) -> None:
        # Under `wandb agent` each run has its own folder, <default_root_dir>/<W&B run id>: its checkpoints,
        # logs and W&B files, never those of the sweep's other runs (in turn or in parallel agents).
        run = sweep_run()
        if run is not None and self.subcommand is not None:
            trainer = self._get(self.config, "trainer")
            trainer.default_root_dir = os.path.join(trainer.default_root_dir or ".", run.id)

    def instantiate_trainer(self, **kwargs: object) -> L.Trainer:
        # By default CSV logs next to the checkpoints (the first logger: it sets trainer.log_dir), and W&B
        # (offline by itself without an API key or network). WANDB_MODE=disabled: no W&B logger at all, not
        # even one the config names.
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            root = trainer_cfg.get("default_root_dir") or "."
            trainer_cfg["logger"] = [CSVLogger(save_dir=root, name="logs")]
            if not wandb_disabled():
                trainer_cfg["logger"].append(WandbLogger(name=run_name(root), save_dir=root))
        elif wandb_disabled():
            trainer_cfg["logger"] = without_wandb(trainer_cfg["logger"])
        # Checkpoints that `--ckpt_path last` finds (in <root>/checkpoints), unless the config has its own.
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer_cfg.get("enable_checkpointing") is not False and not any(
                isinstance(cb, ModelCheckpoint) for cb in callbacks):
            trainer_cfg["callbacks"] = callbacks = [*callbacks, ResumableCheckpoint()]
        # Output to a file: progress as a line a minute (Rich's bar prints nothing there), unless the config
        # has a bar of its own or none at all.
        if (not sys.stdout.isatty() and trainer_cfg.get("enable_progress_bar") is not False
                and not any(isinstance(cb, ProgressBar) for cb in callbacks)):
            trainer_cfg["callbacks"] = callbacks = [*callbacks, LineProgress()]
        if self.subcommand == "predict" and not any(isinstance(cb, BasePredictionWriter) for cb in callbacks):
            trainer_cfg["callbacks"] = [*callbacks, SampleWriter()]  # to files
        return super().instantiate_trainer(**kwargs)
