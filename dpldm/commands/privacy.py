"""``dpldm privacy``: epsilon for (q, sigma, T, delta), or the sigma that spends a target epsilon. Trains nothing.

Bad values exit with status 2 and ``dpldm privacy: error: --FLAG must be BOUND``. With ``--json`` stdout holds
one JSON object and nothing else.

A delta so large that the mechanism already satisfies (0, delta)-DP (delta at least the total-variation
distance between the output distributions on neighbouring datasets) makes both accountants solve to a
*negative* epsilon (e.g. -0.63 at delta = 0.5): such a delta guarantees nothing, and the calculator refuses
it rather than print a meaningless epsilon. Meaningful deltas lie far below 1/N.
"""

from __future__ import annotations

import argparse
import json
import math

from dpldm.privacy.accounting import calibrate_noise, epsilon_for


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpldm privacy", description="DP-SGD privacy calculator (subsampled Gaussian mechanism).",
        epilog="examples:\n  dpldm privacy --sample-rate 0.01 --noise-multiplier 1.1 --steps 10000 --delta 1e-5\n"
               "  dpldm privacy --sample-rate 0.01 --epsilon 10 --steps 10000 --delta 1e-5 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample-rate", type=float, required=True, help="q = expected batch size / N")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--noise-multiplier", type=float, help="sigma: print the epsilon it spends")
    group.add_argument("--epsilon", type=float, help="target epsilon: print the sigma that spends it")
    parser.add_argument("--steps", type=int, required=True, help="T, the number of DP-SGD steps")
    parser.add_argument("--delta", type=float, required=True, help="delta, in (0, 1); far below 1/N to mean much")
    parser.add_argument("--accountant", choices=["prv", "rdp"], default="prv")
    parser.add_argument("--json", action="store_true", help="print only one JSON object")
    return parser


def _positive_finite(x: float | None) -> bool:
    return x is None or (math.isfinite(x) and x > 0)


def _check(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Exit with status 2 naming the first flag outside its bound (NaN fails every bound).

    Args:
        parser: the parser (its ``error`` prints the message and exits).
        a: the parsed arguments.
    """
    for name, ok, bound in [("--sample-rate", 0 < a.sample_rate <= 1, "in (0, 1]"), ("--steps", a.steps >= 1, ">= 1"),
                            ("--delta", 0 < a.delta < 1, "in (0, 1)"),
                            ("--noise-multiplier", _positive_finite(a.noise_multiplier),
                             "finite and > 0 (sigma = 0 is not private: epsilon = inf)"),
                            ("--epsilon", _positive_finite(a.epsilon), "finite and > 0")]:
        if not ok:
            parser.error(f"{name} must be {bound}")


def _solve(parser: argparse.ArgumentParser, a: argparse.Namespace) -> tuple[float, float]:
    """(sigma, epsilon) of the request; exits with status 2 when no meaningful answer exists.

    Args:
        parser: the parser (its ``error`` prints the message and exits).
        a: the checked arguments.
    """
    sigma = a.noise_multiplier
    if sigma is None:
        try:
            sigma = calibrate_noise(a.epsilon, a.delta, a.sample_rate, a.steps, a.accountant)
        except ValueError as err:  # not even an enormous sigma spends so little
            parser.error(f"--epsilon must be larger: at q = {a.sample_rate:g}, T = {a.steps}, "
                         f"delta = {a.delta:g}, {err}")
    eps = epsilon_for(sigma, a.sample_rate, a.steps, a.delta, a.accountant)
    if eps < 0:
        parser.error(f"--delta must be small enough that epsilon > 0: at --delta {a.delta:g} the mechanism already "
                     f"satisfies (0, delta)-DP, so the {a.accountant.upper()} accountant returns a meaningless "
                     f"epsilon = {eps:.3g}; such a delta guarantees nothing (use delta far below 1/N, e.g. 1e-5)")
    return sigma, eps


def _text(a: argparse.Namespace, sigma: float, eps: float) -> str:
    if a.noise_multiplier is not None:
        return (f"epsilon = {eps:.4f}  (q = {a.sample_rate}, sigma = {sigma}, T = {a.steps}, delta = {a.delta}, "
                f"{a.accountant.upper()})")
    return (f"noise_multiplier = {sigma:.4f}  spends epsilon = {eps:.4f} (target {a.epsilon}; q = {a.sample_rate}, "
            f"T = {a.steps}, delta = {a.delta}, {a.accountant.upper()})")


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``dpldm privacy``.

    Args:
        argv: command-line arguments after ``privacy``.

    Returns:
        ``{"epsilon", "noise_multiplier", "sample_rate", "steps", "delta", "accountant"}``.
    """
    parser = _parser()
    a = parser.parse_args(argv)
    _check(parser, a)
    sigma, eps = _solve(parser, a)
    result = {"epsilon": eps, "noise_multiplier": sigma, "sample_rate": a.sample_rate, "steps": a.steps,
              "delta": a.delta, "accountant": a.accountant}
    print(json.dumps(result, allow_nan=False) if a.json else _text(a, sigma, eps))
    return result
