"""Benchmark: step time and peak memory of DP-SGD vs non-private training, side by side in one run.

For each geometry and batch size it runs, each in a fresh process (so peak memory is its own):
  non-DP and DP at the attention scope (DP-LDM), and non-DP and DP at the full scope (the baseline).
DP steps use Poisson-free fixed batches of the same size (sampling costs nothing measurable) split in
physical micro-batches of ``--physical``; non-DP steps run the batch at once.

    python bench/dp_step.py                      # all geometries, batch 64 and 256
    python bench/dp_step.py --geometries quickstart --batch-sizes 64 --steps 3
    python bench/dp_step.py --geometries quickstart --batch-sizes 256 --physical 256 --scopes full --vs-hooks
    python bench/dp_step.py --device cuda --precision bf16 --geometries cifar-gpu --batch-sizes 256 1024 --sampling

On a GPU (``--device cuda``) memory is the peak of ``torch.cuda.max_memory_allocated`` over the timed steps
(weights, optimizer state and activations); on the CPU the peak RSS growth. ``--precision bf16`` runs each step
under bf16 autocast, as Lightning's ``bf16-mixed`` does (the DP engine clips and adds noise in fp32).
``--sampling`` adds the sampling throughput (images/s: DPM-Solver++, classifier-free guidance, decoding).
``bench/gpu_check.sh`` is the prepared run for a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

GEOMETRIES = {
    # the quickstart model: 32x32x1 images -> 8x8x4 latents, UNet (64, 128), attention at the 4x4 level + middle
    "quickstart": dict(image=(1, 32), ae=dict(in_channels=1, latent_channels=4, block_out_channels=(32, 64, 64),
                                              norm_num_groups=16),
                       unet=dict(sample_size=8, in_channels=4, block_out_channels=(64, 128), attention=(False, True),
                                 attention_head_dim=32, cross_attention_dim=64)),
    # DP-LDM's CIFAR-10 geometry (32x32x3 -> 16x16x3, f = 2; attention at every level), channels halved for CPU
    "cifar": dict(image=(3, 32), ae=dict(in_channels=3, latent_channels=3, block_out_channels=(64, 128),
                                         norm_num_groups=32),
                  unet=dict(sample_size=16, in_channels=3, block_out_channels=(64, 128, 256),
                            attention=(True, True, True), layers_per_block=2, attention_head_dim=32,
                            cross_attention_dim=256)),
    # DP-LDM's CIFAR-10 geometry at full width (configs/cifar10/ldm.yaml): for a GPU
    "cifar-gpu": dict(image=(3, 32), ae=dict(in_channels=3, latent_channels=3, block_out_channels=(128, 256),
                                             norm_num_groups=32),
                      unet=dict(sample_size=16, in_channels=3, block_out_channels=(128, 256, 512),
                                attention=(True, True, True), layers_per_block=2, attention_head_dim=32,
                                cross_attention_dim=512)),
}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def precision_context(device: str, precision: str):
    """bf16 autocast (Lightning's ``bf16-mixed``) or nothing (fp32)."""
    import contextlib

    import torch

    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


class Meter:
    """Wall time per call (synchronised on a GPU) and peak memory over the timed calls (MB)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS counter
            self.base = rss_mb()

    def time(self, fn) -> float:
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0

    def peak(self) -> float:
        return self.torch.cuda.max_memory_allocated() / 2**20 if self.cuda else peak_rss_mb() - self.base


def build_model(geometry: str, scope: str, device: str):
    """The geometry's class-conditional LDM (random weights, seed 0) with its trainable scope, on ``device``."""
    import torch

    from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_autoencoder, build_unet
    from dpldm.privacy import TrainableScope

    torch.manual_seed(0)
    g = GEOMETRIES[geometry]
    cond = ClassEmbedder(10, embed_dim=g["unet"]["cross_attention_dim"])
    return LatentDiffusion(build_unet(**g["unet"]), FrozenAutoencoder(build_autoencoder(**g["ae"])), cond,
                           scope=TrainableScope(scope)).to(device)


def measure(geometry: str, batch: int, scope: str, dp: bool, steps: int, physical: int, clipping: str,
            device: str = "cpu", precision: str = "32") -> dict:
    """Runs in a child process: median step time and peak memory over the timed steps."""
    import torch

    from dpldm.privacy import DifferentialPrivacy, DPSGDEngine
    from dpldm.privacy.settings import PrivacyPlan

    g = GEOMETRIES[geometry]
    model = build_model(geometry, scope, device).train()
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    c, size = g["image"]
    data = {"image": torch.rand(batch, c, size, size, device=device) * 2 - 1,
            "label": torch.arange(batch, device=device) % 10}
    if dp:
        settings = DifferentialPrivacy(noise_multiplier=1.0, epsilon=None, max_physical_batch_size=physical, seed=0,
                                       clipping=clipping)
        engine = DPSGDEngine(settings, PrivacyPlan(50_000, batch, batch / 50_000, 1e-5, 1000), model.trained_modules)
        opt = engine.wrap(opt)

    def step() -> None:
        with precision_context(device, precision):
            if dp:
                engine.step(data, model.per_example_loss, opt)
            else:
                model.per_example_loss(data).mean().backward()
        if not dp:
            opt.step()
            opt.zero_grad(set_to_none=True)

    meter = Meter(device)
    step()  # warm-up (allocator, first-call overheads)
    meter.start()
    times = [meter.time(step) for _ in range(steps)]
    trained = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    return {"time": statistics.median(times), "mem": meter.peak(), "trained": trained, "total": total}


def measure_sampling(geometry: str, batch: int, device: str, precision: str, num_steps: int = 20) -> dict:
    """Runs in a child process: images per second of ``model.sample`` (DPM-Solver++, guidance 3, decoding)."""
    import torch

    model = build_model(geometry, "attention", device)
    labels = torch.arange(batch, device=device) % 10

    def draw() -> None:
        with precision_context(device, precision):
            model.sample(labels, guidance_scale=3.0, num_steps=num_steps, solver="dpm_solver++")

    meter = Meter(device)
    draw()  # warm-up
    meter.start()
    seconds = meter.time(draw)
    return {"images_per_s": batch / seconds, "mem": meter.peak()}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometries", nargs="+", default=["quickstart", "cifar"], choices=list(GEOMETRIES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    p.add_argument("--scopes", nargs="+", default=["attention", "full"], choices=["attention", "full"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--physical", type=int, default=64, help="DP physical micro-batch size")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--clipping", default="fast", choices=["fast", "ghost", "hooks"], help="DP clipping method")
    p.add_argument("--vs-hooks", action="store_true",
                   help="also time each DP step with Opacus's per-example gradients (clipping: hooks), side by side")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32", choices=["32", "bf16"], help="fp32, or bf16 autocast (bf16-mixed)")
    p.add_argument("--sampling", action="store_true", help="also measure sampling throughput (images/s)")
    p.add_argument("--child", nargs=4, metavar=("GEOMETRY", "BATCH", "SCOPE", "DP"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        geometry, batch, scope, dp = a.child
        if scope == "sampling":
            print(json.dumps(measure_sampling(geometry, int(batch), a.device, a.precision)))
            return
        print(json.dumps(measure(geometry, int(batch), scope, dp == "1", a.steps, a.physical, a.clipping,
                                 a.device, a.precision)))
        return
    where = "GPU peak allocated" if a.device == "cuda" else "peak RSS growth"
    print(f"dpldm DP step benchmark: {a.device}, precision {a.precision}, clipping {a.clipping}, {a.steps} timed "
          f"steps each, DP physical micro-batch {a.physical}, {a.threads} threads; time = median s/step, "
          f"mem = {where} (MB) during the steps")
    header = (f"{'geometry':<11}{'batch':>6} {'scope':<10}{'trained':>11}{'nonDP s':>9}{'DP s':>8}{'DP/non':>8}"
              f"{'nonDP MB':>10}{'DP MB':>8}{'mem x':>7}")
    print(header)
    common = ["--steps", str(a.steps), "--physical", str(a.physical), "--threads", str(a.threads),
              "--clipping", a.clipping, "--device", a.device, "--precision", a.precision]
    for geometry in a.geometries:
        for batch in a.batch_sizes:
            dp_times = {}
            for scope in a.scopes:
                base = run_child([*common, "--child", geometry, str(batch), scope, "0"])
                priv = run_child([*common, "--child", geometry, str(batch), scope, "1"])
                dp_times[scope] = priv["time"]
                print(f"{geometry:<11}{batch:>6} {scope:<10}{base['trained'] / base['total']:>10.1%} "
                      f"{base['time']:>8.3f}{priv['time']:>8.3f}{priv['time'] / base['time']:>7.2f}x"
                      f"{base['mem']:>10.0f}{priv['mem']:>8.0f}{priv['mem'] / max(base['mem'], 1):>6.2f}x", flush=True)
                if a.vs_hooks:
                    hooks = [*common, "--child", geometry, str(batch), scope, "1"]
                    hooks[hooks.index("--clipping") + 1] = "hooks"
                    ref = run_child(hooks)
                    print(f"{'':<17} {a.clipping} vs hooks (Opacus per-example gradients): {priv['time']:.3f} s vs "
                          f"{ref['time']:.3f} s a step ({ref['time'] / priv['time']:.2f}x faster), {priv['mem']:.0f} "
                          f"vs {ref['mem']:.0f} MB", flush=True)
            if len(dp_times) == 2:
                print(f"{'':<17} DP attention vs DP full: {dp_times['attention'] / dp_times['full']:.2f}x the time")
            if a.sampling:
                out = run_child([*common, "--child", geometry, str(batch), "sampling", "0"])
                print(f"{geometry:<11}{batch:>6} sampling: {out['images_per_s']:.1f} images/s (DPM-Solver++ 20 steps, "
                      f"guidance 3, decoded), {out['mem']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
