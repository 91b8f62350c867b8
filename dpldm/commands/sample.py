"""``dpldm sample``: images from a finished run, for class labels or a prompts file.

DDIM (steps, eta) with classifier-free guidance; seeded (batch k draws from seed + k, so a given
``--batch-size`` reproduces exactly); writes one PNG per sample, ``samples.npz`` (uint8 images and
their conditions) and ``grid.png`` (one row per condition when repeated).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from dpldm.errors import ConfigError
from dpldm.modules.sampling import sample_in_batches
from dpldm.utils.files import read_prompts
from dpldm.utils.images import grid_layout, write_samples


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dpldm sample", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the run directory (trainer.default_root_dir), e.g. runs/laion/finetune")
    p.add_argument("--ckpt", help="checkpoint file (default: the run's newest)")
    cond = p.add_mutually_exclusive_group(required=True)
    cond.add_argument("--prompts", help="text file, one prompt per line (text-conditional models)")
    cond.add_argument("--labels", nargs="+", help="class indices, or 'all' (class-conditional models; "
                      "unconditional ones: all)")
    p.add_argument("--repeat", type=int, default=1, help="samples per prompt or label (default 1)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--steps", type=int, help="solver steps (default: the model's)")
    p.add_argument("--solver", choices=["ddim", "dpm_solver++"], help="the sampler (default: the model's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity, 0 = deterministic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch (fit it to memory)")
    p.add_argument("--out", help="output folder (default: RUN/samples)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def conditions(model: torch.nn.Module, prompts: str | None, labels: list[str] | None, repeat: int) -> list:
    """The list of conditions to sample, each repeated ``repeat`` times."""
    if repeat < 1:
        raise ConfigError("--repeat", repeat, "must be >= 1")
    key = model.conditioner.input_key
    if prompts is not None:
        if key != "caption":
            raise ConfigError("--prompts", prompts, f"this model is conditioned on {key!r}; use --labels")
        items = read_prompts(prompts, "--prompts")
    else:
        if key != "label":
            raise ConfigError("--labels", labels, f"this model is conditioned on {key!r}; use --prompts")
        n = getattr(model.conditioner, "num_classes", None)
        if n is None:  # an unconditional model: one "class", every image
            if labels not in (["all"], ["0"]):
                raise ConfigError("--labels", labels, "this model is unconditional: use --labels all --repeat N")
            n = 1
        items = list(range(n)) if labels == ["all"] else [int(x) for x in labels]
        bad = [x for x in items if not 0 <= x < n]
        if bad:
            raise ConfigError("--labels", bad, f"classes are 0..{n - 1}")
    return [c for c in items for _ in range(repeat)]


def sample(model: torch.nn.Module, conds: list, out: str, batch_size: int = 64, seed: int = 0,
           guidance: float | None = None, steps: int | None = None, eta: float = 0.0, nrow: int = 1,
           solver: str | None = None) -> np.ndarray:
    """Sample one image per condition and write PNGs, ``samples.npz`` and ``grid.png`` to ``out``
    (:func:`~dpldm.utils.images.grid_layout`: ``nrow`` is how often each condition repeats in ``conds``).

    Returns:
        uint8 images [N, H, W, C].
    """
    images = sample_in_batches(model, conds, batch_size, seed, guidance, steps, solver, eta, "sampling batches")
    index, per_row = grid_layout(len(conds), nrow)
    if len(index) < len(conds):
        print(f"grid.png shows {len(index)} of the {len(conds)} samples ({per_row} a row); all are in {out}/")
    return write_samples(images, conds, out, per_row, grid_index=index)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from dpldm.runs import load_run

    model = load_run(args.run, args.ckpt).to(args.device)
    conds = conditions(model, args.prompts, args.labels, args.repeat)
    out = args.out or os.path.join(args.run, "samples")
    sample(model, conds, out, args.batch_size, args.seed, args.guidance, args.steps, args.eta, args.repeat,
           args.solver)
    print(f"{len(conds)} samples -> {out}/ (PNGs, samples.npz, grid.png)")
