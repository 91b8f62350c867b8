"""The text-to-image recipes that keep the base model's own text encoder, each on a tiny pipeline folder in its
base model's layout: a DP fit through the latent cache, the text encoder frozen and bit-identical after it, and
an export to the base model's standard diffusers pipeline that samples the run's images for a seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpldm.cli import main
from dpldm.commands.lightning_cli import DPLDMCLI
from dpldm.runs import load_run
from tests.conftest import write_tiny_ldm_text, write_tiny_sd
from tests.shards import write_shards

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL = "--model.init_args"
SRC = "--data.init_args.source.init_args"


def dp_fit(config: str, base: str, tmp_path: Path, *extra: str) -> DPLDMCLI:
    """Two DP steps of ``config`` with every public part from the folder ``base``, on 6 written records."""
    write_shards(tmp_path / "shards", num_shards=1, per_shard=6)
    return DPLDMCLI(args=[
        "fit", "--config", str(CONFIGS / config), f"{MODEL}.unet.init_args.path={base}",
        f"{MODEL}.autoencoder.init_args.vae.init_args.path={base}", f"{MODEL}.conditioner.init_args.path={base}",
        f"{SRC}.train_shards={tmp_path}/shards/shard-00000.tar", f"{SRC}.num_workers=0",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.max_epochs=null", "--trainer.max_steps=2", "--trainer.callbacks=[]",
        f"{MODEL}.privacy.init_args.max_physical_batch_size=4", f"{MODEL}.sampling_steps=2", *extra])


def check_frozen_text_encoder(model, reference: torch.nn.Module) -> None:
    assert model.dp is not None and model.dp.accountant.steps == 2
    for k, v in model.conditioner.text_model.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k
    assert not any(p.requires_grad for p in model.conditioner.parameters())


def test_stable_diffusion_keeps_its_clip_and_exports_as_a_stable_diffusion_pipeline(tmp_path):
    """configs/sd/finetune.yaml on a tiny SD layout with a v-prediction scheduler: the schedule and its prediction
    type are the base pipeline's; training runs at latent_size, not the UNet's sample_size."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    sd = str(write_tiny_sd(tmp_path / "sd", prediction_type="v_prediction"))
    model = dp_fit("sd/finetune.yaml", sd, tmp_path, f"{MODEL}.latent_size=4", f"{SRC}.image_size=16",
                   "--trainer.precision=32-true").model
    assert type(model.conditioner.text_model).__name__ == "CLIPTextModel" and model.latent_shape == (4, 4, 4)
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    check_frozen_text_encoder(model, CLIPTextModel.from_pretrained(sd, subfolder="text_encoder"))

    main(["export", str(tmp_path / "run"), str(tmp_path / "exported")])
    run = load_run(str(tmp_path / "run"))
    prompts = ["a photo of item 1", "a red square"]
    want = run.sample(prompts, num_steps=2, generator=torch.Generator().manual_seed(3))  # [B, 3, 16, 16]
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "exported"))
    got = pipe(prompts, num_inference_steps=2, guidance_scale=run.guidance_scale, output_type="pt",
               generator=torch.Generator().manual_seed(3)).images  # [B, 3, 16, 16] in [0, 1]
    torch.testing.assert_close(got, (want + 1) / 2, atol=1e-4, rtol=0)
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "StableDiffusionPipeline.from_pretrained" in card and "text encoder" in card


@pytest.mark.parametrize("vq", [False, True])
def test_dp_ldm_text_setting_keeps_ldm_bert_and_exports_as_an_ldm_text_to_image_pipeline(tmp_path, vq):
    """configs/laion/finetune.yaml (DP-LDM's text setting) on a tiny CompVis/ldm-text2im-large-256 layout, with
    its KL autoencoder or a VQ one (cached encodings [c, h, w], quantised when decoded)."""
    from diffusers import LDMTextToImagePipeline
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

    ldm = str(write_tiny_ldm_text(tmp_path / "ldm", vq=vq))
    model = dp_fit("laion/finetune.yaml", ldm, tmp_path, f"{SRC}.image_size=32", f"{SRC}.val_shards=null").model
    assert model.autoencoder.quantised == vq
    check_frozen_text_encoder(model, LDMBertModel.from_pretrained(ldm, subfolder="bert"))

    main(["export", str(tmp_path / "run"), str(tmp_path / "exported")])
    run = load_run(str(tmp_path / "run"))
    prompts = ["a red square"]
    want = run.sample(prompts, num_steps=2, generator=torch.Generator().manual_seed(5))  # [1, 3, 32, 32]
    pipe = LDMTextToImagePipeline.from_pretrained(str(tmp_path / "exported"))
    got = pipe(prompts, height=64, width=64, num_inference_steps=2, guidance_scale=run.guidance_scale,  # 8x8 latents
               output_type="pt", generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(got, (want + 1) / 2, atol=1e-4, rtol=0)
    assert "LDMTextToImagePipeline.from_pretrained" in (tmp_path / "exported" / "README.md").read_text()
