"""CompVis-layout checkpoints (latent-diffusion / DP-LDM ``.ckpt``, Stable Diffusion single files) with their YAML:
tiny models written in that layout load with every tensor equal to the one written, strictly, with the YAML's
forward process; what diffusers cannot express is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel

from dpldm.errors import ConfigError
from dpldm.modules import ClassEmbedder, load_autoencoder, load_unet
from dpldm.modules.hub import PretrainedMismatchError
from dpldm.modules.unet_updown import UpDownUNet2DConditionModel
from tests.modules.compvis import unet_to_compvis, vae_to_compvis, write_compvis

ATTENTION = [True, False]  # CompVis attention_resolutions [1]: attention at the first level only


def compvis_yaml(vq: bool = False, attn_resolutions: tuple[int, ...] = (), updown: bool = False, **params) -> dict:
    """A CompVis LatentDiffusion YAML of a tiny class-conditional LDM: 8x8x1 images, f = 2, 4x4x4 latents."""
    ddconfig = {"double_z": not vq, "z_channels": 4, "resolution": 8, "in_channels": 1, "out_ch": 1, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": list(attn_resolutions), "dropout": 0.0}
    first = ({"target": "ldm.models.autoencoder.VQModelInterface", "params": {"embed_dim": 4, "n_embed": 16,
                                                                              "ddconfig": ddconfig}} if vq else
             {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": ddconfig}})
    unet = {"image_size": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 16, "use_scale_shift_norm": True, "resblock_updown": updown}
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "image_size": 4, "channels": 4,
        "cond_stage_key": "class_label", "conditioning_key": "crossattn", **params,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": first,
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": 10, "embed_dim": 16, "key": "class_label"}}}}}


def reference_models(vq: bool = False, vae_attention: tuple[bool, bool] = (False, False), updown: bool = False):
    """The diffusers models the tiny YAML describes, with random weights (what the file is written from).
    ``vae_attention``: attention in the autoencoder's blocks, per level from the highest resolution; ``updown``:
    ResBlocks join the UNet's levels."""
    torch.manual_seed(0)
    unet = (UpDownUNet2DConditionModel if updown else UNet2DConditionModel)(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                attention_head_dim=2, cross_attention_dim=16, resnet_time_scale_shift="scale_shift")
    common = dict(in_channels=1, out_channels=1, block_out_channels=(32, 64), latent_channels=4,
                  down_block_types=tuple(("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D")
                                         for a in vae_attention),
                  up_block_types=tuple(("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D")
                                       for a in reversed(vae_attention)))
    vae = VQModel(**common, num_vq_embeddings=16, vq_embed_dim=4) if vq else AutoencoderKL(**common)
    for p in [*unet.parameters(), *vae.parameters()]:  # no zero-initialised tensor: a swap would show
        torch.nn.init.normal_(p, std=0.1)
    return unet, vae


def write(tmp_path, vq=False, name="model.ckpt", ema=False, scale_factor=0.5, drop=None, attn_resolutions=(),
          updown=False, **params):
    unet, vae = reference_models(vq, tuple(r in attn_resolutions for r in (8, 4)), updown)
    compvis_unet = unet_to_compvis(unet.state_dict(), 1, ATTENTION)
    ema_unet = {k: v + 1 for k, v in compvis_unet.items()} if ema else None
    if drop:
        compvis_unet.pop(drop)
    embedding = torch.randn(10, 16)
    write_compvis(tmp_path / name, compvis_unet, vae_to_compvis(vae.state_dict(), 2), embedding, ema_unet,
                  scale_factor)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(compvis_yaml(vq, attn_resolutions, updown, **params)))
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
    (tmp_path / "updown.yaml").write_text(yaml.safe_dump(compvis_yaml(updown=True)))  # the file has resample convs
    with pytest.raises(PretrainedMismatchError, match=r"missing .*downsamplers.0.resnet.*unexpected .*downsamplers.0.conv"):
        load_unet(path, original_config=str(tmp_path / "updown.yaml"))
    cfg = compvis_yaml(attn_resolutions=[4])  # a YAML with block attention the file does not have
    (tmp_path / "attn.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(PretrainedMismatchError, match=r"missing \(30\): decoder.up_blocks.0.attentions.0"):
        load_autoencoder(path, original_config=str(tmp_path / "attn.yaml"))
    cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["attn_type"] = "linear"
    (tmp_path / "attn.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="attn_type.*vanilla"):
        load_autoencoder(path, original_config=str(tmp_path / "attn.yaml"))


@pytest.mark.parametrize("vq", [False, True])
def test_attention_inside_the_autoencoder_blocks_as_dp_ldm_trains_it(tmp_path, vq):
    """DP-LDM's autoencoders (attn_resolutions [32, 16, 8] of 32x32 images) attend inside the encoder's and
    decoder's blocks; here at the 4x4 level only, which is the decoder's first block in diffusers' order."""
    path, config, _, vae, _ = write(tmp_path, vq=vq, attn_resolutions=(4,))
    loaded = load_autoencoder(path, original_config=config)
    assert loaded.config.down_block_types == ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
    assert loaded.config.up_block_types == ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")
    assert_same_tensors(loaded, vae)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded(x).sample, vae(x).sample)


def compvis_resblock(weights: dict[str, torch.Tensor], x: torch.Tensor, emb: torch.Tensor, up: bool) -> torch.Tensor:
    """latent-diffusion's ``openaimodel.ResBlock(up=True | down=True, use_scale_shift_norm=True)``, written from
    its forward on its own parameter names: in_layers (GroupNorm(32), SiLU, [resample both paths], conv),
    emb_layers (SiLU, Linear -> scale, shift), out_layers (GroupNorm, FiLM, SiLU, dropout, conv), identity skip."""
    import torch.nn.functional as F

    w = lambda name: weights[name + ".weight"]  # noqa: E731
    b = lambda name: weights[name + ".bias"]  # noqa: E731
    resample = (lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")) if up else (lambda t: F.avg_pool2d(t, 2))
    h = F.silu(F.group_norm(x, 32, w("in_layers.0"), b("in_layers.0"), eps=1e-5))
    h, x = resample(h), resample(x)
    h = F.conv2d(h, w("in_layers.2"), b("in_layers.2"), padding=1)
    scale, shift = F.linear(F.silu(emb), w("emb_layers.1"), b("emb_layers.1"))[:, :, None, None].chunk(2, dim=1)
    h = F.group_norm(h, 32, w("out_layers.0"), b("out_layers.0"), eps=1e-5) * (1 + scale) + shift
    return x + F.conv2d(F.silu(h), w("out_layers.3"), b("out_layers.3"), padding=1)


def test_resblock_updown_unets_as_dp_ldm_trains_them(tmp_path):
    """DP-LDM's UNets join their levels by ResBlocks (resblock_updown): every tensor loads where it was written
    (raw and EMA), and each resampler computes CompVis' ResBlock on the checkpoint's own tensors."""
    from dpldm.modules.original import read_state

    path, config, unet, _, _ = write(tmp_path, ema=True, updown=True)
    loaded = load_unet(path, original_config=config, ema=False)
    assert type(loaded) is UpDownUNet2DConditionModel
    assert_same_tensors(loaded, unet)
    assert_same_tensors(load_unet(path, original_config=config), unet, shift=1.0)
    state = read_state(path, "path")
    emb = torch.randn(2, 128)  # the time embedding [B, 4 * 32]
    for prefix, resampler, channels, size, up in (
            ("input_blocks.2.0.", loaded.down_blocks[0].downsamplers[0], 32, 4, False),
            ("output_blocks.1.1.", loaded.up_blocks[0].upsamplers[0], 64, 2, True)):  # level 1 has no attention
        weights = {k[len("model.diffusion_model." + prefix):]: v for k, v in state.items()
                   if k.startswith("model.diffusion_model." + prefix)}
        x = torch.randn(2, channels, size, size)
        resampler.temb = emb
        torch.testing.assert_close(resampler(x), compvis_resblock(weights, x, emb, up))
    z, t, context = torch.randn(2, 4, 4, 4), torch.tensor([3, 700]), torch.randn(2, 1, 16)
    torch.testing.assert_close(loaded(z, t, context).sample, unet(z, t, context).sample)
    loaded.save_pretrained(tmp_path / "folder")  # a run's saved architecture reloads as the same class
    again = load_unet(str(tmp_path / "folder"))
    assert type(again) is UpDownUNet2DConditionModel
    torch.testing.assert_close(again(z, t, context).sample, unet(z, t, context).sample)


def test_a_dp_fit_from_a_compvis_checkpoint_exports_without_it(tmp_path, monkeypatch):
    """configs/quickstart/finetune.yaml on the bundled digits (8x8) with every public part from one checkpoint
    in DP-LDM's layout (resblock_updown UNet, attention in the autoencoder's blocks; v-parameterised): DP steps
    on the YAML's forward process, the run's export samples as the run does with the checkpoint file deleted,
    and the model card hashes the file it started from."""
    from diffusers import DiffusionPipeline

    from dpldm.cli import main
    from dpldm.commands.lightning_cli import DPLDMCLI
    from dpldm.runs import load_run
    from tests.conftest import REPO

    path, config, *_ = write(tmp_path, parameterization="v", updown=True, attn_resolutions=(4,))
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
    index = json.loads((tmp_path / "exported" / "model_index.json").read_text())
    assert index["unet"] == ["unet_updown", "UpDownUNet2DConditionModel"]  # the UNet's code travels with it
    assert (tmp_path / "exported" / "unet" / "unet_updown.py").exists()
    (tmp_path / "model.ckpt").unlink()
    monkeypatch.chdir(tmp_path)
    want = load_run(str(tmp_path / "run")).sample(torch.tensor([1, 8]), num_steps=2,  # from its own files
                                                  generator=torch.Generator().manual_seed(0))
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "exported"), trust_remote_code=True)
    got = pipe(class_labels=[1, 8], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert torch.allclose(got, want, atol=1e-5)
    without_dpldm = ("import sys, torch; sys.modules['dpldm'] = None\n"  # any import of dpldm now fails
                     "from diffusers import DiffusionPipeline\n"
                     f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'exported')!r}, trust_remote_code=True)\n"
                     "print(type(pipe.unet).__module__, pipe(class_labels=[1], num_inference_steps=2, "
                     "output_type='pt').images.shape)")
    done = subprocess.run([sys.executable, "-c", without_dpldm], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unet_updown torch.Size([1, 1, 8, 8])" in done.stdout
