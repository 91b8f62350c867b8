"""``dpldm audit``: an empirical lower bound on a DP fine-tuning run's epsilon, in one training run.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023):

  1. draw m out-of-distribution canaries shaped like the private records (dpldm.audit.canaries);
  2. include each in the training split with probability 1/2 (a hidden, seeded mask);
  3. train exactly as ``dpldm fit --config FIT.yaml`` would (same DP-SGD engine, Poisson sampling and
     accountant; N counts the included canaries);
  4. score each canary by the drop of its denoising loss during training, guess IN for the top scores
     and OUT for the bottom ones, and turn the number of correct guesses into an epsilon lower bound
     (dpldm.audit.statistics).

Two controls check the audit itself: the same run without DP (same trainable scope, steps, canaries and
mask) must give a clearly positive bound; the DP run's scores tested against a fresh mask that training
never saw must give about 0. A control that shows no leakage (eps_lb ~0 or AUC ~0.5) means the audit proves
nothing: the console and audit.json (``control_shows_leakage``, ``warnings``) say so, and how to strengthen it.

  dpldm audit --config configs/quickstart/finetune.yaml --out runs/audit [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from dpldm.errors import ConfigError
from dpldm.audit import statistics as stats
from dpldm.audit import canaries as cn

CAVEAT = ("eps_lb is a lower bound on the run's epsilon that holds with the stated confidence: it must be <= the "
          "accountant's epsilon (a DP run above it means a bug in the DP pipeline or its accounting). A small eps_lb "
          "does NOT prove privacy: it only says this attack could not show more leakage.")


@dataclass
class RunAudit:
    """One row of the audit table.

    Args:
        name: the row label.
        scores: membership score per canary [m] (loss drop during training).
        included: the mask the scores are tested against [m].
        result: the one-run audit.
        auc: ROC AUC of the loss-drop membership attack.
        tpr: its TPR at 1 % FPR.
        epsilon: the accountant's epsilon (None: not a DP run).
        delta: the delta of ``epsilon`` and of the bound.
        steps: optimizer steps taken.
    """

    name: str
    scores: np.ndarray
    included: np.ndarray
    result: stats.AuditResult
    auc: float
    tpr: float
    epsilon: float | None
    delta: float
    steps: int

    def as_dict(self) -> dict:
        """JSON-ready (inf and NaN as null), with the scores and the mask for re-analysis."""
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else x

        return {"name": self.name, "epsilon": num(self.epsilon), "delta": self.delta, "steps": self.steps,
                **self.result.as_dict(), "auc": num(self.auc), "tpr_at_1pct_fpr": num(self.tpr),
                "scores": self.scores.tolist(), "included": self.included.astype(int).tolist()}


def evaluate(name: str, scores: np.ndarray, included: np.ndarray, delta: float, confidence: float,
             epsilon: float | None, steps: int) -> RunAudit:
    """Audit statistics of one set of scores against one mask.

    Args:
        name: the row label.
        scores: membership scores [m].
        included: the mask [m].
        delta: delta of the bound.
        confidence: confidence level.
        epsilon: the accountant's epsilon, if any.
        steps: optimizer steps of the run.
    """
    result = stats.one_run_audit(scores, included, delta, confidence)
    return RunAudit(name, scores, included, result, stats.membership_auc(scores, included),
                    stats.tpr_at_fpr(scores, included, 0.01), epsilon, delta, steps)


def build_cli(config: str, overrides: list[str], root: str) -> object:
    """The model, datamodule and trainer of ``dpldm fit --config config *overrides``, for an audit run:
    no callbacks (samples and metrics are slow and irrelevant), no logger, checkpoint or validation, and
    every file under ``root``. The DP-SGD pipeline (engine, sampler, accountant) is the config's.

    Args:
        config: the fit config.
        overrides: LightningCLI overrides, applied before the audit's own.
        root: the run's ``trainer.default_root_dir``.
    """
    import warnings

    from dpldm.commands.lightning_cli import DPLDMCLI

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    audit_args = ["--trainer.callbacks=[]", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                  "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                  f"--trainer.default_root_dir={root}"]
    return DPLDMCLI(args=["--config", config, *overrides, *audit_args], run=False)


def open_training_split(cli: object) -> object:
    """Build (or check) the latent cache when there is one, then the training split.

    Args:
        cli: a :func:`build_cli` result.
    """
    from dpldm.datamodules import LatentCacheDataModule

    dm, model = cli.datamodule, cli.model
    if isinstance(dm, LatentCacheDataModule):
        dm.build(model)
    elif hasattr(dm, "prepare_data"):
        dm.prepare_data()
    dm.setup("fit")
    return cn.training_split(dm)


def train_and_score(cli: object, canaries: dict, included: np.ndarray, seed: int, draws: int,
                    t_range: tuple[float, float]) -> tuple:
    """Inject the included canaries, score, fit, score again.

    Args:
        cli: a :func:`build_cli` result.
        canaries: batched canaries.
        included: the secret mask [m].
        seed: the audit's seed (the scorer's noise).
        draws: (t, noise) draws per canary.
        t_range: fractions of the schedule between which t lies.

    Returns:
        (scores [m] = loss before - loss after, the model, the private N before injection)
    """
    model, dm = cli.model, cli.datamodule
    base = open_training_split(cli)
    cn.inject(dm, canaries, included)
    before = cn.canary_losses(model, canaries, draws, seed, t_range)
    cli.trainer.fit(model, dm)
    after = cn.canary_losses(model, canaries, draws, seed, t_range)
    return before - after, model, len(base)


def scope_override(model: object) -> list[str]:
    """The DP model's trainable scope, spelled out for the non-private control (whose default scope would
    otherwise be the whole model).

    Args:
        model: the DP run's model.
    """
    scope = getattr(model, "scope", None)
    if scope is None:
        return []
    args = {"kind": scope.kind, "blocks": scope.blocks, "resolutions": scope.resolutions,
            "conditioner": scope.conditioner}
    return ["--model.init_args.scope=" + json.dumps({"class_path": "dpldm.privacy.TrainableScope", "init_args": args})]


def run_audit(config: str, overrides: list[str], m: int = 256, seed: int = 0, out: str = "runs/audit",
              confidence: float = 0.95, control: bool = True, draws: int = 8, scale: float = 3.0,
              t_range: tuple[float, float] = (0.05, 0.3)) -> list[RunAudit]:
    """The DP run, the non-private control and the negative control (see the module docstring).

    Args:
        config: the fit config.
        overrides: LightningCLI overrides (``--trainer.max_steps=100`` ...).
        m: number of canaries.
        seed: seed of the canaries, the mask and the scorer's noise.
        out: output folder.
        confidence: confidence level of the bounds.
        control: also run the non-private control.
        draws: (t, noise) draws per canary score.
        scale: how far out of distribution the canaries lie (see :func:`dpldm.audit.canaries.make_canaries`).
        t_range: fractions of the schedule between which the scorer's t lie.
    """
    if m < 4:
        raise ConfigError("--canaries", m, "must be >= 4")
    if not 0 < confidence < 1:
        raise ConfigError("--confidence", confidence, "must be in (0, 1)")
    cli = build_cli(config, overrides, os.path.join(out, "dp"))
    model = cli.model
    template = open_training_split(cli)[0]
    classes = getattr(model.conditioner, "num_classes", None) or getattr(cli.datamodule, "num_classes", None)
    canaries = cn.make_canaries(template, m, model, seed, classes, scale)
    included = cn.inclusion_mask(m, seed)
    start = time.perf_counter()
    scores, model, n_private = train_and_score(cli, canaries, included, seed, draws, t_range)
    print(f"audit: DP run trained in {time.perf_counter() - start:.0f}s; {cn.summary_counts(included, n_private)}",
          flush=True)
    dp = getattr(model, "dp", None)
    n_total = n_private + int(included.sum())
    report = dp.report() if dp is not None else None
    delta = report["privacy/delta"] if report else 1.0 / (10 * n_total)
    steps = int(report["privacy/steps"]) if report else int(cli.trainer.global_step)
    if 2 * m * delta > 0.05:
        print(f"audit: note 2 m delta = {2 * m * delta:.3g}: Theorem 3's delta term is large and weakens every bound; "
              "fewer canaries or a smaller delta (model.init_args.privacy.init_args.delta) tighten it", flush=True)
    rows = [evaluate("DP run", scores, included, delta, confidence,
                     report["privacy/epsilon"] if report else None, steps)]
    if control:
        ctrl_args = [*overrides, "--model.init_args.privacy=null", "--model.init_args.allow_non_private=true",
                     *scope_override(model), f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1"]
        ctrl = build_cli(config, ctrl_args, os.path.join(out, "control"))
        start = time.perf_counter()
        ctrl_scores, _, _ = train_and_score(ctrl, canaries, included, seed, draws, t_range)
        print(f"audit: non-private control trained in {time.perf_counter() - start:.0f}s", flush=True)
        rows.append(evaluate("non-private control", ctrl_scores, included, delta, confidence, math.inf,
                             int(ctrl.trainer.global_step)))
    fresh = cn.inclusion_mask(m, seed, cn.FRESH_MASK)  # independent of training: the null holds exactly
    rows.append(evaluate("negative control", scores, fresh, delta, confidence, 0.0, 0))
    return rows


def _fmt(x: float | None, spec: str = ".2f") -> str:
    if x is None:
        return "none"
    return "inf" if math.isinf(x) else ("n/a" if math.isnan(x) else format(x, spec))


def table(rows: list[RunAudit]) -> str:
    """The audit table, with the caveat on what eps_lb means.

    Args:
        rows: the DP run first, then the controls.
    """
    conf = rows[0].result.confidence
    head = (f"{'run':<22}{'accountant eps (delta)':>26}{f'eps_lb @{conf:.0%}':>14}{'correct v / r':>15}"
            f"{'AUC':>8}{'TPR@1%FPR':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        acct = f"{_fmt(r.epsilon)} ({r.delta:.2g})" if r.epsilon is not None else f"none ({r.delta:.2g})"
        if r.name == "negative control":
            acct = "0 (fresh mask)"
        lines.append(f"{r.name:<22}{acct:>26}{r.result.eps_lb:>14.2f}{f'{r.result.v} / {r.result.r}':>15}"
                     f"{_fmt(r.auc, '.3f'):>8}{_fmt(r.tpr, '.3f'):>11}")
    res = rows[0].result
    lines += ["", f"m = {res.m} canaries; guesses: the k highest loss drops IN and the k lowest OUT, k tried over "
              f"{res.tried} values with a Bonferroni correction (each at level {(1 - conf) / res.tried:.3g}).", CAVEAT]
    dp = rows[0]
    if dp.epsilon is not None and dp.result.eps_lb > dp.epsilon:
        lines.append(f"VIOLATION: eps_lb = {dp.result.eps_lb:.3f} > accountant epsilon = {dp.epsilon:.3f}: "
                     "the DP run leaks more than accounted (a bug), or this is the 1 - confidence chance.")
    return "\n".join(lines)


def audit_warnings(rows: list[RunAudit], canary_scale: float) -> tuple[bool | None, list[str]]:
    """Whether the non-private control shows leakage (``None``: no control ran), and the warnings to print
    and record when it does not (then the audit proves nothing), with how to strengthen it.

    Args:
        rows: the audited runs (the DP run first).
        canary_scale: the canaries' ``--canary-scale``, for the advice.
    """
    control = next((r for r in rows if r.name == "non-private control"), None)
    if control is None:
        return None, ["no non-private control was run (--no-control): nothing shows that this attack detects "
                      "leakage at all, so the audit proves nothing; run it with the control"]
    if stats.control_shows_leakage(control.result.eps_lb, control.auc):
        return True, []
    return False, [f"the non-private control shows no leakage (eps_lb = {control.result.eps_lb:.2f}, "
                   f"AUC = {_fmt(control.auc)}): this audit proves nothing, since even without DP the attack could "
                   "not tell included canaries from excluded ones. Strengthen it: train longer (--trainer.max_steps, "
                   f"now {control.steps}), make the canaries stronger (--canary-scale, now {canary_scale:g}) or use "
                   f"more of them (--canaries, now {control.result.m})"]


def plot(rows: list[RunAudit], path: str) -> None:
    """Histograms of the score of included vs excluded canaries, one panel per row (matplotlib Agg).

    Args:
        rows: the audited runs.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.2), squeeze=False)
    for ax, r in zip(axes[0], rows):
        bins = np.histogram_bin_edges(r.scores, bins=30)
        ax.hist(r.scores[r.included], bins=bins, alpha=0.6, label="included (IN)")
        ax.hist(r.scores[~r.included], bins=bins, alpha=0.6, label="excluded (OUT)")
        ax.set_title(f"{r.name}\neps_lb = {r.result.eps_lb:.2f}, AUC = {_fmt(r.auc, '.2f')}", fontsize=9)
        ax.set_xlabel("loss drop (before - after training)")
    axes[0][0].set_ylabel("canaries")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[RunAudit]:
    """Entry point of ``dpldm audit``: unknown arguments are overrides of the fit config.

    A configuration error is printed as one line (``dpldm audit: error: FIELD = VALUE: ...``), exit status 2.

    Args:
        argv: command-line arguments after ``audit``.
    """
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"dpldm audit: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(argv: list[str]) -> list[RunAudit]:
    parser = argparse.ArgumentParser(prog="dpldm audit", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the fit config (as for `dpldm fit --config`)")
    parser.add_argument("--canaries", type=int, default=256, help="number of canaries m")
    parser.add_argument("--seed", type=int, default=0, help="seed of the canaries, the secret mask and the scorer")
    parser.add_argument("--out", default="runs/audit", help="output folder (audit.json, audit.png, the runs)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of eps_lb")
    parser.add_argument("--no-control", action="store_true", help="skip the non-private control run")
    parser.add_argument("--draws", type=int, default=8, help="fixed (t, noise) draws per canary score")
    parser.add_argument("--canary-scale", type=float, default=3.0,
                        help="std of the canaries' scaled latents (data: ~1); image canaries are +-min(scale, 1)")
    parser.add_argument("--t-range", type=float, nargs=2, default=(0.05, 0.3), metavar=("LO", "HI"),
                        help="the scorer's timesteps lie evenly in [LO T, HI T] of the T training timesteps")
    args, overrides = parser.parse_known_args(argv)
    if not os.path.isfile(args.config):
        raise ConfigError("--config", args.config, "no such file")
    if not args.canary_scale > 0:
        raise ConfigError("--canary-scale", args.canary_scale, "must be > 0")
    if args.draws < 1:
        raise ConfigError("--draws", args.draws, "must be >= 1")
    if not 0 <= args.t_range[0] <= args.t_range[1] < 1:
        raise ConfigError("--t-range", args.t_range, "must satisfy 0 <= LO <= HI < 1")
    os.makedirs(args.out, exist_ok=True)
    rows = run_audit(args.config, overrides, args.canaries, args.seed, args.out, args.confidence,
                     not args.no_control, args.draws, args.canary_scale, tuple(args.t_range))
    print("\n=== dpldm audit (Steinke, Nasr & Jagielski 2023: one training run)\n" + table(rows), flush=True)
    leaks, alerts = audit_warnings(rows, args.canary_scale)
    for alert in alerts:
        print(f"\nWARNING: {alert}", flush=True)
    report = {"config": args.config, "overrides": overrides, "canaries": args.canaries, "seed": args.seed,
              "confidence": args.confidence, "draws": args.draws, "canary_scale": args.canary_scale,
              "t_range": list(args.t_range),
              "included": int(rows[0].included.sum()), "caveat": CAVEAT,
              "control_shows_leakage": leaks, "warnings": alerts,
              "runs": [r.as_dict() for r in rows]}
    with open(os.path.join(args.out, "audit.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(rows, os.path.join(args.out, "audit.png"))
    print(f"\nwrote {os.path.join(args.out, 'audit.json')} and {os.path.join(args.out, 'audit.png')}")
    return rows
