"""Canaries for a one-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023), and their scores.

m out-of-distribution records shaped like the private training items are drawn; each joins the training
split independently with probability 1/2 (a hidden, seeded mask). Training itself is untouched: the DP
model Poisson-samples the enlarged split of N = N_private + (number of included canaries) records and
accounts over that N. The number of included canaries is public; which ones is the secret being audited.

A canary's membership score is how much its denoising loss dropped between the model before and after
training, over fixed (t, noise) draws at low-to-mid t: a deterministic loss-difference attack (the
loss-threshold membership inference of Yeom et al., 2018, calibrated per canary by its loss before training).
"""

from __future__ import annotations

from collections.abc import Sized

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from dpldm.errors import ConfigError
from dpldm.modules.loss import denoising_loss

# Streams of randomness derived from --seed: canary content, the secret mask, the negative control's
# fresh mask, the scorer's noise: each from its own numpy SeedSequence([seed, stream]).
CONTENT, MASK, FRESH_MASK, NOISE = range(4)
_WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "glacier", "harbor", "iris", "jade", "kelp",
          "lantern", "meadow", "nebula", "orchid", "prism", "quartz", "raven", "saffron", "tundra")


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for one named stream of the audit's randomness.

    Args:
        seed: the audit's ``--seed``.
        stream: one of CONTENT, MASK, FRESH_MASK, NOISE.
    """
    return int(np.random.SeedSequence([seed, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def inclusion_mask(m: int, seed: int, stream: int = MASK) -> np.ndarray:
    """The secret mask [m] (bool): each canary included independently with probability 1/2.

    Args:
        m: number of canaries.
        seed: the audit's seed.
        stream: MASK for the training mask, FRESH_MASK for the negative control's independent one.
    """
    return np.random.default_rng(stream_seed(seed, stream)).random(m) < 0.5


def random_captions(m: int, generator: torch.Generator) -> list[str]:
    """m unique nonsense captions (random words, the index and a random hex tag): unlike any real caption.

    Args:
        m: number of captions.
        generator: the source of randomness.
    """
    words = torch.randint(len(_WORDS), (m, 4), generator=generator).tolist()
    tags = torch.randint(16**6, (m,), generator=generator).tolist()
    return [f"{' '.join(_WORDS[w] for w in ws)} {i:04d}-{t:06x}" for i, (ws, t) in enumerate(zip(words, tags))]


def make_canaries(template: dict, m: int, model: torch.nn.Module, seed: int, num_classes: int | None = None,
                  scale: float = 3.0) -> dict:
    """m out-of-distribution records with the fields of ``template``, batched (first axis m).

    * ``moments`` [2c, h, w] (a latent cache): mean ~ N(0, scale^2) in the model's *scaled* latent space
      (divided by the autoencoder's scale factor, as the cache stores unscaled moments), log-variance -30
      (the posterior clamps there): a point mass, so every read of the canary is the same latent.
    * ``image`` [C, H, W] in [-1, 1]: random +-1 (times ``scale``, clipped) block patterns on a grid of
      max(4, H / 4) cells per side, unlike any natural image.
    * ``label``: a random class (a class-conditional model cannot get new classes).
    * ``caption`` / ``text_features`` [T, W]: unique random captions (encoded by the frozen text tower).
    * ``key``: ``canary-i``.

    Args:
        template: one item of the private training split (its fields and shapes are copied).
        m: number of canaries.
        model: the diffusion model (its autoencoder's scale factor, its frozen text encoder).
        seed: the audit's seed.
        num_classes: classes to draw labels from (class-conditional data).
        scale: how far from the data the canaries lie: the standard deviation of the scaled latents (the data's
            is about 1); image canaries are +-min(scale, 1). On the tiny test model 3 gave AUC 0.96-0.99 where 1
            gave 0.72-0.93 (non-private, same steps): far-out canaries are easier to memorise.

    Returns:
        Field -> Tensor [m, ...] (or a list of m strings).
    """
    g = torch.Generator().manual_seed(stream_seed(seed, CONTENT))
    out: dict = {}
    for key, value in template.items():
        if key == "moments":  # [2c, h, w]: (mean, log-variance), unscaled
            c2, h, w = value.shape
            mean = torch.randn(m, c2 // 2, h, w, generator=g) * scale / model.autoencoder.scale_factor
            out[key] = torch.cat([mean, torch.full_like(mean, -30.0)], 1)  # [m, 2c, h, w]
        elif key == "image":  # [C, H, W]
            ch, hh, ww = value.shape
            cells = (max(4, hh // 4), max(4, ww // 4))
            signs = torch.randint(2, (m, ch, *cells), generator=g).float() * 2 - 1  # [m, C, gh, gw]
            blocks = torch.nn.functional.interpolate(signs, size=(hh, ww), mode="nearest")
            out[key] = (blocks * scale).clamp(-1, 1)  # [m, C, H, W]
        elif key == "label":
            if not num_classes:
                raise ConfigError("data", "label", "audit canaries need the number of classes of the data")
            out[key] = torch.randint(num_classes, (m,), generator=g)  # [m]
        elif key in ("caption", "text_features"):
            captions = random_captions(m, g)
            if key == "caption":
                out[key] = captions
            else:  # what a latent cache stores: the frozen text tower's features [m, T, W]
                out[key] = encode_captions(model.conditioner, captions).to(value.dtype)
                if out[key].shape[1:] != value.shape:
                    raise ConfigError("model.init_args.conditioner", type(model.conditioner).__name__,
                                      f"encodes captions to {tuple(out[key].shape[1:])}, but the latent cache "
                                      f"stores {tuple(value.shape)}: rebuild the cache (`dpldm cache`)")
        elif key == "key":
            out[key] = [f"canary-{i:05d}" for i in range(m)]
        else:
            raise ConfigError("data", key, "the audit does not know how to make canaries for this item field "
                              "(known: moments, image, label, caption, text_features, key)")
    return out


@torch.no_grad()
def encode_captions(conditioner: torch.nn.Module, captions: list[str], batch_size: int = 64) -> Tensor:
    """Frozen text features of captions, in batches on the conditioner's device -> [m, T, W] on the CPU.

    Args:
        conditioner: a conditioner with a frozen text tower (``frozen_features``).
        captions: the m captions.
        batch_size: captions per forward pass.
    """
    parts = [conditioner.frozen_features(captions[i:i + batch_size]).float().cpu()
             for i in range(0, len(captions), batch_size)]
    return torch.cat(parts)


def canary_item(canaries: dict, i: int) -> dict:
    """Record i of a batched canary dict, shaped like a dataset item (labels as ``int``).

    Args:
        canaries: batched canaries.
        i: the canary's index.
    """
    return {k: (int(v[i]) if k == "label" else v[i]) for k, v in canaries.items()}


def num_canaries(canaries: dict) -> int:
    """Number of records in a batched canary dict.

    Args:
        canaries: batched canaries.
    """
    return len(next(iter(canaries.values())))


class CanaryDataset(Dataset):
    """The private training split followed by the included canaries: N = len(base) + sum(included).

    Args:
        base: the private training split (map-style).
        canaries: batched canaries from :func:`make_canaries`.
        included: the secret mask [m].
    """

    def __init__(self, base: Dataset, canaries: dict, included: np.ndarray):
        self.base, self.canaries = base, canaries
        self.included = np.asarray(included, dtype=bool)
        self.indices = np.flatnonzero(self.included)  # canary ids in the split, in order
        self.num_base = len(base)

    def __len__(self) -> int:
        return self.num_base + len(self.indices)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if index < self.num_base:
            return self.base[index]
        if index >= len(self):
            raise IndexError(index)
        return canary_item(self.canaries, int(self.indices[index - self.num_base]))


def training_split(dm: object) -> Dataset:
    """The datamodule's built training split, or a ConfigError when canaries cannot be injected into it.

    Args:
        dm: the datamodule, after ``setup("fit")``.
    """
    dataset = getattr(dm, "train_dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
        raise ConfigError("data.class_path", type(dm).__name__,
                          "the audit injects canaries into a map-style training split (train_dataset) of known "
                          "size; stream data into dpldm.datamodules.LatentCacheDataModule (a latent cache) first")
    if len(dataset) == 0:
        raise ConfigError("data", 0, "the training split is empty")
    return dataset


def inject(dm: object, canaries: dict, included: np.ndarray) -> CanaryDataset:
    """Replace ``dm.train_dataset`` (already built by ``dm.setup("fit")``) by private records + included canaries.

    ``ImageDataModule._ensure`` keeps a split that exists, so Lightning's own ``setup`` keeps this one; the DP
    model then reads ``dm.num_train_samples`` (this N) and Poisson-samples ``dm.train_dataloader()`` over it.

    Args:
        dm: the datamodule, after ``setup("fit")``.
        canaries: batched canaries.
        included: the secret mask [m].
    """
    base = training_split(dm)
    keys, fields = set(canaries), set(base[0])
    if keys != fields:
        raise ValueError(f"canary fields {sorted(keys)} differ from the training items' {sorted(fields)}")
    dm.train_dataset = CanaryDataset(base, canaries, included)
    return dm.train_dataset


@torch.no_grad()
@torch.no_grad()
def canary_losses(model: torch.nn.Module, canaries: dict, draws: int = 8, seed: int = 0,
                  t_range: tuple[float, float] = (0.05, 0.3), batch_size: int = 64,
                  device: str | torch.device | None = None) -> np.ndarray:
    """Deterministic denoising loss of each canary [m]: the mean over ``draws`` fixed (t, noise) pairs.

    The same t values (evenly spaced in ``t_range`` of the schedule) and the same noise (from the NOISE
    stream of ``seed``) are used on every call, so scores before and after training differ only through
    the weights. Default t: the low-to-middle part of the schedule, t in [0.05 T, 0.3 T]. There the best
    denoiser that has not seen a random canary still errs by about its prior variance while one that
    memorised it errs little (at high t both mostly predict the noise from z_t); on the tiny test model it
    gave AUC 0.92 vs 0.89 for [0.3 T, 0.6 T] (and a larger eps_lb). The model is in
    eval mode (no condition dropout) with its EMA weights when it keeps them (the released weights). The loss is
    the training objective itself (:func:`~dpldm.modules.loss.denoising_loss`: its target and weighting) at
    those fixed draws, on the posterior mean of each canary's latent.

    Args:
        model: a :class:`dpldm.modules.LatentDiffusion`.
        canaries: batched canaries.
        draws: K (t, noise) pairs per canary.
        seed: the audit's seed.
        t_range: fractions of the number of training timesteps between which the K values of t lie.
        batch_size: canaries per forward pass.
        device: where to compute; default CUDA when available. The model is moved back afterwards.

    Returns:
        Loss per canary [m] (float64).
    """
    m = num_canaries(canaries)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    home, was_training = next(model.parameters()).device, model.training
    model.to(device).eval()
    sched = model.noise_scheduler
    big_t = sched.config.num_train_timesteps
    t = torch.linspace(t_range[0] * (big_t - 1), t_range[1] * (big_t - 1), draws).round().long()  # [K]
    g = torch.Generator().manual_seed(stream_seed(seed, NOISE))
    noise = torch.randn(m, draws, *model.latent_shape, generator=g)  # [m, K, c, h, w], fixed by the seed
    losses = []
    try:
        with model.ema_weights():
            for start in range(0, m, batch_size):
                batch = {k: v[start:start + batch_size] for k, v in canaries.items()}
                b = num_canaries(batch)
                if "moments" in batch:  # cached posterior moments (or VQ encodings)
                    moments = batch["moments"].to(device)
                else:
                    moments = model.autoencoder.moments(batch["image"].to(device))
                z0 = model.autoencoder.from_moments(moments, mean=True)  # [b, c, h, w], deterministic
                cond = model.conditioner.select(batch)
                context = model.conditioner(cond.to(device) if isinstance(cond, Tensor) else cond)  # [b, T, D]
                tt = t.repeat(b).to(device)  # [b*K], the K draws of one canary adjacent
                eps = noise[start:start + b].flatten(0, 1).to(device)  # [b*K, c, h, w]
                loss = denoising_loss(model.unet, z0, context, sched, model.timesteps, model.weighting, draws,
                                      t=tt, noise=eps)  # the training objective at fixed (t, noise) [b]
                losses.append(loss.double().cpu())
    finally:
        model.to(home).train(was_training)
    out = torch.cat(losses).numpy()
    if not np.all(np.isfinite(out)):
        raise RuntimeError("non-finite canary loss: the model diverged")
    return out


def summary_counts(included: np.ndarray, num_private: int) -> str:
    """One line: how many canaries were included and what N became.

    Args:
        included: the secret mask [m].
        num_private: N of the private split before injection.
    """
    k = int(np.sum(included))
    return (f"{len(included)} canaries, {k} included (each with probability 1/2): "
            f"N = {num_private} private + {k} canaries = {num_private + k}")
