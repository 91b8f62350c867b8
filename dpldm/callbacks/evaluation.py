"""Sample-based evaluation during and after training: FID, CLIP score, downstream accuracy.

Each metric is a callback. Every ``every_n_epochs`` epochs (0: never) and at the end of fit it draws
``num_samples`` guided DDIM samples (EMA weights if kept) and logs ``val/<metric>`` to every logger,
next to ``train/loss`` and ``privacy/*``; ``dpldm evaluate`` runs the same callbacks on a checkpoint.
Callbacks of one trainer share the samples of a step. Scoring samples of a DP model is
post-processing: no privacy cost. The real images they are compared with come from the data's test
split (evaluation data, never the training set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from dpldm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class SampleSettings:
    """How evaluation samples are drawn.

    Args:
        num_steps: DDIM steps (``None``: the model's default).
        guidance_scale: classifier-free guidance (``None``: the model's default).
        batch_size: samples per batch.
        seed: noise seed (the same for every evaluation, so they are comparable).
    """

    num_steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int = 250
    seed: int = 0


def conditions(model: nn.Module, n: int, prompts: list[str] | None = None) -> Tensor | list[str]:
    """n conditions: every class equally often (class models), or the prompts cycled (text models)."""
    if getattr(model.conditioner, "input_key", None) == "caption":
        if not prompts:
            raise ConfigError("prompts", prompts, "a text-conditional model needs prompts to sample for evaluation")
        return [prompts[i % len(prompts)] for i in range(n)]
    return torch.arange(n) % model.conditioner.num_classes


@torch.no_grad()
def draw_samples(model: nn.Module, conds: Tensor | list[str], settings: SampleSettings) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] (CPU) for the conditions, in seeded batches."""
    from tqdm.auto import tqdm

    device, out = model.device, []
    for k, start in enumerate(tqdm(range(0, len(conds), settings.batch_size), desc="evaluation samples",
                                   unit="batch", leave=False)):
        chunk = conds[start:start + settings.batch_size]
        chunk = chunk.to(device) if isinstance(chunk, Tensor) else chunk
        gen = torch.Generator(device).manual_seed(settings.seed + k)
        out.append(model.sample(chunk, settings.guidance_scale, settings.num_steps, generator=gen).cpu())
    return torch.cat(out)


def real_images(datamodule: object, max_items: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Real held-out images of a DataModule (a latent cache's source): its test split, else its validation
    split; images and labels (if any)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from dpldm.metrics.downstream import load_images

    if datamodule is None:
        raise ConfigError("data", None, "evaluation against real images needs the run's DataModule")
    try:
        datamodule.setup("test")
        loader = datamodule.test_dataloader()
    except (MisconfigurationException, NotImplementedError):  # e.g. a stream of shards with no test split
        datamodule.setup("validate")
        loader = datamodule.val_dataloader()
    if not loader:
        raise ConfigError("data", type(datamodule).__name__, "has no test or validation images to compare with "
                          "(e.g. set val_shards, or give the metric a reference_dir)")
    return load_images(loader, max_items)


class SampleMetric(L.Callback):
    """Base class: draws (shared) samples, scores them, logs ``key`` to every logger.

    Args:
        num_samples: samples per evaluation.
        every_n_epochs: also evaluate every n epochs (0: only at the end of fit).
        sampling: how samples are drawn (default :class:`SampleSettings`).
    """

    key = "val/metric"
    prompts: list[str] | None = None

    def __init__(self, num_samples: int, every_n_epochs: int = 0, sampling: SampleSettings | None = None):
        if num_samples < 1:
            raise ConfigError(f"{type(self).__name__}.num_samples", num_samples, "must be >= 1")
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.sampling = sampling or SampleSettings()
        self.last: dict[str, float] | None = None
        self.history: list[list[float]] = []

    def compute(self, model: nn.Module, datamodule: object, images: Tensor, conds: Tensor | list[str]) -> dict:
        """Score samples ``images`` drawn for ``conds``; returns ``{log key: value}``."""
        raise NotImplementedError

    def samples(self, model: nn.Module, step: int) -> tuple[Tensor, Tensor | list[str]]:
        """Samples for this metric, shared with the other metrics of the same step and settings."""
        conds = conditions(model, self.num_samples, self.prompts)
        key = (step, self.num_samples, repr(self.sampling), tuple(conds) if isinstance(conds, list) else "labels")
        shared = model.__dict__.setdefault("_evaluation_samples", {})
        if key not in shared:
            shared.clear()  # only the current step's samples are kept
            shared[key] = (draw_samples(model, conds, self.sampling), conds)
        return shared[key]

    def evaluate(self, model: nn.Module, datamodule: object, step: int = -1, loggers: list = ()) -> dict:
        """Sample, score, log; returns the values."""
        was_training = model.training
        images, conds = self.samples(model, step)
        values = self.compute(model, datamodule, images, conds)
        model.train(was_training)
        self.last = values
        for logger in loggers:
            logger.log_metrics(values, step=max(step, 0))
            if isinstance(logger, WandbLogger):  # the history as a table, next to the curves
                self.history.append([step, *values.values()])
                logger.log_table(f"{self.key}_table", columns=["step", *values], data=self.history)
        log.info("%s", ", ".join(f"{k} = {v:.4g}" for k, v in values.items()))
        return values

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:  # a smoke test: no thousands of samples
            return
        if trainer.is_global_zero:
            self.evaluate(pl_module, trainer.datamodule, trainer.global_step, trainer.loggers)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)


class DownstreamAccuracy(SampleMetric):
    """Train a small CNN on labelled samples, test it on the real test split (DP-LDM / DPDM protocol).

    Args:
        num_samples: labelled synthetic training images (every class equally often).
        epochs: classifier training epochs.
        test_samples: real test images used (``None``: all).
        every_n_epochs: also evaluate every n epochs (0: only at the end of fit).
        sampling: how samples are drawn.
    """

    key = "val/downstream_acc"

    def __init__(self, num_samples: int = 5000, epochs: int = 10, test_samples: int | None = None,
                 every_n_epochs: int = 0, sampling: SampleSettings | None = None):
        super().__init__(num_samples, every_n_epochs, sampling)
        self.epochs, self.test_samples = epochs, test_samples

    def compute(self, model: nn.Module, datamodule: object, images: Tensor, conds: Tensor | list[str]) -> dict:
        from dpldm.metrics.downstream import downstream_accuracy

        if not isinstance(conds, Tensor):
            raise ConfigError("DownstreamAccuracy", type(model.conditioner).__name__, "needs a class-conditional model")
        test_x, test_y = real_images(datamodule, self.test_samples)
        acc = downstream_accuracy(images, conds, test_x, test_y, model.conditioner.num_classes, epochs=self.epochs,
                                  seed=self.sampling.seed)
        return {self.key: acc}


class FID(SampleMetric):
    """Fréchet distance of samples to real images, computed the clean-fid way.

    Args:
        extractor: features of images in [-1, 1] (default: clean-fid's Inception, downloaded once);
            e.g. :func:`dpldm.metrics.public_classifier_features` offline.
        reference: clean-fid's precomputed statistics by name (e.g. ``cifar10``; Inception only).
        reference_split: their split (``train`` / ``test``).
        reference_resolution: their resolution.
        reference_dir: a folder of reference images instead.
        stats_path: reference statistics file, written once and reused.
        reference_samples: real test images used when the reference is the run's data (``None``: all).
        key: log key (``val/fid``; e.g. ``val/fid_glyph`` for a non-Inception extractor).
        num_samples: generated images per evaluation.
        every_n_epochs: also evaluate every n epochs (0: only at the end of fit).
        sampling: how samples are drawn.
    """

    def __init__(self, extractor: nn.Module | None = None, reference: str | None = None, reference_split: str = "train",
                 reference_resolution: int = 32, reference_dir: str | None = None, stats_path: str | None = None,
                 reference_samples: int | None = None, key: str = "val/fid", num_samples: int = 10_000,
                 every_n_epochs: int = 0, sampling: SampleSettings | None = None):
        from dpldm.metrics.fid import FID as FIDScore

        super().__init__(num_samples, every_n_epochs, sampling)
        self.key, self.reference_samples = key, reference_samples
        self.metric = FIDScore(extractor, reference, reference_split, reference_resolution, reference_dir, stats_path)

    def compute(self, model: nn.Module, datamodule: object, images: Tensor, conds: Tensor | list[str]) -> dict:
        real = real_images(datamodule, self.reference_samples)[0] if self.metric.needs_images() else None  # once
        reference = self.metric.reference_stats(real)
        return {self.key: self.metric(images, reference)}


class CLIPScore(SampleMetric):
    """CLIP score of samples and their prompts, 100 * max(cos, 0), with an open_clip model.

    Args:
        prompts: the prompts to sample (cycled up to ``num_samples``).
        prompts_file: or a text file, one prompt per line.
        model_name: open_clip architecture (or a JSON architecture file).
        pretrained: open_clip pretrained tag.
        checkpoint: a local open_clip checkpoint file (offline).
        num_samples: samples per evaluation.
        every_n_epochs: also evaluate every n epochs (0: only at the end of fit).
        sampling: how samples are drawn.
    """

    key = "val/clip_score"

    def __init__(self, prompts: list[str] | None = None, prompts_file: str | None = None, model_name: str = "ViT-B-32",
                 pretrained: str | None = "laion2b_s34b_b79k", checkpoint: str | None = None,
                 num_samples: int = 1000, every_n_epochs: int = 0, sampling: SampleSettings | None = None):
        super().__init__(num_samples, every_n_epochs, sampling)
        if prompts_file is not None:
            with open(prompts_file) as f:
                prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ConfigError("CLIPScore.prompts", prompts, "give prompts or a non-empty prompts_file")
        self.prompts = prompts
        self.model_name, self.pretrained, self.checkpoint = model_name, pretrained, checkpoint
        self._scorer = None

    def compute(self, model: nn.Module, datamodule: object, images: Tensor, conds: Tensor | list[str]) -> dict:
        from dpldm.metrics.clip_score import CLIPScore as Scorer

        if self._scorer is None:
            self._scorer = Scorer(self.model_name, self.pretrained, self.checkpoint)
            log.info("CLIP score with %s", self._scorer.description)
        return {self.key: self._scorer(images, list(conds))}
