"""CompVis-layout checkpoints (latent-diffusion / DP-LDM ``.ckpt``, Stable Diffusion single files) with their YAML:
tiny models written in that layout load with every tensor equal to the one written, strictly, with the YAML's
forward process; what diffusers cannot express is refused by name."""

from __future__ import annotations

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel

from dpldm.errors import ConfigError
from dpldm.modules import ClassEmbedder, load_autoencoder, load_unet
from dpldm.modules.hub import PretrainedMismatchError
from tests.modules.compvis import unet_to_compvis, vae_to_compvis, write_compvis

ATTENTION = [True, False]  # CompVis attention_resolutions [1]: attention at the first level only


def compvis_yaml(vq: bool = False, **params) -> dict:
    """A CompVis LatentDiffusion YAML of a tiny class-conditional LDM: 8x8x1 images, f = 2, 4x4x4 latents."""
    ddconfig = {"double_z": not vq, "z_channels": 4, "resolution": 8, "in_channels": 1, "out_ch": 1, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    first = ({"target": "ldm.models.autoencoder.VQModelInterface", "params": {"embed_dim": 4, "n_embed": 16,
                                                                              "ddconfig": ddconfig}} if vq else
             {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": ddconfig}})
    unet = {"image_size": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 16, "use_scale_shift_norm": True}
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "image_size": 4, "channels": 4,
        "cond_stage_key": "class_label", "conditioning_key": "crossattn", **params,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": first,
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": 10, "embed_dim": 16, "key": "class_label"}}}}}


def reference_models(vq: bool = False):
    """The diffusers models the tiny YAML describes, with random weights (what the file is written from)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                attention_head_dim=2, cross_attention_dim=16, resnet_time_scale_shift="scale_shift")
    common = dict(in_channels=1, out_channels=1, block_out_channels=(32, 64), latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae = VQModel(**common, num_vq_embeddings=16, vq_embed_dim=4) if vq else AutoencoderKL(**common)
    for p in [*unet.parameters(), *vae.parameters()]:  # no zero-initialised tensor: a swap would show
        torch.nn.init.normal_(p, std=0.1)
    return unet, vae


def write(tmp_path, vq=False, name="model.ckpt", ema=False, scale_factor=0.5, drop=None, **params):
    unet, vae = reference_models(vq)
    compvis_unet = unet_to_compvis(unet.state_dict(), 1, ATTENTION)
    ema_unet = {k: v + 1 for k, v in compvis_unet.items()} if ema else None
    if drop:
        compvis_unet.pop(drop)
    embedding = torch.randn(10, 16)
    write_compvis(tmp_path / name, compvis_unet, vae_to_compvis(vae.state_dict(), 2), embedding, ema_unet,
                  scale_factor)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(compvis_yaml(vq, **params)))
    return str(tmp_path / name), str(tmp_path / "model.yaml"), unet, vae, embedding


def assert_same_tensors(loaded: torch.nn.Module, reference: torch.nn.Module, shift: float = 0.0) -> None:
    want = reference.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value + shift), key


@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors"])
def test_unet_and_autoencoder_load_every_tensor_as_written(tmp_path, name):
    path, config, unet, vae, _ = write(tmp_path, name=name)
    loaded = load_unet(path, original_config=config)
    assert loaded.config.resnet_time_scale_shift == "scale_shift" and loaded.config.sample_size == 4
    assert_same_tensors(loaded, unet)
    loaded_vae = load_autoencoder(path, original_config=config)
    assert isinstance(loaded_vae, AutoencoderKL) and loaded_vae.config.scaling_factor == 0.5  # the buffer's
    assert_same_tensors(loaded_vae, vae)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded_vae(x).sample, vae(x).sample)  # the 1x1-conv attention became linear


def test_vq_autoencoder_and_the_ema_copy(tmp_path):
    path, config, unet, vae, _ = write(tmp_path, vq=True, ema=True, scale_factor=None)
    loaded = load_autoencoder(path, original_config=config)
    assert isinstance(loaded, VQModel) and loaded.config.scaling_factor == 1.0  # CompVis' default
    assert_same_tensors(loaded, vae)
    assert_same_tensors(load_unet(path, original_config=config), unet, shift=1.0)  # EMA: what CompVis samples
    assert_same_tensors(load_unet(path, original_config=config, ema=False), unet)


@pytest.mark.parametrize("parameterization, schedule, prediction, betas",
                         [("eps", "linear", "epsilon", "scaled_linear"), ("v", "cosine", "v_prediction",
                                                                          "squaredcos_cap_v2")])
def test_the_forward_process_comes_from_the_yaml(tmp_path, parameterization, schedule, prediction, betas):
    from dpldm.modules.schedule import training_schedule

    path, config, *_ = write(tmp_path, parameterization=parameterization, beta_schedule=schedule)
    base = load_unet(path, original_config=config).base_scheduler_config
    schedule = training_schedule(None, base)
    assert schedule.config.prediction_type == prediction and schedule.config.beta_schedule == betas
    if betas == "scaled_linear":  # CompVis: linspace(sqrt(start), sqrt(end)) ** 2
        want = torch.linspace(0.0015 ** 0.5, 0.0155 ** 0.5, 1000, dtype=torch.float64) ** 2
        torch.testing.assert_close(schedule.betas.double(), want, atol=1e-7, rtol=0)


def test_the_class_embedder_starts_from_the_checkpoint_with_a_mean_null_class(tmp_path):
    path, _, _, _, embedding = write(tmp_path)
    embedder = ClassEmbedder(num_classes=3, embed_dim=16, num_tokens=1, init_from=path, init_classes=[7, 2, 0])
    want = torch.cat([embedding[[7, 2, 0]], embedding.mean(0, keepdim=True)])
    assert torch.equal(embedder.embedding.weight.detach(), want)
    with pytest.raises(ValueError, match="do not fit"):  # CompVis: one token per class
        ClassEmbedder(num_classes=10, embed_dim=16, num_tokens=4, init_from=path)


def test_loading_is_strict_and_names_what_it_cannot_express(tmp_path):
    path, config, *_ = write(tmp_path, drop="input_blocks.1.1.proj_in.weight")
    with pytest.raises(PretrainedMismatchError, match="missing .*down_blocks.0.attentions.0.proj_in.weight"):
        load_unet(path, original_config=config)
    with pytest.raises(ConfigError, match="original_config"):
        load_unet(path)
    cfg = compvis_yaml()
    cfg["model"]["params"]["unet_config"]["params"]["resblock_updown"] = True  # DP-LDM's own UNets use it
    (tmp_path / "updown.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="resblock_updown"):
        load_unet(path, original_config=str(tmp_path / "updown.yaml"))
    cfg = compvis_yaml()
    cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["attn_resolutions"] = [4]
    (tmp_path / "attn.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="attn_resolutions"):
        load_autoencoder(path, original_config=str(tmp_path / "attn.yaml"))


def test_a_dp_fit_from_a_compvis_checkpoint_exports_without_it(tmp_path, monkeypatch):
    """configs/quickstart/finetune.yaml on the bundled digits (8x8) with every public part from one CompVis
    checkpoint (v-parameterised): DP steps on the YAML's forward process, the run's export samples as the run
    does with the checkpoint file deleted, and the model card hashes the file it started from."""
    from diffusers import DiffusionPipeline

    from dpldm.cli import main
    from dpldm.commands.lightning_cli import DPLDMCLI
    from dpldm.runs import load_run
    from tests.conftest import REPO

    path, config, *_ = write(tmp_path, parameterization="v")
    model = "--model.init_args"
    cli = DPLDMCLI(args=[
        "fit", "--config", f"{REPO}/configs/quickstart/finetune.yaml",
        f"{model}.unet.init_args.path={path}", f"{model}.unet.init_args.original_config={config}",
        f"{model}.autoencoder.init_args.vae.init_args.path={path}",
        f"{model}.autoencoder.init_args.vae.init_args.original_config={config}",
        f"{model}.conditioner.init_args.init_from={path}", f"{model}.conditioner.init_args.embed_dim=16",
        f"{model}.conditioner.init_args.num_tokens=1", "--data.init_args.source.init_args.image_size=8",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.max_epochs=null", "--trainer.max_steps=2", "--trainer.callbacks=[]", "--trainer.logger=false",
        f"{model}.sampling_steps=2"])
    fitted = cli.model
    assert fitted.dp.accountant.steps == 2 and fitted.noise_scheduler.config.prediction_type == "v_prediction"
    main(["export", str(tmp_path / "run"), str(tmp_path / "exported")])
    card = (tmp_path / "exported" / "README.md").read_text()
    assert f"`{path}` (YAML `{config}`), weights sha256" in card
    (tmp_path / "model.ckpt").unlink()
    monkeypatch.chdir(tmp_path)
    want = load_run(str(tmp_path / "run")).sample(torch.tensor([1, 8]), num_steps=2,  # from its own files
                                                  generator=torch.Generator().manual_seed(0))
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "exported"), trust_remote_code=True)
    got = pipe(class_labels=[1, 8], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert torch.allclose(got, want, atol=1e-5)
