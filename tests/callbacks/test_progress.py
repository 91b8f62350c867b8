"""LineProgress: plain progress lines where the output is a file."""

from __future__ import annotations

import io
import re
import time

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from dpldm.callbacks import LineProgress


class _Tiny(L.LightningModule):
    def __init__(self, slow_from: int | None = None):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.slow_from = slow_from  # steps from this one on take 0.3 s more

    def training_step(self, batch, batch_idx):
        if self.slow_from is not None and self.global_step >= self.slow_from:
            time.sleep(0.3)
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(12, 2))
        return torch.utils.data.DataLoader(data, batch_size=4)


def _fit(tmp_path, progress: LineProgress, model: _Tiny | None = None, **trainer: object) -> L.Trainer:
    fit = L.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_model_summary=False,
                    callbacks=[progress], **trainer)
    fit.fit(model or _Tiny())
    return fit


def test_a_line_per_interval_with_the_step_rate_time_left_and_metrics(tmp_path):
    out = io.StringIO()
    trainer = _fit(tmp_path, LineProgress(interval=1e-9, stream=out), max_steps=6)
    lines = out.getvalue().splitlines()
    assert trainer.progress_bar_callback is trainer.callbacks[0]  # it replaces Lightning's own bar
    assert len(lines) == 7  # one a step (the interval is ~0), one at the end
    assert lines[0].startswith("[training] step 1/6 (17%)")
    assert lines[-1].startswith("[training] step 6/6 (100%)") and "0m00s left" in lines[-1]
    assert all(" s/step | " in ln and "train/loss " in ln for ln in lines)


def test_epochs_give_the_total_and_a_long_interval_prints_only_the_end(tmp_path):
    out = io.StringIO()
    _fit(tmp_path, LineProgress(interval=3600, stream=out), max_epochs=2)  # 3 batches an epoch
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[training] step 6/6 (100%)")


def test_the_rate_is_that_of_the_steps_since_the_line_before(tmp_path):
    out = io.StringIO()
    _fit(tmp_path, LineProgress(interval=1e-9, stream=out), _Tiny(slow_from=3), max_steps=6)
    rates = [float(re.search(r"([0-9.]+) s/step", ln).group(1)) for ln in out.getvalue().splitlines()]
    assert max(rates[1:3]) < 0.15 and min(rates[3:]) >= 0.3  # a running mean would show ~0.15 at step 6


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match=r"LineProgress.interval = 0 must be > 0"):
        LineProgress(interval=0)
