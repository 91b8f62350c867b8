"""Sample-based evaluation during and after training: FID, CLIP score, downstream accuracy.

Each metric is a callback. Every ``every_n_epochs`` epochs (0: never) and at the end of fit it draws
``num_samples`` guided DDIM samples (EMA weights if kept), scores them and logs ``<split>/<metric>`` to
every logger, next to ``train/loss`` and ``privacy/*``; ``dpldm evaluate`` runs the same callbacks on a
checkpoint. Callbacks of one trainer share the samples of a step.

The key names the data the samples were compared with: ``test/...`` the data's test split (the final
number, reported once), ``val/...`` its val split (held out from training and from the final test: what a
sweep may choose on), ``ref/...`` a fixed reference set (FID's ``reference`` / ``reference_dir``),
``prompts/...`` the config's prompts only (CLIP score). ``splits: [val, test]`` scores one set of
samples against both. Scoring samples of a DP model is post-processing: no privacy cost. But the val
and test images are private data too, used without DP: choosing among runs by a ``val/`` value is
itself a (declared) privacy cost, see ``dpldm sweep --account-selection`` and the README, "Sweeps".
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from dpldm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class SampleSettings:
    """How evaluation samples are drawn.

    Args:
        num_steps: solver steps (``None``: the model's default).
        solver: ``ddim`` or ``dpm_solver++`` (``None``: the model's default).
        guidance_scale: classifier-free guidance (``None``: the model's default).
        batch_size: samples per batch.
        seed: noise seed (the same for every evaluation, so they are comparable).
    """

    num_steps: int | None = None
    solver: Literal["ddim", "dpm_solver++"] | None = None
    guidance_scale: float | None = None
    batch_size: int = 250
    seed: int = 0


def conditions(model: nn.Module, n: int, prompts: list[str] | None = None) -> Tensor | list[str]:
    """n conditions: every class equally often (class models), or the prompts cycled (text models)."""
    if getattr(model.conditioner, "input_key", None) == "caption":
        if not prompts:
            raise ConfigError("prompts", prompts, "a text-conditional model needs prompts to sample for evaluation")
        return [prompts[i % len(prompts)] for i in range(n)]
    classes = getattr(model.conditioner, "num_classes", None)
    return torch.zeros(n, dtype=torch.long) if classes is None else torch.arange(n) % classes  # None: unconditional


def draw_samples(model: nn.Module, conds: Tensor | list[str], settings: SampleSettings) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] (CPU) for the conditions, in seeded batches."""
    from dpldm.modules.sampling import sample_in_batches

    return sample_in_batches(model, conds, settings.batch_size, settings.seed, settings.guidance_scale,
                             settings.num_steps, settings.solver, desc="evaluation samples")


class SharedSamples:
    """The evaluation samples of a model at one step, drawn once for every metric that asks with the same
    settings (held by a weak reference to the model: they go when it does)."""

    def __init__(self):
        self._by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module, key: tuple, draw: Callable[[], tuple]) -> tuple:
        held = self._by_model.get(model)
        if held is None or held[0] != key:  # only the current step's samples are kept
            held = (key, draw())
            self._by_model[model] = held
        return held[1]


SHARED_SAMPLES = SharedSamples()


SPLITS = ("val", "test")  # held-out splits a metric may be scored on; never the (private) training split
_STAGES = {"val": "validate", "test": "test"}


def check_splits(owner: str, splits: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``splits`` as a tuple, if they are distinct names of held-out splits (``val``, ``test``).

    Args:
        owner: the metric's class name, for the error.
        splits: the splits to score on, in logging order.
    """
    splits = tuple(splits)
    if not splits or len(set(splits)) != len(splits) or not set(splits) <= set(SPLITS):
        raise ConfigError(f"{owner}.splits", list(splits), f"must be distinct held-out splits out of {list(SPLITS)}")
    return splits


def real_images(datamodule: object, max_items: int | None = None, split: str = "test") -> tuple[Tensor, Tensor | None]:
    """Real held-out images of one split of a DataModule (a latent cache serves its source's): images and
    labels (if any).

    Args:
        datamodule: the run's DataModule.
        max_items: at most this many images (``None``: all).
        split: ``test`` or ``val``.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from dpldm.metrics.downstream import load_images

    if datamodule is None:
        raise ConfigError("data", None, "evaluation against real images needs the run's DataModule")
    try:
        datamodule.setup(_STAGES[split])
        loader = getattr(datamodule, f"{split}_dataloader")()
    except (MisconfigurationException, NotImplementedError):  # e.g. a stream of shards with no test split
        loader = None
    if not loader:
        raise ConfigError("splits", split, f"{type(datamodule).__name__} has no {split} images to compare with "
                          "(set the metric's splits to one the data has, e.g. [val] with val_shards, or give FID "
                          "a reference_dir)")
    return load_images(loader, max_items)


def held_out(datamodule: object, splits: tuple[str, ...], max_items: int | None) -> dict[str, tuple]:
    """``{split: (images, labels)}``; refuses val and test splits that are the same images (choosing on such
    a val split would choose on the test split).

    Args:
        datamodule: the run's DataModule.
        splits: the splits to load.
        max_items: at most this many images per split (``None``: all).
    """
    real = {split: real_images(datamodule, max_items, split) for split in splits}
    if "val" in real and "test" in real:
        val, test = real["val"][0], real["test"][0]
        if val.shape == test.shape and torch.equal(val, test):
            raise ConfigError("splits", list(splits), f"{type(datamodule).__name__}'s val and test splits are the "
                              "same images: give the data a separate val split, or score on test only")
    return real


class SampleMetric(L.Callback):
    """Base class: draws (shared) samples, scores them, logs ``<split>/<name>`` for each split to every logger.

    Args:
        num_samples: samples per evaluation.
        every_n_epochs: also evaluate every n epochs (0: only at the end of fit).
        sampling: how samples are drawn (default :class:`SampleSettings`).
        splits: the data's held-out splits to score against (``val``, ``test``; default ``[test]``).
    """

    name = "metric"
    prompts: list[str] | None = None

    def __init__(self, num_samples: int, every_n_epochs: int = 0, sampling: SampleSettings | None = None,
                 splits: list[str] | None = None):
        if num_samples < 1:
            raise ConfigError(f"{type(self).__name__}.num_samples", num_samples, "must be >= 1")
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.sampling = sampling or SampleSettings()
        self.splits = check_splits(type(self).__name__, ["test"] if splits is None else splits)
        self.last: dict[str, float] | None = None
        self.history: list[list[float]] = []

    def keys(self) -> list[str]:
        """The keys this metric logs, one per split."""
        return [f"{split}/{self.name}" for split in self.splits]

    def compute(self, model: nn.Module, datamodule: object, images: Tensor, conds: Tensor | list[str]) -> dict:
        """Score samples ``images`` drawn for ``conds``; returns ``{log key: value}``."""
        raise NotImplementedError

    def samples(self, model: nn.Module, step: int) -> tuple[Tensor, Tensor | list[str]]:
        """Samples for this metric, shared with the other metrics of the same step and settings."""
        conds = conditions(model, self.num_samples, self.prompts)
        key = (step, self.num_samples, repr(self.sampling), tuple(conds) if isinstance(conds, list) else "labels")
        return SHARED_SAMPLES.get(model, key, lambda: (draw_samples(model, conds, self.sampling), conds))

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
                logger.log_table(f"tables/{self.name}", columns=["step", *values], data=self.history)
        # shown without any logger too (`--trainer.logger=false`), beside the DP-SGD summary: never lost
        rank_zero_info(f"{type(self).__name__} at step {max(step, 0)}: "
                       + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()))
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
    """Train a small CNN on labelled samples, test it on real held-out images (DP-LDM / DPDM protocol): the
    classifier is trained once per evaluation and tested on every split.

    Args:
        num_samples: labelled synthetic training images (every class equally often).
        epochs: classifier training epochs.
        test_samples: real images used per split (``None``: all).
        every_n_epochs: also evaluate every n epochs (0: only at the end of fit).
        sampling: how samples are drawn.
        splits: the held-out splits to test on (``[val, test]``: ``val/downstream_acc`` to choose on,
            ``test/downstream_acc`` to report); default ``[test]``.
        image_size: score at this side (samples and real images resized, antialiased), e.g. 28 for the MNIST
            family as DPImageBench scores it; ``None``: the model's output size.
        width: channel width of the classifier (:class:`~dpldm.metrics.downstream.SmallCNN`).
        per_class: also log the accuracy on each class's real images, ``<split>/downstream_acc/class_<k>``: which
            classes the generator draws badly (a diagnostic; the headline number stays the overall accuracy).
    """

    name = "downstream_acc"

    def __init__(self, num_samples: int = 5000, epochs: int = 10, test_samples: int | None = None,
                 every_n_epochs: int = 0, sampling: SampleSettings | None = None, splits: list[str] | None = None,
                 image_size: int | None = None, width: int = 32, per_class: bool = False):
        super().__init__(num_samples, every_n_epochs, sampling, splits)
        if image_size is not None and image_size < 8:
            raise ConfigError("DownstreamAccuracy.image_size", image_size, "must be >= 8 (the classifier pools 3 times)")
        self.epochs, self.test_samples, self.image_size, self.width = epochs, test_samples, image_size, width
        self.per_class = per_class

    def resize(self, images: Tensor) -> Tensor:
        """Images [N, C, H, W] at the scoring side."""
        from dpldm.metrics.downstream import resize

        return images if self.image_size is None else resize(images, self.image_size)

    def compute(self, model: nn.Module, datamodule: object, images: Tensor, conds: Tensor | list[str]) -> dict:
        from dpldm.metrics import downstream

        if not isinstance(conds, Tensor) or getattr(model.conditioner, "num_classes", None) is None:
            raise ConfigError("DownstreamAccuracy", type(model.conditioner).__name__, "needs a class-conditional model")
        real = held_out(datamodule, self.splits, self.test_samples)
        for split, (x, y) in real.items():
            if y is None or x.shape[1:] != images.shape[1:]:
                raise ConfigError("DownstreamAccuracy", split, f"needs labelled real images of the samples' shape "
                                  f"{tuple(images.shape[1:])}; the {split} split has {tuple(x.shape[1:])}"
                                  + (" without labels" if y is None else ""))
        classifier = downstream.train_classifier(self.resize(images), conds, model.conditioner.num_classes,
                                                 epochs=self.epochs, width=self.width, seed=self.sampling.seed)
        values = {}
        for split, (x, y) in real.items():
            pred = downstream.predict(classifier, self.resize(x))  # [M]
            values[f"{split}/{self.name}"] = downstream.fraction_correct(pred, y)
            if self.per_class:
                per_class = downstream.per_class_accuracy(pred, y, model.conditioner.num_classes)
                values.update({f"{split}/{self.name}/class_{k}": acc for k, acc in enumerate(per_class)})
        return values


class FID(SampleMetric):
    """Fréchet distance of samples to real images, computed the clean-fid way. The samples' features are
    computed once per evaluation; each reference's statistics once (then kept).

    Args:
        extractor: features of images in [-1, 1] (default: clean-fid's Inception, downloaded once);
            e.g. :func:`dpldm.metrics.public_classifier_features` offline.
        reference: clean-fid's precomputed statistics by name (e.g. ``cifar10``; Inception only): logged as
            ``ref/<name>``.
        reference_split: their split (``train`` / ``test``).
        reference_resolution: their resolution.
        reference_dir: a folder of reference images instead (``ref/<name>`` too).
        stats_path: reference statistics file, written once and reused (one reference: with the run's data,
            one split).
        reference_samples: real images used per split when the reference is the run's data (``None``: all).
        name: the metric's name in its keys (``fid``; e.g. ``fid_glyph`` for a non-Inception extractor).
        num_samples: generated images per evaluation.
        every_n_epochs: also evaluate every n epochs (0: only at the end of fit).
        sampling: how samples are drawn.
        splits: the run's held-out splits to compare with (default ``[test]``); not with ``reference`` or
            ``reference_dir``.
    """

    def __init__(self, extractor: nn.Module | None = None, reference: str | None = None, reference_split: str = "train",
                 reference_resolution: int = 32, reference_dir: str | None = None, stats_path: str | None = None,
                 reference_samples: int | None = None, name: str = "fid", num_samples: int = 10_000,
                 every_n_epochs: int = 0, sampling: SampleSettings | None = None, splits: list[str] | None = None):
        from dpldm.metrics.fid import FID as FIDScore

        super().__init__(num_samples, every_n_epochs, sampling, splits)
        self.external = reference is not None or reference_dir is not None
        if self.external and splits is not None:
            raise ConfigError("FID.splits", splits, "compare with the run's data splits or with reference / "
                              "reference_dir, not both")
        if stats_path is not None and not self.external and len(self.splits) > 1:
            raise ConfigError("FID.stats_path", stats_path, f"caches one reference; splits {list(self.splits)} "
                              "are several: leave stats_path unset")
        self.name, self.reference_samples = name, reference_samples
        self.metric = FIDScore(extractor, reference, reference_split, reference_resolution, reference_dir, stats_path)
        self._stats: dict = {}

    def keys(self) -> list[str]:
        return [f"ref/{self.name}"] if self.external else super().keys()

    def references(self, datamodule: object) -> dict:
        """``{log key: reference statistics}``, each computed once."""
        if self.external:
            return {f"ref/{self.name}": self.metric.reference_stats()}
        for split in self.splits:
            if split not in self._stats:
                self._stats[split] = self._split_stats(datamodule, split)
        return {f"{split}/{self.name}": self._stats[split] for split in self.splits}

    def _split_stats(self, datamodule: object, split: str) -> object:
        if self.metric.stats_path is not None:  # one split (checked): the file is its cache
            needs = self.metric.needs_images()
            return self.metric.reference_stats(real_images(datamodule, self.reference_samples, split)[0]
                                               if needs else None)
        return self.metric.stats(real_images(datamodule, self.reference_samples, split)[0])

    def compute(self, model: nn.Module, datamodule: object, images: Tensor, conds: Tensor | list[str]) -> dict:
        from dpldm.metrics.fid import frechet_distance

        references = self.references(datamodule)
        samples = self.metric.stats(images)  # once, for every reference
        return {key: frechet_distance(samples, reference) for key, reference in references.items()}


class CLIPScore(SampleMetric):
    """CLIP score of samples and their prompts, 100 * max(cos, 0), with an open_clip model. It reads no real
    images: logged as ``prompts/clip_score``.

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

    name = "clip_score"

    def __init__(self, prompts: list[str] | None = None, prompts_file: str | None = None, model_name: str = "ViT-B-32",
                 pretrained: str | None = "laion2b_s34b_b79k", checkpoint: str | None = None,
                 num_samples: int = 1000, every_n_epochs: int = 0, sampling: SampleSettings | None = None):
        super().__init__(num_samples, every_n_epochs, sampling)
        if prompts_file is not None:
            from dpldm.utils.files import read_prompts

            prompts = read_prompts(prompts_file, "CLIPScore.prompts_file")
        if not prompts:
            raise ConfigError("CLIPScore.prompts", prompts, "give prompts or a non-empty prompts_file")
        self.prompts = prompts
        self.model_name, self.pretrained, self.checkpoint = model_name, pretrained, checkpoint
        self._scorer = None

    def keys(self) -> list[str]:
        return [f"prompts/{self.name}"]

    def compute(self, model: nn.Module, datamodule: object, images: Tensor, conds: Tensor | list[str]) -> dict:
        from dpldm.metrics.clip_score import CLIPScore as Scorer

        if self._scorer is None:
            self._scorer = Scorer(self.model_name, self.pretrained, self.checkpoint)
            log.info("CLIP score with %s", self._scorer.description)
        return {self.keys()[0]: self._scorer(images, list(conds))}
