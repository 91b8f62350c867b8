"""The statistics of the one-run audit (Steinke, Nasr & Jagielski 2023) against brute force."""

import math

import numpy as np
import pytest

from dpldm.errors import ConfigError
from dpldm.audit.statistics import (
    MIN_CONTROL_AUC, MIN_CONTROL_EPS_LB, control_shows_leakage, default_guesses, epsilon_lower_bound, membership_auc,
    one_run_audit, p_value, tpr_at_fpr,
)


def binomial_tail(r: int, v: int, q: float) -> float:
    """P[Binomial(r, q) >= v], summed term by term."""
    return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1))


def theorem3(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The bound of Theorem 3 written out literally: f(v) + 2 m delta max_i (f(v - i) - f(v)) / i."""
    q = math.exp(eps) / (1 + math.exp(eps))
    f = [binomial_tail(r, u, q) for u in range(v + 1)]
    slack = max([(f[v - i] - f[v]) / i for i in range(1, v + 1)], default=0.0)
    return min(1.0, f[v] + 2 * m * delta * slack)


@pytest.mark.parametrize("r, v, eps", [(10, 7, 0.0), (20, 15, 0.5), (50, 45, 2.0), (30, 0, 1.0), (12, 12, 3.0)])
def test_without_delta_the_p_value_is_the_binomial_tail(r, v, eps):
    q = math.exp(eps) / (1 + math.exp(eps))  # eps-DP randomized response's accuracy
    assert p_value(100, r, v, eps, 0.0) == pytest.approx(binomial_tail(r, v, q), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("m, r, v, eps, delta", [(100, 20, 16, 0.5, 1e-3), (1000, 60, 50, 1.0, 1e-5),
                                                 (50, 50, 40, 0.2, 1e-2), (200, 10, 10, 2.0, 1e-4)])
def test_the_delta_term_matches_theorem_3_written_out(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(theorem3(m, r, v, eps, delta), rel=1e-9)
    assert p_value(m, r, v, eps, delta) >= p_value(m, r, v, eps, 0.0)  # delta only weakens the test


def test_the_bound_is_the_largest_rejected_epsilon():
    m, r, v, delta = 1000, 200, 170, 1e-5
    eps = epsilon_lower_bound(m, r, v, delta, 0.95)
    assert eps > 0
    assert p_value(m, r, v, eps, delta) <= 0.05 < p_value(m, r, v, eps + 1e-3, delta)


def test_chance_level_guesses_give_zero():
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 0, 1e-5) == 0.0


def test_perfect_guesses_give_a_positive_bound_that_grows_with_r():
    bounds = [epsilon_lower_bound(10_000, r, r, 1e-6) for r in (10, 30, 100, 300, 1000)]
    assert bounds[0] > 0.5 and all(a < b for a, b in zip(bounds, bounds[1:]))
    # r perfect guesses reject eps while q^r <= 0.05 (delta = 0): eps_lb = -log(0.05^(-1/r) - 1)
    assert epsilon_lower_bound(10_000, 100, 100, 0.0) == pytest.approx(-math.log(0.05 ** (-1 / 100) - 1), abs=1e-4)


def test_randomized_response_at_a_known_epsilon_is_rarely_overestimated():
    """Canaries through eps-DP randomized response: the 95 % bound exceeds eps at most ~5 % of the time."""
    rng = np.random.default_rng(0)
    eps, m, trials = 1.0, 500, 300
    q = math.exp(eps) / (1 + math.exp(eps))
    over, bounds = 0, []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        released = np.where(rng.random(m) < q, included, ~included)  # each bit: eps-DP randomized response
        scores = released + 0.01 * rng.random(m)  # post-processing: ties broken independently of the bits
        result = one_run_audit(scores, included, delta=0.0, confidence=0.95, guesses=[m // 2])
        over += result.eps_lb > eps
        bounds.append(result.eps_lb)
    assert over / trials <= 0.08  # 5 % nominal; 3 standard errors of slack for 300 trials
    assert np.mean(bounds) > 0.5  # and the audit is not vacuous: it usually sees most of eps (0.79 on average)


def test_bonferroni_over_the_tried_k():
    rng = np.random.default_rng(1)
    included = rng.random(400) < 0.5
    scores = included + rng.normal(0, 0.7, 400)
    one = one_run_audit(scores, included, 1e-5, 0.95, guesses=[50])
    several = one_run_audit(scores, included, 1e-5, 0.95, guesses=[10, 25, 50, 100, 200])
    assert several.tried == 5 and one.tried == 1
    assert one.eps_lb == pytest.approx(epsilon_lower_bound(400, one.r, one.v, 1e-5, 0.95), abs=1e-6)
    # the reported k is tested at level 0.05 / 5
    assert several.eps_lb == pytest.approx(epsilon_lower_bound(400, several.r, several.v, 1e-5, 0.99), abs=1e-6)
    top = np.argsort(-scores)[:several.k]
    bottom = np.argsort(-scores)[-several.k:]
    assert several.v == included[top].sum() + (~included[bottom]).sum() and several.r == 2 * several.k


def test_default_guesses_and_bad_inputs():
    assert default_guesses(256) == [6, 12, 25, 64, 128] and default_guesses(3) == [1]
    with pytest.raises(ConfigError, match="2k <= m"):
        one_run_audit(np.arange(10.0), np.arange(10) < 5, 0.0, guesses=[6])
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="one mask entry per score"):
        one_run_audit(np.arange(10.0), np.arange(9) < 5, 0.0)


def test_auc_of_separated_and_of_random_scores():
    labels = np.array([0, 0, 0, 1, 1, 1], bool)
    assert membership_auc([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], labels) == 1.0
    assert membership_auc([0.9, 0.8, 0.7, 0.3, 0.2, 0.1], labels) == 0.0
    rng = np.random.default_rng(0)
    assert membership_auc(rng.random(4000), rng.random(4000) < 0.5) == pytest.approx(0.5, abs=0.03)
    assert math.isnan(membership_auc([0.1, 0.2], [True, True]))


def test_tpr_at_fpr_by_hand():
    # members score 0.9, 0.7, 0.6, 0.3; non-members 0.8, 0.5, 0.4, 0.2, 0.1, 0.05 (6 of them)
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    labels = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    assert tpr_at_fpr(scores, labels, 0.01) == 0.25  # no false positive allowed: only 0.9 is flagged
    assert tpr_at_fpr(scores, labels, 0.2) == 0.75  # one (1/6): threshold 0.6 flags 0.9, 0.8, 0.7, 0.6
    assert tpr_at_fpr(scores, labels, 0.5) == 1.0  # three (3/6): down to 0.3


def test_the_control_shows_leakage_only_with_a_positive_bound_and_an_auc_above_chance():
    assert control_shows_leakage(1.5, 0.97)
    assert not control_shows_leakage(0.0, 0.97)  # the bound is ~0: the attack proved nothing even without DP
    assert not control_shows_leakage(MIN_CONTROL_EPS_LB / 2, 0.9)
    assert not control_shows_leakage(1.0, 0.5)  # AUC at chance
    assert not control_shows_leakage(1.0, MIN_CONTROL_AUC - 0.01)
    assert not control_shows_leakage(0.0, math.nan)
    # a real audit: separable scores show leakage, scores independent of the mask do not
    rng = np.random.default_rng(0)
    included = rng.random(128) < 0.5
    strong = one_run_audit(included + rng.normal(0, 0.2, 128), included, 1e-5)
    assert control_shows_leakage(strong.eps_lb, membership_auc(included + rng.normal(0, 0.2, 128), included))
    noise = rng.normal(0, 1, 128)
    assert not control_shows_leakage(one_run_audit(noise, included, 1e-5).eps_lb, membership_auc(noise, included))
