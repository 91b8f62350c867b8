import copy
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

from dpldm.errors import ConfigError
from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_unet, load_unet
from dpldm.modules.diffusion import check_data_compatible
from tests.conftest import TINY_UNET


def _fit(model, batch, steps=2, tmp_path=None):
    data = [{"image": batch["image"][i], "label": batch["label"][i]} for i in range(len(batch["image"]))]
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(data, batch_size=3))
    return trainer


def test_training_changes_trained_parts_only(tiny_model, tiny_batch, tmp_path):
    ae_before = copy.deepcopy(tiny_model.autoencoder.state_dict())
    unet_before = copy.deepcopy(tiny_model.unet.state_dict())
    _fit(tiny_model, tiny_batch, tmp_path=tmp_path)
    # frozen autoencoder: bit-identical, still in eval mode
    for k, v in tiny_model.autoencoder.state_dict().items():
        assert torch.equal(v, ae_before[k]), k
    assert not tiny_model.autoencoder.training
    # trained parts moved
    assert any(not torch.equal(v, unet_before[k]) for k, v in tiny_model.unet.state_dict().items())


def test_optimizer_covers_exactly_the_trainable_parameters(tiny_model):
    opt = tiny_model.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in tiny_model.parameters() if p.requires_grad}
    assert not in_opt & {id(p) for p in tiny_model.autoencoder.parameters()}


def test_per_example_loss_shape_with_k_draws(tiny_model, tiny_batch):
    tiny_model.noise_draws = 3
    loss = tiny_model.per_example_loss(tiny_batch)
    assert loss.shape == (6,) and torch.isfinite(loss).all()


def test_sample_shapes_and_guidance_determinism(tiny_model):
    labels = torch.tensor([0, 1, 2])
    a = tiny_model.sample(labels, num_steps=3, generator=torch.Generator().manual_seed(0))
    b = tiny_model.sample(labels, num_steps=3, generator=torch.Generator().manual_seed(0))
    c = tiny_model.sample(labels, num_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 1, 8, 8) and a.abs().max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


class GaussianDenoiser(torch.nn.Module):
    """The exact eps-prediction for data x0 ~ N(0, s^2 I): E[eps | z_t] = sqrt(1 - a_t) z_t / (a_t s^2 + 1 - a_t)."""

    def __init__(self, alphas_cumprod, s):
        super().__init__()
        self.a, self.s, self.anchor = alphas_cumprod, s, torch.nn.Parameter(torch.zeros(()))  # anchor: a device

    def forward(self, z, t, encoder_hidden_states=None):
        a = self.a[int(t)]
        return SimpleNamespace(sample=(1 - a).sqrt() * z / (a * self.s**2 + 1 - a))


@pytest.mark.parametrize("steps, tolerance", [(8, 0.25), (50, 0.06)])
def test_solvers_against_the_exact_ode_solution_of_gaussian_data(tiny_model, steps, tolerance):
    """For Gaussian data the probability-flow ODE is linear: from z_T it ends at x0 = s z_T / sqrt(a_T s^2 + 1 - a_T)
    (a_T at the solver's first timestep). Both converge to it; DPM-Solver++ lands nearer than DDIM in as many steps."""
    from dpldm.modules.sampling import sample_latents, solver_scheduler

    m, s = tiny_model.eval(), 0.5
    net = GaussianDenoiser(m.noise_scheduler.alphas_cumprod, s)
    err = {}
    for solver in ("ddim", "dpm_solver++"):
        got = sample_latents(net, m.conditioner, torch.tensor([0, 1, 2, 3]), m.noise_scheduler, m.latent_shape, steps,
                             guidance_scale=1.0, generator=torch.Generator().manual_seed(0), solver=solver)
        sched = solver_scheduler(m.noise_scheduler, solver)
        sched.set_timesteps(steps)
        a = m.noise_scheduler.alphas_cumprod[int(sched.timesteps[0])]
        z_t = torch.randn((4, *m.latent_shape), generator=torch.Generator().manual_seed(0))
        exact = s * z_t / (a * s**2 + 1 - a).sqrt()
        err[solver] = float((got - exact).norm() / exact.norm())
    assert err["dpm_solver++"] < err["ddim"] < tolerance, err


def test_the_model_samples_with_its_solver(tiny_model):
    a = tiny_model.sample(torch.tensor([1, 2]), num_steps=4, solver="dpm_solver++",
                          generator=torch.Generator().manual_seed(0))
    b = tiny_model.sample(torch.tensor([1, 2]), num_steps=4, generator=torch.Generator().manual_seed(0))
    assert a.shape == b.shape == (2, 1, 8, 8) and not torch.equal(a, b)  # default: ddim


def test_ema_is_used_for_sampling_and_saved(tiny_vae, tiny_batch, tmp_path):
    torch.manual_seed(0)
    model = LatentDiffusion(build_unet(**TINY_UNET), FrozenAutoencoder(tiny_vae),
                            ClassEmbedder(10, embed_dim=16), ema_decay=0.9)
    _fit(model, tiny_batch, steps=3, tmp_path=tmp_path)
    live = [p.detach().clone() for p in model.trainable_parameters()]
    with model.ema_weights():
        swapped = [p.detach().clone() for p in model.trainable_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(live, swapped))
    assert all(torch.equal(a, p) for a, p in zip(live, model.trainable_parameters()))  # restored
    ckpt = {}
    model.on_save_checkpoint(ckpt)
    assert "ema" in ckpt and ckpt["ema"]["optimization_step"] == 3


def test_export_pretrained_roundtrip(tiny_model, tmp_path):
    tiny_model.export_pretrained(str(tmp_path))
    unet = load_unet(str(tmp_path), subfolder="unet")
    for a, b in zip(tiny_model.unet.state_dict().values(), unet.state_dict().values()):
        assert torch.equal(a, b)


def test_width_mismatch_is_caught_at_construction(tiny_vae):
    with pytest.raises(ConfigError, match="cross_attention_dim.*embed_dim = 32"):
        LatentDiffusion(build_unet(**TINY_UNET), FrozenAutoencoder(tiny_vae), ClassEmbedder(10, embed_dim=32))


def test_latent_channel_mismatch(tiny_vae):
    with pytest.raises(ConfigError, match="in_channels"):
        LatentDiffusion(build_unet(**{**TINY_UNET, "in_channels": 3}), FrozenAutoencoder(tiny_vae),
                        ClassEmbedder(10, embed_dim=16))


class _DM:
    def __init__(self, image_size=8, channels=1, num_classes=10):
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes


@pytest.mark.parametrize("dm, field", [
    (_DM(image_size=9), "data.init_args.image_size"),           # not divisible by f = 2
    (_DM(image_size=10), "data.init_args.image_size"),          # 5x5 latents; the UNet halves once
    (_DM(image_size=16), "latent_size.*set latent_size: 8"),    # latent 8 != unet sample_size 4
    (_DM(channels=3), "data.init_args.channels"),
    (_DM(num_classes=7), "num_classes"),
])
def test_data_model_mismatches_name_the_field(tiny_model, dm, field):
    with pytest.raises(ConfigError, match=field):
        check_data_compatible(tiny_model, dm)


def test_compatible_data_passes(tiny_model):
    check_data_compatible(tiny_model, _DM())


def _fit_on(model, dm, tmp_path):
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
              enable_progress_bar=False, enable_model_summary=False).fit(model, dm)


def test_a_fit_on_private_data_without_dp_is_refused_unless_declared(tiny_vae, tmp_path):
    from dpldm.datamodules import DigitsDataModule, GlyphsDataModule
    from dpldm.modules import AutoencoderTraining

    def model(**kw):
        torch.manual_seed(0)
        return LatentDiffusion(build_unet(**TINY_UNET), FrozenAutoencoder(tiny_vae), ClassEmbedder(10, 16), **kw)

    digits = DigitsDataModule(image_size=8, batch_size=8)
    with pytest.raises(ConfigError, match=r"model.init_args.privacy = None: DigitsDataModule is not marked public"):
        _fit_on(model(), digits, tmp_path)
    with pytest.raises(ConfigError, match="allow_non_private"):
        _fit_on(AutoencoderTraining(tiny_vae), digits, tmp_path)
    declared = model(allow_non_private=True)
    _fit_on(declared, digits, tmp_path)  # a declared non-private baseline trains
    assert declared.trainer.global_step == 1
    glyphs = GlyphsDataModule(characters="0123456789", image_size=8, batch_size=8, num_train=16, num_val=8, num_test=8)
    _fit_on(model(), glyphs, tmp_path)  # public data: no declaration needed


def test_trains_and_samples_at_a_latent_size_other_than_the_unet_s(tiny_model):
    """A base UNet of sample_size 4 fine-tuned on 16-pixel images (8x8 latents) with latent_size: 8."""
    m = LatentDiffusion(tiny_model.unet, tiny_model.autoencoder, tiny_model.conditioner, latent_size=8)
    check_data_compatible(m, _DM(image_size=16))  # accepted
    assert m.sample(torch.tensor([0, 1]), num_steps=2).shape == (2, 1, 16, 16)
    with pytest.raises(ConfigError, match="latent_size"):
        check_data_compatible(m, _DM(image_size=8))
