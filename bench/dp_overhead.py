"""Benchmark: the price of DP-SGD per step, by clipping method, side by side in one run.

On the CIFAR-scale model (DP-LDM's CIFAR-10 geometry, channels halved for CPU; latents from the latent
cache), attention scope, K = 1, batch 64 and 256, each variant in a fresh process (its own peak memory):

  non-DP           the same step without privacy (the reference of every ratio)
  opacus-hooks     dpldm's engine, clipping: hooks (Opacus per-example gradients, micro-batches of 64)
  opacus-ghost     Opacus's ghost clipping (GradSampleHooksFastGradientClipping: two backward passes,
                   the whole batch at once; the conditioner is not trained in any variant here)
  ours             dpldm's engine, clipping: fast (ghost/instantiated norms per layer + book-keeping)
  dp-ldm-style     DP-LDM's way: the autoencoder encodes the images every step, per-example gradients on
                   every transformer block while only the decoder half is optimised, gc.collect() each step

    python bench/dp_overhead.py                       # batch 64 and 256
    python bench/dp_overhead.py --batch-sizes 64 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dp_step import GEOMETRIES, peak_rss_mb, rss_mb  # noqa: E402
from latent_cache import STEADY_MALLOC  # noqa: E402

VARIANTS = ("non-DP", "opacus-hooks", "opacus-ghost", "ours", "dp-ldm-style")
PHYSICAL = 64


def build(batch: int):
    import torch

    from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_autoencoder, build_unet
    from dpldm.privacy import TrainableScope

    torch.manual_seed(0)
    g = GEOMETRIES["cifar"]
    model = LatentDiffusion(build_unet(**g["unet"]), FrozenAutoencoder(build_autoencoder(**g["ae"])),
                            ClassEmbedder(10, embed_dim=g["unet"]["cross_attention_dim"]),
                            scope=TrainableScope("attention", conditioner=False), cond_drop_prob=0.0).train()
    c, size = g["image"]
    images = torch.rand(batch, c, size, size) * 2 - 1
    labels = torch.arange(batch) % 10
    cached = {"moments": model.autoencoder.moments(images).contiguous(), "label": labels}
    return model, {"image": images, "label": labels}, cached


def engine_for(model, batch: int, clipping: str, trained=None):
    from dpldm.privacy import DifferentialPrivacy, DPSGDEngine
    from dpldm.privacy.settings import PrivacyPlan

    settings = DifferentialPrivacy(noise_multiplier=1.0, epsilon=None, max_physical_batch_size=PHYSICAL, seed=0,
                                   clipping=clipping)
    return DPSGDEngine(settings, PrivacyPlan(50_000, batch, batch / 50_000, 1e-5, 1000), trained or model.trained_modules)


def step_fn(variant: str, batch: int):
    """A closure running one training step of ``variant``."""
    import torch

    model, images, cached = build(batch)
    params = model.trainable_parameters()
    if variant == "non-DP":
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            model.per_example_loss(cached).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if variant in ("opacus-hooks", "ours"):
        engine = engine_for(model, batch, "hooks" if variant == "opacus-hooks" else "fast")
        opt = engine.wrap(torch.optim.AdamW(params, lr=1e-4))
        return lambda: engine.step(cached, model.per_example_loss, opt)
    if variant == "opacus-ghost":
        return ghost_step(model, cached, batch)
    return dpldm_style_step(model, images, batch)


def ghost_step(model, cached: dict, batch: int):
    import torch
    from opacus.grad_sample import GradSampleHooksFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    class PerExampleMSE(torch.nn.Module):  # Opacus ghost needs a criterion with a `reduction`
        reduction = "mean"

        def forward(self, pred, target):
            per = (pred - target).pow(2).flatten(1).mean(1)
            return per if self.reduction == "none" else per.mean()

    hooks = GradSampleHooksFastGradientClipping(model.unet, max_grad_norm=1.0, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(torch.optim.AdamW(model.trainable_parameters(), lr=1e-4),
                                          noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)
    criterion = DPLossFastGradientClipping(hooks, opt, PerExampleMSE())
    sched = model.noise_scheduler

    def step():
        z = model.autoencoder.from_moments(cached["moments"])
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        noise = torch.randn_like(z)
        pred = model.unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=model.conditioner(cached["label"])).sample
        criterion(pred, noise).backward()  # ghost norms, then the clipped backward
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def dpldm_style_step(model, images: dict, batch: int):
    """Per-example gradients of every transformer block; the optimizer holds only the decoder half."""
    import torch
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

    from dpldm.privacy.engine import micro_batches
    from dpldm.privacy.scope import attention_blocks

    blocks = [m for _, m in attention_blocks(model.unet)]
    decoder = [p for name, m in attention_blocks(model.unet) if name.startswith("up_blocks") for p in m.parameters()]
    _hooks = [GradSampleHooks(m, batch_first=True, loss_reduction="sum") for m in blocks]
    opt = DPOptimizer(torch.optim.AdamW(decoder, lr=1e-4), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=batch, loss_reduction="mean")
    others = [p for m in blocks for p in m.parameters() if all(p is not q for q in decoder)]

    def step():
        chunks = list(micro_batches(images, PHYSICAL))
        for i, chunk in enumerate(chunks):
            model.per_example_loss(chunk).sum().backward()  # encodes the images through the autoencoder
            for p in others:  # computed, never used: free them (DP-LDM zeroes them)
                p.grad_sample, p.grad = None, None
            if i < len(chunks) - 1:
                opt.signal_skip_step(True)
                opt.step()
                opt.zero_grad(set_to_none=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        gc.collect()
    return step


def measure(variant: str, batch: int, steps: int) -> dict:
    step = step_fn(variant, batch)
    step()  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, times = rss_mb(), []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"time": statistics.median(times), "mem": peak_rss_mb() - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if any(k not in os.environ for k in STEADY_MALLOC):  # glibc reads these at start: re-run with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(measure(a.child[0], int(a.child[1]), a.steps)))
        return
    print(f"dpldm DP overhead: CIFAR-scale model, attention scope, latents from the cache; median of {a.steps} "
          f"steps, {a.threads} threads; mem = peak RSS growth during the steps (MB); ratios to non-DP")
    print(f"{'variant':<14}{'batch':>6}{'s/step':>9}{'time x':>8}{'MB':>8}{'mem x':>7}")
    for batch in a.batch_sizes:
        results = {}
        for variant in a.variants:
            cmd = [sys.executable, __file__, "--steps", str(a.steps), "--threads", str(a.threads),
                   "--child", variant, str(batch)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{variant:<14}{batch:>6}  failed: {out.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            r = results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            ref = results.get("non-DP", r)
            print(f"{variant:<14}{batch:>6}{r['time']:>9.3f}{r['time'] / ref['time']:>7.2f}x{r['mem']:>8.0f}"
                  f"{r['mem'] / max(ref['mem'], 1):>6.2f}x", flush=True)
        if "ours" in results and "dp-ldm-style" in results:
            print(f"{'':<20}ours vs DP-LDM-style: {results['dp-ldm-style']['time'] / results['ours']['time']:.2f}x "
                  f"faster", flush=True)


if __name__ == "__main__":
    main()
