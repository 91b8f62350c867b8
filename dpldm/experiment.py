"""``dpldm experiment``: the paper's central comparison on real data, on a CPU (DP-LDM, Lyu et al., 2024).

With the same public pretraining (the quickstart's glyph autoencoder and glyph LDM), the same optimizer and
the same number of DP-SGD steps, train on the private set with:

  attention   DP fine-tuning of the attention modules only (DP-LDM)
  full        DP fine-tuning of the whole UNet
  scratch     DP training of the same UNet from random weights (no public pretraining)
  nonprivate  fine-tuning of the attention modules without DP (the ceiling of fine-tuning)

for each epsilon and seed, and score each model by downstream accuracy (a CNN trained on 1,000 samples,
tested on the real test split) and an FID-style distance in public glyph-classifier features. Results go
to ``docs/results/<size>.json``; ``docs/results.md`` is rendered from all sizes run so far
(:mod:`dpldm.experiment_report`).

  dpldm experiment --size digits      # scikit-learn's digits, N = 1,437 (minutes per run)
  dpldm experiment --size fashion     # Fashion-MNIST, N = 60,000 (apt-get install dataset-fashion-mnist)
"""

from __future__ import annotations

import argparse
import json
import os
import time

from dpldm.quickstart import config_dir, real_data_ceiling, run_stage, stage_overrides

METHODS = ("attention", "full", "scratch", "nonprivate")
PRIVACY = "--model.init_args.privacy.init_args"

# Per data size: the private source, its cache folder name, and the step budget.
SIZES = {
    "digits": {"source": "dpldm.datamodules.DigitsDataModule", "source_args": {},
               "budget": ["--trainer.max_epochs=15"], "label": "scikit-learn digits (N = 1,437, 8x8 upsampled to 32x32)"},
    "fashion": {"source": "dpldm.datamodules.FashionMNISTDataModule", "source_args": {},
                "budget": ["--trainer.max_epochs=null", "--trainer.max_steps=300"],
                "label": "Fashion-MNIST (N = 60,000, 28x28 resized to 32x32)"},
}


def method_overrides(method: str) -> list[str]:
    """What differs from ``configs/quickstart/finetune.yaml`` (attention scope, DP) for each method."""
    if method == "attention":
        return []
    if method == "full":
        return ["--model.init_args.scope.init_args.kind=full"]
    if method == "scratch":  # the pretrained UNet's architecture, random weights; class embedding from scratch
        return ["--model.init_args.unet.init_args.weights=false", "--model.init_args.scope.init_args.kind=full",
                "--model.init_args.conditioner.init_args.init_from=null"]
    if method == "nonprivate":
        return ["--model.init_args.privacy=null", "--model.init_args.allow_non_private=true"]  # declared ceiling
    raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")


def source_override(size: str) -> str:
    """The ``dpldm fit`` argument that makes ``size``'s private data set the latent cache's source."""
    spec = SIZES[size]
    return f"--data.init_args.source={json.dumps({'class_path': spec['source'], 'init_args': spec['source_args']})}"


def run_one(size: str, method: str, epsilon: float | None, seed: int, args: argparse.Namespace) -> dict:
    """One fine-tuning run; its metrics, privacy report and time."""
    spec = SIZES[size]
    name = f"{method}-eps{epsilon:g}-seed{seed}" if epsilon is not None else f"{method}-seed{seed}"
    root = os.path.join(args.out, size, name)
    chain = stage_overrides(args.public, {})["finetune"]
    chain[chain.index("--trainer.default_root_dir") + 1] = root
    chain[chain.index("--data.init_args.cache_dir") + 1] = os.path.join(args.out, size, "latent-cache")
    overrides = [*chain, source_override(size), *spec["budget"], f"--seed_everything={seed}",
                 "--trainer.logger=false", *method_overrides(method), *args.override]
    if epsilon is not None:
        overrides += [f"{PRIVACY}.epsilon={epsilon}", f"{PRIVACY}.seed={seed}"]
    result = run_stage(name, os.path.join(args.configs, "finetune.yaml"), overrides, ceiling=False)  # once, at the end
    row = {"method": method, "epsilon": epsilon, "seed": seed, "seconds": round(result.seconds, 1),
           "trained_fraction": result.trained_fraction, **(result.metrics or {})}
    if result.privacy:  # what was spent: epsilon_spent, delta, noise_multiplier, sample_rate, steps
        row.update({k.split("/")[1].replace("epsilon", "epsilon_spent"): v for k, v in result.privacy.items()})
    return row


def _save(record: dict, path: str) -> None:
    with open(path + ".part", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".part", path)


def finetune_settings(configs: str) -> dict:
    """The shared settings of every run, as written in ``finetune.yaml``."""
    import yaml

    with open(os.path.join(configs, "finetune.yaml")) as f:
        cfg = yaml.safe_load(f)
    model = cfg["model"]["init_args"]
    return {"privacy": model["privacy"]["init_args"], "optimizer": model["optimizer"],
            "batch_size": cfg["data"]["init_args"]["batch_size"],
            "metrics": [c.get("init_args", {}) | {"class": c["class_path"].rsplit(".", 1)[1]}
                        for c in cfg["trainer"]["callbacks"] if "Grid" not in c["class_path"]]}


REFERENCES = ("real_data_classifier", "autoencoder_classifier")


def references(size: str, args: argparse.Namespace, missing: tuple[str, ...] = REFERENCES) -> dict[str, float]:
    """Not private, references only: the downstream CNN trained on as many real private training images as
    it gets samples (``real_data_classifier``), and on their reconstructions by the frozen public
    autoencoder (``autoencoder_classifier``: what any model in that latent space could reach at best)."""
    from dpldm.callbacks.evaluation import DownstreamAccuracy
    from dpldm.cli import DPLDMCLI

    cli = DPLDMCLI(args=["--config", os.path.join(args.configs, "finetune.yaml"), "--trainer.logger=false",
                         source_override(size), *stage_overrides(args.public, {})["finetune"][2:]],
                   run=False)
    metric = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DownstreamAccuracy))
    autoencoder = {"real_data_classifier": None, "autoencoder_classifier": cli.model.autoencoder}
    return {key: real_data_ceiling(cli.datamodule, metric, autoencoder[key], max_items=metric.num_samples)
            for key in missing}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="dpldm experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="digits", help="which private data set")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 5.0, 10.0])
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: 2 digits, 1 fashion)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--public", default="runs/quickstart", help="the quickstart's output (public stages 1-2)")
    p.add_argument("--configs", default=config_dir(), help="folder with the quickstart configs")
    p.add_argument("--out", default="runs/experiment", help="runs go to OUT/SIZE/METHOD-epsE-seedS")
    p.add_argument("--results", default="docs/results", help="folder of the per-size result files")
    p.add_argument("--doc", default="docs/results.md", help="the report rendered from all result files")
    p.add_argument("--override", action="append", default=[], metavar="ARG",
                   help="extra `dpldm fit` argument for every run, e.g. --override=--trainer.max_steps=50")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming the size's result file")
    p.add_argument("--report-only", action="store_true", help="re-render the report from existing results")
    args = p.parse_args(argv)
    from dpldm.experiment_report import render

    if args.report_only:
        return render(args.results, args.doc)
    for stage in ("autoencoder", "ldm"):
        if not os.path.isdir(os.path.join(args.public, stage, "pretrained")):
            run_stage(stage, os.path.join(args.configs, f"{stage}.yaml"), stage_overrides(args.public, {})[stage])
    seeds = args.seeds or (2 if args.size == "digits" else 1)
    path = os.path.join(args.results, f"{args.size}.json")
    record = {"size": args.size, "label": SIZES[args.size]["label"], "rows": [], **dict.fromkeys(REFERENCES),
              "budget": SIZES[args.size]["budget"] + args.override, "settings": finetune_settings(args.configs),
              "minutes": 0.0, "command": f"dpldm experiment --size {args.size}"}
    if os.path.exists(path) and not args.fresh:  # resume: keep the runs already done with the same settings
        with open(path) as f:
            old = json.load(f)
        if old.get("budget") == record["budget"] and old.get("settings") == record["settings"]:
            record = old
    done = {(r["method"], r["epsilon"], r["seed"]) for r in record["rows"]}
    # Seed-major: every method and epsilon once before the second seed (an interrupted run is still a comparison).
    plan = [(m, e, s) for s in range(seeds) for m in args.methods
            for e in ([None] if m == "nonprivate" else args.epsilons)
            if (m, e, s) not in done and not (m == "nonprivate" and s > 0)]
    os.makedirs(args.results, exist_ok=True)
    for i, (method, epsilon, seed) in enumerate(plan, 1):
        print(f"\n=== experiment {args.size} {i}/{len(plan)}: {method}, epsilon {epsilon}, seed {seed}", flush=True)
        start = time.perf_counter()
        record["rows"].append(run_one(args.size, method, epsilon, seed, args))
        record["minutes"] = round(record["minutes"] + (time.perf_counter() - start) / 60, 1)
        _save(record, path)  # after every run: an interrupted experiment resumes where it stopped
    missing = tuple(key for key in REFERENCES if record.get(key) is None)
    if missing:
        record.update(references(args.size, args, missing))
        _save(record, path)
    return render(args.results, args.doc)
