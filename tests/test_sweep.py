"""``dpldm sweep``: W&B sweep files run locally (validation, grid and random expansion, results, plots, and the
epsilon of the selection), and the sweep files shipped in configs/sweeps/."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from dpldm.commands import sweep as sweep_module
from dpldm.errors import ConfigError
from dpldm.privacy.accounting import PrivacyAccountant
from dpldm.commands.sweep import expand, fit_command, load_sweep, main
from tests.privacy.tiny_fit import tiny_dp_config

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
EPS = "model.init_args.privacy.init_args.epsilon"
C = "model.init_args.privacy.init_args.max_grad_norm"


def sweep_doc(**changes) -> dict:
    """A valid 2x2 grid over epsilon and C; ``changes`` replace its top-level keys."""
    doc = {"method": "grid", "metric": {"name": "val/downstream_acc", "goal": "maximize"},
           "parameters": {EPS: {"values": [1, 10]}, C: {"values": [0.1, 1.0]}},
           "command": ["dpldm", "fit", "--config", "run.yaml", "${args}"]}
    return {**doc, **changes}


def write(path: Path, doc: dict) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_a_2x2_grid_gives_4_distinct_override_sets_in_order():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = load_sweep(sweep_doc())
    sets = expand(sweep)
    assert sets == [{EPS: 1, C: 0.1}, {EPS: 1, C: 1.0}, {EPS: 10, C: 0.1}, {EPS: 10, C: 1.0}]
    commands = [fit_command(sweep, p, Path("out") / f"run-{i:03d}") for i, p in enumerate(sets)]
    overrides = [tuple(c[c.index("run.yaml") + 1:-1]) for c in commands]
    assert len(set(overrides)) == 4
    assert overrides[1] == (f"--{EPS}=1", f"--{C}=1.0")
    for params, args in zip(sets, overrides):  # exactly what the W&B agent puts in place of ${args}
        assert list(args) == create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]
    assert commands[3][-1] == f"--trainer.default_root_dir={Path('out') / 'run-003'}"
    assert len(expand(sweep, count=3)) == 3


def test_random_draws_respect_bounds_and_are_seeded():
    params = {EPS: {"values": [1, 2, 5, 10]}, C: {"distribution": "log_uniform_values", "min": 0.01, "max": 1.0},
              "trainer.max_steps": {"min": 2, "max": 5}, "model.init_args.optimizer.init_args.lr": {"min": 1e-4, "max": 1e-3},
              "data.init_args.batch_size": {"value": 64}}
    sweep = load_sweep(sweep_doc(method="random", parameters=params))
    draws = expand(sweep, count=400, seed=1)
    assert draws == expand(sweep, count=400, seed=1) and draws != expand(sweep, count=400, seed=2)
    assert {d[EPS] for d in draws} == {1, 2, 5, 10}
    assert all(0.01 <= d[C] <= 1.0 for d in draws) and 130 < sum(d[C] < 0.1 for d in draws) < 270  # log-uniform
    assert {d["trainer.max_steps"] for d in draws} == {2, 3, 4, 5}
    assert all(1e-4 <= d["model.init_args.optimizer.init_args.lr"] <= 1e-3 for d in draws)
    assert all(d["data.init_args.batch_size"] == 64 for d in draws)
    assert len(expand(sweep)) == 10 and len(expand(load_sweep(sweep_doc(method="random", run_cap=3)))) == 3
    bayes = load_sweep(sweep_doc(method="bayes", parameters=params))  # runs as random search here
    assert expand(bayes, count=5, seed=1) == draws[:5]


@pytest.mark.parametrize("changes, key", [
    ({"method": "hyperband"}, "method"),
    ({"metrc": {"name": "val/loss"}}, "metrc"),
    ({"method": "bayes", "metric": None}, "metric.name"),
    ({"metric": {"name": "val/x", "goal": "max"}}, "metric.goal"),
    ({"metric": {"name": "test/downstream_acc", "goal": "maximize"}}, "metric.name"),  # never choose on test
    ({"parameters": {}}, "parameters"),
    ({"parameters": {EPS: {"values": []}}}, f"parameters.{EPS}.values"),
    ({"parameters": {EPS: {"vals": [1, 2]}}}, f"parameters.{EPS}.vals"),
    ({"parameters": {EPS: [1, 2]}}, f"parameters.{EPS}"),
    ({"parameters": {"model": {"parameters": {"lr": {"value": 1}}}}}, "parameters.model.parameters"),
    ({"parameters": {C: {"min": 0.1, "max": 1.0}}}, f"parameters.{C}"),  # a grid needs values
    ({"method": "random", "parameters": {C: {"min": 1.0, "max": 0.1}}}, f"parameters.{C}.max"),
    ({"method": "random", "parameters": {C: {"distribution": "log_uniform_values", "min": 0, "max": 1}}},
     f"parameters.{C}.min"),
    ({"method": "random", "parameters": {C: {"distribution": "normal", "mu": 0}}}, f"parameters.{C}.distribution"),
    ({"command": ["dpldm", "fit", "--config", "run.yaml"]}, "command"),  # no ${args}
    ({"command": ["python", "train.py", "${args}"]}, "command"),  # not dpldm fit
    ({"command": ["dpldm", "fit", "${args}"]}, "command"),  # no --config
    ({"command": ["dpldm", "fit", "--config", "run.yaml", "${args_no_hyphens}", "${args}"]}, "command"),
    ({"run_cap": 0}, "run_cap"),
])
def test_bad_sweep_files_fail_naming_the_key(changes, key):
    with pytest.raises(ConfigError) as err:
        load_sweep(sweep_doc(**changes))
    assert err.value.field == key and key in str(err.value)


def test_bad_files_and_arguments_are_one_line_errors(tmp_path, capsys):
    cases = [([write(tmp_path / "a.yaml", sweep_doc(method="hyperband"))], "method = 'hyperband': must be grid"),
             ([str(tmp_path / "missing.yaml")], "cannot be read"),
             ([write(tmp_path / "b.yaml", sweep_doc())], "run.yaml': no such config file"),
             ([write(tmp_path / "c.yaml", sweep_doc(command=["dpldm", "fit", "--config", str(tmp_path / "c.yaml"),
                                                             "${args}"])), "--dryrun"], "'--dryrun': is neither")]
    (tmp_path / "d.yaml").write_text("method: grid\nparameters: {a: [1, 2}\n")
    cases.append(([str(tmp_path / "d.yaml")], "is not valid YAML"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and message in err and err.startswith("dpldm sweep: error:"), err


def fake_fit(cmd: list[str], stdout, **kwargs) -> subprocess.CompletedProcess:
    """Stands in for ``python -m dpldm fit``: epsilon 1 fails, the others log a result."""
    if f"--{EPS}=1" in cmd:
        stdout.write("Traceback (most recent call last):\nValueError: boom\n\x1b[1mwandb\x1b[0m: Find logs at x\n")
        return subprocess.CompletedProcess(cmd, 1)
    logs = Path(cmd[-1].split("=", 1)[1]) / "logs" / "version_0"
    logs.mkdir(parents=True)
    eps = float(next(a for a in cmd if a.startswith(f"--{EPS}=")).split("=")[1])
    (logs / "privacy.json").write_text(json.dumps({
        "privacy/epsilon": eps * 0.99, "privacy/delta": 1e-5, "privacy/noise_multiplier": 4 / eps,
        "privacy/sample_rate": 0.01, "privacy/steps": 100.0, "accountant": "prv", "max_grad_norm": 1.0,
        "target_epsilon": eps}))
    (logs / "metrics.csv").write_text(f"step,val/downstream_acc,test/downstream_acc\n0,0.1,\n100,{eps / 20},{eps / 25}"
                                      "\n100,,\n")
    return subprocess.CompletedProcess(cmd, 0)


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    file = write(tmp_path / "sweep.yaml", sweep_doc(parameters={EPS: {"values": [1, 2, 5]}},
                                                    command=["dpldm", "fit", "--config", str(config), "${args}"]))
    monkeypatch.setattr(sweep_module.subprocess, "run", fake_fit)
    result = main([file, "--out", str(tmp_path / "out")])
    rows = result["rows"]
    assert [r["status"] for r in rows] == ["failed", "ok", "ok"]
    assert rows[0]["error"] == "exit 1: ValueError: boom" and rows[0]["epsilon"] is None
    assert rows[2]["metric"] == 0.25 and rows[2]["epsilon"] == pytest.approx(4.95) and rows[2]["sigma"] == 0.8
    assert result["best"]["run"] == "run-002" and result["best"]["test_metric"] == 0.2
    with open(tmp_path / "out" / "results.csv") as f:
        assert [(r["status"], r["test_metric"]) for r in csv.DictReader(f)] == [("failed", ""), ("ok", "0.08"),
                                                                                 ("ok", "0.2")]
    out = capsys.readouterr().out
    assert "chosen on val/downstream_acc = 0.25; its test/downstream_acc = 0.2" in out  # the test value, reported once
    assert "[1/3] run-000: epsilon=1" in out and "ValueError: boom (log:" in out
    assert "Papernot & Steinke" in out and "--account-selection composes all runs" in out
    with pytest.raises(SystemExit):  # never over an earlier sweep
        main([file, "--out", str(tmp_path / "out")])
    assert "already holds runs" in capsys.readouterr().err


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_are_valid_and_run_existing_configs(path, monkeypatch, capsys):
    doc = yaml.safe_load(path.read_text())
    assert doc["command"][:2] == ["dpldm", "fit"] and doc["command"][-1] == "${args}"  # as the W&B agent runs it
    sweep = load_sweep(path)
    assert set(sweep.parameters) == {EPS, C} and sweep.parameters[EPS]["values"] == [1, 2, 5, 10]
    assert (sweep.metric, sweep.goal) in {("val/downstream_acc", "maximize"), ("val/fid_glyph", "minimize")}
    monkeypatch.chdir(ROOT)
    result = main([str(path.relative_to(ROOT)), "--dry-run", "--", "--trainer.max_epochs=1"])
    commands = result["commands"]
    assert len(commands) == (12 if sweep.method == "grid" else sweep.run_cap)
    assert f"{len(commands)} run(s)" in capsys.readouterr().out
    for cmd in commands:
        config = cmd[cmd.index("--config") + 1]
        assert (ROOT / config).is_file() and not config.startswith("configs/sweeps")
        assert cmd[-2:] == ["--trainer.max_epochs=1", f"--trainer.default_root_dir={cmd[-1].split('=', 1)[1]}"]
        assert sum(a.startswith("--trainer.default_root_dir") for a in cmd) == 1
        assert 0.01 <= float(next(a for a in cmd if a.startswith(f"--{C}=")).split("=")[1]) <= 1.0


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_optimise_a_metric_computed_on_the_val_split(path):
    """The sweep's metric is one its run config's metric callbacks compute on the data's val split."""
    import importlib

    from dpldm.callbacks import SampleSettings

    sweep = load_sweep(path)
    run = yaml.safe_load((ROOT / sweep.configs[0]).read_text())
    keys = []
    for cb in run["trainer"]["callbacks"]:
        module, name = cb["class_path"].rsplit(".", 1)
        args = {k: v for k, v in cb.get("init_args", {}).items() if k != "extractor"}  # the metric's features: lazy
        args["sampling"] = SampleSettings(**args.get("sampling", {}))
        if name in ("DownstreamAccuracy", "FID"):
            keys += getattr(importlib.import_module(module), name)(**args).keys()
    assert sweep.metric.startswith("val/") and sweep.metric in keys
    assert sweep.metric.replace("val/", "test/") in keys  # and the final test value beside it, to report once


def test_shipped_sweeps_cover_grid_and_bayes():
    methods = {load_sweep(p).method for p in SWEEPS}
    assert {"grid", "bayes"} <= methods


def test_tiny_sweep_end_to_end_with_the_selection_accounted(tmp_path, capsys):
    config = tiny_dp_config(tmp_path / "tiny", max_steps=2, privacy={"log_private_metrics": True})
    file = write(tmp_path / "sweep.yaml", {
        "method": "grid", "metric": {"name": "train/loss", "goal": "minimize"},
        "parameters": {EPS: {"values": [2, 8]}, C: {"values": [0.5]}},
        "command": ["dpldm", "fit", "--config", config, "${args}"]})
    out = tmp_path / "out"
    result = main([file, "--out", str(out), "--account-selection", "--",  # overrides for every run
                   "--trainer.enable_checkpointing=false", "--model.init_args.noise_draws=1"])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and [r["status"] for r in rows] == ["ok", "ok"], rows
    for row, target in zip(rows, (2, 8)):
        assert float(row[EPS]) == float(row["target_epsilon"]) == target and float(row["C"]) == 0.5
        assert 0 < float(row["epsilon"]) <= target and float(row["steps"]) == 2 and row["metric"]
        assert (out / row["run"] / "fit.log").is_file() and not (out / row["run"] / "checkpoints").exists()
    for plot in ("metric_vs_epsilon.png", "steps_vs_epsilon.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "Papernot & Steinke" in printed and "best (minimize train/loss): run-00" in printed
    assert "train/loss is computed on the private training batches" in printed
    acc = PrivacyAccountant("prv", float(rows[0]["delta"]))
    for row in rows:
        acc.add(float(row["sigma"]), float(row["q"]), int(float(row["steps"])))
    eps = result["selection_epsilon"]
    assert eps == pytest.approx(acc.epsilon(), rel=1e-9) and eps > max(float(r["epsilon"]) for r in rows)
    assert f"epsilon = {eps:.4g} at delta" in printed
    # the same runs, ready to declare as the prior of a retrained model: its accountant composes them as above
    import yaml

    from dpldm.privacy import PriorRelease

    block = yaml.safe_load(printed.split("model.init_args.privacy.init_args:\n")[1].split("\n")[0])
    declared = [PriorRelease(**r) for r in block["prior"]]
    segments = [(r.noise_multiplier, r.sample_rate, r.steps) for r in declared]
    assert [x for seg in segments for x in seg] == pytest.approx(
        [x for r in rows for x in (float(r["sigma"]), float(r["q"]), int(float(r["steps"])))], rel=1e-5)
    assert PrivacyAccountant("prv", float(rows[0]["delta"]), segments).epsilon() == pytest.approx(eps, rel=1e-4)
