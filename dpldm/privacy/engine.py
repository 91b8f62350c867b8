"""The DP-SGD step (Abadi et al., 2016) for the trainable scope, with Opacus underneath (plain PyTorch).

One logical step over a Poisson batch of n examples (expected size B = qN):

  for each physical micro-batch:   loss_i = mean_k l(x_i, t_ik, eps_ik)    (K draws -> one loss per example)
                                   backward of sum_i loss_i
                                   ||g_i|| over all trained parameters at once (g_i: the *whole* gradient
                                   of example i, its K rows together); c_i = min(1, C / ||g_i||)
                                   add sum_i c_i g_i to the running sum
  noise:  g = (sum_i c_i g_i + N(0, sigma^2 C^2 I)) / B, once                (Opacus DPOptimizer)
  account one step of the subsampled Gaussian mechanism (q, sigma).

``clipping: fast`` (default) and ``ghost`` get norms and the clipped sum from layer inputs and output
gradients (dpldm.privacy.clipping: ghost norms, book-keeping), never materialising per-example gradients
of Linear layers and convolutions where ghost norms are cheaper; ``hooks`` uses Opacus's per-example
gradients of every layer. All give the same update.
Only the trained modules get any per-sample work.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dpldm.errors import ConfigError
from dpldm.privacy.accounting import PrivacyAccountant, calibrate_noise, epsilon_for, max_steps_within
from dpldm.privacy.clipping import BookKeepingClipper, SummedGradDPOptimizer, full_precision
from dpldm.privacy.distributed import GlobalBatchNoise
from dpldm.privacy.sampling import poisson_loader
from dpldm.privacy.settings import FIELD, DifferentialPrivacy, PrivacyPlan, prior_releases

# Opacus's backward hooks on the first trained layer, whose inputs need no gradient: expected, harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


def derive_seed(seed: int, *parts: int) -> int:
    """A deterministic seed per (run seed, resume step, purpose): distinct streams, never replayed."""
    return hash((seed, *parts)) & 0x7FFF_FFFF_FFFF_FFFF


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & 0x7FFF_FFFF_FFFF_FFFF


def micro_batches(batch: dict, size: int) -> Iterator[dict]:
    """Split a batch dict (tensors or lists, batch-first) into physical micro-batches."""
    n = len(next(iter(batch.values())))
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in batch.items()}


class NoisyDPOptimizer(GlobalBatchNoise, DPOptimizer):
    """Opacus's DPOptimizer (per-example gradients from hooks), noise once for the global batch under DDP."""


class NoisySummedGradDPOptimizer(GlobalBatchNoise, SummedGradDPOptimizer):
    """The book-keeping clipped sum's optimizer, noise once for the global batch under DDP."""


def zero_nonfinite_samples(params: Sequence[nn.Parameter], num_examples: int) -> int:
    """Zero the per-example gradients of examples with a non-finite entry in any trained parameter.

    A zeroed example contributes nothing (as if clipped to norm 0): a function of that example alone,
    so the step stays DP. Returns how many were zeroed.
    """
    bad = torch.zeros(num_examples, dtype=torch.bool, device=params[0].device)
    for p in params:
        bad |= ~torch.isfinite(p.grad_sample.reshape(num_examples, -1)).all(1)
    if bad.any():
        for p in params:
            p.grad_sample[bad] = 0
    return int(bad.sum())


def fold_noise_draws(params: Sequence[nn.Parameter], num_examples: int, noise_draws: int) -> None:
    """Turn the per-row gradients of the last backward into per-example gradients and append them.

    The UNet sees each example K times (rows of one example adjacent); the conditioner may see it once.
    Rows of one example are summed: that is the gradient of its (K-averaged) loss. Under bf16-mixed autocast
    the grad samplers return bf16: clipping and noise then run in the fp32 of the master weights.
    """
    for p in params:
        gs = p.grad_sample
        done, new = (gs[:-1], gs[-1]) if isinstance(gs, list) else ([], gs)
        new = new.to(p.dtype)
        if new.shape[0] == num_examples * noise_draws and noise_draws > 1:
            new = new.view(num_examples, noise_draws, *new.shape[1:]).sum(1)
        elif new.shape[0] != num_examples:
            raise RuntimeError(f"per-sample gradient with {new.shape[0]} rows for {num_examples} examples")
        p.grad_sample = torch.cat([*done, new]) if done else new


class DPSGDEngine:
    """Per-example clipping, noise and accounting for one DP fine-tuning run.

    Args:
        settings: the DP settings.
        plan: N, q, delta and the planned number of steps.
        trained: top modules whose parameters are trained (from the trainable scope).
        start_step: optimizer steps already taken (non-zero when resuming), to derive fresh seeds.
        rank: this process's global rank under DDP (each rank samples its own shard, own stream).
    """

    def __init__(self, settings: DifferentialPrivacy, plan: PrivacyPlan, trained: Sequence[nn.Module],
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        self.settings, self.plan, self.rank, self.world_size = settings, plan, rank, world_size
        self.nonfinite_examples = 0  # examples whose gradient was not finite, zeroed (a private count: not logged)
        self.params = [p for m in trained for p in m.parameters() if p.requires_grad]
        self.accountant = PrivacyAccountant(settings.accountant, plan.delta, settings.prior_segments())
        self.noise_multiplier, self.budget_steps = self._budget()
        self.seed = settings.seed if settings.seed is not None else fresh_seed()
        self.noise_generator = torch.Generator()
        self.reseed(start_step)
        if settings.clipping == "hooks":
            self.clipper = None
            self._hooks = [GradSampleHooks(m, batch_first=True, loss_reduction="sum", strict=True) for m in trained]
        else:
            self._hooks = []
            self.clipper = BookKeepingClipper(trained, "ghost" if settings.clipping == "ghost" else "auto")

    def _budget(self) -> tuple[float, int | None]:
        """sigma for the steps still planned, and the total steps the target epsilon allows (``None``: no
        target), both after the steps already accounted: a resumed run with a longer plan spends the budget
        that is left, never the whole budget again."""
        s, p, done = self.settings, self.plan, self.accountant.steps
        if s.prior and s.epsilon is not None:  # invariant 7: a budget the declared releases already spent
            spent = self.accountant.prior_epsilon()
            if spent >= s.epsilon:
                raise ConfigError(f"{FIELD}.prior", s.prior, f"already spends epsilon = "
                                  f"{spent:.4g} >= epsilon = {s.epsilon} at delta = {p.delta:.3g}: no budget is "
                                  "left for this run")
        if s.noise_multiplier is not None:
            return float(s.noise_multiplier), self._steps_allowed(float(s.noise_multiplier))
        try:
            sigma = calibrate_noise(s.epsilon, p.delta, p.sample_rate, max(p.planned_steps - done, 1), s.accountant,
                                    self.accountant.composed)
        except ValueError as err:
            raise ConfigError(f"{FIELD}.epsilon", s.epsilon, f"leaves no budget for more steps: the {done} steps "
                              f"already taken spend epsilon = {self.accountant.epsilon():.4g} ({err})") from None
        return sigma, self._steps_allowed(sigma)

    def describe(self) -> str:
        """The plan in one line, as a DP fit starts: N, B and q, T, sigma and where it comes from, (epsilon, delta),
        the accountant, C."""
        s, p, done = self.settings, self.plan, self.accountant.steps
        sigma = (f"sigma = {self.noise_multiplier:.4g} (set)" if s.noise_multiplier is not None else
                 f"sigma = {self.noise_multiplier:.4g} (calibrated)")
        target = f"target epsilon = {s.epsilon:g}" if s.epsilon is not None else "no epsilon target"
        resumed = f", {done} already taken" if done else ""
        if s.prior:  # what the declared releases spent, composed before this run's first step
            resumed += (f", after {prior_releases(len(s.prior))} "
                        f"(epsilon = {self.accountant.prior_epsilon():.4g})")
        return (f"DP-SGD plan: N = {p.num_samples:,}, expected batch B = {p.expected_batch_size:,} (Poisson, q = "
                f"{p.sample_rate:.4g}), T = {p.planned_steps:,} steps{resumed}, {sigma}, {target} at delta = "
                f"{p.delta:.3g} ({s.accountant.upper()} accountant), C = {s.max_grad_norm:g}")

    def _steps_allowed(self, sigma: float) -> int | None:
        """Total steps (those taken included) within the target epsilon at sigma, up to the plan."""
        s, p, done = self.settings, self.plan, self.accountant.steps
        if s.epsilon is None:
            return None
        extra = max_steps_within(s.epsilon, sigma, p.sample_rate, p.delta, s.accountant,
                                 limit=p.planned_steps - done, history=self.accountant.composed)
        if extra == 0 and done == 0:  # invariant 7: fail fast rather than train 0 steps and exit 0
            one = epsilon_for(sigma, p.sample_rate, 1, p.delta, s.accountant)
            raise ConfigError(f"{FIELD}.noise_multiplier", s.noise_multiplier,
                              f"is too small for even one step: one step at q = {p.sample_rate:.4g} spends epsilon = "
                              f"{one:.4g} > epsilon = {s.epsilon} (raise noise_multiplier, or leave it unset to "
                              "calibrate sigma from epsilon)")
        return done + extra

    def resume(self, accountant_state: dict, step: int) -> None:
        """Continue the accountant of a checkpoint at optimizer step ``step``, and draw fresh sampling and noise
        streams (never a replay of the first steps). The same plan keeps its sigma (as if never interrupted);
        a changed plan (more steps, another q) gets sigma recalibrated for the steps left after the history.

        Raises:
            RuntimeError: the checkpoint's accountant and its step disagree.
        """
        planned_sigma = self.noise_multiplier  # calibrated for this plan from step 0
        self.accountant.load_state_dict(accountant_state)
        if self.accountant.steps != step:
            raise RuntimeError(f"checkpoint accounted {self.accountant.steps} DP steps at step {step}")
        if all(seg[:2] == (planned_sigma, self.plan.sample_rate) for seg in self.accountant.history):
            self.budget_steps = self._steps_allowed(planned_sigma)
        else:
            self.noise_multiplier, self.budget_steps = self._budget()
        self.reseed(step)

    def segments(self, prior: bool = False) -> list[dict]:
        """The accountant's history (``prior``: the declared prior releases instead), one
        ``{noise_multiplier, sample_rate, steps}`` per segment (privacy.json)."""
        segments = self.accountant.prior if prior else self.accountant.history
        return [{"noise_multiplier": s, "sample_rate": q, "steps": t} for s, q, t in segments]

    def reseed(self, step: int) -> None:
        self.noise_generator.manual_seed(derive_seed(self.seed, step, 1))

    def sampler_seed(self, step: int) -> int:
        """Seed of this rank's Poisson sampler from ``step`` on: independent across ranks and resumptions."""
        return derive_seed(self.seed, step, 2, self.rank)

    def train_loader(self, dataset: Dataset, num_workers: int = 0) -> DataLoader:
        """The training loader of a DP stage, the one place its batches are decided: Poisson samples at the
        accounted q = B / N over this rank's shard (:mod:`dpldm.privacy.sampling`), from this rank's stream at
        the step the accountant has reached (fresh after a resume, never a replay), secure when asked."""
        return poisson_loader(dataset, self.plan.expected_batch_size, self.sampler_seed(self.accountant.steps),
                              num_workers, rank=self.rank, world_size=self.world_size,
                              secure=self.settings.secure_mode)

    def wrap(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        """The optimizer that clips, noises and divides by B before its step."""
        opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if opt_params != {id(p) for p in self.params}:
            raise ConfigError("model.init_args.optimizer", type(optimizer).__name__,
                              "must update exactly the parameters of the trainable scope")
        device = self.params[0].device
        if self.noise_generator.device != device:
            gen = torch.Generator(device)
            gen.manual_seed(int(self.noise_generator.initial_seed()))
            self.noise_generator = gen
        kind = NoisyDPOptimizer if self.clipper is None else NoisySummedGradDPOptimizer
        return kind(optimizer, noise_multiplier=self.noise_multiplier,
                           max_grad_norm=self.settings.max_grad_norm,
                           expected_batch_size=self.plan.expected_batch_size, loss_reduction="mean",
                           generator=self.noise_generator,
                           secure_mode=self.settings.secure_mode)

    def step(self, batch: dict, per_example_loss: Callable[[dict], Tensor], optimizer: torch.optim.Optimizer,
             noise_draws: int = 1, backward: Callable[[Tensor], None] = Tensor.backward) -> tuple[float, int]:
        """One DP-SGD step over a Poisson batch (possibly empty ``{}``), in physical micro-batches.

        Each micro-batch is clipped as soon as its per-example gradients exist and only the clipped sum is
        kept (Opacus's skipped-step accumulation), so per-example gradients of one micro-batch at a time
        are ever in memory. Noise is added once, at the last micro-batch.

        Args:
            batch: the logical batch (dict of batch-first tensors or lists).
            per_example_loss: micro-batch -> loss per example [b] (K draws averaged).
            optimizer: the optimizer from :meth:`wrap` (or Lightning's wrapper around it).
            noise_draws: K, the rows per example the UNet sees.
            backward: how to backpropagate (Lightning's ``manual_backward`` for precision plugins).

        Returns:
            (sum of the per-example losses, number of examples): for declared, non-private logging only.
        """
        n = len(next(iter(batch.values()))) if batch else 0
        chunks = list(micro_batches(batch, self.settings.max_physical_batch_size)) if n else []
        if self.clipper is not None:
            total = self._bookkeeping_step(chunks, per_example_loss, optimizer, backward)
            return total, n
        dp_optimizer = getattr(optimizer, "optimizer", optimizer)  # the DPOptimizer under Lightning's wrapper
        total = 0.0
        for i, chunk in enumerate(chunks):
            loss = per_example_loss(chunk)  # [b]
            backward(loss.sum())
            fold_noise_draws(self.params, len(loss), noise_draws)
            self.nonfinite_examples += zero_nonfinite_samples(self.params, len(loss))
            total += float(loss.detach().sum())
            if i < len(chunks) - 1:  # clip and accumulate this micro-batch; no noise, no update yet
                dp_optimizer.signal_skip_step(True)
                with full_precision():
                    dp_optimizer.step()
                dp_optimizer.zero_grad(set_to_none=True)
        if not chunks:
            self.empty_batch()
        self.before_noise()
        with full_precision():
            optimizer.step()  # clip the last micro-batch, add N(0, sigma^2 C^2) once, divide by B, step
        optimizer.zero_grad(set_to_none=True)
        self.step_taken()
        return total, n

    def _bookkeeping_step(self, chunks: list[dict], per_example_loss: Callable[[dict], Tensor],
                          optimizer: torch.optim.Optimizer, backward: Callable[[Tensor], None]) -> float:
        """``fast``/``ghost``: each micro-batch's clipped sum straight from activations and output gradients."""
        total = 0.0
        self.clipper.begin()
        try:
            for chunk in chunks:
                loss = per_example_loss(chunk)  # [b]
                backward(loss.sum())
                self.nonfinite_examples += self.clipper.accumulate(len(loss), self.settings.max_grad_norm)
                total += float(loss.detach().sum())
        finally:
            self.clipper.end()
        self.before_noise()
        with full_precision():
            optimizer.step()  # add N(0, sigma^2 C^2) once to the clipped sum, divide by B, step
        optimizer.zero_grad(set_to_none=True)
        self.step_taken()
        return total

    def exhausted(self) -> bool:
        """True when one more step would exceed the target epsilon."""
        return self.budget_steps is not None and self.accountant.steps >= self.budget_steps

    def empty_batch(self) -> None:
        """A Poisson batch can be empty: the step is then pure noise (zero per-example gradients)."""
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def before_noise(self) -> None:
        """secure_mode: a fresh 64-bit seed from the OS for this step's noise."""
        if self.settings.secure_mode:
            self.noise_generator.manual_seed(fresh_seed())

    def step_taken(self) -> None:
        self.accountant.add(self.noise_multiplier, self.plan.sample_rate)

    def report(self) -> dict[str, float]:
        """What is logged next to epsilon: (q, sigma, T, delta) and the expected batch size."""
        return {"privacy/epsilon": self.accountant.epsilon(), "privacy/delta": self.plan.delta,
                "privacy/noise_multiplier": self.noise_multiplier, "privacy/sample_rate": self.plan.sample_rate,
                "privacy/steps": float(self.accountant.steps),
                "privacy/expected_batch_size": float(self.plan.expected_batch_size)}

    def detach(self) -> None:
        for h in self._hooks:
            h.remove_hooks()
        if self.clipper is not None:
            self.clipper.remove()

