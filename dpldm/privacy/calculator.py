"""``dpldm privacy``: epsilon for (q, sigma, T, delta), or the sigma that spends a target epsilon. Trains nothing."""

from __future__ import annotations

import argparse
import json

from dpldm.privacy.accounting import calibrate_noise, epsilon_for


def main(argv: list[str] | None = None) -> dict:
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
    parser.add_argument("--delta", type=float, required=True)
    parser.add_argument("--accountant", choices=["prv", "rdp"], default="prv")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    a = parser.parse_args(argv)
    for name, ok, bound in [("--sample-rate", 0 < a.sample_rate <= 1, "in (0, 1]"), ("--steps", a.steps >= 1, ">= 1"),
                            ("--delta", 0 < a.delta < 1, "in (0, 1)"),
                            ("--noise-multiplier", a.noise_multiplier is None or a.noise_multiplier >= 0, ">= 0"),
                            ("--epsilon", a.epsilon is None or a.epsilon > 0, "> 0")]:
        if not ok:
            parser.error(f"{name} must be {bound}")
    if a.noise_multiplier is not None:
        sigma = a.noise_multiplier
        eps = epsilon_for(sigma, a.sample_rate, a.steps, a.delta, a.accountant)
        print(f"epsilon = {eps:.4f}  (q = {a.sample_rate}, sigma = {sigma}, T = {a.steps}, delta = {a.delta}, "
              f"{a.accountant.upper()})")
    else:
        sigma = calibrate_noise(a.epsilon, a.delta, a.sample_rate, a.steps, a.accountant)
        eps = epsilon_for(sigma, a.sample_rate, a.steps, a.delta, a.accountant)
        print(f"noise_multiplier = {sigma:.4f}  spends epsilon = {eps:.4f} (target {a.epsilon}; q = {a.sample_rate}, "
              f"T = {a.steps}, delta = {a.delta}, {a.accountant.upper()})")
    result = {"epsilon": eps, "noise_multiplier": sigma, "sample_rate": a.sample_rate, "steps": a.steps,
              "delta": a.delta, "accountant": a.accountant}
    if a.json:
        print(json.dumps(result))
    return result
