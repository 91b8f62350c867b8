"""``dpldm evaluate``: the run's sample-based metrics (FID, CLIP score, downstream accuracy) on a checkpoint.

The metrics are the ``SampleMetric`` callbacks of the run's saved config (the same ones ``fit`` ran at
its end), or those of a YAML file (``--metrics``: a list of ``class_path``/``init_args`` callbacks).
Results are printed and written to ``RUN/evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import yaml

from dpldm.errors import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dpldm evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the run directory (trainer.default_root_dir), e.g. runs/quickstart/finetune")
    p.add_argument("--ckpt", help="checkpoint file (default: the run's newest)")
    p.add_argument("--metrics", help="YAML file: a list of metric callbacks (default: those of the run's config)")
    p.add_argument("--num-samples", type=int, help="override every metric's num_samples")
    p.add_argument("--per-class", action="store_true",
                   help="downstream accuracy on each class's real images too (which classes the model draws badly)")
    p.add_argument("--out", help="results file (default: RUN/evaluation.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str]) -> dict[str, float]:
    from dpldm.callbacks.evaluation import DownstreamAccuracy, SampleMetric
    from dpldm.commands.lightning_cli import DPLDMCLI
    from dpldm.runs import load_weights, run_config

    args = parse_args(argv)
    cfg = run_config(args.run)
    if args.metrics:
        with open(args.metrics) as f:
            cfg["trainer"]["callbacks"] = yaml.safe_load(f)
    cfg["trainer"]["logger"] = False
    cli = DPLDMCLI(args=cfg, run=False)
    metrics = [cb for cb in cli.trainer.callbacks if isinstance(cb, SampleMetric)]
    if not metrics:
        raise ConfigError("--metrics", args.metrics, "no metric callback (FID, CLIPScore, DownstreamAccuracy) found")
    downstream = [m for m in metrics if isinstance(m, DownstreamAccuracy)]
    if args.per_class and not downstream:
        raise ConfigError("--per-class", args.metrics or "the run's config", "needs a DownstreamAccuracy metric")
    for metric in downstream:
        metric.per_class = metric.per_class or args.per_class
    model = cli.model
    ckpt = load_weights(model, args.run, args.ckpt)
    model = model.to(args.device).eval()
    results: dict[str, float] = {}
    for metric in metrics:
        if args.num_samples:
            metric.num_samples = args.num_samples
        results.update(metric.evaluate(model, cli.datamodule))
    report = {"checkpoint": ckpt, **results}
    privacy = torch.load(ckpt, map_location="cpu", weights_only=False).get("privacy")
    if privacy:  # the epsilon the evaluated weights were trained with
        report.update({k: v for k, v in privacy.items() if k != "accountant"})
    out = args.out or os.path.join(args.run, "evaluation.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    for key, value in report.items():
        print(f"{key:<28} {value:.4g}" if isinstance(value, float) else f"{key:<28} {value}")
    print(f"-> {out}")
    return results
