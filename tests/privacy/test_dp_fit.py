"""DP fine-tuning through Lightning: frozen parts untouched, epsilon as accounted, resume continues it."""

import copy
import csv

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dpldm.datamodules import DigitsDataModule
from dpldm.errors import ConfigError
from dpldm.privacy import TrainableScope, epsilon_for
from tests.privacy.common import data, dp_model, trainer


@pytest.mark.parametrize("kind", ["attention", "lora"])
def test_only_the_scope_changes_and_optimizer_matches_requires_grad(tmp_path, kind):
    model = dp_model(TrainableScope(kind))
    before = copy.deepcopy(model.state_dict())
    t = trainer(tmp_path, 3, enable_checkpointing=False)
    t.fit(model, data())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    in_opt = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed and changed <= trained  # everything outside the scope is bit-identical
    assert not any("resnets" in n for n in trained) and not model.autoencoder.training
    assert model.dp.accountant.steps == 3
    if kind == "lora":  # no UNet weight trained: only the adapters (and the class embedding)
        assert all(".lora_" in n for n in trained if n.startswith("unet."))
        assert any(".lora_B." in n for n in changed)
        model.export_pretrained(str(tmp_path / "export"))  # merged: a plain diffusers UNet
        from diffusers import UNet2DConditionModel

        exported = UNet2DConditionModel.from_pretrained(str(tmp_path / "export" / "unet"))
        assert not any("lora" in n for n in exported.state_dict())
        x, t = torch.randn(2, 4, 4, 4), torch.tensor([5, 500])
        ctx = model.conditioner(torch.tensor([1, 2]))
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(exported(x, t, encoder_hidden_states=ctx).sample,
                                       model.unet(x, t, encoder_hidden_states=ctx).sample, rtol=1e-4, atol=1e-5)
        reloaded = dp_model(TrainableScope(kind))  # as load_run rebuilds a run: adapters first, then the weights
        reloaded.load_state_dict(model.state_dict())  # strict: the same adapter keys
        assert all(torch.equal(v, model.state_dict()[n]) for n, v in reloaded.state_dict().items())


def _logged(tmp_path):
    rows = list(csv.DictReader(open(next(tmp_path.glob("logs/version_*/metrics.csv")))))
    return [r for r in rows if r.get("privacy/epsilon")][-1]


def test_logged_epsilon_is_the_accountants_for_the_logged_parameters(tmp_path):
    model = dp_model()
    trainer(tmp_path, 4, enable_checkpointing=False).fit(model, data())
    row = _logged(tmp_path)
    q, sigma, steps, delta = (float(row[f"privacy/{k}"]) for k in ("sample_rate", "noise_multiplier", "steps", "delta"))
    assert steps == 4 and q == pytest.approx(16 / DigitsDataModule().num_train_samples)
    assert float(row["privacy/epsilon"]) == pytest.approx(epsilon_for(sigma, q, int(steps), delta, "prv"), rel=1e-6)
    assert float(row["privacy/epsilon"]) <= 8.0
    assert "train/loss" not in row or not row["train/loss"]  # private losses are not logged by default
    import yaml

    hparams = yaml.safe_load(open(next(tmp_path.glob("logs/version_*/hparams.yaml"))))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert hparams["scope/trained_parameters"] == trained and 0 < hparams["scope/reduction"] < 1


class Kill(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.at:
            raise KeyboardInterrupt  # like a killed job: Lightning stops, the last checkpoint stays


def test_kill_and_resume_gives_the_same_final_epsilon_and_steps(tmp_path):
    full = dp_model()
    trainer(tmp_path / "a", 6, enable_checkpointing=False).fit(full, data())

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    first = dp_model()
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown on an interrupt
        trainer(tmp_path / "b", 6, callbacks=[ckpt, Kill(3)]).fit(first, data())
    assert first.dp.accountant.steps == 3
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    # accountant state in the checkpoint, matching its step (the step in flight at the kill is lost)
    assert state["privacy"]["accountant"]["history"][0][2] == state["global_step"] == 2

    resumed = dp_model()
    trainer(tmp_path / "c", 6, enable_checkpointing=False).fit(resumed, data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.dp.accountant.steps == full.dp.accountant.steps == 6
    assert resumed.dp.accountant.epsilon() == pytest.approx(full.dp.accountant.epsilon())


def test_training_stops_before_exceeding_the_target_epsilon(tmp_path):
    n = DigitsDataModule().num_train_samples
    budget = 3
    eps = epsilon_for(1.0, 16 / n, budget, 1 / (10 * n))  # with sigma = 1, 3 steps fit exactly
    model = dp_model(noise_multiplier=1.0, epsilon=eps * 1.0001)
    trainer(tmp_path, 20, enable_checkpointing=False).fit(model, data())
    assert model.dp.accountant.steps == budget and model.dp.accountant.epsilon() <= eps * 1.0001


def test_resuming_with_a_longer_plan_spends_only_the_budget_left(tmp_path):
    """A run planned for 4 steps at epsilon 8, resumed with max_steps 12: sigma is recalibrated for the 8 steps
    left after the accountant's history, so the whole run ends at or below 8 (it ended at 9.02 before)."""
    import json

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = dp_model()
    trainer(tmp_path / "a", 4, callbacks=[ckpt]).fit(first, data())
    resumed = dp_model()
    trainer(tmp_path / "b", 12, enable_checkpointing=False).fit(resumed, data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    acc = resumed.dp.accountant
    assert acc.steps == 12 and acc.epsilon() <= 8.0
    (s1, q1, t1), (s2, q2, t2) = acc.history
    assert (t1, t2) == (4, 8) and q1 == q2 and s2 > s1  # the longer plan needs more noise per step
    report = json.load(open(next(tmp_path.glob("b/logs/version_*/privacy.json"))))
    assert report["segments"] == [{"noise_multiplier": s, "sample_rate": q, "steps": t} for s, q, t in acc.history]
    assert report["privacy/epsilon"] == pytest.approx(acc.epsilon()) and report["privacy/steps"] == 12


def test_a_resume_with_no_budget_left_stops_and_says_so(tmp_path):
    """Fixed sigma: the budget comes from the loaded history, so a longer plan stops at the same total."""
    n = DigitsDataModule().num_train_samples
    eps = epsilon_for(1.0, 16 / n, 3, 1 / (10 * n)) * 1.0001  # 3 steps at sigma = 1 fit, 4 do not
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "a", 3, callbacks=[ckpt]).fit(dp_model(noise_multiplier=1.0, epsilon=eps), data())
    resumed = dp_model(noise_multiplier=1.0, epsilon=eps)
    with pytest.warns(UserWarning, match="one more step would take epsilon past the target"):
        trainer(tmp_path / "b", 10, enable_checkpointing=False).fit(resumed, data(),
                                                                    ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.dp.accountant.steps == 3 and resumed.dp.accountant.epsilon() <= eps


def test_a_fixed_sigma_too_small_for_one_step_fails_fast(tmp_path):
    with pytest.raises(ConfigError, match=r"noise_multiplier = 0.1: is too small for even one step.*epsilon = 69\.6"):
        trainer(tmp_path, 10, enable_checkpointing=False).fit(dp_model(noise_multiplier=0.1, epsilon=10.0), data())


def test_distributed_sampler_must_be_off(tmp_path):
    t = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False)  # use_distributed_sampler defaults to True
    with pytest.raises(ConfigError, match="use_distributed_sampler"):
        t.fit(dp_model(), data())


def test_refuses_to_train_without_the_poisson_sampler(tmp_path):
    class Shuffled(DigitsDataModule):  # a data module that ignores the DP model's request for Poisson sampling
        def train_dataloader(self):
            self.train_loader_factory = None
            return super().train_dataloader()

    with pytest.raises(RuntimeError, match="without the Poisson sampler"):
        trainer(tmp_path, 2, enable_checkpointing=False).fit(dp_model(), Shuffled(image_size=8, batch_size=16))


def test_the_loader_in_use_samples_at_the_accounted_rate(tmp_path):
    from dpldm.privacy.sampling import poisson_rate

    model = dp_model()
    t = trainer(tmp_path, 1, enable_checkpointing=False)
    t.fit(model, data())
    assert poisson_rate(t.train_dataloader) == pytest.approx(model.dp.plan.sample_rate)


def test_declared_prior_releases_are_read_from_yaml_accounted_and_written_to_privacy_json(tmp_path):
    """`prior:` in a config (the runs a search compared): sigma leaves room for them, the logged and saved
    epsilon is theirs and the run's together, and privacy.json lists them."""
    import json

    from dpldm.commands.lightning_cli import DPLDMCLI
    from dpldm.privacy import PriorRelease
    from tests.privacy.tiny_fit import tiny_dp_config

    search = [{"noise_multiplier": 1.5, "sample_rate": 0.01, "steps": 50}]
    config = tiny_dp_config(tmp_path / "run", max_steps=3, privacy={"prior": search})
    cli = DPLDMCLI(args=["--config", config, "--trainer.logger=false"], run=False)
    assert cli.model.privacy.prior == [PriorRelease(1.5, 0.01, 50)]
    model = dp_model(prior=cli.model.privacy.prior)
    trainer(tmp_path, 3, enable_checkpointing=False).fit(model, data())
    acc, row = model.dp.accountant, _logged(tmp_path)
    q, sigma = float(row["privacy/sample_rate"]), float(row["privacy/noise_multiplier"])
    composed = epsilon_for(sigma, q, 3, acc.delta, "prv", history=[(1.5, 0.01, 50)])
    assert float(row["privacy/epsilon"]) == pytest.approx(composed, rel=1e-6) and composed <= 8.0
    assert acc.prior_epsilon() < composed and float(row["privacy/steps"]) == 3
    report = json.load(open(next(tmp_path.glob("logs/version_*/privacy.json"))))
    assert report["prior"] == search and report["prior_epsilon"] == pytest.approx(acc.prior_epsilon())
