"""Training progress as plain lines, for output that is not a terminal (``dpldm experiment > log``, nohup,
a cluster job): Lightning's Rich bar prints nothing there and a tqdm bar one endless line of carriage returns.
``DPLDMCLI`` puts this in place of the default bar when stdout is not a terminal.
"""

from __future__ import annotations

import math
import sys
import time

import lightning.pytorch as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class LineProgress(ProgressBar):
    """One line every ``interval`` seconds of training (and one at the end): the step, its share of the run,
    seconds per step since the line before (a machine that gets busier or freer shows at once), the time left at
    that rate, and the progress-bar metrics the model logs (the batch loss, epsilon spent).

    Args:
        interval: seconds between two lines.
        stream: where the lines go (default: stdout).
    """

    def __init__(self, interval: float = 60.0, stream=None):
        super().__init__()
        if interval <= 0:
            raise ValueError(f"LineProgress.interval = {interval} must be > 0 seconds")
        self.interval = interval
        self.stream = stream
        self._enabled = True
        self._last = 0.0
        self._since = (0.0, 0)  # (time, step) the rate is measured from: the line before, or the start
        self._rate: float | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:  # LightningModule.print asks the bar before printing through it
        return self._enabled

    def _total_steps(self, trainer: L.Trainer) -> float:
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            return trainer.max_steps
        batches, epochs = self.total_train_batches, trainer.max_epochs
        return batches * epochs if epochs is not None and epochs >= 0 and math.isfinite(batches) else math.inf

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """The current line: ``step 256/1024 (25%) | 2.81 s/step | 36m00s left | train/loss 0.123``."""
        step, total = trainer.global_step, self._total_steps(trainer)
        elapsed, done = time.perf_counter() - self._since[0], step - self._since[1]
        if done > 0:  # no step since the last line (micro-batches of one DP step): keep its rate
            self._rate = elapsed / done
        known = math.isfinite(total) and total > 0
        parts = [f"step {step}/{total:g} ({step / total:.0%})" if known else f"step {step}"]
        if self._rate is not None:
            parts.append(f"{self._rate:.2f} s/step")
            if known:
                parts.append(f"{_duration(self._rate * max(total - step, 0))} left")
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        return " | ".join(parts)

    def _print(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:  # setup() disables it on every rank but the first
            print(f"[{self.train_description.lower() or 'training'}] {self.line(trainer, pl_module)}",
                  file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()
        self._since = (self._last, trainer.global_step)  # a resumed run: the rate of this process's steps only

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._print(trainer, pl_module)
            if trainer.global_step > self._since[1]:  # the next line's rate: the steps since this one
                self._since = (now, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, pl_module)
