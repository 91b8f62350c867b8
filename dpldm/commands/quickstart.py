"""``dpldm quickstart``: the whole method end to end on a laptop CPU, on real data, offline.

Stage 1  public autoencoder on rendered glyphs        (configs/quickstart/autoencoder.yaml)
Stage 2  public class-conditional LDM on glyphs       (configs/quickstart/ldm.yaml)
Stage 3  DP fine-tune of the attention modules on scikit-learn's digits (private, epsilon = 10)
         (configs/quickstart/finetune.yaml)

Each stage is exactly ``dpldm fit --config FILE`` with the output folder (and the paths of the
previous stages' exports) overridden; the run ends with a PNG grid of samples of the final model.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch
from lightning.pytorch.loggers import WandbLogger

from dpldm.callbacks.evaluation import DownstreamAccuracy, SampleMetric, real_images
from dpldm.callbacks.samples import SampleGrid
from dpldm.commands import CONFIGS
from dpldm.commands.lightning_cli import DPLDMCLI


METRIC_LABELS = {
    "test/downstream_acc": "downstream accuracy (CNN trained on DP samples, tested on the real test digits)",
    "test/fid_glyph": "FID-style distance to the real test digits (glyph-classifier features; NOT Inception FID)",
}


@dataclass
class StageResult:
    name: str
    seconds: float
    root: str
    checkpoint: str | None
    log_dir: str | None
    grid: str | None
    privacy: dict[str, float] | None = None  # the DP stage's report (epsilon, delta, sigma, q, steps)
    trained_fraction: float | None = None
    metrics: dict[str, float] | None = None  # the sample-based metric callbacks' values (val/*, test/*, ...)
    ceiling: float | None = None  # downstream accuracy of the same classifier trained on the real data


def config_dir() -> str:
    """``configs/quickstart`` of the checkout (the package is installed in editable mode)."""
    return os.path.join(CONFIGS, "quickstart")


def pretrained_overrides(out: str) -> list[str]:
    """Command-line overrides that make a fine-tune start from the public stages' exports under ``out``."""
    return [f"--model.init_args.autoencoder.init_args.vae.init_args.path={out}/autoencoder/pretrained",
            f"--model.init_args.unet.init_args.path={out}/ldm/pretrained",
            f"--model.init_args.conditioner.init_args.init_from={out}/ldm/pretrained"]


def stage_overrides(out: str, extra: dict[str, list[str]]) -> dict[str, list[str]]:
    """Command-line overrides that chain the stages through ``out``."""
    ae = pretrained_overrides(out)[:1]
    return {
        "autoencoder": ["--trainer.default_root_dir", f"{out}/autoencoder", *extra.get("autoencoder", [])],
        "ldm": ["--trainer.default_root_dir", f"{out}/ldm", *ae, *extra.get("ldm", [])],
        "finetune": ["--trainer.default_root_dir", f"{out}/finetune", *pretrained_overrides(out),
                     "--data.init_args.cache_dir", f"{out}/finetune/latent-cache", *extra.get("finetune", [])],
    }


def run_stage(name: str, config: str, overrides: list[str], ceiling: bool = True) -> StageResult:
    """``dpldm fit --config config *overrides``, timed; with ``ceiling``, also the real-data classifier
    reference (:func:`real_data_ceiling`: a CNN trained on every private training image, slow at N = 60,000)."""
    print(f"\n=== stage {name}: dpldm fit --config {config} {' '.join(overrides)}", flush=True)
    start = time.perf_counter()
    cli = DPLDMCLI(args=["fit", "--config", config, *overrides])
    seconds = time.perf_counter() - start
    trainer = cli.trainer
    for logger in trainer.loggers:  # one W&B run per stage (W&B would otherwise reuse the open run)
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
    cb = trainer.checkpoint_callback
    ckpt = (cb.best_model_path or cb.last_model_path) if cb else None
    grids = [cb.last_path for cb in trainer.callbacks if isinstance(cb, SampleGrid)]
    result = StageResult(name, seconds, trainer.default_root_dir, ckpt or None, trainer.log_dir,
                         grids[-1] if grids else None)
    metrics = [cb for cb in trainer.callbacks if isinstance(cb, SampleMetric) and cb.last]
    result.metrics = {k: v for cb in metrics for k, v in cb.last.items()} or None
    downstream = [cb for cb in metrics if isinstance(cb, DownstreamAccuracy)]
    if downstream and ceiling:
        result.ceiling = real_data_ceiling(cli.datamodule, downstream[0])
    dp = getattr(cli.model, "dp", None)
    if dp is not None:
        result.privacy = dp.report()
        params = list(cli.model.parameters())
        result.trained_fraction = sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)
    return result


def real_data_ceiling(datamodule: object, metric: DownstreamAccuracy, autoencoder: object | None = None,
                      max_items: int | None = None) -> float:
    """The downstream classifier trained on the real training images instead of samples: the ceiling.

    Not private: it reads the private training set without DP. It is printed as a reference, never logged.

    Args:
        datamodule: the run's DataModule (a latent cache's ``source`` is used for the real images).
        metric: the run's downstream metric (test size, classifier epochs, seed).
        autoencoder: a :class:`~dpldm.modules.FrozenAutoencoder`: train on its reconstructions of the real
            images (decode(encode(x))) instead, the most any model in its latent space could reach.
        max_items: train on a random subset of this many real images (seeded; None: all of them).
    """
    from dpldm.metrics.downstream import downstream_accuracy, load_images

    source = getattr(datamodule, "source", datamodule)
    train_x, train_y = load_images(source.cache_dataset())  # [N, C, H, W] in [-1, 1]
    if max_items is not None and max_items < len(train_x):
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(metric.sampling.seed))[:max_items]
        train_x, train_y = train_x[keep], train_y[keep]
    if autoencoder is not None:
        train_x = torch.cat([autoencoder.decode(autoencoder.encode(x)) for x in train_x.split(256)])
    test_x, test_y = real_images(datamodule, metric.test_samples)
    return downstream_accuracy(metric.resize(train_x), train_y, metric.resize(test_x), test_y, source.num_classes,
                               epochs=metric.epochs, width=metric.width, seed=metric.sampling.seed)


def final_metrics(metrics: dict[str, float] | None) -> dict[str, float]:
    """The values to report: a ``val/`` value (for choosing, e.g. in a sweep) is left out when the same metric's
    ``test/`` value is there, so the final number is the test split's, reported once.

    Args:
        metrics: a stage's metric values by log key.
    """
    metrics = metrics or {}
    return {k: v for k, v in metrics.items() if not (k.startswith("val/") and "test/" + k[4:] in metrics)}


def summary(results: list[StageResult]) -> str:
    lines = ["", "=== dpldm quickstart: done", f"{'stage':<12}{'time':>9}  outputs"]
    for r in results:
        lines.append(f"{r.name:<12}{r.seconds:>8.0f}s  checkpoint: {r.checkpoint}")
        lines.append(f"{'':<23}logs: {r.log_dir}")
        if r.grid:
            lines.append(f"{'':<23}samples: {r.grid}")
        if r.privacy:
            p = r.privacy
            lines.append(f"{'':<23}DP-SGD: epsilon = {p['privacy/epsilon']:.2f} spent at delta = {p['privacy/delta']:.2g}; "
                         f"sigma = {p['privacy/noise_multiplier']:.3f}, q = {p['privacy/sample_rate']:.4f}, "
                         f"steps = {int(p['privacy/steps'])}; trained {r.trained_fraction:.1%} of the parameters")
        for key, value in final_metrics(r.metrics).items():
            lines.append(f"{'':<23}{METRIC_LABELS.get(key, key)}: {value:.3f}")
        if r.ceiling is not None:
            lines.append(f"{'':<23}  ceiling, the same classifier trained on the real training digits: {r.ceiling:.3f} "
                         "(not private: a reference only)")
    lines.append(f"{'total':<12}{sum(r.seconds for r in results):>8.0f}s")
    final = results[-1].grid if results else None
    if final:
        lines.append(f"\nSamples of the final model (a column per digit class): {final}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[StageResult]:
    parser = argparse.ArgumentParser(prog="dpldm quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output folder of all stages")
    parser.add_argument("--configs", default=config_dir(), help="folder with the three stage configs")
    parser.add_argument("--stages", nargs="+", default=["autoencoder", "ldm", "finetune"],
                        choices=["autoencoder", "ldm", "finetune"], help="run only these stages (in order)")
    parser.add_argument("--override", action="append", default=[], metavar="STAGE:ARG",
                        help="extra CLI argument for one stage, e.g. --override ldm:--trainer.max_epochs=1")
    args = parser.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for item in args.override:
        stage, sep, arg = item.partition(":")
        if not sep or stage not in ("autoencoder", "ldm", "finetune"):
            parser.error(f"--override {item!r}: expected STAGE:ARG with STAGE one of autoencoder, ldm, finetune")
        extra.setdefault(stage, []).append(arg)
    overrides = stage_overrides(args.out, extra)
    results = [run_stage(s, os.path.join(args.configs, f"{s}.yaml"), overrides[s]) for s in args.stages]
    print(summary(results), flush=True)
    return results
