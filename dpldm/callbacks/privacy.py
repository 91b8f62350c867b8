"""Reports what a DP run spent: epsilon from the accountant over the steps actually taken, with
(q, sigma, T, delta) next to it. Added automatically by a LatentDiffusion with ``privacy`` set.
"""

from __future__ import annotations

import json
import os

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_info

from dpldm.privacy.settings import prior_releases


class PrivacyMonitor(L.Callback):
    """Logs ``privacy/*`` whenever Lightning writes logs (every ``trainer.log_every_n_steps`` optimizer
    steps: computing a PRV epsilon takes ~0.1 s) and at the end; writes ``privacy.json`` to the log dir.
    """

    def __init__(self) -> None:
        self.final: dict[str, float] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object,
                           batch: object, batch_idx: int) -> None:
        dp = getattr(pl_module, "dp", None)  # under DDP every rank accounts the same steps; rank 0 reports
        if (dp is not None and trainer.is_global_zero and dp.accountant.steps
                and trainer.global_step % trainer.log_every_n_steps == 0):
            report = dp.report()
            pl_module.log_dict(report, on_step=True, on_epoch=False, batch_size=1)
            pl_module.log("eps", report["privacy/epsilon"], prog_bar=True, logger=False, batch_size=1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dp = getattr(pl_module, "dp", None)
        if dp is None:
            return
        root = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: called on every rank
        if not trainer.is_global_zero:
            return
        self.final = dp.report()
        for logger in trainer.loggers:
            logger.log_metrics(self.final, step=trainer.global_step)
        os.makedirs(root, exist_ok=True)
        prior_epsilon = dp.accountant.prior_epsilon()  # already composed into the epsilon above
        with open(os.path.join(root, "privacy.json"), "w") as f:
            json.dump({**self.final, "accountant": dp.settings.accountant, "max_grad_norm": dp.settings.max_grad_norm,
                       "target_epsilon": dp.settings.epsilon, "planned_steps": dp.plan.planned_steps,
                       "world_size": trainer.world_size,
                       "segments": dp.segments(),  # every (sigma, q, steps), resumed runs included
                       "prior": dp.segments(prior=True), "prior_epsilon": prior_epsilon}, f, indent=2)
        r = self.final
        rank_zero_info(f"DP-SGD: epsilon = {r['privacy/epsilon']:.3f} at delta = {r['privacy/delta']:.3g} "
                       f"({dp.settings.accountant.upper()}), sigma = {r['privacy/noise_multiplier']:.4g}, "
                       f"q = {r['privacy/sample_rate']:.4g}, steps = {int(r['privacy/steps'])}, "
                       f"C = {dp.settings.max_grad_norm}"
                       + (f"; with {prior_releases(len(dp.accountant.prior))} (epsilon = "
                          f"{prior_epsilon:.3g} alone) composed in" if dp.accountant.prior else "")
                       + ("; segments (sigma, q, steps): " + ", ".join(f"({s:.4g}, {q:.4g}, {t})" for s, q, t
                                                                     in dp.accountant.history)
                          if len(dp.accountant.history) > 1 else ""))
