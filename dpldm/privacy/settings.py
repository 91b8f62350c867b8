"""DP-SGD settings of one fine-tuning stage, and the checks that run before any private data is read."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from dpldm.errors import ConfigError
from dpldm.privacy.accounting import AccountantKind

FIELD = "model.init_args.privacy.init_args"


def prior_releases(n: int) -> str:
    """'1 prior release', '4 prior releases': how every report names the declared releases."""
    return f"{n} prior release{'s' * (n != 1)}"


@dataclass(frozen=True)
class PriorRelease:
    """DP-SGD steps spent on the same private training set before this run, by a release this run depends on:
    a run whose result chose this run's settings (hyperparameter selection is a function of the runs it compared,
    so it costs their privacy; Papernot & Steinke, 2022), or an earlier stage trained on the same data.

    Args:
        noise_multiplier: its sigma.
        sample_rate: its Poisson rate q.
        steps: its DP-SGD steps T.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int


class DifferentialPrivacy:
    """DP-SGD (Abadi et al., 2016) with Poisson sampling: clip each example's whole gradient to norm C,
    sum, add N(0, sigma^2 C^2), divide by the expected batch size qN.

    Args:
        epsilon: target epsilon; with ``noise_multiplier`` unset, sigma is calibrated so that the planned
            steps spend exactly this; training stops before a step would exceed it.
        delta: target delta; must be in (0, 1/N). ``None``: 1 / (10 N).
        max_grad_norm: per-example clipping norm C.
        noise_multiplier: sigma; set it to train with a fixed sigma (``epsilon`` then only stops training).
        accountant: ``prv`` (default) or ``rdp``.
        max_physical_batch_size: examples per forward/backward; a logical (Poisson) batch is split into
            physical micro-batches of at most this size, clipped per example, and stepped once.
        secure_mode: Opacus's Gaussian noise robust to floating-point attacks (Holohan & Braghin, 2021; slower),
            from a generator re-seeded with 64 bits of OS entropy at every step, and Poisson sampling from the
            OS's cryptographically secure generator. Excludes ``seed``.
        seed: seed of the Poisson sampler and of the noise; ``None`` draws one from the OS (recommended:
            a seeded run replays the same noise if its seed leaks).
        log_private_metrics: log the training/validation loss of private batches. Off by default: those
            aggregates are not differentially private. Turning it on is a declared leak.
        clipping: how per-example gradient norms and the clipped sum are computed (same result):
            ``fast`` (ghost or instantiated norms per Linear layer or convolution, whichever is cheaper, and
            book-keeping: no per-example gradients where they are not needed), ``ghost`` (ghost norms for
            every Linear layer and convolution), ``hooks`` (Opacus's per-example gradients for every layer).
        prior: releases on the same private set that this run depends on (:class:`PriorRelease`), composed
            into every epsilon: sigma is calibrated so that they and this run together spend ``epsilon``, and
            the reported epsilon is theirs and this run's together.
    """

    def __init__(self, epsilon: float | None = 10.0, delta: float | None = None, max_grad_norm: float = 1.0,
                 noise_multiplier: float | None = None, accountant: AccountantKind = "prv",
                 max_physical_batch_size: int = 64, secure_mode: bool = False, seed: int | None = None,
                 log_private_metrics: bool = False, clipping: Literal["fast", "ghost", "hooks"] = "fast",
                 prior: list[PriorRelease] | None = None):
        self.epsilon, self.delta, self.max_grad_norm = epsilon, delta, max_grad_norm
        self.noise_multiplier, self.accountant = noise_multiplier, accountant
        self.max_physical_batch_size, self.secure_mode, self.seed = max_physical_batch_size, secure_mode, seed
        self.log_private_metrics, self.clipping = log_private_metrics, clipping
        self.prior = list(prior or [])
        check_settings(self)

    def prior_segments(self) -> list[tuple[float, float, int]]:
        """``prior`` as the accountant's (sigma, q, steps) segments."""
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.prior]


def check_settings(dp: DifferentialPrivacy) -> None:
    """Checks that need no data (run at construction)."""
    if dp.epsilon is None and dp.noise_multiplier is None:
        raise ConfigError(f"{FIELD}.epsilon", None, "set epsilon (to calibrate sigma) or noise_multiplier")
    if dp.epsilon is not None and not dp.epsilon > 0:
        raise ConfigError(f"{FIELD}.epsilon", dp.epsilon, "must be > 0")
    if not dp.max_grad_norm > 0:
        raise ConfigError(f"{FIELD}.max_grad_norm", dp.max_grad_norm, "must be > 0 (the clipping norm C)")
    if dp.noise_multiplier is not None and not dp.noise_multiplier >= 0:
        raise ConfigError(f"{FIELD}.noise_multiplier", dp.noise_multiplier, "must be >= 0")
    if dp.accountant not in ("prv", "rdp"):
        raise ConfigError(f"{FIELD}.accountant", dp.accountant, "must be 'prv' or 'rdp'")
    if dp.clipping not in ("fast", "ghost", "hooks"):
        raise ConfigError(f"{FIELD}.clipping", dp.clipping, "must be 'fast', 'ghost' or 'hooks'")
    if dp.secure_mode and dp.seed is not None:
        raise ConfigError(f"{FIELD}.seed", dp.seed, "must be null with secure_mode: a seed makes the noise and the "
                          "sampling reproducible by whoever learns it")
    if dp.max_physical_batch_size < 1:
        raise ConfigError(f"{FIELD}.max_physical_batch_size", dp.max_physical_batch_size, "must be >= 1")
    for i, r in enumerate(dp.prior):
        if not r.noise_multiplier > 0:
            raise ConfigError(f"{FIELD}.prior[{i}].noise_multiplier", r.noise_multiplier, "must be > 0")
        if not 0 < r.sample_rate <= 1:
            raise ConfigError(f"{FIELD}.prior[{i}].sample_rate", r.sample_rate, "must be in (0, 1]")
        if not r.steps >= 1:
            raise ConfigError(f"{FIELD}.prior[{i}].steps", r.steps, "must be >= 1")


@dataclass(frozen=True)
class PrivacyPlan:
    """The numbers a DP run is accounted with: q = B / N, sigma, delta, planned steps T."""

    num_samples: int
    expected_batch_size: int
    sample_rate: float
    delta: float
    planned_steps: int


def plan(dp: DifferentialPrivacy, num_samples: int, expected_batch_size: int, max_steps: int,
         max_epochs: int | None) -> PrivacyPlan:
    """Checks that need the data size and trainer limits; returns the accounting plan.

    Args:
        dp: the settings.
        num_samples: N, the size of the private training set.
        expected_batch_size: the logical batch size B (``data.init_args.batch_size``).
        max_steps: ``trainer.max_steps`` (-1: unset).
        max_epochs: ``trainer.max_epochs``; an epoch is 1/q steps.
    """
    if num_samples < 1:
        raise ConfigError("data", num_samples, "a DP stage needs a non-empty training set of known size N")
    q = expected_batch_size / num_samples
    if not 0 < q <= 1:
        raise ConfigError("data.init_args.batch_size", expected_batch_size,
                          f"sample rate q = batch_size / N = {q:.4g} must be in (0, 1] (N = {num_samples})")
    delta = dp.delta if dp.delta is not None else 1.0 / (10 * num_samples)
    if not 0 < delta < 1.0 / num_samples:
        raise ConfigError(f"{FIELD}.delta", delta, f"must be in (0, 1/N) = (0, {1.0 / num_samples:.3g})")
    if delta > 1.0 / (10 * num_samples):
        warnings.warn(f"{FIELD}.delta = {delta:.3g} is above 1/(10N) = {1.0 / (10 * num_samples):.3g}; "
                      "a delta close to 1/N permits leaking a whole example with that probability")
    if max_steps is not None and max_steps > 0:
        steps = max_steps
    elif max_epochs is not None and max_epochs > 0:
        steps = max_epochs * int(1 / q)
    else:
        raise ConfigError("trainer.max_steps", max_steps, "a DP stage needs max_steps or max_epochs to plan sigma")
    return PrivacyPlan(num_samples, expected_batch_size, q, delta, steps)


def check_private_data(datamodule: object, private_training: bool, allow_non_private: bool,
                       field: str = "model.init_args.privacy") -> None:
    """A fit on data not marked public must be DP, unless declared (a private stage without DP is the worst
    bug a DP framework can ship).

    Args:
        datamodule: the fit's data; public when it has ``public = True`` (a latent cache: its source's).
        private_training: whether the fit runs DP-SGD.
        allow_non_private: the config's declaration that a non-private fit on this data is intended.
        field: the config field that turns DP on.
    """
    if private_training or allow_non_private or datamodule is None or getattr(datamodule, "public", False):
        return
    name = type(getattr(datamodule, "source", datamodule)).__name__
    raise ConfigError(field, None, f"{name} is not marked public, and training on it without DP-SGD leaks it: set "
                      f"{field} (DifferentialPrivacy), or declare model.init_args.allow_non_private: true "
                      "(a non-private baseline, or data you know to be public)")


def _is_ddp(strategy: object) -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(strategy, DDPStrategy)


def check_trainer(trainer: object) -> None:
    """Trainer settings that would break DP-SGD's accounting."""
    if getattr(trainer, "accumulate_grad_batches", 1) != 1:
        raise ConfigError("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches,
                          "must be 1 with DP: Poisson sampling draws each logical batch at once "
                          f"(split it with {FIELD}.max_physical_batch_size instead)")
    connector = getattr(trainer, "_accelerator_connector", None)
    if connector is not None and connector.use_distributed_sampler:
        raise ConfigError("trainer.use_distributed_sampler", True,
                          "must be false for DP stages: Lightning would replace the Poisson sampler")
    if getattr(trainer, "world_size", 1) > 1 and not _is_ddp(getattr(trainer, "strategy", None)):
        raise ConfigError("trainer.strategy", type(trainer.strategy).__name__,
                          "DP on several devices needs Lightning's DDP strategy (ddp, ddp_spawn, ddp_notebook): "
                          "dpldm sums the clipped gradients over ranks and adds the noise once")
    if str(getattr(trainer, "precision", "32-true")).startswith("16"):
        raise ConfigError("trainer.precision", trainer.precision,
                          "fp16 loss scaling does not compose with per-example clipping; use 32-true or bf16-mixed")
    if getattr(trainer, "gradient_clip_val", None):
        raise ConfigError("trainer.gradient_clip_val", trainer.gradient_clip_val,
                          f"must be unset with DP: clipping is per example ({FIELD}.max_grad_norm)")

