import pytest

from dpldm.privacy.accounting import PrivacyAccountant, calibrate_noise, epsilon_for, max_steps_within


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_calibrated_sigma_spends_the_target(kind):
    q, steps, delta = 64 / 1437, 200, 1e-4
    sigma = calibrate_noise(10.0, delta, q, steps, kind)
    eps = epsilon_for(sigma, q, steps, delta, kind)
    assert 9.9 <= eps <= 10.0
    assert epsilon_for(sigma * 0.9, q, steps, delta, kind) > 10.0  # the smallest sigma that fits


def test_max_steps_within_is_the_boundary():
    sigma, q, delta = 1.0, 0.05, 1e-5
    t = max_steps_within(5.0, sigma, q, delta, "rdp")
    assert epsilon_for(sigma, q, t, delta, "rdp") <= 5.0 < epsilon_for(sigma, q, t + 1, delta, "rdp")
    assert max_steps_within(5.0, sigma, q, delta, "rdp", limit=t + 1) == t
    assert max_steps_within(5.0, sigma, q, delta, "rdp", limit=t - 3) == t - 3  # capped at the planned steps


def test_a_generous_budget_is_not_accounted_to_millions_of_steps():
    # (uncapped, this searched up to millions of steps: minutes and over 10 GB for the PRV accountant)
    assert max_steps_within(50.0, 2.0, 0.0124, 1e-4, "prv", limit=100) == 100


def test_accountant_merges_history_and_round_trips():
    acc = PrivacyAccountant("prv", 1e-5)
    for _ in range(30):
        acc.add(1.1, 0.01)
    assert acc.steps == 30 and acc.state_dict()["history"] == [(1.1, 0.01, 30)]
    eps = acc.epsilon()
    assert eps == pytest.approx(epsilon_for(1.1, 0.01, 30, 1e-5, "prv"))
    other = PrivacyAccountant("prv", 1e-5)
    other.load_state_dict(acc.state_dict())
    assert other.epsilon() == eps
    with pytest.raises(ValueError, match="rdp"):
        PrivacyAccountant("rdp", 1e-5).load_state_dict(acc.state_dict())


def test_no_noise_means_infinite_epsilon():
    acc = PrivacyAccountant("rdp", 1e-5)
    assert acc.epsilon() == 0.0
    acc.add(0.0, 0.1)
    assert acc.epsilon() == float("inf")


def test_calibration_after_a_history_spends_the_budget_left():
    from opacus.accountants.utils import get_noise_multiplier

    from dpldm.privacy.accounting import calibrate_noise

    q, delta = 0.05, 1e-5
    # No history: Opacus's own search, to the same number.
    assert calibrate_noise(8.0, delta, q, 100, "rdp") == get_noise_multiplier(
        target_epsilon=8.0, target_delta=delta, sample_rate=q, steps=100, accountant="rdp")
    history = [(1.0, q, 60)]
    spent = epsilon_for(1.0, q, 60, delta, "rdp")
    sigma = calibrate_noise(8.0, delta, q, 100, "rdp", history=history)
    total = epsilon_for(sigma, q, 100, delta, "rdp", history=history)
    assert spent < total <= 8.0 and 8.0 - total <= 0.01 + 1e-9
    with pytest.raises(ValueError, match="no noise multiplier"):
        calibrate_noise(spent * 0.9, delta, q, 10, "rdp", history=history)  # the history alone spends more


def test_steps_within_the_budget_count_the_history():
    q, delta = 0.05, 1e-5
    history = [(1.0, q, 60)]
    extra = max_steps_within(8.0, 1.5, q, delta, "rdp", history=history, limit=5_000)
    assert 0 < extra < 5_000
    assert (epsilon_for(1.5, q, extra, delta, "rdp", history=history) <= 8.0
            < epsilon_for(1.5, q, extra + 1, delta, "rdp", history=history))
    assert extra < max_steps_within(8.0, 1.5, q, delta, "rdp", limit=5_000)


def test_prior_releases_compose_into_epsilon_but_not_into_this_runs_steps():
    """A hyperparameter search's runs (declared as prior) count in every epsilon, never as steps taken."""
    prior = [(0.5, 0.01, 100), (0.7, 0.03, 20)]
    acc = PrivacyAccountant("prv", 1e-5, prior)
    assert acc.epsilon() == pytest.approx(acc.prior_epsilon()) and acc.steps == 0 and acc.history == []
    for _ in range(30):
        acc.add(1.1, 0.01)
    brute = PrivacyAccountant("prv", 1e-5)  # the same segments, all accounted as steps
    for segment in [*prior, (1.1, 0.01, 30)]:
        brute.add(*segment)
    assert acc.epsilon() == pytest.approx(brute.epsilon()) and acc.steps == 30
    assert acc.prior_epsilon() < acc.epsilon() and acc.history == [(1.1, 0.01, 30)]
    other = PrivacyAccountant("prv", 1e-5, prior)  # a resume with the same prior continues the same epsilon
    other.load_state_dict(acc.state_dict())
    assert other.epsilon() == pytest.approx(acc.epsilon())
    with pytest.raises(ValueError, match="prior"):  # a resume never drops (or changes) a declared release
        PrivacyAccountant("prv", 1e-5).load_state_dict(acc.state_dict())
    legacy = {k: v for k, v in PrivacyAccountant("prv", 1e-5).state_dict().items() if k != "prior"}
    PrivacyAccountant("prv", 1e-5).load_state_dict(legacy)  # checkpoints from before `prior` existed
