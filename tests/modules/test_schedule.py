"""The base pipeline's schedule and prediction type are what a fine-tune trains on (dpldm/modules/schedule.py)."""

import pytest
import torch
from diffusers import DDPMScheduler

from dpldm.errors import ConfigError
from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_autoencoder, build_unet, load_unet
from dpldm.modules.loss import UniformTimesteps, UnitWeighting, denoising_loss
from tests.conftest import TINY_AE, TINY_UNET


@pytest.fixture
def v_pipeline(tmp_path):
    """A tiny pipeline folder whose UNet was trained to predict v on its own betas (as SD 2.x 768 is)."""
    torch.manual_seed(0)
    build_unet(**TINY_UNET).save_pretrained(tmp_path / "unet")
    DDPMScheduler(prediction_type="v_prediction", beta_schedule="linear", beta_start=1e-4,
                  beta_end=0.02).save_pretrained(tmp_path / "scheduler")
    return tmp_path


def _model(unet, noise_scheduler=None):
    ae = FrozenAutoencoder(build_autoencoder(**TINY_AE))
    return LatentDiffusion(unet, ae, ClassEmbedder(3, embed_dim=16), noise_scheduler=noise_scheduler)


def test_a_v_prediction_base_model_trains_against_v(v_pipeline):
    unet = load_unet(str(v_pipeline), subfolder="unet")
    m = _model(unet)
    cfg = m.noise_scheduler.config
    assert cfg.prediction_type == "v_prediction" and cfg.beta_schedule == "linear" and cfg.beta_end == 0.02
    z0, ctx = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 16)
    torch.manual_seed(3)
    loss = denoising_loss(m.unet, z0, ctx, m.noise_scheduler, UniformTimesteps(), UnitWeighting())
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (2,))
    noise = torch.randn_like(z0)
    pred = m.unet(m.noise_scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=ctx).sample
    v = m.noise_scheduler.get_velocity(z0, noise, t)
    torch.testing.assert_close(loss, (pred - v).pow(2).flatten(1).mean(1))
    assert not torch.allclose(loss, (pred - noise).pow(2).flatten(1).mean(1))  # not the epsilon loss


def test_a_schedule_that_contradicts_the_base_model_is_refused(v_pipeline):
    unet = load_unet(str(v_pipeline), subfolder="unet")
    with pytest.raises(ConfigError, match=r"noise_scheduler.init_args.prediction_type.*v_prediction"):
        _model(unet, DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    with pytest.raises(ConfigError, match="beta_end"):
        _model(unet, DDPMScheduler(prediction_type="v_prediction", beta_schedule="linear", beta_end=0.012))
    same = DDPMScheduler(prediction_type="v_prediction", beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert _model(unet, same).noise_scheduler is same


def test_without_a_base_pipeline_the_default_is_ldm_s_schedule():
    m = _model(build_unet(**TINY_UNET))
    assert m.noise_scheduler.config.prediction_type == "epsilon"
    assert m.noise_scheduler.config.beta_schedule == "scaled_linear" and m.noise_scheduler.config.beta_end == 0.012
