"""Privacy accounting for the subsampled Gaussian mechanism of DP-SGD (plain Python).

Accountants from Opacus: PRV (Gopi et al., 2021; numerically tight, the default) or RDP
(Mironov, 2017; Mironov et al., 2019). Calibration inverts epsilon(sigma) by bisection.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

from opacus.accountants import create_accountant
from opacus.accountants.utils import MAX_SIGMA

AccountantKind = Literal["prv", "rdp"]


Segment = tuple[float, float, int]  # (sigma, q, steps): one stretch of steps at one noise level and rate


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: AccountantKind = "prv", history: Sequence[Segment] = ()) -> float:
    """Epsilon spent by ``steps`` DP-SGD steps at sampling rate q and noise multiplier sigma, after the steps
    already accounted in ``history`` (composed)."""
    acc = PrivacyAccountant(accountant, delta)
    for segment in history:
        acc.add(*segment)
    acc.add(noise_multiplier, sample_rate, steps)
    return acc.epsilon()


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: AccountantKind = "prv", history: Sequence[Segment] = (),
                    tolerance: float = 0.01) -> float:
    """Smallest noise multiplier sigma (to ``tolerance`` in epsilon) such that ``steps`` more steps at (sigma, q)
    after ``history`` spend at most ``epsilon`` in all (Opacus's ``get_noise_multiplier`` search, with a history).

    Raises:
        ValueError: not even an enormous sigma fits (``history`` alone spends ``epsilon``, or close to it).
    """
    def spent(sigma: float) -> float:
        return epsilon_for(sigma, sample_rate, steps, delta, accountant, history)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP's "optimal order is the largest alpha" during the search
        low, high, eps_high = 0.0, 10.0, float("inf")
        while eps_high > epsilon:
            high *= 2
            if high > MAX_SIGMA:
                raise ValueError(f"no noise multiplier up to {MAX_SIGMA:g} keeps epsilon <= {epsilon} "
                                 f"(already spent before these steps: {epsilon_for(0, sample_rate, 0, delta, accountant, history):.4g})")
            eps_high = spent(high)
        while epsilon - eps_high > tolerance:
            mid = (low + high) / 2
            eps = spent(mid)
            if eps < epsilon:
                high, eps_high = mid, eps
            else:
                low = mid
    return high


def max_steps_within(epsilon: float, noise_multiplier: float, sample_rate: float, delta: float,
                     accountant: AccountantKind = "prv", limit: int = 10_000_000,
                     history: Sequence[Segment] = ()) -> int:
    """Largest T <= ``limit`` with epsilon(history + T steps at (sigma, q), delta) <= epsilon (0 if not even one
    more step fits).

    Pass the planned number of steps as ``limit``: accounting millions of steps (a generous epsilon at a
    large sigma) is slow and memory-hungry, and no run takes more steps than it plans.
    """
    def fits(t: int) -> bool:
        return epsilon_for(noise_multiplier, sample_rate, t, delta, accountant, history) <= epsilon

    if noise_multiplier == 0 or limit < 1 or not fits(1):
        return 0
    if fits(limit):
        return limit
    lo, hi = 1, 2
    while hi < limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit)
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class PrivacyAccountant:
    """Tracks the steps actually taken; its state goes into every checkpoint.

    Args:
        kind: ``prv`` or ``rdp``.
        delta: the delta at which epsilon is reported.
        prior: (sigma, q, steps) segments spent on the same private set before this run, by releases this run
            depends on (e.g. the runs a hyperparameter search compared): composed into ``epsilon()``, never
            counted in ``steps`` or ``history`` (this run's own).
    """

    def __init__(self, kind: AccountantKind, delta: float, prior: Sequence[Segment] = ()):
        self.kind, self.delta = kind, delta
        self.prior: list[Segment] = [tuple(seg) for seg in prior]
        self._acc = create_accountant(kind)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps (merged into the history's last entry when (sigma, q) match)."""
        if steps <= 0:
            return
        hist = self._acc.history
        if hist and hist[-1][:2] == (noise_multiplier, sample_rate):
            hist[-1] = (noise_multiplier, sample_rate, hist[-1][2] + steps)
        else:
            hist.append((noise_multiplier, sample_rate, steps))

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self._acc.history)

    def epsilon(self) -> float:
        """Epsilon at ``delta`` of the prior segments and this run's steps, composed."""
        segments = self.composed
        if not any(t > 0 for _, _, t in segments):
            return 0.0
        if any(sigma == 0 for sigma, _, t in segments if t > 0):
            return float("inf")
        acc = create_accountant(self.kind)
        acc.history = [seg for seg in segments if seg[2] > 0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(delta=self.delta))

    @property
    def history(self) -> list[Segment]:
        """Every (sigma, q, steps) segment this run accounted so far, in order."""
        return [tuple(h) for h in self._acc.history]

    def prior_epsilon(self) -> float:
        """Epsilon at ``delta`` of the prior segments alone."""
        return PrivacyAccountant(self.kind, self.delta, self.prior).epsilon()

    @property
    def composed(self) -> list[Segment]:
        """The prior segments, then this run's: what every epsilon (reported or calibrated) is composed over."""
        return [*self.prior, *self.history]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "delta": self.delta, "history": [tuple(h) for h in self._acc.history],
                "prior": [tuple(h) for h in self.prior]}

    def load_state_dict(self, state: dict) -> None:
        """Continue a checkpoint's accountant; its prior must be this run's (a resume never drops a release)."""
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint accountant is {state['kind']!r}, this run uses {self.kind!r}")
        saved = [tuple(h) for h in state.get("prior", [])]
        if saved != self.prior:
            raise ValueError(f"checkpoint accountant composes the prior segments {saved}, this run declares "
                             f"{self.prior} (model.init_args.privacy.init_args.prior)")
        self.delta = state["delta"]
        self._acc.history = [tuple(h) for h in state["history"]]
