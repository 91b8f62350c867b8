"""The model card's public base models: each part's source as configured, its file hash when on disk."""

import hashlib

import yaml

from dpldm.export.card import base_models


def test_single_files_are_named_with_their_yaml_or_config_and_hashed(tmp_path):
    ckpt = tmp_path / "sd15.safetensors"
    ckpt.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()[:16]
    cfg = {"trainer": {"default_root_dir": str(tmp_path / "run")}, "model": {"init_args": {
        "unet": {"init_args": {"path": str(ckpt), "original_config": "v1-inference.yaml"}},
        "autoencoder": {"init_args": {"vae": {"init_args": {"path": "some/hub-id", "subfolder": "vae"}}}},
        "conditioner": {"class_path": "dpldm.modules.PipelineTextEncoder",
                        "init_args": {"path": str(ckpt), "config": "stable-diffusion-v1-5/stable-diffusion-v1-5"}}}}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = base_models(cfg, str(tmp_path / "run"))
    assert lines == [
        f"- UNet: `{ckpt}` (YAML `v1-inference.yaml`), weights sha256 {digest}…",
        "- autoencoder: `some/hub-id` (subfolder `vae`)",
        f"- text encoder: `{ckpt}` (config and tokenizer `stable-diffusion-v1-5/stable-diffusion-v1-5`), "
        f"weights sha256 {digest}…",
    ]
