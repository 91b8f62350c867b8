"""What the privacy tests share: tiny models, engines, batches, one DP update, a tiny DP fit."""

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger

from dpldm.datamodules import DigitsDataModule
from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_autoencoder, build_unet
from dpldm.privacy import DifferentialPrivacy
from dpldm.privacy.engine import DPSGDEngine
from dpldm.privacy.settings import PrivacyPlan
from tests.conftest import TINY_AE, TINY_UNET


def make_model(noise_draws=1, kind="attention", updown=False):
    """A tiny class-conditional LDM; ``updown``: its UNet joins levels by ResBlocks (CompVis resblock_updown)."""
    from dpldm.modules import UpDownUNet2DConditionModel
    from dpldm.privacy import TrainableScope

    torch.manual_seed(0)
    unet = build_unet(**TINY_UNET)
    if updown:
        unet = UpDownUNet2DConditionModel.from_config(unet.config)
    model = LatentDiffusion(unet, FrozenAutoencoder(build_autoencoder(**TINY_AE)),
                            ClassEmbedder(10, embed_dim=16), noise_draws=noise_draws, cond_drop_prob=0.2,
                            scope=TrainableScope(kind), privacy=DifferentialPrivacy(epsilon=10, seed=0))
    if kind == "lora":
        perturb_lora(model.unet)
    return model.train()


def perturb_lora(unet):
    """LoRA starts at B = 0, where A's gradient is 0 too: random B, so both are tested."""
    from peft.tuners.lora import LoraLayer

    for m in unet.modules():
        if isinstance(m, LoraLayer):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)


def make_engine(model, batch_size, sigma=1.0, clip=1.0, clipping="hooks", physical=64):
    """The engine; ``hooks`` by default here: these tests read Opacus's per-example gradients."""
    settings = DifferentialPrivacy(noise_multiplier=sigma, epsilon=None, max_grad_norm=clip, seed=0,
                                   clipping=clipping, max_physical_batch_size=physical)
    plan = PrivacyPlan(num_samples=100, expected_batch_size=batch_size, sample_rate=batch_size / 100,
                       delta=1e-3, planned_steps=10)
    model.privacy = settings
    model.dp = DPSGDEngine(settings, plan, model.trained_modules)
    return model.dp


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "label": torch.arange(n) % 10}


def dp_update(model, engine, data, noise_draws):
    """The parameter change of one DP step (SGD, lr 1), with fixed draws of t, noise and label dropout."""
    opt = engine.wrap(torch.optim.SGD(model.trainable_parameters(), lr=1.0))
    before = [p.detach().clone() for p in model.trainable_parameters()]
    torch.manual_seed(123)
    engine.step(data, model.per_example_loss, opt, noise_draws)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.trainable_parameters(), before)])


def dp_model(scope=None, **privacy):
    torch.manual_seed(0)
    settings = {"epsilon": 8.0, "seed": 0, "max_physical_batch_size": 8, **privacy}
    return LatentDiffusion(build_unet(**TINY_UNET), FrozenAutoencoder(build_autoencoder(**TINY_AE)),
                           ClassEmbedder(10, embed_dim=16), noise_draws=2, scope=scope,
                           privacy=DifferentialPrivacy(**settings))


def trainer(tmp_path, max_steps, callbacks=(), **kw):
    return L.Trainer(max_steps=max_steps, use_distributed_sampler=False, logger=CSVLogger(tmp_path, name="logs"),
                     log_every_n_steps=1, limit_val_batches=0, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=list(callbacks), default_root_dir=tmp_path, **kw)


def data():
    return DigitsDataModule(image_size=8, batch_size=16)
