"""The quickstart chain, each stage a fast_dev_run fit on tiny models, then bad-input errors."""

from __future__ import annotations

import os

import pytest
import torch

from dpldm.commands import quickstart
from dpldm.commands.lightning_cli import DPLDMCLI
from dpldm.errors import ConfigError
from tests.conftest import AE, TINY, tiny_args, user_error

@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return out, quickstart.main(tiny_args(out))


def test_quickstart_runs_every_stage_and_writes_a_grid(quickstart_run, capsys):
    out, results = quickstart_run
    assert [r.name for r in results] == ["autoencoder", "ldm", "finetune"]
    assert (out / "autoencoder" / "pretrained" / "config.json").exists()
    assert (out / "ldm" / "pretrained" / "unet" / "config.json").exists()
    grid = results[-1].grid
    assert grid is not None and os.path.getsize(grid) > 0
    text = quickstart.summary(results)
    assert "finetune" in text and grid in text and "total" in text
    dp = results[-1].privacy  # the fine-tune is DP: its summary line reports what it spent
    assert dp is not None and dp["privacy/steps"] == 1 and 0 < dp["privacy/epsilon"] <= 10
    assert "DP-SGD: epsilon" in text and 0 < results[-1].trained_fraction < 1


def test_exported_scale_factor_is_measured_on_public_data(quickstart_run):
    import json

    out, _ = quickstart_run
    cfg = json.loads((out / "autoencoder" / "pretrained" / "config.json").read_text())
    assert cfg["scaling_factor"] != 1.0 and cfg["scaling_factor"] > 0  # set by stage 1, not left at default


def _finetune(out, *extra: str) -> DPLDMCLI:
    cfg = os.path.join(quickstart.config_dir(), "finetune.yaml")
    chain = quickstart.stage_overrides(str(out), {"finetune": TINY["finetune"]})["finetune"]
    return DPLDMCLI(args=["fit", "--config", cfg, *chain, *extra])


def _finished_run(out):
    """The fine-tune run folder, with a checkpoint (fast_dev_run keeps none: one real step then)."""
    run = out / "finetune"
    if not list(run.glob("checkpoints/*.ckpt")):
        _finetune(out, "--trainer.fast_dev_run=false", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                  "--trainer.callbacks=[]")
    return run


def test_frozen_autoencoder_unchanged_by_finetune(quickstart_run):
    out, _ = quickstart_run
    cli = _finetune(out)
    from dpldm.modules import load_autoencoder

    ref = load_autoencoder(str(out / "autoencoder" / "pretrained")).state_dict()
    for k, v in cli.model.autoencoder.vae.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_progress_goes_to_a_log_file_as_lines(quickstart_run, capsys, monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from dpldm.callbacks import LineProgress

    out, _ = quickstart_run
    cli = _finetune(out)  # pytest captures stdout: not a terminal, as in `dpldm experiment > log`
    assert isinstance(cli.trainer.progress_bar_callback, LineProgress)
    assert "[training] step 1/1 (100%)" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)  # a terminal keeps Lightning's bar
    assert isinstance(_finetune(out).trainer.progress_bar_callback, (RichProgressBar, TQDMProgressBar))


@pytest.mark.parametrize("extra, field", [
    (["--data.init_args.source.init_args.image_size=30"], "data.init_args.source.init_args.image_size"),  # f = 4 does not divide 30
    (["--model.init_args.conditioner.init_args.num_classes=7"], "num_classes"),
])
def test_mismatch_fails_before_training(quickstart_run, extra, field):
    out, _ = quickstart_run
    with pytest.raises(ConfigError, match=field):
        _finetune(out, *extra)


def test_unknown_config_key_is_rejected_by_name(quickstart_run, capsys):
    out, _ = quickstart_run
    with pytest.raises(SystemExit):
        _finetune(out, "--model.init_args.no_such_option=1")
    assert "no_such_option" in capsys.readouterr().err


def test_missing_data_path_names_the_field(quickstart_run, tmp_path, capsys):
    out, _ = quickstart_run
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as err:
        _finetune(out, "--data=dpldm.datamodules.CIFAR10DataModule", f"--data.init_args.root={tmp_path / 'nowhere'}")
    assert "data.init_args.root" in str(err.value) + capsys.readouterr().err


def test_wandb_by_default_offline_without_an_account(quickstart_run, monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no `wandb login`: dpldm's logger goes offline by itself
    out, _ = quickstart_run
    cli = _finetune(out, "--trainer.fast_dev_run=false", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks=[{class_path: "
                    "dpldm.callbacks.SampleGrid, init_args: {per_class: 1, num_steps: 2}}]")
    wandb_logger = cli.trainer.loggers[1]
    config = dict(wandb_logger.experiment.config)  # the resolved run config
    wandb_logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir())
    assert list((runs[0] / "files").rglob("samples_*.png"))  # the sample grid, as a W&B image
    assert config["model"]["class_path"] == "dpldm.modules.LatentDiffusion" and "privacy" in config["model"]["init_args"]


def test_load_run_restores_the_trained_weights(quickstart_run):
    from dpldm.runs import load_run

    out, _ = quickstart_run
    cli = _finetune(out, "--trainer.fast_dev_run=false", "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
                    "--trainer.callbacks=[]")
    model = load_run(str(out / "finetune"))
    for (k, v), ref in zip(model.state_dict().items(), cli.model.state_dict().values()):
        assert torch.equal(v, ref.cpu()), k


def test_sample_command_on_a_class_conditional_run(quickstart_run, tmp_path, capsys):
    import numpy as np

    from dpldm.cli import main

    run = _finished_run(quickstart_run[0])
    main(["sample", str(run), "--labels", "0", "3", "--repeat", "2", "--steps", "2", "--out", str(tmp_path)])
    saved = np.load(tmp_path / "samples.npz")
    assert saved["images"].shape == (4, 32, 32, 1) and list(saved["labels"]) == [0, 0, 3, 3]
    assert len(list(tmp_path.glob("0*.png"))) == 4 and (tmp_path / "grid.png").exists()
    # a class-conditional model takes labels
    assert "--prompts = " in user_error(capsys, ["sample", str(run), "--prompts", __file__, "--out", str(tmp_path)])
    assert "classes are 0..9" in user_error(capsys, ["sample", str(run), "--labels", "12", "--out", str(tmp_path)])


def test_evaluate_command_scores_a_checkpoint(quickstart_run, tmp_path, capsys):
    import json

    from dpldm.cli import main

    run = _finished_run(quickstart_run[0])
    metrics = tmp_path / "metrics.yaml"
    metrics.write_text(f"""
- class_path: dpldm.callbacks.DownstreamAccuracy
  init_args: {{num_samples: 40, epochs: 1, test_samples: 60, sampling: {{num_steps: 2}}}}
- class_path: dpldm.callbacks.FID
  init_args:
    name: fid_glyph
    splits: [val, test]
    num_samples: 40
    reference_samples: 60
    extractor:
      class_path: dpldm.metrics.PublicClassifierFeatures
      init_args:
        public: {{class_path: dpldm.datamodules.GlyphsDataModule, init_args: {{num_train: 200}}}}
        path: {tmp_path / 'glyphs.pt'}
        epochs: 1
    sampling: {{num_steps: 2}}
""")
    main(["evaluate", str(run), "--metrics", str(metrics), "--out", str(tmp_path / "eval.json"), "--per-class"])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= report["test/downstream_acc"] <= 1 and report["test/fid_glyph"] > 0 and report["val/fid_glyph"] > 0
    per_class = [report[f"test/downstream_acc/class_{k}"] for k in range(10)]  # a class absent from 60 images: NaN
    assert all(0 <= a <= 1 for a in per_class if a == a) and "test/downstream_acc/class_10" not in report
    assert report["privacy/epsilon"] > 0 and report["checkpoint"].endswith(".ckpt")  # the weights' epsilon with it
    assert (tmp_path / "glyphs.pt").exists()  # the public feature extractor, trained once and kept
    fid_only = tmp_path / "fid.yaml"
    fid_only.write_text("- class_path: dpldm.callbacks.FID" + metrics.read_text().split("dpldm.callbacks.FID")[1])
    assert "--per-class" in user_error(capsys, ["evaluate", str(run), "--metrics", str(fid_only), "--per-class"])


def test_summary_reports_metrics_and_the_labelled_ceiling():
    metrics = {"val/downstream_acc": 0.61, "test/downstream_acc": 0.58, "val/fid_glyph": 3.4, "test/fid_glyph": 3.2}
    result = quickstart.StageResult("finetune", 10.0, "r", None, None, None, metrics=metrics, ceiling=0.9)
    text = quickstart.summary([result])
    assert "downstream accuracy" in text and "0.580" in text and "3.200" in text and "NOT Inception FID" in text
    assert "0.610" not in text and "3.400" not in text  # the final numbers are the test split's, reported once
    assert "0.900 (not private: a reference only)" in text


def test_each_stage_gets_its_own_wandb_run(quickstart_run, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "qs"
    real_runs = [f"--override={s}:{a}" for s in (AE, "ldm") for a in ("--trainer.fast_dev_run=false",
                                                                    "--trainer.max_steps=2", "--trainer.limit_val_batches=1")]
    quickstart.main([*tiny_args(out), *real_runs, "--stages", AE, "ldm"])  # fast_dev_run would turn loggers off
    for stage in ("autoencoder", "ldm"):  # W&B would otherwise keep logging into the first stage's run
        assert list((out / stage / "wandb").glob("offline-run-*")), stage


@pytest.mark.parametrize("value, field, bound", [
    ("epsilon=-1", "model.init_args.privacy.init_args.epsilon = -1", "must be > 0"),
    ("max_grad_norm=0", "max_grad_norm = 0", "must be > 0"),
])
def test_a_bad_privacy_setting_is_one_short_paragraph_and_exit_2(quickstart_run, capsys, value, field, bound):
    """`dpldm fit` with an invalid DP setting: the field, the value and the bound in at most 10 lines (no
    traceback, no config dump); --verbose gives the traceback."""
    out, _ = quickstart_run
    cfg = os.path.join(quickstart.config_dir(), "finetune.yaml")
    chain = quickstart.stage_overrides(str(out), {"finetune": TINY["finetune"]})["finetune"]
    argv = ["fit", "--config", cfg, *chain, f"--model.init_args.privacy.init_args.{value}"]
    message = user_error(capsys, argv)
    assert field in message and bound in message and "Traceback" not in message and "Namespace(" not in message
    from dpldm.cli import main

    with pytest.raises(ValueError, match=bound):
        main([*argv, "--verbose"])


def test_weights_missing_where_the_config_points_is_a_short_error(quickstart_run, capsys, tmp_path):
    out, _ = quickstart_run
    cfg = os.path.join(quickstart.config_dir(), "finetune.yaml")
    chain = quickstart.stage_overrides(str(out), {"finetune": TINY["finetune"]})["finetune"]
    message = user_error(capsys, ["fit", "--config", cfg, *chain,
                                  f"--model.init_args.unet.init_args.path={tmp_path / 'no-unet'}"])
    assert "model.init_args.unet.init_args.path" in message and "run that stage first" in message
    assert "hf download" not in message  # a local path that does not exist is no hub id to download
