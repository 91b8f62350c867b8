"""DP-SGD engine against brute force (no Lightning): per-example gradients, clipping, noise, sampling."""

import pytest
import torch
from torch.utils.data import TensorDataset

from dpldm.privacy import DifferentialPrivacy
from dpldm.privacy.engine import DPSGDEngine, fold_noise_draws, micro_batches
from dpldm.privacy.sampling import poisson_loader
from dpldm.privacy.settings import PrivacyPlan
from tests.privacy.common import batch, make_engine, make_model


def dp_per_example_grads(model, engine, data, physical):
    torch.manual_seed(123)
    for chunk in micro_batches(data, physical):
        loss = model.per_example_loss(chunk)
        loss.sum().backward()
        fold_noise_draws(engine.params, len(loss), model.noise_draws)
    return [p.grad_sample for p in engine.params]


def brute_force_grads(model, engine, data, physical=None):
    """One backward per example, with the same draws of t, noise and label dropout (same seed, same chunks)."""
    for h in engine._hooks:
        h.disable_hooks()
    torch.manual_seed(123)
    rows = []
    for chunk in micro_batches(data, physical or len(data["image"])):
        loss = model.per_example_loss(chunk)
        rows += [torch.autograd.grad(loss[i], engine.params, retain_graph=True, allow_unused=True)
                 for i in range(len(loss))]
    for h in engine._hooks:
        h.enable_hooks()
    return [torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
            for j, p in enumerate(engine.params)]


@pytest.mark.parametrize("noise_draws", [1, 3])
@pytest.mark.parametrize("kind", ["attention", "full", "lora"])
def test_per_example_gradients_match_brute_force(noise_draws, kind):
    model = make_model(noise_draws, kind)
    engine = make_engine(model, 6)
    data = batch(6)
    got = dp_per_example_grads(model, engine, data, physical=6)
    ref = brute_force_grads(model, engine, data)
    assert all(g.shape[0] == 6 for g in got)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_a_resblock_updown_unet_trained_whole_has_exact_per_example_gradients():
    """DP-LDM's UNets (ResBlock resamplers fed the time embedding by a pre-hook): Opacus's hooks still give each
    example's own gradient, resamplers included."""
    model = make_model(2, "full", updown=True)
    engine = make_engine(model, 4)
    assert any("downsamplers.0.resnet" in n for n, p in model.unet.named_parameters() if p.requires_grad)
    data = batch(4)
    for g, r in zip(dp_per_example_grads(model, engine, data, physical=4), brute_force_grads(model, engine, data)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_micro_batches_give_per_example_gradients_in_order():
    model = make_model(noise_draws=2)
    engine = make_engine(model, 7)
    data = batch(7)
    got = dp_per_example_grads(model, engine, data, physical=3)  # chunks of 3, 3, 1
    ref = brute_force_grads(model, engine, data, physical=3)
    assert all(g.shape[0] == 7 for g in got)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def _apply_dp_step(model, engine, data, lr=0.1):
    opt = engine.wrap(torch.optim.SGD(model.trainable_parameters(), lr=lr))
    dp_per_example_grads(model, engine, data, physical=len(data["image"]))
    opt.step()
    opt.zero_grad()


def test_no_noise_no_clipping_equals_a_non_private_step():
    data = batch(6)
    dp_model = make_model()
    _apply_dp_step(dp_model, make_engine(dp_model, batch_size=6, sigma=0.0, clip=1e9), data)
    plain = make_model()
    plain.dp = None
    opt = torch.optim.SGD(plain.trainable_parameters(), lr=0.1)
    torch.manual_seed(123)
    plain.per_example_loss(data).mean().backward()  # mean over n = B examples
    opt.step()
    for a, b in zip(dp_model.trainable_parameters(), plain.trainable_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_clipping_bounds_each_example_contribution():
    model = make_model()
    engine = make_engine(model, batch_size=6, sigma=0.0, clip=1e-3)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    _apply_dp_step(model, engine, batch(6), lr=1.0)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.trainable_parameters(), before)])
    assert update.norm() <= 6 * 1e-3 / 6 + 1e-6  # ||sum of clipped|| / B <= n C / B


def test_noise_std_is_sigma_c_over_b():
    model = make_model()
    sigma, clip, b = 2.0, 0.5, 8
    engine = make_engine(model, batch_size=b, sigma=sigma, clip=clip)
    opt = engine.wrap(torch.optim.SGD(model.trainable_parameters(), lr=1.0))
    engine.empty_batch()  # zero per-example gradients: the update is pure noise
    opt.pre_step()
    noise = torch.cat([p.grad.flatten() for p in engine.params])
    assert noise.numel() > 10_000
    assert noise.std().item() == pytest.approx(sigma * clip / b, rel=0.03)
    assert abs(noise.mean().item()) < 3 * sigma * clip / b / noise.numel() ** 0.5


def test_noise_does_not_repeat_across_resumes():
    model = make_model()
    engine = make_engine(model, 4)
    a = torch.randn(5, generator=engine.noise_generator)
    engine.reseed(100)
    b = torch.randn(5, generator=engine.noise_generator)
    engine.reseed(0)
    assert torch.equal(a, torch.randn(5, generator=engine.noise_generator)) and not torch.equal(a, b)


def test_poisson_batch_sizes_have_binomial_moments():
    n, q = 1000, 0.05
    loader = poisson_loader(TensorDataset(torch.arange(n)), expected_batch_size=int(q * n), seed=0)
    assert len(loader) == int(1 / q)
    sizes = torch.tensor([len(b[0]) if b else 0 for _ in range(20) for b in loader], dtype=torch.float)
    m = len(sizes)  # 400 batches
    assert abs(sizes.mean() - q * n) < 4 * (q * n * (1 - q) / m) ** 0.5
    assert sizes.var().item() == pytest.approx(q * n * (1 - q), rel=0.25)
    assert sizes.unique().numel() > 10  # sizes vary: not a fixed batch size


def test_empty_poisson_batch_collates_to_empty_dict():
    loader = poisson_loader(TensorDataset(torch.arange(3)), expected_batch_size=1, seed=0)
    loader.batch_sampler.sample_rate = 1e-9  # force empty batches
    assert next(iter(loader)) == {}


def test_engine_rejects_an_optimizer_over_other_parameters():
    from dpldm.errors import ConfigError

    model = make_model()
    engine = make_engine(model, 4)
    with pytest.raises(ConfigError, match="trainable scope"):
        engine.wrap(torch.optim.SGD(model.unet.parameters(), lr=0.1))  # includes frozen parameters


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))

    def loss(self, chunk):  # deterministic per-example loss [b]
        return (self.net(chunk["x"]) - chunk["y"]).pow(2).mean(1)


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_engine_step_is_the_same_for_any_micro_batching(sigma):
    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(9, 5, generator=g), "y": torch.randn(9, 3, generator=g)}
    results = []
    for physical in (9, 4, 1):
        model = _Tiny()
        settings = DifferentialPrivacy(noise_multiplier=sigma, epsilon=None, max_grad_norm=0.05,
                                       max_physical_batch_size=physical, seed=0)
        engine = DPSGDEngine(settings, PrivacyPlan(90, 9, 0.1, 1e-3, 10), [model.net])
        opt = engine.wrap(torch.optim.SGD(model.net.parameters(), lr=1.0))
        engine.step(data, model.loss, opt)
        assert engine.accountant.steps == 1
        results.append(torch.cat([p.detach().flatten() for p in model.net.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)  # same clipping, same noise
    torch.testing.assert_close(results[2], results[0], rtol=1e-5, atol=1e-6)


def test_engine_step_with_clipping_matches_manual_dp_sgd():
    g = torch.Generator().manual_seed(1)
    data = {"x": torch.randn(6, 5, generator=g), "y": torch.randn(6, 3, generator=g)}
    model, ref = _Tiny(), _Tiny()
    clip, expected_b = 0.05, 8
    settings = DifferentialPrivacy(noise_multiplier=0.0, epsilon=None, max_grad_norm=clip,
                                   max_physical_batch_size=4, seed=0)
    engine = DPSGDEngine(settings, PrivacyPlan(80, expected_b, 0.1, 1e-3, 10), [model.net])
    engine.step(data, model.loss, engine.wrap(torch.optim.SGD(model.net.parameters(), lr=1.0)))
    # brute force: per-example gradient, clip its whole norm to C, sum, divide by the expected B
    params = list(ref.net.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(6):
        grads = torch.autograd.grad(ref.loss({k: v[i:i + 1] for k, v in data.items()}).sum(), params)
        norm = torch.sqrt(sum(gr.pow(2).sum() for gr in grads))
        for t, gr in zip(total, grads):
            t += gr * min(1.0, clip / (norm.item() + 1e-6))
    with torch.no_grad():
        for p, t in zip(params, total):
            p -= t / expected_b
    for a, b in zip(model.net.parameters(), params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_plan_printed_at_fit_start_is_the_one_accounted():
    """N, B, q, T, the calibrated sigma, (epsilon, delta), the accountant and C: what a DP fit prints first."""
    from dpldm.privacy.accounting import calibrate_noise

    model = make_model()
    settings = DifferentialPrivacy(epsilon=3.0, max_grad_norm=0.5, seed=0)
    plan = PrivacyPlan(num_samples=1000, expected_batch_size=50, sample_rate=0.05, delta=1e-4, planned_steps=40)
    line = DPSGDEngine(settings, plan, model.trained_modules).describe()
    sigma = calibrate_noise(3.0, 1e-4, 0.05, 40, "prv")
    assert (f"N = 1,000, expected batch B = 50 (Poisson, q = 0.05), T = 40 steps, sigma = {sigma:.4g} (calibrated), "
            "target epsilon = 3 at delta = 0.0001 (PRV accountant), C = 0.5") in line


def test_sigma_is_calibrated_so_that_the_prior_releases_and_this_run_spend_epsilon():
    from dpldm.errors import ConfigError
    from dpldm.privacy import PriorRelease
    from dpldm.privacy.accounting import calibrate_noise, epsilon_for

    model = make_model()
    plan = PrivacyPlan(num_samples=1000, expected_batch_size=50, sample_rate=0.05, delta=1e-4, planned_steps=40)
    search = [PriorRelease(1.0, 0.05, 40), PriorRelease(1.2, 0.05, 40)]  # two runs a search compared
    engine = DPSGDEngine(DifferentialPrivacy(epsilon=6.0, seed=0, prior=search), plan, model.trained_modules)
    history = [(1.0, 0.05, 40), (1.2, 0.05, 40)]
    assert engine.noise_multiplier == calibrate_noise(6.0, 1e-4, 0.05, 40, "prv", history=history)
    assert engine.noise_multiplier > DPSGDEngine(DifferentialPrivacy(epsilon=6.0, seed=0), plan,
                                                 model.trained_modules).noise_multiplier
    total = epsilon_for(engine.noise_multiplier, 0.05, 40, 1e-4, "prv", history=history)
    assert 5.9 <= total <= 6.0 and engine.budget_steps == 40
    for _ in range(40):
        engine.step_taken()
    assert engine.report()["privacy/epsilon"] == pytest.approx(total)  # reported: the prior and this run
    assert "after 2 prior releases (epsilon = " in engine.describe()
    spent = epsilon_for(1.2, 0.05, 40, 1e-4, "prv", history=history[:1])
    with pytest.raises(ConfigError) as err:  # the search alone spent the budget: fail before any step
        DPSGDEngine(DifferentialPrivacy(epsilon=spent * 0.99, seed=0, prior=search), plan, model.trained_modules)
    assert err.value.field == "model.init_args.privacy.init_args.prior" and "no budget is left" in err.value.bound
