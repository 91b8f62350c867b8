"""Sweep files under W&B's own agent (``wandb agent``), offline: the real ``wandb.wandb_agent.Agent`` builds and
runs each command; only the server is a stub (the sweep's config, an agent id, and heartbeats that hand out
the grid one run at a time, as the W&B sweep controller does)."""

from __future__ import annotations

import multiprocessing
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

from dpldm.commands.sweep import expand, load_sweep, read_run
from tests.privacy.tiny_fit import tiny_dp_config

ROOT = Path(__file__).resolve().parents[1]
EPS = "model.init_args.privacy.init_args.epsilon"
C = "model.init_args.privacy.init_args.max_grad_norm"
AGENT_VARS = ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH")


class StubServer:
    """What the W&B server tells an agent: the sweep YAML, then one ``run`` command per parameter set, each
    handed out once the previous run has ended."""

    def __init__(self, sweep_file: Path):
        self.config = sweep_file.read_text()
        self.todo = [{k: {"value": v} for k, v in p.items()} for p in expand(load_sweep(sweep_file))]
        self.issued: list[dict] = []

    def heartbeat(self, api, agent_id, metrics, run_states) -> list[dict]:
        if run_states or not self.todo:  # a run still going, or nothing left (the agent stops at its count)
            return []
        self.issued.append(self.todo.pop(0))
        return [{"type": "run", "run_id": f"r{len(self.issued) - 1}", "program": None, "args": self.issued[-1]}]

    def run_agent(self, monkeypatch, count: int) -> None:
        import wandb
        import wandb.apis.public.sweeps as server
        from wandb import wandb_agent

        monkeypatch.setattr(server, "_sweep_with_runs", lambda *a, **k: {"config": self.config})
        monkeypatch.setattr(server, "_register_agent", lambda *a, **k: {"id": "agent-0"})
        monkeypatch.setattr(server, "_agent_heartbeat", self.heartbeat)
        monkeypatch.setattr(wandb, "Api", lambda *a, **k: None)  # re-made after every run; nothing to reach
        monkeypatch.setattr(wandb, "teardown", lambda *a, **k: None)
        monkeypatch.setattr(wandb_agent.Agent, "POLL_INTERVAL", 0.2)
        wandb_agent.Agent(None, multiprocessing.Queue(), sweep_id="stub", count=count).run()


@pytest.fixture
def agent_env(tmp_path, monkeypatch):
    """The agent's working folder and a PATH on which ``dpldm`` is this interpreter's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(ROOT)
    saved = {var: os.environ.get(var) for var in AGENT_VARS}
    yield bin_dir
    for var, value in saved.items():  # the agent sets these in os.environ itself: not this process's after the test
        os.environ.pop(var, None)
        if value is not None:
            os.environ[var] = value


def shim(bin_dir: Path, extra: str = "") -> None:
    """``dpldm`` on PATH: ``python -m dpldm "$@"`` + ``extra``."""
    path = bin_dir / "dpldm"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dpldm "$@" {extra}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_the_wandb_agent_runs_a_dp_sweep_offline(tmp_path, agent_env, monkeypatch):
    shim(agent_env)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the runs' own W&B runs, on disk: their names can be read back
    config = tiny_dp_config(tmp_path / "tiny", max_steps=2)
    root = tmp_path / "agent-runs"
    file = tmp_path / "sweep.yaml"
    file.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "train/loss", "goal": "minimize"},
        "parameters": {EPS: {"values": [2, 8]}, C: {"values": [0.5]}},
        "command": ["dpldm", "fit", "--config", config, f"--trainer.default_root_dir={root}",
                    "--model.init_args.noise_draws=1", "${args}"]}))
    server = StubServer(file)
    server.run_agent(monkeypatch, count=2)
    assert [a[EPS]["value"] for a in server.issued] == [2, 8] and not server.todo
    assert sorted(p.name for p in root.iterdir()) == ["r0", "r1"]  # a folder per W&B run id, nothing shared
    for i, target in enumerate((2, 8)):  # each run trained with the values the server handed out, in its folder
        run = root / f"r{i}"
        report = read_run(run, None)
        assert report["target_epsilon"] == target and report["C"] == 0.5 and report["steps"] == 2
        assert 0 < report["epsilon"] <= target
        assert (run / "checkpoints" / "last.ckpt").is_file() and len(list(run.rglob("privacy.json"))) == 1
        (wandb_run,) = (run / "wandb").glob(f"offline-run-*-r{i}")  # W&B's run of the agent's id, in the folder
        name = f"{run} epsilon={target} max_grad_norm=0.5"  # its name: the folder and the swept values
        assert name.encode() in (wandb_run / f"run-r{i}.wandb").read_bytes()
    assert (tmp_path / "wandb" / "sweep-None" / "config-r1.yaml").is_file()  # the agent's own book-keeping


@pytest.mark.parametrize("name", ["quickstart_grid.yaml", "quickstart_bayes.yaml"])
def test_the_wandb_agent_command_of_a_shipped_sweep_parses(name, tmp_path, agent_env, monkeypatch, capfd):
    shim(agent_env, "--print_config")  # the full CLI parse of the agent's command line, without fitting
    server = StubServer(ROOT / "configs" / "sweeps" / name)
    server.run_agent(monkeypatch, count=1)
    privacy = yaml.safe_load(capfd.readouterr().out)["model"]["init_args"]["privacy"]["init_args"]
    assert privacy["epsilon"] == server.issued[0][EPS]["value"] and privacy["max_grad_norm"] == server.issued[0][C]["value"]
