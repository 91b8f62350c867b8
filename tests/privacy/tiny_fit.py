"""A tiny DP fit config for tests that run ``python -m dpldm fit`` in subprocesses (DDP, kill and resume)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import yaml

from tests.conftest import TINY_AE, TINY_UNET

ROOT = Path(__file__).resolve().parents[2]


class Throttle(L.Callback):
    """Slows each training step down, so that a test can kill the run mid-way."""

    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)


def tiny_dp_config(root, max_steps=6, privacy=None, optimizer=None, callbacks=()) -> str:
    """Write a DP fine-tuning config of tiny random models on the digits (8x8); returns its path."""
    cfg = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(root), "max_steps": max_steps, "accelerator": "cpu",
                    "use_distributed_sampler": False, "limit_val_batches": 0, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "callbacks": list(callbacks)},
        "model": {"class_path": "dpldm.modules.LatentDiffusion", "init_args": {
            "unet": {"class_path": "dpldm.modules.build_unet", "init_args": dict(TINY_UNET)},
            "autoencoder": {"class_path": "dpldm.modules.FrozenAutoencoder", "init_args": {"vae": {
                "class_path": "dpldm.modules.build_autoencoder", "init_args": dict(TINY_AE)}}},
            "conditioner": {"class_path": "dpldm.modules.ClassEmbedder",
                            "init_args": {"num_classes": 10, "embed_dim": 16}},
            "noise_draws": 2,
            "privacy": {"class_path": "dpldm.privacy.DifferentialPrivacy",
                        "init_args": {"epsilon": 8.0, "seed": 0, "max_physical_batch_size": 8, **(privacy or {})}},
            **({"optimizer": optimizer} if optimizer else {}),
        }},
        "data": {"class_path": "dpldm.datamodules.DigitsDataModule", "init_args": {"image_size": 8, "batch_size": 16}},
    }
    for part in ("unet", "autoencoder"):  # tuples -> lists for YAML
        node = cfg["model"]["init_args"][part]["init_args"]
        node = node["vae"]["init_args"] if part == "autoencoder" else node
        for k, v in node.items():
            node[k] = list(v) if isinstance(v, tuple) else v
    path = Path(root).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def dpldm(*args: str, wait: bool = True, **kw):
    """``python -m dpldm ARGS`` from the checkout, W&B off; a finished process or a running one."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "dpldm", *args]
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
