"""Checkpoints a killed run resumes from: ``dpldm fit --config FILE --ckpt_path last``.

Lightning's default checkpoint folder lies under the logger's version folder, a new one for each run, so
a resumed run would not find the checkpoint of the run it resumes. Here the folder is fixed per run root,
files are replaced atomically (a job killed mid-write leaves the previous checkpoint whole), and the final
step is always saved. The DP accountant's state is in every file (``LatentDiffusion.on_save_checkpoint``):
resuming continues the same epsilon.
"""

from __future__ import annotations

import os
import warnings
from weakref import proxy

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

# Lightning 2.6 warns that a manual-optimization checkpoint holds the state *after* the step: it should.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class ResumableCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps, at each epoch end and when training
    ends, in ``dirpath`` (default ``<trainer.default_root_dir>/checkpoints``).

    Added by ``dpldm fit`` when the config has no checkpoint callback (``trainer.enable_checkpointing:
    false`` turns checkpoints off).

    Args:
        dirpath: the folder; default ``<trainer.default_root_dir>/checkpoints``.
        every_n_train_steps: save every this many optimizer steps (and at the end of every epoch).
        save_top_k: also keep this many step-named checkpoints (0: only ``last.ckpt``).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 100, save_top_k: int = 0):
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=save_top_k,
                         save_last=True)

    def _default_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # called for ckpt_path="last" before setup: look in the fixed folder, not a new version folder
        self._default_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_if_new(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_if_new(trainer)  # the final step, even when max_steps is not a multiple of n

    def _save_if_new(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # (skips a step already saved)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Write ``filepath.part``, then rename it over ``filepath`` (atomic on POSIX file systems)."""
        part = f"{filepath}.part"
        trainer.save_checkpoint(part, self.save_weights_only)  # collective under DDP; rank 0 writes
        if trainer.is_global_zero:
            os.replace(part, filepath)
        trainer.strategy.barrier("ResumableCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
