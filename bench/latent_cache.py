"""Benchmark: a DP step reading the latent cache vs re-encoding through the frozen encoders (DP-LDM).

Side by side in one process, alternating, for two geometries:
  cifar: DP-LDM's CIFAR-10 one (32x32x3 images, f = 2 autoencoder, 16x16x3 latents), class labels;
  t2i256: 256x256 text-to-image, f = 8 autoencoder (32x32x4 latents) and an open_clip text tower,
          channels shrunk for a CPU (autoencoder 1/4 of Stable Diffusion's widths, text tower 256 wide).
Both steps are the same DP-SGD step on the attention scope (per-example clipping, noise); the uncached
one also runs the frozen encoders on the batch (images, and captions for text), the cached one reads
their stored outputs. "removed" = (uncached - cached) / encoders alone: 100% means the cache removes
the encoders' whole share of the step (paired: the median over repetitions of uncached - cached).
On a CPU the encoder also hands the UNet channels-last latents (its convolutions' output layout), which
slows the UNet a little; the cache's records are plain NCHW, so "removed" can exceed 100%.

    python bench/latent_cache.py                        # both geometries
    python bench/latent_cache.py --geometries cifar --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dp_step import GEOMETRIES as DP_GEOMETRIES  # noqa: E402

TEXT_TOWER = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6}}
GEOMETRIES = {
    "cifar": {**DP_GEOMETRIES["cifar"], "batch": 64},
    "t2i256": dict(image=(3, 256), batch=16, text=TEXT_TOWER,
                   ae=dict(in_channels=3, latent_channels=4, block_out_channels=(32, 64, 128, 128),
                           layers_per_block=2, norm_num_groups=32),
                   unet=dict(sample_size=32, in_channels=4, block_out_channels=(64, 128, 256),
                             attention=(False, True, True), layers_per_block=1, attention_head_dim=32,
                             cross_attention_dim=256)),
}


def build(name: str):
    """The model (DP engine attached, attention scope), an image batch and its cached counterpart."""
    import torch

    from dpldm.modules import (ClassEmbedder, FrozenAutoencoder, LatentDiffusion, OpenCLIPTextEncoder,
                               build_autoencoder, build_unet)
    from dpldm.privacy import DifferentialPrivacy, DPSGDEngine, TrainableScope
    from dpldm.privacy.settings import PrivacyPlan

    torch.manual_seed(0)
    g = GEOMETRIES[name]
    width, b = g["unet"]["cross_attention_dim"], g["batch"]
    if "text" in g:
        arch = os.path.join(tempfile.mkdtemp(), "bench-text-tower.json")
        with open(arch, "w") as f:
            json.dump(g["text"], f)
        cond = OpenCLIPTextEncoder(arch, pretrained=None, projection_dim=width)
        raw = [f"a photograph of object number {i} on a table" for i in range(b)]
    else:
        cond, raw = ClassEmbedder(10, embed_dim=width), torch.arange(b) % 10
    model = LatentDiffusion(build_unet(**g["unet"]), FrozenAutoencoder(build_autoencoder(**g["ae"])), cond,
                            scope=TrainableScope("attention")).train()
    settings = DifferentialPrivacy(noise_multiplier=1.0, epsilon=None, max_physical_batch_size=b, seed=0)
    engine = DPSGDEngine(settings, PrivacyPlan(50_000, b, b / 50_000, 1e-5, 1000), model.trained_modules)
    opt = engine.wrap(torch.optim.AdamW(model.trainable_parameters(), lr=1e-4))
    c, size = g["image"]
    images = {"image": torch.rand(b, c, size, size) * 2 - 1, cond.input_key: raw}
    cached = {"moments": model.autoencoder.moments(images["image"]).contiguous()}  # as the cache loader gives
    cached.update({cond.cache_key: cond.frozen_features(raw)} if cond.cache_key else {cond.input_key: raw})

    def encoders() -> None:
        model.autoencoder.moments(images["image"])
        if cond.cache_key:
            cond.frozen_features(raw)

    return model, engine, opt, images, cached, encoders


def run(name: str, steps: int) -> dict:
    model, engine, opt, images, cached, encoders = build(name)
    timed = {"uncached": lambda: engine.step(images, model.per_example_loss, opt),
             "cached": lambda: engine.step(cached, model.per_example_loss, opt), "encoders": encoders}
    times = {k: [] for k in timed}
    for _ in range(2):
        for fn in timed.values():
            fn()  # warm-up (allocator, first-call overheads)
    for _ in range(steps):  # alternate, so drift hits all three alike
        for k, fn in timed.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()}
    # paired: each uncached step against the cached step run right after it (drift cancels)
    out["saved"] = statistics.median(u - c for u, c in zip(times["uncached"], times["cached"]))
    return out


# Keep freed memory in glibc's heap instead of returning it to the OS after every step: the large
# per-sample-gradient buffers otherwise page-fault afresh each time (noisy, and ~40% slower here).
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (after one warm-up), median reported")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    if any(k not in os.environ for k in STEADY_MALLOC):  # glibc reads these at start: re-run with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})
    import torch

    torch.set_num_threads(a.threads)
    print(f"dpldm latent-cache benchmark: DP step (attention scope), median of {a.steps}, {a.threads} threads, "
          "glibc heap kept between steps")
    print(f"{'geometry':<9}{'batch':>6}{'uncached s':>12}{'cached s':>10}{'speed-up':>10}{'encoders s':>12}"
          f"{'enc share':>11}{'removed':>9}")
    for name in a.geometries:
        t = run(name, a.steps)
        share, removed = t["encoders"] / t["uncached"], t["saved"] / t["encoders"]
        print(f"{name:<9}{GEOMETRIES[name]['batch']:>6}{t['uncached']:>12.3f}{t['cached']:>10.3f}"
              f"{t['uncached'] / t['cached']:>9.2f}x{t['encoders']:>12.3f}{share:>10.1%}{removed:>9.0%}", flush=True)


if __name__ == "__main__":
    main()
