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


def test_the_card_of_a_run_with_declared_prior_releases_lists_them_beside_the_composed_guarantee(tmp_path):
    from dpldm.export.card import model_card
    from dpldm.privacy import PriorRelease
    from dpldm.privacy.accounting import epsilon_for
    from tests.privacy.common import dp_model

    record = {"privacy/epsilon": 7.9, "privacy/delta": 1e-5, "privacy/noise_multiplier": 1.2,
              "privacy/sample_rate": 0.01, "privacy/expected_batch_size": 16.0, "privacy/steps": 40.0}
    (tmp_path / "run").mkdir()
    cfg = {"trainer": {"default_root_dir": str(tmp_path / "run")}, "model": {"init_args": {}}}
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    plain = model_card("m", dp_model(), record, cfg, str(tmp_path / "run"))
    assert "(ε = 7.9, δ = 1e-05)-DP" in plain and "prior releases" not in plain
    card = model_card("m", dp_model(prior=[PriorRelease(1.5, 0.01, 50)]), record, cfg, str(tmp_path / "run"))
    alone = epsilon_for(1.5, 0.01, 50, 1e-5, "prv")
    assert (f"| composed with | 1 prior release on the same images (ε = {alone:.3g} alone; σ, q, T: "
            "(1.5, 0.01, 50)) |") in card
