"""Looking at a trained model (``notebooks/explore_samples.ipynb``): sample grids, epsilon against steps, and
each sample's nearest training images in pixel and latent space, a memorisation check (Carlini et al., 2023,
"Extracting training data from diffusion models": near-copies of training images are what to look for).
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from dpldm.callbacks.samples import sample_grid  # noqa: F401  (the notebook takes it from here)
from dpldm.privacy.accounting import PrivacyAccountant


@dataclass
class Neighbours:
    """The k nearest training images of each query: distances [n, k] and training indices [n, k]."""

    distances: Tensor
    indices: Tensor
    space: str


def show_grid(images: Tensor, nrow: int, title: str = "", size: float = 1.0) -> plt.Figure:
    """A grid of images [n, C, H, W] in [-1, 1], ``nrow`` per row."""
    rows = (len(images) + nrow - 1) // nrow
    fig, axes = plt.subplots(rows, nrow, figsize=(size * nrow, size * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img in zip(axes.flat, images):
        _imshow(ax, img)
    fig.suptitle(title)
    return fig


def _imshow(ax: plt.Axes, img: Tensor) -> None:
    x = ((img.detach().cpu().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()  # [H, W, C] in [0, 1]
    ax.imshow(x[..., 0] if x.shape[-1] == 1 else x, cmap="gray" if x.shape[-1] == 1 else None, vmin=0, vmax=1)
    ax.axis("off")


def privacy_curve(checkpoint: str | dict, points: int = 50) -> dict[str, np.ndarray | float]:
    """Epsilon after t steps, t = 1 .. T, from the accountant state a DP checkpoint carries (with the declared
    prior releases composed in, as the run reported it).

    Args:
        checkpoint: a ``.ckpt`` path or a loaded checkpoint dict.
        points: how many values of t (evenly spaced, the last one T).

    Returns:
        ``steps`` and ``epsilon`` arrays, and ``delta``; empty arrays for a non-private checkpoint.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False) if isinstance(checkpoint, str) else checkpoint
    state = (ckpt.get("privacy") or {}).get("accountant")
    if not state:
        return {"steps": np.array([]), "epsilon": np.array([]), "delta": float("nan")}
    history, total = state["history"], sum(h[2] for h in state["history"])
    steps = np.unique(np.linspace(1, total, min(points, total)).round().astype(int))
    epsilons = []
    for t in steps:  # the first t steps of the history, in order
        acc, left = PrivacyAccountant(state["kind"], state["delta"], state.get("prior", ())), t  # prior composed in
        for sigma, q, n in history:
            acc.add(sigma, q, min(n, left))
            left -= min(n, left)
        epsilons.append(acc.epsilon())
    return {"steps": steps, "epsilon": np.array(epsilons), "delta": state["delta"]}


def plot_privacy_curve(curve: dict) -> plt.Figure:
    """Epsilon against optimizer steps."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(curve["steps"], curve["epsilon"])
    ax.set_xlabel("DP-SGD steps")
    ax.set_ylabel(f"epsilon (delta = {curve['delta']:.2g})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def training_images(datamodule: object, limit: int | None = None) -> Tensor:
    """The private training images [N, C, H, W] in [-1, 1], unaugmented and in order (a latent cache's
    source images; ``limit``: the first ones only)."""
    source = getattr(datamodule, "source", datamodule)
    source.setup("fit")
    dataset = source.cache_dataset() if hasattr(source, "cache_dataset") else source.train_dataset
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.stack([dataset[i]["image"] for i in range(n)])


@torch.no_grad()
def latent_means(model: torch.nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Posterior means of the frozen autoencoder, flattened [N, c h w]: the space the diffusion model lives in."""
    out = []
    for start in range(0, len(images), batch_size):
        moments = model.autoencoder.moments(images[start:start + batch_size].to(model.device))  # [b, 2c, h, w]
        out.append(moments[:, : moments.shape[1] // 2].flatten(1).cpu())
    return torch.cat(out)


def nearest(queries: Tensor, references: Tensor, k: int = 3, space: str = "pixel") -> Neighbours:
    """The ``k`` nearest references (L2) of each query; both [n, ...] (flattened here)."""
    d = torch.cdist(queries.flatten(1).float(), references.flatten(1).float())  # [n, N]
    dist, idx = d.topk(min(k, d.shape[1]), largest=False)
    return Neighbours(dist, idx, space)


def show_neighbours(samples: Tensor, train: Tensor, found: Neighbours, size: float = 1.0) -> plt.Figure:
    """A row per sample: the sample, then its nearest training images with their distances."""
    n, k = found.indices.shape
    fig, axes = plt.subplots(n, k + 1, figsize=(size * (k + 1), size * n), squeeze=False)
    for r in range(n):
        _imshow(axes[r, 0], samples[r])
        for c in range(k):
            _imshow(axes[r, c + 1], train[found.indices[r, c]])
            axes[r, c + 1].set_title(f"{found.distances[r, c]:.2f}", fontsize=7)
    axes[0, 0].set_title("sample", fontsize=7)
    fig.suptitle(f"nearest training images ({found.space} space, L2)")
    return fig


def heldout_images(datamodule: object, limit: int | None = None) -> Tensor:
    """Real images the model never trained on [n, C, H, W]: the test split, else the validation split."""
    source = getattr(datamodule, "source", datamodule)
    for split in ("test", "val"):
        source.setup(split if split == "test" else "validate")
        dataset = getattr(source, f"{split}_dataset", None)
        if dataset is not None and len(dataset):
            n = len(dataset) if limit is None else min(limit, len(dataset))
            return torch.stack([dataset[i]["image"] for i in range(n)])
    raise ValueError(f"{type(source).__name__} has no test or validation split")


def plot_distance_histograms(samples: Neighbours, heldout: Neighbours) -> plt.Figure:
    """Distance to the nearest training image: samples against real held-out images. Samples much closer to
    the training set than unseen real images are (a left tail) are near-copies."""
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = np.histogram_bin_edges(torch.cat([samples.distances[:, 0], heldout.distances[:, 0]]).numpy(), 30)
    ax.hist(heldout.distances[:, 0].numpy(), bins, alpha=0.6, density=True, label="real held-out images")
    ax.hist(samples.distances[:, 0].numpy(), bins, alpha=0.6, density=True, label="samples")
    ax.set_xlabel(f"L2 distance to the nearest training image ({samples.space} space)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
