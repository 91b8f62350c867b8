"""The experiment's report from result files, the methods' overrides, and a UNet "from scratch"."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dpldm.commands import experiment, quickstart
from dpldm.commands.experiment import METHODS, method_overrides
from dpldm.commands.experiment_report import render
from dpldm.modules import build_unet, load_unet
from dpldm.utils.files import files_digest
from tests.conftest import AE, TINY_UNET, tiny_args

AE_ARG = "--model.init_args.autoencoder.init_args.vae.init_args.path"


def _row(method, eps, seed, acc, fid):
    row = {"method": method, "epsilon": eps, "seed": seed, "test/downstream_acc": acc, "test/fid_glyph": fid,
           "val/downstream_acc": acc - 0.3, "val/fid_glyph": fid + 50, "trained_fraction": 0.3, "seconds": 1.0}
    if eps is not None:
        row.update({"epsilon_spent": eps - 0.01, "delta": 1e-5, "noise_multiplier": 2.0 / eps,
                    "sample_rate": 128 / 60000, "steps": 300, "expected_batch_size": 128})
    return row


def test_report_tables_means_over_seeds_anchors_and_plot(tmp_path):
    rows = [_row("attention", 1.0, 0, 0.5, 20), _row("attention", 1.0, 1, 0.7, 30), _row("full", 1.0, 0, 0.4, 25),
            _row("nonprivate", None, 0, 0.9, 5)]
    record = {"size": "fashion", "label": "Fashion-MNIST", "rows": rows, "real_data_classifier": 0.93, "autoencoder_classifier": 0.71,
              "budget": ["--trainer.max_steps=300"], "minutes": 3.0, "command": "dpldm experiment --size fashion",
              "settings": {"privacy": {"max_grad_norm": 1.0}, "optimizer": {"class_path": "torch.optim.AdamW"},
                           "batch_size": 128, "metrics": []},
              "public_build": "0123456789abcdef", "machine": "CPU A, AVX2, 2 threads, torch 2.14.1"}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "fashion.json").write_text(json.dumps(record))
    (tmp_path / "results" / "discussion.md").write_text("## Discussion\nhand-written")
    render(str(tmp_path / "results"), str(tmp_path / "results.md"))
    doc = (tmp_path / "results.md").read_text()
    assert "| DP fine-tune, attention only (DP-LDM) | 0.600 ± 0.141 |" in doc  # mean ± sd of the two seeds
    assert "| DP fine-tune, full UNet | 0.400 |" in doc and "(ε = ∞) | 0.900 |" in doc
    assert "scores 0.930" in doc and "reconstructions by the frozen public autoencoder, it scores 0.710" in doc
    assert "86.2% at ε = 10" in doc and "N = 60000" in doc and "hand-written" in doc
    assert "(3.0 min on CPU A, AVX2, 2 threads, torch 2.14.1; public build 0123456789abcdef;" in doc  # where from
    assert (tmp_path / "results" / "fashion.png").stat().st_size > 10_000


def test_report_reads_result_files_from_before_the_metrics_had_splits(tmp_path):
    """Those logged the test split's values as val/*: they are shown as the test values they are."""
    rows = [{k.replace("test/", "val/"): v for k, v in _row("attention", 1.0, 0, 0.5, 20).items() if "val/" not in k}]
    record = {"size": "digits", "label": "digits", "rows": rows, "budget": [], "minutes": 1.0, "command": "c",
              "settings": {"privacy": {}, "optimizer": {"class_path": "torch.optim.AdamW"}, "batch_size": 128,
                           "metrics": [{"class": "FID", "key": "val/fid_glyph"}]}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "digits.json").write_text(json.dumps(record))
    render(str(tmp_path / "results"), str(tmp_path / "results.md"))
    doc = (tmp_path / "results.md").read_text()
    assert "| DP fine-tune, attention only (DP-LDM) | 0.500 |" in doc and "| 20.000 |" in doc


def test_each_method_changes_only_what_it_names():
    assert method_overrides("attention") == []
    assert "--model.init_args.privacy=null" in method_overrides("nonprivate")
    scratch = method_overrides("scratch")
    assert "--model.init_args.unet.init_args.weights=false" in scratch and any("kind=full" in a for a in scratch)
    assert method_overrides("lora") == ["--model.init_args.scope.init_args.kind=lora"]
    assert set(METHODS) == {"attention", "lora", "full", "scratch", "nonprivate"}
    with pytest.raises(ValueError, match="unknown method"):
        method_overrides("ghost")


def test_unet_from_scratch_has_the_pretrained_architecture_and_fresh_weights(tmp_path):
    pretrained = build_unet(**TINY_UNET)
    pretrained.save_pretrained(tmp_path / "unet")
    torch.manual_seed(1)
    fresh = load_unet(str(tmp_path), subfolder="unet", weights=False)
    loaded = load_unet(str(tmp_path), subfolder="unet").config
    assert {k: v for k, v in fresh.config.items() if not k.startswith("_")} == {
        k: v for k, v in loaded.items() if not k.startswith("_")}
    same = [torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), pretrained.state_dict().values())
            if a.dim() > 1]
    assert same and not any(same)


def test_the_plan_is_seed_major_resumes_after_an_interruption_and_scores_real_data_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no committed result file (docs/results/) to time the plan by

    calls, ceilings = [], []
    report = {"epsilon": 0.9, "delta": 1e-5, "noise_multiplier": 2.0, "sample_rate": 0.1, "steps": 3,
              "expected_batch_size": 128}

    def fake_stage(name, config, overrides, ceiling=True):
        if len(calls) == 3 and not ceilings:  # the first attempt dies in its fourth run
            ceilings.append("interrupted")
            raise KeyboardInterrupt
        calls.append((name, overrides, ceiling))
        private = f"{experiment.PRIVACY}.epsilon=" in " ".join(overrides)
        metrics = {"val/downstream_acc": 0.1, "test/downstream_acc": 0.5}
        return SimpleNamespace(seconds=1.0, trained_fraction=0.3, metrics=metrics,
                               privacy={f"privacy/{k}": v for k, v in report.items()} if private else None)

    monkeypatch.setattr(experiment, "run_stage", fake_stage)
    monkeypatch.setattr(experiment, "references",
                        lambda size, args, missing: ceilings.append((size, missing))
                        or {k: {"test/downstream_acc": 0.2} if k == "public_model" else 0.9 for k in missing})
    for stage in ("autoencoder", "ldm"):
        (tmp_path / "public" / stage / "pretrained").mkdir(parents=True)
    argv = ["--size", "digits", "--seeds", "2", "--epsilons", "1", "10", "--methods", "attention", "nonprivate",
            "--public", str(tmp_path / "public"), "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--doc", str(tmp_path / "results.md")]
    with pytest.raises(KeyboardInterrupt):
        experiment.main(argv)
    out = capsys.readouterr().out  # nothing to time a first start by: said once, not before every run
    assert "no earlier run of this size to time it by" in out and "1/5: attention, epsilon 1.0, seed 0\n" in out
    assert [c[0] for c in calls] == ["attention-eps1-seed0", "attention-eps10-seed0", "nonprivate-seed0"]
    experiment.main(argv)  # resumes: only what is missing, then the real-data reference once
    out = capsys.readouterr().out  # the plan up front, timed by the runs already done (1 s each)
    assert "experiment digits: 2 runs to go (attention 2), 3 done; about 0.0 h here" in out
    assert "1/2: attention, epsilon 1.0, seed 1 (about 0.0 h here to the last run)" in out
    names = [c[0] for c in calls]
    assert names == ["attention-eps1-seed0", "attention-eps10-seed0", "nonprivate-seed0",
                     "attention-eps1-seed1", "attention-eps10-seed1"]  # every setting once before seed 1
    assert not any(ceiling for _, _, ceiling in calls) and ceilings == ["interrupted", ("digits", experiment.REFERENCES)]
    for name, overrides, _ in calls:
        private = "nonprivate" not in name
        assert ("--model.init_args.privacy=null" in overrides) is not private
        assert (f"{experiment.PRIVACY}.seed={name[-1]}" in overrides) is private
        assert f"--seed_everything={name[-1]}" in overrides
    record = json.loads((tmp_path / "results" / "digits.json").read_text())
    assert len(record["rows"]) == 5 and record["real_data_classifier"] == record["autoencoder_classifier"] == 0.9
    assert "| DP fine-tune, attention only (DP-LDM) | 0.500 ± 0.000 |" in (tmp_path / "results.md").read_text()
    assert "| public LDM, no private step (ε = 0) | 0.200 | 0.200 |" in (tmp_path / "results.md").read_text()


def test_the_autoencoder_reference_trains_on_reconstructions(one_thread):
    from dpldm.datamodules import DigitsDataModule
    from dpldm.commands.quickstart import real_data_ceiling

    class Through:  # a stand-in autoencoder: decode(encode(x)) = keep * x
        def __init__(self, keep: float):
            self.keep, self.seen = keep, 0

        def encode(self, x):
            self.seen += len(x)
            return x

        def decode(self, z):
            return self.keep * z

    data = DigitsDataModule(image_size=8, batch_size=64)
    data.prepare_data()
    metric = SimpleNamespace(test_samples=None, epochs=4, sampling=SimpleNamespace(seed=0), width=32,
                             resize=lambda x: x)
    real = real_data_ceiling(data, metric)
    assert real > 0.6  # chance is 0.1
    assert real_data_ceiling(data, metric, Through(1.0)) == real  # a perfect autoencoder changes nothing
    assert real_data_ceiling(data, metric, Through(0.0)) < 0.2  # one that loses everything: chance
    subset = Through(1.0)
    assert real_data_ceiling(data, metric, subset, max_items=300) < real and subset.seen == 300


def test_mnist_report_prints_the_published_rows_beside_ours_in_percent(tmp_path):
    rows = [_row("attention", 1.0, 0, 0.61, 9), _row("attention", 10.0, 0, 0.905, 5), _row("lora", 10.0, 0, 0.8, 6),
            _row("nonprivate", None, 0, 0.97, 2), _row("full", 1.0, 0, 0.8068, 2), _row("full", 1.0, 1, 0.8202, 3)]
    for r in rows:
        r["cpu_minutes"] = 7.5
    record = {"size": "mnist", "label": "MNIST", "protocol": "dpimagebench", "rows": rows, "real_data_classifier": 0.991,
              "autoencoder_classifier": 0.98, "public_model": {"test/downstream_acc": 0.42}, "budget": [], "minutes": 3.0, "command": "dpldm experiment --size mnist",
              "settings": {"privacy": {"max_grad_norm": 0.1}, "clip_norms": {"lora": 0.005},
                           "optimizer": {"class_path": "torch.optim.AdamW"}, "batch_size": 1000, "recipe": {"noise_draws": 2, "max_steps": 120}, "metrics": [],
                           "public": {"config": "mnist/public", "autoencoder": {"trainer": {"max_epochs": 6}},
                                      "ldm": {"data": {"init_args": {"elastic": 2.0}}}}}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mnist.json").write_text(json.dumps(record))
    render(str(tmp_path / "results"), str(tmp_path / "results.md"))
    doc = (tmp_path / "results.md").read_text()
    assert "| **dpldm: DP fine-tune, attention only (DP-LDM)** | 61.0 | 90.5 |" in doc
    assert "| **dpldm: DP fine-tune, LoRA on the attention projections (DP-LoRA)** | – | 80.0 |" in doc
    # A mean on a rounding tie (0.8135) reads the same in both tables: 0.814 there, 81.4 here.
    assert "| DP fine-tune, full UNet | 0.814 ± 0.009 | – |" in doc
    assert "| **dpldm: DP fine-tune, full UNet** | 81.4 ± 0.9 | – |" in doc
    assert "| DP-LDM (their re-run) (published) | 44.2 | 95.5 |" in doc and "| DPDM (published) | 89.2 | 97.7 |" in doc
    assert "| dpldm: public LDM, no private step (ε = 0) | 42.0 | 42.0 |" in doc
    assert "60,000 real training images scores 0.991" in doc and "'noise_draws': 2" in doc
    assert "CPU minutes per run" in doc and "attention 7.5" in doc
    assert "C = 0.1 (lora 0.005; public median gradient norms)" in doc
    assert ("for MNIST, the same stages with the overlays of `configs/mnist/public/` laid over them "
            "(autoencoder: max_epochs = 6; ldm: elastic = 2.0;") in doc
    assert (tmp_path / "results" / "mnist.png").stat().st_size > 10_000


@pytest.mark.parametrize("size, real_items", [("mnist", None), ("digits", 1000)])
def test_references_score_real_data_reconstructions_and_the_untrained_public_model(size, real_items, monkeypatch):
    """DPImageBench's reference CNN trains on every real training image (the quickstart's on as many as it gets
    samples); the autoencoder's on as many reconstructions as samples; the public model is scored by every metric
    callback of the config, on its own samples, before any private step."""
    import dpldm.commands.lightning_cli
    from dpldm.callbacks.evaluation import FID, DownstreamAccuracy

    acc, fid = DownstreamAccuracy(num_samples=1000), FID.__new__(FID)
    acc.evaluate = lambda model, data: {"test/downstream_acc": 0.4 if model.training is False else -1}
    fid.evaluate = lambda model, data: {"test/fid_glyph": 9.0}
    model = SimpleNamespace(autoencoder="the public autoencoder", training=True)
    model.eval = lambda: setattr(model, "training", False) or model
    cli = SimpleNamespace(trainer=SimpleNamespace(callbacks=[acc, fid]), model=model, datamodule="data")
    monkeypatch.setattr(dpldm.commands.lightning_cli, "DPLDMCLI", lambda args, run: cli)
    seen = []
    monkeypatch.setattr(experiment, "real_data_ceiling", lambda data, metric, autoencoder=None, max_items=None:
                        seen.append((autoencoder, max_items)) or 0.9)
    args = SimpleNamespace(configs=experiment.CONFIGS, public="public", out="out")
    refs = experiment.references(size, args)
    assert seen == [(None, real_items), ("the public autoencoder", 1000)]
    assert refs == {"real_data_classifier": 0.9, "autoencoder_classifier": 0.9,
                    "public_model": {"test/downstream_acc": 0.4, "test/fid_glyph": 9.0}}  # scored in eval mode
    assert experiment.references(size, args, ("public_model",)).keys() == {"public_model"} and len(seen) == 2


def test_mnist_builds_its_own_public_stages_with_the_handwriting_overlay(tmp_path, monkeypatch):
    """MNIST's public stages are the quickstart's configs with configs/mnist/public/STAGE.yaml laid over them, under
    their own folder; the overlays are part of the settings, so a changed public model starts MNIST's results over."""
    calls = []
    monkeypatch.setattr(experiment, "run_stage", lambda name, config, overrides, ceiling=True: calls.append(
        (name, config, overrides)))
    size = experiment.SIZES["mnist"]
    (tmp_path / "autoencoder" / "pretrained").mkdir(parents=True)  # stage 1 done: only stage 2 runs
    experiment.public_stages(size, SimpleNamespace(configs=experiment.CONFIGS, public=str(tmp_path)))
    [(name, config, overrides)] = calls
    assert name == "ldm" and config.endswith("quickstart/ldm.yaml")
    assert overrides[:2] == ["--config", os.path.join(experiment.CONFIGS, "mnist", "public", "ldm.yaml")]
    assert f"{AE_ARG}={tmp_path}/autoencoder/pretrained" in overrides
    mnist, digits = (experiment.finetune_settings(experiment.CONFIGS, experiment.SIZES[k]) for k in ("mnist", "digits"))
    public = mnist["public"]
    assert public["config"] == "mnist/public" and public["ldm"]["data"]["init_args"]["elastic"] > 0
    assert public["autoencoder"]["trainer"]["max_epochs"] > 1  # stage 1 trained to convergence, not the quickstart's 1
    with open(os.path.join(experiment.CONFIGS, "quickstart", "ldm.yaml")) as f:  # stage 2 past the quickstart's epochs
        assert public["ldm"]["trainer"]["max_epochs"] > yaml.safe_load(f)["trainer"]["max_epochs"]
    assert "public" not in digits and size.public == "runs/mnist/public"
    with open(os.path.join(experiment.CONFIGS, "mnist", "finetune.yaml")) as f:  # a plain `dpldm fit` finds them
        assert f.read().count(f"{size.public}/") == 3


def test_each_dp_method_runs_at_its_own_public_clipping_norm(tmp_path, monkeypatch):
    """MNIST's methods whose trained set differs from the config's scope get their own C (Size.clip_norms, chosen on
    public glyphs by bench/grad_norms.py); the others keep the config's; the norms are part of the settings."""
    seen = {}
    monkeypatch.setattr(experiment, "run_stage", lambda name, config, overrides, ceiling=True: seen.setdefault(
        name, overrides) and SimpleNamespace(seconds=1.0, trained_fraction=None, metrics={}, privacy=None))
    args = SimpleNamespace(public="public", out=str(tmp_path), configs=experiment.CONFIGS,
                           override=["--trainer.max_steps=2"])
    for method in METHODS:
        experiment.run_one("mnist", method, None if method == "nonprivate" else 1.0, 0, args)
    clip = {name.split("-")[0]: [o for o in overrides if o.startswith(f"{experiment.PRIVACY}.max_grad_norm=")]
            for name, overrides in seen.items()}
    norms = experiment.SIZES["mnist"].clip_norms
    assert clip == {m: [f"{experiment.PRIVACY}.max_grad_norm={norms[m]}"] if m in norms else [] for m in METHODS}
    assert "attention" not in norms and "nonprivate" not in norms and norms["lora"] < norms["full"]
    assert seen["lora-eps1-seed0"][-3] == "--trainer.max_steps=2"  # the user's overrides come after, and win
    settings = experiment.finetune_settings(experiment.CONFIGS, experiment.SIZES["mnist"])
    assert settings["clip_norms"] == norms and settings["privacy"]["max_grad_norm"] == 0.1
    for size in ("digits", "fashion"):  # every size clips at its public medians, none at the old default C = 1
        settings = experiment.finetune_settings(experiment.CONFIGS, experiment.SIZES[size])
        assert settings["privacy"]["max_grad_norm"] == 0.1 and settings["clip_norms"]["full"] < 1.0


def test_fashion_runs_mnists_recipe_on_mnists_public_stages():
    """configs/fashion/ holds MNIST's recipe unchanged (chosen on MNIST, nothing tuned on Fashion-MNIST): the
    settings a result file records are the same for both sets, only the private data and its cache differ."""
    mnist, fashion = (experiment.finetune_settings(experiment.CONFIGS, experiment.SIZES[k]) for k in ("mnist", "fashion"))
    assert fashion == mnist and fashion["batch_size"] == 2048 and fashion["recipe"]["max_steps"] == 256
    configs = {}
    for size in ("mnist", "fashion"):
        with open(os.path.join(experiment.CONFIGS, size, "finetune.yaml")) as f:
            configs[size] = yaml.safe_load(f)
    assert configs["fashion"]["model"] == configs["mnist"]["model"]
    assert configs["fashion"]["data"]["init_args"]["source"]["class_path"].endswith("FashionMNISTDataModule")
    assert configs["fashion"]["data"]["init_args"]["cache_dir"] != configs["mnist"]["data"]["init_args"]["cache_dir"]


def test_a_rebuilt_public_stage_starts_the_results_over(tmp_path, monkeypatch, capsys):
    """Rows of one result file come from one build of the public stages: other public weights move rows by a
    seed's spread, so a resume on other weights must not mix them in."""
    calls = []

    def fake_stage(name, config, overrides, ceiling=True):
        calls.append(name)
        return SimpleNamespace(seconds=1.0, trained_fraction=None, metrics={"test/downstream_acc": 0.5}, privacy=None)

    monkeypatch.setattr(experiment, "run_stage", fake_stage)
    monkeypatch.setattr(experiment, "references", lambda size, args, missing: {
        k: {"test/downstream_acc": 0.2} if k == "public_model" else 0.9 for k in missing})
    public = tmp_path / "public"
    for stage in ("autoencoder", "ldm"):
        (public / stage / "pretrained" / "unet").mkdir(parents=True)
    weights = public / "ldm" / "pretrained" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"build 1")
    argv = ["--size", "digits", "--seeds", "1", "--methods", "nonprivate", "--public", str(public),
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--doc", str(tmp_path / "r.md")]
    monkeypatch.setattr(experiment, "machine", lambda: "CPU A, AVX512, 8 threads")
    experiment.main(argv)
    monkeypatch.setattr(experiment, "machine", lambda: "CPU B, AVX2, 2 threads")
    experiment.main(argv)  # the same build on another machine: nothing to rerun, and no warning
    assert calls == ["nonprivate-seed0"] and "differ" not in capsys.readouterr().out
    weights.write_bytes(b"build 2")
    experiment.main(argv)
    assert calls == ["nonprivate-seed0", "nonprivate-seed0"]
    out = capsys.readouterr().out  # the refusal names the likely cause: the machine that built the rows' stages
    assert "public_build differ" in out and "built on: CPU A, AVX512, 8 threads" in out
    assert "this machine:                   CPU B, AVX2, 2 threads" in out
    record = json.loads((tmp_path / "results" / "digits.json").read_text())
    assert len(record["rows"]) == 1 and record["public_build"] == experiment.public_build(str(public))


def test_the_public_stages_rebuild_to_the_same_weights_and_another_seed_does_not(tmp_path):
    """A clean clone resumes a committed result file only if its public build comes back bit-identical: the same
    configs and seed on the same machine and torch must give the same exported weights (on CPU: the glyphs are
    rendered from per-sample seeds, the fits seeded by ``seed_everything``). Another seed must not, or the digest
    would say nothing."""
    steps = [f"--override={stage}:{arg}" for stage in (AE, "ldm") for arg in (
        "--trainer.fast_dev_run=false", "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.logger=false")]
    builds = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        quickstart.main([*tiny_args(out), *steps, f"--override={AE}:--seed_everything={seed}", "--stages", AE, "ldm"])
        builds[name] = experiment.public_build(str(out))
    assert builds["a"] == builds["b"] != builds["c"]
    assert builds["a"] != files_digest([])  # the digest read weights


def test_the_machine_names_the_cpu_its_isa_threads_and_torch():
    """What a result file records of the machine that built its public stages (the floats depend on all four)."""
    import torch

    text = experiment.machine()
    assert text.endswith(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    assert f", {torch.backends.cpu.get_cpu_capability()}, " in text and not text.startswith(",")


def test_the_time_estimate_scales_earlier_runs_to_the_new_budget_and_names_untimed_methods():
    """A start-over after a budget change (512 steps of 512 -> 256 of 2,048 -> 1,024 of 512 by override) still
    knows what each method costs on this machine: time scales with steps x batch."""
    earlier = {"budget": [], "settings": {"batch_size": 512, "recipe": {"max_steps": 512}},
               "rows": [{"method": "attention", "seconds": 600.0}, {"method": "attention", "seconds": 1200.0},
                        {"method": "nonprivate", "seconds": 300.0}]}
    record = {"budget": [], "settings": {"batch_size": 2048, "recipe": {"max_steps": 256}}, "rows": []}
    assert experiment.examples_budget(earlier) == 512 * 512 and experiment.examples_budget(record) == 256 * 2048
    plan = [("attention", 1.0, 0), ("attention", 10.0, 0), ("nonprivate", None, 0), ("full", 1.0, 0)]
    minutes, untimed = experiment.estimate_minutes(plan, record, (earlier,))
    assert minutes == pytest.approx(2 * (2 * 900 + 300) / 60) and untimed == ["full"]
    # overrides beat the config: 1,024 steps of 512, the same work again
    record["budget"] = ["--trainer.max_steps=1024", "--data.init_args.batch_size=512"]
    assert experiment.examples_budget(record) == 1024 * 512
    # a row of the current file (same budget) counts as it is
    record["rows"] = [{"method": "full", "seconds": 3600.0}]
    minutes, untimed = experiment.estimate_minutes(plan, record, (earlier,))
    assert minutes == pytest.approx(2 * (2 * 900 + 300) / 60 + 60) and untimed == []
    assert experiment._eta(plan, {"rows": []}, ()) == "no earlier run of this size to time it by"
    # rows at the same recipe (another size's, same settings and budget) beat scaled ones of another recipe
    record["rows"], twin = [], {"budget": record["budget"], "settings": record["settings"],
                                "rows": [{"method": "attention", "seconds": 1500.0}]}
    minutes, untimed = experiment.estimate_minutes(plan, record, (earlier, twin))
    assert minutes == pytest.approx((2 * 1500 + 2 * 300) / 60) and untimed == ["full"]


def test_results_run_to_their_own_folder_are_timed_by_the_committed_ones(tmp_path, monkeypatch, capsys):
    """`--results STAGING` (the committed table stays whole until a rerun lands) still gets a time estimate."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment, "run_stage", lambda name, config, overrides, ceiling=True: SimpleNamespace(
        seconds=1.0, trained_fraction=None, metrics={"test/downstream_acc": 0.5}, privacy=None))
    monkeypatch.setattr(experiment, "references", lambda size, args, missing: {
        k: {"test/downstream_acc": 0.2} if k == "public_model" else 0.9 for k in missing})
    for stage in ("autoencoder", "ldm"):
        (tmp_path / "public" / stage / "pretrained").mkdir(parents=True)
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "digits.json").write_text(json.dumps(
        {"budget": [], "settings": {}, "rows": [{"method": "nonprivate", "seconds": 5400.0}]}))
    experiment.main(["--size", "digits", "--seeds", "1", "--methods", "nonprivate", "--public", "public",
                     "--results", "staging", "--doc", "staging/results.md"])
    assert "1 run to go (nonprivate 1), 0 done; about 1.5 h here" in capsys.readouterr().out


def test_a_size_is_timed_by_another_sizes_runs_at_the_same_recipe(tmp_path, monkeypatch, capsys):
    """Fashion-MNIST runs MNIST's recipe: MNIST's committed rows time its runs better than its own rows of an
    older recipe scaled by steps x batch (the full UNet's cost does not scale linearly with the batch)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment, "run_stage", lambda name, config, overrides, ceiling=True: SimpleNamespace(
        seconds=1.0, trained_fraction=None, metrics={"test/downstream_acc": 0.5}, privacy=None))
    monkeypatch.setattr(experiment, "references", lambda size, args, missing: {
        k: {"test/downstream_acc": 0.2} if k == "public_model" else 0.9 for k in missing})
    monkeypatch.setattr(experiment, "public_stages", lambda size, args: None)
    monkeypatch.setattr(experiment, "public_build", lambda path: "build")
    settings = experiment.finetune_settings(experiment.CONFIGS, experiment.SIZES["fashion"])
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    rows = lambda seconds: [{"method": "full", "seconds": seconds}]  # noqa: E731
    (results / "fashion.json").write_text(json.dumps({"budget": [], "settings": {**settings, "batch_size": 1024},
                                                      "rows": rows(9000.0)}))  # an older recipe: x 2 = 5 h
    (results / "mnist.json").write_text(json.dumps({"budget": [], "settings": settings, "rows": rows(3600.0)}))
    (results / "digits.json").write_text(json.dumps({"budget": [], "settings": {}, "rows": rows(60.0)}))
    experiment.main(["--size", "fashion", "--seeds", "1", "--epsilons", "1", "--methods", "full",
                     "--results", "staging", "--doc", "staging/results.md"])
    assert "1 run to go (full 1), 0 done; about 1.0 h here" in capsys.readouterr().out


def test_the_committed_report_is_what_its_result_files_render(tmp_path):
    """docs/results.md is generated: edits belong in docs/results/discussion.md (the hand-written part) or the
    result files, else the next ``dpldm experiment`` re-render silently drops them."""
    committed = Path(__file__).resolve().parents[1] / "docs"
    shutil.copytree(committed / "results", tmp_path / "results", ignore=shutil.ignore_patterns("*.png"))
    render(str(tmp_path / "results"), str(tmp_path / "results.md"))
    assert (tmp_path / "results.md").read_text() == (committed / "results.md").read_text()
