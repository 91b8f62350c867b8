"""W&B logging: offline by itself without an API key or network, and on by default in the CLI."""

import os
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
    assert WandbLogger(save_dir=str(tmp_path)).mode == "offline"
    no_wandb_env.setattr(loggers, "wandb_online_reason", lambda: None)
    assert WandbLogger(save_dir=str(tmp_path)).mode == "online"
    no_wandb_env.setenv("WANDB_MODE", "disabled")
    assert wandb_online_reason() == "WANDB_MODE=disabled"


def test_cli_logs_to_csv_and_wandb_by_default(no_wandb_env):
    from pathlib import Path

    from lightning.pytorch.loggers import CSVLogger

    from dpldm.commands.lightning_cli import DPLDMCLI

    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "autoencoder.yaml"
    cli = DPLDMCLI(args=["--config", str(config)], run=False)
    kinds = [type(lg) for lg in cli.trainer.loggers]
    assert kinds == [CSVLogger, WandbLogger]  # CSV first: trainer.log_dir stays next to the checkpoints


def _fit(config: str, *extra: str):
    from dpldm.commands.lightning_cli import DPLDMCLI

    return DPLDMCLI(args=["fit", "--config", config, *extra])


def test_wandb_mode_disabled_means_no_wandb_logger(monkeypatch, tmp_path):
    from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

    from dpldm.commands.lightning_cli import DPLDMCLI
    from tests.privacy.tiny_fit import tiny_dp_config

    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = tiny_dp_config(tmp_path / "run", max_steps=1)
    cli = DPLDMCLI(args=["--config", config], run=False)
    assert not [lg for lg in cli.trainer.loggers if isinstance(lg, LightningWandbLogger)]
    explicit = ("--trainer.logger=[{class_path: dpldm.loggers.WandbLogger, init_args: {save_dir: %s}}, "
                "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %s}}]" % (tmp_path, tmp_path))
    cli = DPLDMCLI(args=["--config", config, explicit], run=False)  # named in the config: still no W&B
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["CSVLogger"]
    _fit(config, "--trainer.enable_checkpointing=false", explicit)
    assert list(tmp_path.rglob("metrics.csv"))  # the run did train and log, to CSV only
    assert not list(tmp_path.rglob("wandb")) and os.environ["WANDB_MODE"] == "disabled"


def test_a_disabled_logger_used_directly_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(save_dir=str(tmp_path / "run"))
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.log_hyperparams({"lr": 0.1})
    logger.experiment.config.update({"a": 1})
    logger.finalize("success")
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())  # nothing on disk
    assert os.environ["WANDB_MODE"] == "disabled"  # not turned into offline ("dryrun")


@pytest.mark.parametrize("bad", ["--model.init_args.noise_draws=0",  # refused when the model is built
                                 "--model.init_args.privacy.init_args.delta=0.5"])  # refused in setup (delta < 1/N)
def test_an_offline_run_that_fails_a_config_check_leaves_no_wandb_folder(bad, monkeypatch, tmp_path):
    from dpldm.errors import ConfigError
    from tests.privacy.tiny_fit import tiny_dp_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    config = tiny_dp_config(tmp_path / "run", max_steps=1)
    with pytest.raises((ConfigError, ValueError), match=bad.split("=")[0].rsplit(".", 1)[1]):  # jsonargparse wraps
        _fit(config, bad)
    assert not list(tmp_path.rglob("wandb"))
