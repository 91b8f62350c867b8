"""``dpldm sweep``: run a W&B sweep file locally, one ``dpldm fit`` after another, without a W&B server.

Expands the grid of the YAML that ``wandb sweep`` takes (``configs/sweeps/``), or draws seeded random
configurations (``bayes`` runs as random search here: no model of the metric); runs each as ``python -m dpldm
fit`` + the command's arguments, ``${args}`` as ``--key=value`` + extra overrides + ``--trainer.default_root_dir=
OUT/run-XXX``; collects every run's ``privacy.json``, last metric value (``val/...``: chosen on) and last test value
(``test/...``: reported once, for the chosen run) into ``OUT/results.csv`` and two plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dpldm.errors import ConfigError
from dpldm.commands.sweep_spec import Sweep, require, expand, load_sweep  # noqa: F401 (public here too)

PRIVACY = {"epsilon": "privacy/epsilon", "delta": "privacy/delta", "sigma": "privacy/noise_multiplier",
           "q": "privacy/sample_rate", "steps": "privacy/steps"}
RESULTS = ["status", "metric", "test_metric", *PRIVACY, "target_epsilon", "C", "accountant", "seconds", "error"]
CAVEAT = ("Caveat: every run is DP on its own, but choosing among them with a metric computed on private data is "
          "not free (Papernot & Steinke, \"Hyperparameter Tuning with Renyi Differential Privacy\", ICLR 2022): "
          "the released model's guarantee is then not just its own epsilon.")
HOW_TO = ("To account for the selection: --account-selection composes all runs' DP-SGD steps in one accountant "
          "(pessimistic but valid; for a finished sweep, add the sigma, q, steps of results.csv to one "
          "dpldm.privacy.accounting.PrivacyAccountant); or retrain the chosen settings with the runs declared "
          "under privacy.init_args.prior (sigma is then calibrated so that the search and the new run together "
          "spend its epsilon); or select on a public validation set; or run a random number of runs as Papernot "
          "& Steinke do (a small multiple of one run's epsilon, not the sum).")


def fit_command(sweep: Sweep, params: dict[str, Any], run_dir: Path, extra: list[str] = ()) -> list[str]:
    """``python -m dpldm fit`` + the sweep's arguments with ``params`` as ``--key=value`` + ``extra`` + run_dir."""
    args = []
    for a in sweep.command:
        args += [f"--{k}={v}" for k, v in params.items()] if a == "${args}" else [a]
    return [sys.executable, "-m", "dpldm", "fit", *args, *extra, f"--trainer.default_root_dir={run_dir}"]


def _latest(run_dir: Path, name: str) -> Path | None:
    found = list(run_dir.glob(f"logs/version_*/{name}")) or list(run_dir.rglob(name))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _num(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def final_key(metric: str | None) -> str | None:
    """The test-split key of a ``val/`` sweep metric (``val/downstream_acc`` -> ``test/downstream_acc``): the
    value reported for the chosen run, never chosen on.

    Args:
        metric: the sweep metric (``None`` or not ``val/...``: no counterpart).
    """
    return "test/" + metric[len("val/"):] if metric and metric.startswith("val/") else None


def _last(rows: list[dict], key: str | None) -> float | None:
    return next((_num(r[key]) for r in reversed(rows) if key and r.get(key)), None)


def read_run(run_dir: Path, metric: str | None) -> dict[str, Any]:
    """A run's privacy report (:data:`PRIVACY`, target epsilon, C), the last logged value of ``metric`` and
    that of its test-split counterpart (:func:`final_key`).

    Args:
        run_dir: the run's ``default_root_dir``.
        metric: the sweep metric, read from the CSV logs.
    """
    path = _latest(run_dir, "metrics.csv")
    with open(path or os.devnull, newline="") as f:
        rows = list(csv.DictReader(f))
    report_path = _latest(run_dir, "privacy.json")  # written at the end; a failed run: its last logged DP step
    report = (json.loads(report_path.read_text()) if report_path
              else next((r for r in reversed(rows) if r.get("privacy/steps")), {}))
    out: dict[str, Any] = {k: _num(report.get(key)) for k, key in PRIVACY.items()}
    out.update(target_epsilon=_num(report.get("target_epsilon")), C=_num(report.get("max_grad_norm")),
               accountant=report.get("accountant"))
    out["metric"], out["test_metric"] = _last(rows, metric), _last(rows, final_key(metric))
    return out


def last_error(log: Path) -> str:
    """The last line of a failed run's log that names an error (else its last line)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith("wandb")] or [""]
    return next((line for line in reversed(lines) if re.search(r"Error\b|Exception\b|^error:", line)), lines[-1])


def plot(rows: list[dict], metric: str | None, out: Path) -> None:
    """``metric_vs_epsilon.png`` and ``steps_vs_epsilon.png``: target epsilon on x, one line per C."""
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas

    done = [r for r in rows if r["status"] == "ok" and r["target_epsilon"]]
    for name, key, label in (("metric_vs_epsilon.png", "metric", metric or "metric"),
                             ("steps_vs_epsilon.png", "steps", "DP-SGD steps taken")):
        fig = Figure(figsize=(5.5, 3.8), layout="constrained")
        ax = fig.subplots()
        for c in sorted({r["C"] for r in done if r["C"] is not None}):
            pts = sorted((r["target_epsilon"], r[key]) for r in done if r["C"] == c and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"C = {c:g}")
        if ax.lines:
            ax.set_xscale("log")
            ax.legend(fontsize="small", ncols=1 + len(ax.lines) // 8)
        ax.set(xlabel="target epsilon", ylabel=label, title=f"{label} vs epsilon")
        fig.savefig(out / name, dpi=120)


def selection_epsilon(rows: list[dict]) -> tuple[float, float, str]:
    """Epsilon of releasing the selected model: all runs' DP-SGD steps composed in one accountant.

    Args:
        rows: the sweep's results (``sigma``, ``q``, ``steps``, ``delta``, ``accountant`` per run).

    Returns:
        ``(epsilon, delta, accountant)`` at the runs' (smallest) delta, with their accountant (PRV if they
        differ); epsilon is ``inf`` if a finished run reported no privacy (it was not DP).
    """
    from dpldm.privacy.accounting import PrivacyAccountant

    runs = [r for r in rows if r["sigma"] is not None and r["q"] is not None and r["steps"]]
    kinds, deltas = {r["accountant"] for r in runs if r["accountant"]}, [r["delta"] for r in runs if r["delta"]]
    kind, delta = (kinds.pop() if len(kinds) == 1 else "prv"), (min(deltas) if deltas else float("nan"))
    if any(r["status"] == "ok" and r["sigma"] is None for r in rows):
        return float("inf"), delta, kind
    acc = PrivacyAccountant(kind, delta)
    for r in runs:
        acc.add(r["sigma"], r["q"], int(r["steps"]))
    return acc.epsilon(), delta, kind


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def report(rows: list[dict], sweep: Sweep, account_selection: bool) -> dict[str, Any]:
    """Print the results table, the best run and the caveat (and the selection's epsilon); returns them."""
    short = {p: p.rsplit(".", 1)[-1] for p in sweep.parameters}  # table columns (results.csv: full keys)
    head = ["run", *short.values(), "status", sweep.metric or "metric",
            "eps spent", "delta", "sigma", "q", "steps", "s"]
    body = [[r["run"], *(_fmt(r[p]) for p in short), r["status"], *(_fmt(r[k]) for k in ("metric", *PRIVACY)),
             f"{r['seconds']:.0f}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    for line in (head, *body):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    scored = [r for r in rows if r["status"] == "ok" and r["metric"] is not None]
    best = (max if sweep.goal == "maximize" else min)(scored, key=lambda r: r["metric"]) if scored else None
    if best:
        print(f"best ({sweep.goal} {sweep.metric}): {best['run']}, " + ", ".join(f"{short[p]}={best[p]}" for p in short)
              + f": {sweep.metric} = {best['metric']:.4g} at epsilon = {_fmt(best['epsilon'])}")
        if final_key(sweep.metric):  # the chosen run's test value: the number to report (never chosen on)
            print(f"final: chosen on {sweep.metric} = {best['metric']:.4g}; its {final_key(sweep.metric)} = "
                  f"{_fmt(best['test_metric'])} (the test split, reported once)")
    elif sweep.metric:
        print(f"no finished run logged {sweep.metric}")
    print(CAVEAT)
    if sweep.metric and sweep.metric.startswith("train/"):
        print(f"Note: {sweep.metric} is computed on the private training batches without DP: no epsilon covers it.")
    if not account_selection:
        print(HOW_TO)
        return {"rows": rows, "best": best}
    eps, delta, kind = selection_epsilon(rows)
    counted = [r for r in rows if r["steps"]]
    print(f"Selection accounted: releasing the selected model after these {len(counted)} run(s), all their DP-SGD "
          f"steps composed ({kind.upper()}), is epsilon = {eps:.4g} at delta = {delta:.3g} (each run alone: up to "
          f"{max([r['epsilon'] or 0 for r in counted] or [0]):.4g}). Pessimistic (it covers releasing every run) "
          "but valid for the training set when the metric is computed on data outside it.")
    if any(r["status"] != "ok" for r in counted):
        print("Failed runs are composed with the steps they last logged (privacy.json is written at the end).")
    prior = ", ".join(f"{{noise_multiplier: {r['sigma']:.6g}, sample_rate: {r['q']:.6g}, steps: {int(r['steps'])}}}"
                      for r in counted if r["sigma"] is not None)
    print(f"To retrain the chosen settings with the selection inside its epsilon, add to its config under "
          f"model.init_args.privacy.init_args:\n  prior: [{prior}]")
    return {"rows": rows, "best": best, "selection_epsilon": eps, "selection_delta": delta}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the config overrides passed through to every run."""
    parser = argparse.ArgumentParser(
        prog="dpldm sweep", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a W&B sweep file locally: dpldm fit after dpldm fit, W&B offline; results.csv and plots.",
        epilog="examples:\n  dpldm sweep configs/sweeps/quickstart_grid.yaml --out runs/sweep\n"
               "  dpldm sweep configs/sweeps/quickstart_bayes.yaml --count 8 --dry-run\n"
               "  dpldm sweep FILE --account-selection -- --trainer.max_epochs=2   (overrides for every run)")
    parser.add_argument("file", help="W&B sweep YAML (method, metric, parameters, command)")
    parser.add_argument("--count", type=int, help="number of runs (grid: the first N; random/bayes: run_cap or 10)")
    parser.add_argument("--out", help="output folder (default runs/sweeps/<file name>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws (random/bayes)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--account-selection", action="store_true",
                        help="print the epsilon of releasing the selected model, all runs composed")
    dashes = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_known_args(argv[:dashes])
    extra += argv[dashes + 1:]
    for item in extra:
        key = item.split("=", 1)[0]
        require(key != "--trainer.default_root_dir", key, item, "is set per run by dpldm sweep: use --out")
        require(not key.startswith("-") or "." in key or key in ("--seed_everything", "--ckpt_path", "--config"),
                 "argument", item, "is neither an option of dpldm sweep nor a config key (e.g. --trainer.max_epochs=2)")
    return args, extra


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``dpldm sweep FILE [--count N] [--out DIR] [--seed S] [--dry-run] [--account-selection] [overrides]``.

    Args:
        argv: the arguments after ``sweep``; config overrides (``--trainer.max_epochs=2``) go to every
            run after the sweep's parameters (put them after ``--``).

    Returns:
        ``sweep``, ``commands``; after running also ``out``, ``rows``, ``best`` (and ``selection_epsilon``).
    """
    try:
        return _run(*parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ConfigError as e:
        print(f"dpldm sweep: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    sweep = load_sweep(args.file)
    require(args.count is None or args.count >= 1, "--count", args.count, "must be >= 1")
    for config in sweep.configs:
        require(Path(config).is_file(), "command", config, f"no such config file in {os.getcwd()}: run from the "
                 "repository root")
    sets = expand(sweep, args.count, args.seed)
    out = Path(args.out or Path("runs", "sweeps", Path(args.file).stem))
    commands = [fit_command(sweep, p, out / f"run-{i:03d}", extra) for i, p in enumerate(sets)]
    if sweep.method == "bayes":
        print("bayes runs as random search here (no model of the metric); `wandb agent` searches Bayesian.")
    print(f"{len(sets)} run(s) of {args.file} ({sweep.method}) into {out}")
    if args.dry_run:
        print("\n".join(shlex.join(command) for command in commands))
        return {"sweep": sweep, "commands": commands}
    require(not any(out.glob("run-*")), "--out", str(out), "already holds runs (run-*): pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", f"sweep-{out.name}")}
    env.setdefault("WANDB_MODE", "offline")
    rows: list[dict] = []
    try:
        for i, (params, command) in enumerate(zip(sets, commands)):
            run_dir = out / f"run-{i:03d}"
            print(f"[{i + 1}/{len(sets)}] {run_dir.name}: " + " ".join(f"{k.rsplit('.', 1)[-1]}={v}"
                                                                       for k, v in params.items()), flush=True)
            run_dir.mkdir(parents=True)
            start = time.monotonic()
            with open(run_dir / "fit.log", "w") as log:
                rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            row = {"run": run_dir.name, **params, "status": "ok" if rc == 0 else "failed",
                   "seconds": round(time.monotonic() - start, 1), **read_run(run_dir, sweep.metric),
                   "error": "" if rc == 0 else f"exit {rc}: {last_error(run_dir / 'fit.log')}"}
            rows.append(row)
            with open(out / "results.csv", "w", newline="") as f:  # run, the parameters (full keys), RESULTS
                writer = csv.DictWriter(f, ["run", *sweep.parameters, *RESULTS], extrasaction="ignore")
                writer.writeheader()
                writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
            note = f"; {row['error']} (log: {run_dir / 'fit.log'})" if rc else ""
            print(f"    {row['status']} in {row['seconds']:.0f} s: {sweep.metric or 'metric'} = {_fmt(row['metric'])}, "
                  f"epsilon = {_fmt(row['epsilon'])} (target {_fmt(row['target_epsilon'])}), "
                  f"steps = {_fmt(row['steps'])}{note}", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted: reporting the {len(rows)} finished run(s)", file=sys.stderr)
    if rows:
        plot(rows, sweep.metric, out)
        print(f"results: {out / 'results.csv'}, {out}/metric_vs_epsilon.png, {out}/steps_vs_epsilon.png")
    return {"sweep": sweep, "commands": commands, "out": out, **report(rows, sweep, args.account_selection)}

