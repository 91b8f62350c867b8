"""``dpldm audit`` on a tiny model: canary injection, the deterministic scorer, and one audit run whose DP
bound stays below the accountant's epsilon while the non-private control is clearly positive."""

from __future__ import annotations

import contextlib
import io
import json

import lightning.pytorch as L
import numpy as np
import pytest
import torch

from dpldm.datamodules import DigitsDataModule
from dpldm.errors import ConfigError
from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_autoencoder, build_unet
from dpldm.privacy import DifferentialPrivacy
from dpldm.audit import canaries as cn
from tests.conftest import TINY_AE, TINY_UNET

# The tiny fit config the audit runs. Tuned so that the non-private control memorises the canaries within
# 60 steps: few private records (N = 18 digits, so the ~32 included canaries are most of every batch;
# q = 32 / N ~ 0.6), the whole UNet trained (the attention scope of this 16/32-channel UNet hardly memorises in
# so few steps: AUC ~ 0.6), K = 4 noise draws per example, lr 3e-3, and canaries far out (--canary-scale 3:
# AUC 0.96-0.99 and eps_lb 1.4-1.8 over three model seeds, vs AUC 0.72-0.93 at scale 1). delta = 1e-5, not
# 1/(10N): Theorem 3's delta term is 2 m delta = 2 * 64 / 460 with N ~ 46, which alone would hide any bound.
# sigma = 2 is fixed (calibrating it costs seconds of CPU): epsilon ~ 15 after 60 steps.
CONFIG = """
seed_everything: 0
trainer:
  max_steps: 60
  use_distributed_sampler: false
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: dpldm.callbacks.SampleGrid     # dropped by the audit
      init_args: {{per_class: 1, num_steps: 2}}
model:
  class_path: dpldm.modules.LatentDiffusion
  init_args:
    unet:
      class_path: dpldm.modules.build_unet
      init_args: {{sample_size: 4, in_channels: 4, block_out_channels: [16, 32], attention: [true, true],
                  attention_head_dim: 8, cross_attention_dim: 16, norm_num_groups: 8}}
    autoencoder:
      class_path: dpldm.modules.FrozenAutoencoder
      init_args:
        vae:
          class_path: dpldm.modules.build_autoencoder
          init_args: {{in_channels: 1, latent_channels: 4, block_out_channels: [8, 16], norm_num_groups: 4}}
    conditioner:
      class_path: dpldm.modules.ClassEmbedder
      init_args: {{num_classes: 10, embed_dim: 16}}
    scope:
      class_path: dpldm.privacy.TrainableScope
      init_args: {{kind: full}}
    noise_draws: 4
    privacy:
      class_path: dpldm.privacy.DifferentialPrivacy
      init_args: {{epsilon: null, noise_multiplier: 2.0, delta: 1.0e-5, max_grad_norm: 1.0, max_physical_batch_size: 64,
                  seed: 0}}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {{lr: 3.0e-3}}
data:
  class_path: dpldm.datamodules.LatentCacheDataModule
  init_args:
    source:
      class_path: dpldm.datamodules.DigitsDataModule
      init_args: {{image_size: 8, val_fraction: 0.05, test_fraction: 0.94}}
    cache_dir: {cache}
    batch_size: 32
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    from dpldm.cli import main

    tmp = tmp_path_factory.mktemp("audit")
    config = tmp / "tiny.yaml"
    config.write_text(CONFIG.format(cache=tmp / "cache"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["audit", "--config", str(config), "--out", str(tmp / "run"), "--canaries", "64", "--canary-scale", "3"])
    return tmp / "run", out.getvalue(), json.loads((tmp / "run" / "audit.json").read_text())


def _row(report, name):
    return next(r for r in report["runs"] if r["name"] == name)


def test_the_dp_runs_bound_is_below_its_accountant_epsilon(audit_run):
    _, _, report = audit_run
    dp = _row(report, "DP run")
    assert dp["steps"] == 60 and 0 < dp["epsilon"] < 30 and dp["delta"] == 1e-5
    assert 0 <= dp["eps_lb"] <= dp["epsilon"]


def test_the_non_private_control_is_clearly_positive(audit_run):
    _, _, report = audit_run
    control, dp = _row(report, "non-private control"), _row(report, "DP run")
    assert control["eps_lb"] > 1.0 and control["auc"] > 0.9
    assert control["steps"] == dp["steps"] and control["epsilon"] is None  # same steps, no DP
    assert control["included"] == dp["included"]  # the same secret mask


def test_the_negative_control_is_about_zero(audit_run):
    _, _, report = audit_run
    neg, dp = _row(report, "negative control"), _row(report, "DP run")
    assert neg["eps_lb"] < 0.3 and abs(neg["auc"] - 0.5) < 0.2
    assert neg["scores"] == dp["scores"] and neg["included"] != dp["included"]  # the DP scores, a fresh mask


def test_the_cli_prints_the_table_and_writes_json_and_plot(audit_run):
    run, text, report = audit_run
    for label in ("DP run", "non-private control", "negative control", "eps_lb @95%", "AUC", "TPR@1%FPR",
                  "must be <= the accountant's epsilon", "does NOT prove privacy"):
        assert label in text, label
    assert (run / "audit.png").stat().st_size > 0
    assert report["canaries"] == 64 and report["included"] == sum(report["runs"][0]["included"])
    assert not (run / "dp" / "samples").exists()  # the config's sample callback was dropped


def test_a_control_that_leaks_raises_no_warning(audit_run):
    _, text, report = audit_run
    assert report["control_shows_leakage"] is True and report["warnings"] == []
    assert "WARNING" not in text


def fake_rows(control_leaks: bool | None) -> list:
    """Audit rows from synthetic scores: a DP run at chance, a control that leaks or not (None: no control)."""
    from dpldm.audit.run import evaluate

    rng = np.random.default_rng(0)
    included, fresh = rng.random(64) < 0.5, rng.random(64) < 0.5
    noise = rng.normal(0, 1, 64)
    rows = [evaluate("DP run", noise, included, 1e-5, 0.95, 3.0, 60)]
    if control_leaks is not None:
        scores = included + rng.normal(0, 0.1, 64) if control_leaks else rng.normal(0, 1, 64)
        rows.append(evaluate("non-private control", scores, included, 1e-5, 0.95, float("inf"), 60))
    return rows + [evaluate("negative control", noise, fresh, 1e-5, 0.95, 0.0, 0)]


@pytest.mark.parametrize("control_leaks", [False, None])
def test_a_control_without_leakage_warns_on_the_console_and_in_the_json(control_leaks, tmp_path, monkeypatch, capsys):
    from dpldm.audit import run as audit

    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: fake_rows(control_leaks))
    audit.main(["--config", __file__, "--out", str(tmp_path), "--canaries", "64", "--canary-scale", "2"])
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["control_shows_leakage"] is control_leaks and len(report["warnings"]) == 1
    warning = report["warnings"][0]
    assert f"WARNING: {warning}" in text and "proves nothing" in warning
    if control_leaks is None:
        assert "--no-control" in warning
    else:  # the control's numbers, and how to strengthen the audit (with the settings in use)
        control = _row(report, "non-private control")
        assert f"eps_lb = {control['eps_lb']:.2f}" in warning and f"AUC = {control['auc']:.2f}" in warning
        for advice in ("--trainer.max_steps", "60", "--canary-scale", "2", "--canaries", "64"):
            assert advice in warning, advice
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: fake_rows(True))
    audit.main(["--config", __file__, "--out", str(tmp_path)])
    assert "WARNING" not in capsys.readouterr().out
    assert json.loads((tmp_path / "audit.json").read_text())["warnings"] == []


def tiny_dp_model() -> LatentDiffusion:
    torch.manual_seed(0)
    dp = DifferentialPrivacy(epsilon=None, noise_multiplier=1.0, seed=0, max_physical_batch_size=64)
    return LatentDiffusion(build_unet(**TINY_UNET), FrozenAutoencoder(build_autoencoder(**TINY_AE)),
                           ClassEmbedder(10, embed_dim=16), privacy=dp)


def test_the_injected_split_holds_the_records_and_exactly_the_included_canaries(tmp_path):
    from dpldm.privacy.sampling import poisson_rate

    model, dm = tiny_dp_model(), DigitsDataModule(image_size=8, batch_size=16)
    dm.setup("fit")
    original, n = dm.train_dataset, len(dm.train_dataset)
    canaries = cn.make_canaries(original[0], 40, model, seed=3, num_classes=10)
    included = cn.inclusion_mask(40, seed=3)
    split = cn.inject(dm, canaries, included)
    k = int(included.sum())
    assert 0 < k < 40 and len(split) == dm.num_train_samples == n + k
    assert torch.equal(split[5]["image"], original[5]["image"]) and split[5]["label"] == original[5]["label"]
    ids = [j for j in range(40) if included[j]]
    for pos, j in enumerate(ids):  # the canaries after the records, exactly the included ones, in order
        assert torch.equal(split[n + pos]["image"], canaries["image"][j])
    assert split[n]["image"].shape == original[0]["image"].shape and split[n]["image"].abs().max() <= 1
    with pytest.raises(IndexError):
        split[n + k]
    trainer = L.Trainer(max_steps=1, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert model.dp.plan.num_samples == n + k  # accounting over the actual N
    assert poisson_rate(trainer.train_dataloader) == pytest.approx(16 / (n + k))
    assert trainer.train_dataloader.dataset is split  # the Poisson sampler draws from the enlarged split
    assert trainer.train_dataloader.batch_sampler.num_samples == n + k


def test_latent_and_text_canaries_and_a_fresh_mask():
    class Text(torch.nn.Module):  # a stand-in frozen text encoder: a caption -> [T = 3, W = 5] features
        def frozen_features(self, captions):
            return torch.stack([torch.full((3, 5), float(len(c))) for c in captions])

    class Model(torch.nn.Module):
        autoencoder, conditioner = FrozenAutoencoder(build_autoencoder(**TINY_AE), scale_factor=0.5), Text()

    template = {"moments": torch.zeros(8, 4, 4), "text_features": torch.zeros(3, 5), "key": "x"}
    c = cn.make_canaries(template, 50, Model(), seed=0, scale=1.0)
    assert c["moments"].shape == (50, 8, 4, 4) and (c["moments"][:, 4:] == -30).all()
    assert c["moments"][:, :4].std().item() == pytest.approx(2.0, rel=0.1)  # unit std once scaled by 0.5
    assert c["text_features"].shape == (50, 3, 5) and len(set(c["key"])) == 50
    assert len(set(cn.random_captions(50, torch.Generator().manual_seed(0)))) == 50
    assert not np.array_equal(cn.inclusion_mask(64, 0), cn.inclusion_mask(64, 0, cn.FRESH_MASK))
    with pytest.raises(ConfigError, match="unknown|does not know"):
        cn.make_canaries({"depth": torch.zeros(3)}, 4, Model(), seed=0)
    with pytest.raises(ConfigError, match="map-style training split"):
        cn.inject(object(), c, np.ones(50, bool))


def test_the_scorer_is_deterministic_and_restores_the_mode():
    model = tiny_dp_model()
    model.train()
    canaries = cn.make_canaries({"moments": torch.zeros(8, 4, 4), "label": 0}, 12, model, seed=0, num_classes=10)
    a = cn.canary_losses(model, canaries, draws=3, seed=1, batch_size=5)
    b = cn.canary_losses(model, canaries, draws=3, seed=1, batch_size=12)
    assert a.shape == (12,) and np.allclose(a, b, rtol=1e-5) and model.training
    assert not np.allclose(a, cn.canary_losses(model, canaries, draws=3, seed=2))  # other noise, other losses


@pytest.mark.parametrize("args, message", [(["--config", "no/such.yaml"], "--config = 'no/such.yaml': no such file"),
                                           (["--config", __file__, "--canaries", "2"], "--canaries = 2: must be >= 4"),
                                           (["--config", __file__, "--t-range", "0.5", "0.2"], "--t-range")])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    from dpldm.cli import main

    with pytest.raises(SystemExit) as err:
        main(["audit", *args])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_the_control_trains_the_dp_runs_scope_even_when_it_is_the_default(tmp_path):
    from dpldm.audit.run import build_cli, scope_override

    config = tmp_path / "attention.yaml"  # no scope in the config: DP trains the attention default
    config.write_text(CONFIG.format(cache=tmp_path / "cache").replace("kind: full", "kind: attention")
                      .replace("    scope:\n      class_path: dpldm.privacy.TrainableScope\n"
                               "      init_args: {kind: attention}\n", ""))
    dp = build_cli(str(config), [], str(tmp_path / "dp")).model
    assert "scope:" not in config.read_text() and dp.scope.kind == "attention"
    control = build_cli(str(config), ["--model.init_args.privacy=null", *scope_override(dp)], str(tmp_path / "c")).model
    assert control.privacy is None
    trained = {n for n, p in dp.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in control.named_parameters() if p.requires_grad}
    assert len(trained) < len(list(dp.parameters()))  # not everything: the attention blocks and the class embedding
