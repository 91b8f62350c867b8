"""Export the trained public part in diffusers format at the end of a fit, for the next stage."""

from __future__ import annotations

import os

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_info


class ExportPretrained(L.Callback):
    """Calls ``pl_module.export_pretrained(dirpath)`` once training ends.

    Args:
        dirpath: output directory; the next stage's config points its ``load_*`` ``path`` here.
            Default: ``<trainer.default_root_dir>/pretrained``.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "pretrained")
            pl_module.export_pretrained(dirpath)
            rank_zero_info(f"exported pretrained weights to {dirpath}")
