"""Sample grids during and after training: the first thing people look at."""

from __future__ import annotations

import os

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from dpldm.utils.images import GRID_LIMIT, save_grid, write_samples


def grid_conditions(model: L.LightningModule, per_class: int, prompts: list[str] | None) -> tuple[object, int]:
    """The conditions of a sample grid and its row length: per_class samples of every class, or prompts."""
    if prompts:
        return [p for p in prompts for _ in range(per_class)], per_class
    num_classes = getattr(model.conditioner, "num_classes", None)
    if num_classes is None:  # unconditional: per_class rows of 8
        return torch.zeros(8 * per_class, dtype=torch.long, device=model.device), 8
    return torch.arange(num_classes, device=model.device).repeat(per_class), num_classes  # a column per class


def sample_grid(model: L.LightningModule, per_class: int = 4, prompts: list[str] | None = None,
                num_steps: int | None = None, guidance_scale: float | None = None,
                seed: int = 0) -> tuple[torch.Tensor, int]:
    """Guided samples [n, C, H, W] in [-1, 1] for a grid: ``per_class`` of every class (a column per class), or
    of every prompt (a row per prompt), in one batch seeded with ``seed``; returns them with the row length."""
    from dpldm.modules.sampling import sample_in_batches

    cond, nrow = grid_conditions(model, per_class, prompts)
    return sample_in_batches(model, cond, len(cond), seed, guidance_scale, num_steps, desc="grid"), nrow


class SampleGrid(L.Callback):
    """Writes a PNG grid of guided DDIM samples every ``every_n_epochs`` and at the end of training.

    Args:
        per_class: samples per class (or per prompt).
        prompts: captions for text-conditional models.
        every_n_epochs: 0 = only at the end.
        num_steps: DDIM steps (``None``: the model's default).
        guidance_scale: ``None``: the model's default.
        seed: initial-noise seed, the same for every grid so they can be compared.
    """

    def __init__(self, per_class: int = 8, prompts: list[str] | None = None, every_n_epochs: int = 0,
                 num_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0):
        self.per_class, self.prompts, self.every_n_epochs = per_class, prompts, every_n_epochs
        self.num_steps, self.guidance_scale, self.seed = num_steps, guidance_scale, seed
        self.last_path: str | None = None

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: called on every rank
        if not trainer.is_global_zero:
            return
        images, nrow = sample_grid(pl_module, self.per_class, self.prompts, self.num_steps, self.guidance_scale,
                                   self.seed)
        self.last_path = save_grid(images, os.path.join(root, "samples", f"{name}.png"), nrow)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [self.last_path], step=trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self._write(trainer, pl_module, f"epoch{epoch:04d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "final")


class SampleWriter(BasePredictionWriter):
    """``dpldm predict``: writes the predicted samples (PNGs, ``samples.npz`` with their conditions, ``grid.png``)
    to ``dirpath`` (default ``<trainer.default_root_dir>/predictions``; one subfolder per rank under DDP).

    Args:
        dirpath: the output folder.
    """

    def __init__(self, dirpath: str | None = None):
        super().__init__(write_interval="epoch")
        self.dirpath = dirpath

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: list,
                           batch_indices: list) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions  # 1 loader
        if not batches:
            return
        out = self.dirpath or os.path.join(trainer.default_root_dir, "predictions")
        out = os.path.join(out, f"rank{trainer.global_rank}") if trainer.world_size > 1 else out
        images = torch.cat([b["images"] for b in batches])  # [N, C, H, W]
        conds = [c for b in batches for c in b["cond"]]
        write_samples(images, conds, out, nrow=min(8, len(conds)))
        rank_zero_info(f"{len(conds)} predicted samples -> {out}/ (PNGs, samples.npz, grid.png of the first "
                       f"{min(len(conds), GRID_LIMIT)})")
