"""An unconditional LDM (a diffusers ``UNet2DModel``, as CompVis/ldm-celebahq-256): DP fine-tuning of its
self-attention modules only, exported as diffusers' standard ``LDMPipeline``."""

from __future__ import annotations

import pytest
import torch

from dpldm.cli import main
from dpldm.commands.lightning_cli import DPLDMCLI
from dpldm.runs import load_run
from tests.conftest import REPO

MODEL = "--model.init_args"


def write_tiny_ldm_uncond(folder):
    """A tiny folder in the layout of CompVis/ldm-celebahq-256: ``unet/`` (a UNet2DModel with self-attention at
    its second level and in the middle), ``vqvae/`` (a VQModel, 1 channel, f = 2) and ``scheduler/`` (DDIM)."""
    from diffusers import DDIMScheduler, UNet2DModel, VQModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8, norm_num_groups=8).save_pretrained(folder / "unet")
    VQModel(in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=4, num_vq_embeddings=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4).save_pretrained(folder / "vqvae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                  clip_sample=False).save_pretrained(folder / "scheduler")
    return folder


def fit(base, tmp_path, *extra):
    return DPLDMCLI(args=[
        "fit", "--config", f"{REPO}/configs/quickstart/finetune.yaml",
        f"{MODEL}.unet.init_args.path={base}", f"{MODEL}.unet.init_args.subfolder=unet",
        f"{MODEL}.autoencoder.init_args.vae.init_args.path={base}",
        f"{MODEL}.autoencoder.init_args.vae.init_args.subfolder=vqvae",
        f"{MODEL}.conditioner=dpldm.modules.Unconditional", "--data.init_args.source.init_args.image_size=8",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.max_epochs=null", "--trainer.max_steps=2", "--trainer.callbacks=[]", "--trainer.logger=false",
        f"{MODEL}.sampling_steps=2", *extra])


def test_dp_fine_tunes_the_self_attention_and_exports_an_ldm_pipeline(tmp_path, capsys, caplog):
    from diffusers import LDMPipeline, UNet2DModel
    from diffusers.models.attention_processor import Attention

    base = write_tiny_ldm_uncond(tmp_path / "base")
    cli = fit(base, tmp_path)
    model = cli.model
    reference = UNet2DModel.from_pretrained(base, subfolder="unet")
    assert isinstance(model.unet, UNet2DModel) and model.dp.accountant.steps == 2
    attention = {n for n, m in model.unet.named_modules() if isinstance(m, Attention)}
    assert len(attention) == 4  # down level 2, middle, two in the first up level
    trained = {n for n, p in model.unet.named_parameters() if p.requires_grad}
    assert trained == {f"{a}.{n}" for a in attention for n, _ in model.unet.get_submodule(a).named_parameters()}
    in_optimizer = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.unet.parameters() if p.requires_grad}  # no conditioner to train
    after = model.unet.state_dict()
    for name, value in reference.state_dict().items():  # the frozen rest bit-identical
        assert name in trained or torch.equal(after[name], value), name
    assert any(not torch.equal(after[n], reference.state_dict()[n]) for n in trained)  # the scope moved

    main(["export", str(tmp_path / "run"), str(tmp_path / "exported")])
    run = load_run(str(tmp_path / "run"))
    want = run.sample(torch.zeros(3), num_steps=2, generator=torch.Generator().manual_seed(4))  # [3, 1, 8, 8]
    pipe = LDMPipeline.from_pretrained(str(tmp_path / "exported"))
    got = pipe(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(4),
               output_type="np").images  # [3, 8, 8, 1] in [0, 1]
    torch.testing.assert_close(torch.from_numpy(got).permute(0, 3, 1, 2), (want + 1) / 2, atol=1e-5, rtol=0)
    assert "LDMPipeline.from_pretrained" in (tmp_path / "exported" / "README.md").read_text()

    import numpy as np

    capsys.readouterr()
    caplog.clear()
    main(["sample", str(tmp_path / "run"), "--labels", "all", "--repeat", "3", "--steps", "2",
          "--out", str(tmp_path / "samples")])
    assert "3 samples ->" in capsys.readouterr().out
    assert "GPU available" not in caplog.text and "Seed set" not in caplog.text  # a command that does not train
    assert np.load(tmp_path / "samples" / "samples.npz")["images"].shape == (3, 8, 8, 1)


def test_a_conditioner_and_an_unconditional_unet_are_refused_by_name(tmp_path):
    base = write_tiny_ldm_uncond(tmp_path / "base")
    with pytest.raises(ValueError, match="conditioner = 'ClassEmbedder': an unconditional UNet"):
        DPLDMCLI(args=["--config", f"{REPO}/configs/quickstart/finetune.yaml",
                       f"{MODEL}.unet.init_args.path={base}", f"{MODEL}.unet.init_args.subfolder=unet",
                       f"{MODEL}.autoencoder.init_args.vae.init_args.path={base}",
                       f"{MODEL}.autoencoder.init_args.vae.init_args.subfolder=vqvae",
                       f"{MODEL}.conditioner.init_args.embed_dim=16", f"{MODEL}.conditioner.init_args.init_from=null",
                       "--trainer.max_steps=1"], run=False)
    with pytest.raises(ValueError, match="scope.kind = 'cross_attention': an unconditional UNet"):
        fit(base, tmp_path, f"{MODEL}.scope.init_args.kind=cross_attention")
    with pytest.raises(ValueError, match="scope.kind = 'lora': diffusers' UNet2DModel takes no PEFT adapters"):
        fit(base, tmp_path, f"{MODEL}.scope.init_args.kind=lora")
