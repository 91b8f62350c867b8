"""W&B logging: offline by itself without an API key or network, and on by default in the CLI."""

import socket

import pytest

from dpldm import loggers
from dpldm.loggers import WandbLogger, wandb_online_reason


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no `wandb login` either
    return monkeypatch


def test_offline_without_an_api_key(no_wandb_env):
    assert "no API key" in wandb_online_reason()


def test_offline_without_network(no_wandb_env):
    no_wandb_env.setenv("WANDB_API_KEY", "x" * 40)

    def unreachable(*args, **kwargs):
        raise OSError("no route")

    no_wandb_env.setattr(socket, "create_connection", unreachable)
    assert "unreachable" in wandb_online_reason()


def test_online_with_a_key_in_netrc_and_a_reachable_host(no_wandb_env, tmp_path):
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    no_wandb_env.setattr(socket, "create_connection", lambda *a, **k: socket.socket())
    assert wandb_online_reason() is None


def test_logger_decides_offline_and_respects_wandb_mode(no_wandb_env, tmp_path):
    assert WandbLogger(save_dir=str(tmp_path))._offline
    no_wandb_env.setattr(loggers, "wandb_online_reason", lambda: None)
    assert not WandbLogger(save_dir=str(tmp_path))._offline
    no_wandb_env.setenv("WANDB_MODE", "disabled")
    assert wandb_online_reason() == "WANDB_MODE=disabled"


def test_cli_logs_to_csv_and_wandb_by_default():
    from pathlib import Path

    from lightning.pytorch.loggers import CSVLogger

    from dpldm.cli import DPLDMCLI

    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "autoencoder.yaml"
    cli = DPLDMCLI(args=["--config", str(config)], run=False)
    kinds = [type(lg) for lg in cli.trainer.loggers]
    assert kinds == [CSVLogger, WandbLogger]  # CSV first: trainer.log_dir stays next to the checkpoints
