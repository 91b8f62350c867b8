"""Privacy accounting for the subsampled Gaussian mechanism of DP-SGD (plain Python).

Accountants from Opacus: PRV (Gopi et al., 2021; numerically tight, the default) or RDP
(Mironov, 2017; Mironov et al., 2019). Calibration inverts epsilon(sigma) by bisection.
"""

from __future__ import annotations

import warnings
from typing import Literal

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

AccountantKind = Literal["prv", "rdp"]


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: AccountantKind = "prv") -> float:
    """Epsilon spent by ``steps`` DP-SGD steps at sampling rate q and noise multiplier sigma."""
    acc = PrivacyAccountant(accountant, delta)
    acc.add(noise_multiplier, sample_rate, steps)
    return acc.epsilon()


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: AccountantKind = "prv") -> float:
    """Smallest noise multiplier sigma (to 0.01 in epsilon) with epsilon(sigma, q, T, delta) <= epsilon."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP's "optimal order is the largest alpha" during the search
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant))


def max_steps_within(epsilon: float, noise_multiplier: float, sample_rate: float, delta: float,
                     accountant: AccountantKind = "prv", limit: int = 10_000_000) -> int:
    """Largest T <= ``limit`` with epsilon(sigma, q, T, delta) <= epsilon (0 if not even one step fits).

    Pass the planned number of steps as ``limit``: accounting millions of steps (a generous epsilon at a
    large sigma) is slow and memory-hungry, and no run takes more steps than it plans.
    """
    def fits(t: int) -> bool:
        return epsilon_for(noise_multiplier, sample_rate, t, delta, accountant) <= epsilon

    if noise_multiplier == 0 or not fits(1):
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
    """

    def __init__(self, kind: AccountantKind, delta: float):
        self.kind, self.delta = kind, delta
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
        if self.steps == 0:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self._acc.history):
            return float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(self._acc.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict:
        return {"kind": self.kind, "delta": self.delta, "history": [tuple(h) for h in self._acc.history]}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint accountant is {state['kind']!r}, this run uses {self.kind!r}")
        self.delta = state["delta"]
        self._acc.history = [tuple(h) for h in state["history"]]
