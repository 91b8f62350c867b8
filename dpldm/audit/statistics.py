"""Statistics of an empirical privacy audit in one training run (plain numpy/scipy, no Lightning).

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023): m canaries are
each included in the training set independently with probability 1/2. After training, an auditor guesses
IN or OUT for r of them (abstaining on the rest) from a membership score. Under the null hypothesis
"training is (eps, delta)-DP", the number of correct guesses V is stochastically dominated by a
Binomial(r, e^eps / (1 + e^eps)) up to a delta term (their Theorem 3), which gives a p-value; the largest
eps whose p-value is at most 1 - confidence is a lower bound on the epsilon of the training run that
holds with that confidence. It must never exceed the accountant's epsilon; a small one proves nothing.

Also the plain loss-threshold membership inference metrics (AUC, TPR at a low FPR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import special, stats

from dpldm.errors import ConfigError


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] under an (eps, delta)-DP null (Steinke et al. 2023, Theorem 3).

    With q = e^eps / (1 + e^eps) (the accuracy of eps-DP randomized response) and
    f(u) = P[Binomial(r, q) >= u], the theorem bounds

        P[V >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i,

    where f(v - i) - f(v) = P[v - i <= Binomial(r, q) < v]. With delta = 0 this is the binomial tail.

    Args:
        m: number of canaries, each included independently with probability 1/2.
        r: number of guesses (canaries the auditor did not abstain on), 0 <= r <= m.
        v: number of correct guesses, 0 <= v <= r.
        eps: epsilon of the null hypothesis (>= 0).
        delta: delta of the null hypothesis, in [0, 1].

    Returns:
        The p-value, in [0, 1].
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m = {m}, r = {r}, v = {v}")
    if not eps >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got eps = {eps}, delta = {delta}")
    q = float(special.expit(eps))  # e^eps / (1 + e^eps), without overflow for large eps
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    slack = 0.0
    if v > 0 and delta > 0:
        # Theorem 3's delta term: window[i-1] = P[v - i <= Binomial(r, q) <= v - 1], i = 1..v.
        window = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))  # [v]
        slack = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * slack)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95,
                        tol: float = 1e-6) -> float:
    """The largest eps rejected at the given confidence: p_value(m, r, v, eps, delta) <= 1 - confidence.

    Rejecting eps also rejects every smaller eps ((eps', delta)-DP with eps' < eps implies (eps, delta)-DP),
    so the returned value is a lower bound on the run's epsilon with probability >= ``confidence``.
    Found by bisection, as in Steinke et al.; 0 when not even eps = 0 is rejected.

    Args:
        m: number of canaries.
        r: number of guesses.
        v: number of correct guesses.
        delta: the delta the bound is for (the accountant's delta, to compare with its epsilon).
        confidence: e.g. 0.95.
        tol: bisection tolerance on eps.

    Returns:
        The epsilon lower bound (>= 0).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence}: must be in (0, 1)")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= level:  # p -> 1 as eps -> inf (v <= r): the bracket ends
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:
            return lo
    while hi - lo > tol:  # invariant: p(lo) <= level < p(hi)
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) <= level:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditResult:
    """The outcome of :func:`one_run_audit`.

    Args:
        m: number of canaries.
        r: guesses made (k IN + k OUT).
        v: correct guesses.
        eps_lb: epsilon lower bound at ``confidence`` (Bonferroni-corrected over ``tried`` values of k).
        k: guesses per side of the reported (best) choice.
        confidence: the overall confidence level.
        tried: how many values of k were tried (the Bonferroni factor).
    """

    m: int
    r: int
    v: int
    eps_lb: float
    k: int
    confidence: float
    tried: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def default_guesses(m: int) -> list[int]:
    """Guesses per side tried by default: k ~ m/40, m/20, m/10, m/4 and m/2 (5 %, 10 %, 20 %, 50 % and
    100 % of the canaries guessed), distinct and >= 1.

    Args:
        m: number of canaries (>= 2).
    """
    return sorted({max(1, int(m * f) // 2) for f in (0.05, 0.1, 0.2, 0.5, 1.0)})


def one_run_audit(scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = 0.95,
                  guesses: Sequence[int] | None = None) -> AuditResult:
    """Guess IN for the k highest scores and OUT for the k lowest, then lower-bound epsilon.

    Steinke et al.'s auditor abstains on the middle of the ranking. Trying several k and keeping the best
    is itself a multiple test: each k is tested at level (1 - confidence) / K for K tried values (the
    Bonferroni correction), so the reported bound holds with probability >= ``confidence`` overall.

    Args:
        scores: membership score per canary [m]; higher means "more likely trained on".
        included: the secret mask [m]: canary i was in the training set.
        delta: the delta the bound is for.
        confidence: overall confidence, e.g. 0.95.
        guesses: values of k (guesses per side) to try, each with 2k <= m; default :func:`default_guesses`.

    Returns:
        The best (largest eps_lb) choice of k; the largest k when no k gives a positive bound.
    """
    s, mask = np.asarray(scores, dtype=float).ravel(), np.asarray(included, dtype=bool).ravel()
    m = len(s)
    if len(mask) != m or m < 2:
        raise ValueError(f"need >= 2 canaries and one mask entry per score ({m} scores, {len(mask)} mask entries)")
    if not np.all(np.isfinite(s)):
        raise ValueError("membership scores must be finite")
    ks = sorted({int(k) for k in (guesses if guesses is not None else default_guesses(m))})
    if not ks or ks[0] < 1 or 2 * ks[-1] > m:
        raise ConfigError("guesses", ks, f"each k must satisfy 1 <= k and 2k <= m = {m}")
    per_test = 1.0 - (1.0 - confidence) / len(ks)  # Bonferroni: split the error probability over the K tests
    order = np.argsort(-s, kind="stable")  # indices by decreasing score [m]; ties keep canary order
    best: AuditResult | None = None
    for k in reversed(ks):  # largest k first: with no positive bound, report the guesses about all canaries
        v = int(mask[order[:k]].sum() + (~mask[order[m - k:]]).sum())  # IN guesses right + OUT guesses right
        eps = epsilon_lower_bound(m, 2 * k, v, delta, per_test)
        if best is None or eps > best.eps_lb:
            best = AuditResult(m, 2 * k, v, eps, k, confidence, len(ks))
    return best


# The non-private control must show leakage, or the audit proves nothing (the attack could not tell the
# included canaries from the excluded ones even without DP): a bound of at least MIN_CONTROL_EPS_LB and a
# membership AUC of at least MIN_CONTROL_AUC.
MIN_CONTROL_EPS_LB = 0.1
MIN_CONTROL_AUC = 0.55


def control_shows_leakage(eps_lb: float, auc: float) -> bool:
    """Whether the non-private control's numbers show that the attack detects membership at all.

    A control whose bound is ~0, or whose AUC is ~0.5 (or below, or undefined), shows none: then a small
    bound of the DP run is no evidence of privacy, only of a weak attack.

    Args:
        eps_lb: the control's epsilon lower bound.
        auc: the control's membership AUC (NaN when undefined).
    """
    return eps_lb >= MIN_CONTROL_EPS_LB and auc >= MIN_CONTROL_AUC  # NaN AUC: False


def membership_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """ROC AUC of the threshold attack "member iff score > tau" (NaN when one class is missing).

    Args:
        scores: membership score per record; higher means "more likely a member".
        labels: true membership.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, np.asarray(scores, dtype=float)))


def tpr_at_fpr(scores: Sequence[float], labels: Sequence[bool], fpr: float = 0.01) -> float:
    """True-positive rate of the best threshold attack whose false-positive rate is at most ``fpr``.

    Thresholds are the observed scores (no interpolation between ROC points), so with n non-members an
    FPR below 1/n allows no false positive at all (Carlini et al., 2022, "Membership Inference Attacks
    From First Principles": report the low-FPR regime).

    Args:
        scores: membership score per record; higher means "more likely a member".
        labels: true membership.
        fpr: the largest allowed false-positive rate.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        return math.nan
    fprs, tprs, _ = roc_curve(y, np.asarray(scores, dtype=float), drop_intermediate=False)
    return float(tprs[fprs <= fpr + 1e-12].max())
