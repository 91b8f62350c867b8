"""Long DP runs survive: a SIGKILL-ed run resumes from its last checkpoint to the same steps and epsilon;
non-finite per-example gradients are zeroed (still DP) and counted; secure_mode runs."""

import glob
import json
import time

import pytest
import torch

from dpldm.privacy import epsilon_for
from tests.privacy.common import batch, dp_update, make_engine, make_model
from tests.privacy.tiny_fit import dpldm, tiny_dp_config


def _step_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_sigkill_mid_epoch_then_ckpt_path_last_resumes_to_the_same_steps_and_epsilon(tmp_path):
    steps = 12  # an epoch is 1/q ~ 80 steps: every checkpoint is mid-epoch
    throttle = {"class_path": "tests.privacy.tiny_fit.Throttle", "init_args": {"seconds": 0.3}}
    every_2 = {"class_path": "dpldm.callbacks.ResumableCheckpoint", "init_args": {"every_n_train_steps": 2}}
    cfg = tiny_dp_config(tmp_path / "run", max_steps=steps, callbacks=[throttle, every_2])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"

    job = dpldm("fit", "--config", cfg, "--ckpt_path", "last", wait=False)  # no checkpoint yet: starts afresh
    deadline = time.time() + 300
    while not (last.exists() and _step_of(last) >= 4) and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # (safe to read while the run writes: the file is replaced atomically)
    job.kill()  # SIGKILL: no handler, no on-exception checkpoint
    output = job.communicate()[0]
    assert job.returncode == -9, output[-3000:]
    assert "no last checkpoint available" in output
    killed_at = _step_of(last)
    assert 4 <= killed_at < steps and not list(last.parent.glob("*.part"))

    done = dpldm("fit", "--config", cfg, "--ckpt_path", "last")
    assert done.returncode == 0, done.stderr[-5000:]
    assert "Restoring states from the checkpoint path" in done.stdout + done.stderr
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == steps
    sigma, q, t = final["privacy"]["accountant"]["history"][0]
    assert final["privacy"]["accountant"]["history"] == [(sigma, q, steps)]  # one run's steps, accounted once
    report = json.load(open(glob.glob(str(tmp_path / "run" / "logs" / "version_1" / "privacy.json"))[0]))
    delta = report["privacy/delta"]
    assert report["privacy/steps"] == steps
    assert report["privacy/epsilon"] == pytest.approx(epsilon_for(sigma, q, steps, delta), rel=1e-9)
    assert report["privacy/epsilon"] <= 8.0


@pytest.mark.parametrize("clipping, kind", [("fast", "attention"), ("hooks", "attention"), ("fast", "full")])
def test_a_non_finite_example_is_zeroed_and_counted(clipping, kind):
    """An example whose gradient is NaN contributes nothing: the update is the one with its loss weighted 0
    (``full``: the k x k convolutions' clipped sums too)."""
    data = batch(6)
    poisoned = {k: v.clone() for k, v in data.items()}
    poisoned["image"][2] = float("nan")
    updates = {}
    for name, d in (("poisoned", poisoned), ("weighted 0", data)):
        model = make_model(1, kind)
        engine = make_engine(model, 6, sigma=0.0, clip=0.5, clipping=clipping, physical=4)
        if name == "weighted 0":
            model.per_example_loss = _zero_weight_first_chunk_row(model.per_example_loss, 2)
        updates[name] = dp_update(model, engine, d, 1)
        assert engine.nonfinite_examples == (1 if name == "poisoned" else 0)
    assert torch.isfinite(updates["poisoned"]).all() and updates["poisoned"].abs().max() > 1e-4
    torch.testing.assert_close(updates["poisoned"], updates["weighted 0"], rtol=1e-4, atol=1e-6)


def _zero_weight_first_chunk_row(loss_fn, row):
    """The loss with row ``row`` of the first micro-batch weighted 0 (the same random draws for all rows)."""
    calls = []

    def wrapped(chunk):
        loss = loss_fn(chunk)
        calls.append(1)
        if len(calls) > 1:
            return loss
        weight = torch.ones_like(loss)
        weight[row] = 0
        return loss * weight
    return wrapped


def test_secure_mode_trains_and_draws_fresh_noise(tmp_path):
    """secure_mode: no seed, OS-seeded noise and sampling: two identical runs end in different weights."""
    from tests.privacy.common import data, dp_model, trainer

    weights = []
    for run in ("a", "b"):
        model = dp_model(seed=None, secure_mode=True)
        trainer(tmp_path / run, 2, enable_checkpointing=False).fit(model, data())
        assert model.dp.accountant.steps == 2
        weights.append(torch.cat([p.detach().flatten() for p in model.trainable_parameters()]))
    assert not torch.equal(*weights)


@pytest.mark.parametrize("declared", [False, True])
def test_the_non_finite_count_stays_off_the_console_unless_declared(declared):
    """How many private examples had a non-finite gradient is a statistic of the private data."""
    import warnings

    model = make_model(1)
    engine = make_engine(model, 6)
    model.privacy.log_private_metrics = declared
    engine.nonfinite_examples = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.on_train_end()
    shown = [str(w.message) for w in caught if "not finite" in str(w.message)]
    assert (len(shown) == 1 and shown[0].startswith("3 per-example")) if declared else shown == []
