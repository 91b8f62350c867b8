"""Per-example gradient norms of each method's trained parameters on PUBLIC images, beside its clipping norm C.

DP-SGD adds N(0, sigma^2 C^2) to the sum of the clipped per-example gradients (Abadi et al., 2016). Where every
||g_i|| is far below C, clipping never acts and the noise is C / ||g_i|| times larger than it has to be; the
usual choice is C near the median norm (Andrew et al., 2021, adapt it to a quantile under DP). Here the median is
read off *public* data only: the public glyphs of the size's public LDM stage (digits 0-9, the same strokes and
elastic warps), at each method's starting weights, so the choice costs no privacy. ``dpldm experiment`` takes
its C per method from ``Size.clip_norms`` and the fine-tune config (those values came from this script).

    python bench/grad_norms.py --size mnist                       # every DP method of the MNIST experiment
    python bench/grad_norms.py --size mnist --methods lora --examples 256

Prints, per method: trained parameters, the 10/25/50/75/90% quantiles and the maximum of ||g_i||, the C the
experiment uses, and C / median (about 1: clipping acts on half of the public examples; >> 1: noise wasted).
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import torch
import yaml

from dpldm.commands.experiment import CONFIGS, METHODS, PRIVACY, SIZES, finetune_settings, method_overrides, public_overlays
from dpldm.commands.quickstart import pretrained_overrides


def public_glyphs(size: str, examples: int) -> dict:
    """A batch of public digit glyphs rendered as the size's public LDM stage renders them."""
    from dpldm.datamodules import GlyphsDataModule

    glyph = {}
    overlay = public_overlays(CONFIGS, SIZES[size]).get("ldm")
    if overlay:
        with open(overlay) as f:
            glyph = (yaml.safe_load(f).get("data") or {}).get("init_args") or {}
    dm = GlyphsDataModule(characters="0123456789", num_train=examples, batch_size=examples, **glyph)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def grad_norms(model: torch.nn.Module, batch: dict) -> np.ndarray:
    """||grad of example i's loss|| over the trained parameters, one example at a time (the brute force)."""
    params = model.trainable_parameters()
    norms = []
    for i in range(len(batch["label"])):
        loss = model.per_example_loss({k: v[i:i + 1] for k, v in batch.items()})[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)).item())
    return np.asarray(norms)


def main() -> None:
    from dpldm.commands.lightning_cli import DPLDMCLI

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="mnist")
    p.add_argument("--methods", nargs="+", choices=[m for m in METHODS if m != "nonprivate"],
                   default=[m for m in METHODS if m != "nonprivate"])
    p.add_argument("--public", default=None, help="the public stages (default: the size's)")
    p.add_argument("--examples", type=int, default=96, help="public glyphs scored")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # it is run from Python on purpose
    size = SIZES[args.size]
    config = os.path.join(CONFIGS, size.config)
    default_c = finetune_settings(CONFIGS, size)["privacy"]["max_grad_norm"]  # the config's own C
    batch = public_glyphs(args.size, args.examples)
    print(f"{'method':<10} {'trained':>10}  ||g_i|| quantiles 10 / 25 / 50 / 75 / 90 %      max       C  C/median")
    for method in args.methods:
        torch.manual_seed(0)  # the same timesteps and noise for every method
        cli = DPLDMCLI(args=["--config", config, *pretrained_overrides(args.public or size.public),
                             "--trainer.logger=false", *method_overrides(method)], run=False)
        model = cli.model.train()
        norms = grad_norms(model, batch)
        q = np.quantile(norms, [0.1, 0.25, 0.5, 0.75, 0.9])
        c = size.clip_norms.get(method, default_c)
        trained = sum(p.numel() for p in model.trainable_parameters())
        print(f"{method:<10} {trained:>10,}  " + " ".join(f"{x:8.4f}" for x in q)
              + f"  {norms.max():8.4f}  {c:6g}  {c / q[2]:8.2f}", flush=True)
    print(f"(public glyphs: {args.examples}; C: {PRIVACY}.max_grad_norm per method, dpldm.commands.experiment.SIZES)")


if __name__ == "__main__":
    main()
