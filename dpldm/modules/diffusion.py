"""The latent diffusion LightningModule (Rombach et al., 2022): a denoiser trained in the latent space
of a frozen public autoencoder, conditioned through cross-attention.

Parts are injected as objects (LightningCLI ``class_path``/``init_args``): the UNet, the frozen
autoencoder, the conditioner, the noise schedule, how t is drawn and how the loss is weighted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import lightning.pytorch as L
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from dpldm.errors import ConfigError
from dpldm.modules.autoencoder import FrozenAutoencoder
from dpldm.modules.conditioning import Conditioner
from dpldm.modules.loss import LossWeighting, TimestepSampler, UniformTimesteps, UnitWeighting, denoising_loss
from dpldm.modules.sampling import Solver, sample_latents
from dpldm.modules.schedule import training_schedule
from dpldm.modules.unet import unet_downsample_factor
from dpldm.privacy.engine import DPSGDEngine
from dpldm.privacy.sampling import poisson_rate
from dpldm.privacy.scope import TrainableScope, count, merged_unet
from dpldm.privacy.settings import DifferentialPrivacy, check_private_data, check_trainer, plan


def _adamw(params: Iterator[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


class LatentDiffusion(L.LightningModule):
    """Conditional latent diffusion: training loss, EMA, guided DDIM sampling.

    Args:
        unet: the denoiser (``dpldm.modules.unet.build_unet`` or ``load_unet``).
        autoencoder: the frozen public autoencoder.
        conditioner: class embedder (trained) or text encoder (frozen).
        noise_scheduler: forward process and prediction type (``epsilon``, ``v_prediction`` or ``sample``);
            default: the base pipeline's scheduler (``load_unet``), else LDM's scaled-linear schedule. One that
            contradicts the base pipeline's is refused (:mod:`dpldm.modules.schedule`).
        timesteps: how training timesteps are drawn; default uniform.
        weighting: loss weight per timestep; default 1.
        noise_draws: K (t, noise) draws per example, averaged into one per-example loss.
        cond_drop_prob: probability of replacing the condition by the null one (for guidance).
        ema_decay: keep an exponential moving average of the trained weights (``None``: off).
        optimizer: optimizer factory over the trainable parameters.
        guidance_scale: classifier-free guidance scale used by :meth:`sample`.
        sampling_steps: solver steps used by :meth:`sample`.
        solver: the sampler of :meth:`sample`: ``ddim`` or ``dpm_solver++`` (fewer steps for the same quality).
        latent_size: the latent height and width trained and sampled at (image size / autoencoder factor);
            default the UNet's ``sample_size``. The UNet is convolutional, so a base model can be fine-tuned at
            another resolution (e.g. a 512-pixel Stable Diffusion at 256: ``latent_size: 32``).
        scope: train only this part of the UNet (+ conditioner); default: everything, or ``attention``
            when ``privacy`` is set.
        privacy: DP-SGD settings; ``None`` trains without a privacy guarantee.
        allow_non_private: declare a fit without DP on data that is not marked public (a non-private baseline,
            or data you know to be public); without it such a fit is refused.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        autoencoder: FrozenAutoencoder,
        conditioner: Conditioner,
        noise_scheduler: DDPMScheduler | None = None,
        timesteps: TimestepSampler | None = None,
        weighting: LossWeighting | None = None,
        noise_draws: int = 1,
        cond_drop_prob: float = 0.1,
        ema_decay: float | None = None,
        optimizer: OptimizerCallable = _adamw,
        guidance_scale: float = 3.0,
        sampling_steps: int = 50,
        solver: Solver = "ddim",
        latent_size: int | None = None,
        scope: TrainableScope | None = None,
        privacy: DifferentialPrivacy | None = None,
        allow_non_private: bool = False,
    ):
        super().__init__()
        self.unet, self.autoencoder, self.conditioner = unet, autoencoder, conditioner
        self.noise_scheduler = training_schedule(noise_scheduler, getattr(unet, "base_scheduler_config", None))
        self.timesteps = timesteps or UniformTimesteps()
        self.weighting = weighting or UnitWeighting()
        self.noise_draws, self.cond_drop_prob = noise_draws, cond_drop_prob
        self.optimizer_factory = optimizer
        self.guidance_scale, self.sampling_steps, self.solver = guidance_scale, sampling_steps, solver
        self.latent_size = latent_size or unet.config.sample_size
        self._check_parts()
        self.privacy, self.dp = privacy, None  # dp: the DPSGDEngine, built at fit start (needs N)
        self.allow_non_private = allow_non_private
        self.scope = scope or (TrainableScope() if privacy is not None else None)
        self.trained_modules = self.scope.apply(unet, conditioner) if self.scope else [unet, conditioner]
        self.automatic_optimization = privacy is None  # DP: micro-batches and one noisy step, by hand
        self.ema = EMAModel(self.trainable_parameters(), decay=ema_decay, use_ema_warmup=True) if ema_decay else None

    # --- checks that need only the parts (run at construction, before any data is read) ---
    def _check_parts(self) -> None:
        cfg = self.unet.config
        cross, width = cfg.get("cross_attention_dim"), self.conditioner.embed_dim  # None: unconditional UNet2DModel
        if (cross is None) != (width is None):
            raise ConfigError("model.init_args.conditioner", type(self.conditioner).__name__,
                              "an unconditional UNet (UNet2DModel) takes dpldm.modules.Unconditional" if cross is None
                              else "the UNet cross-attends to conditioning tokens: a class embedder or text encoder")
        if width != cross:
            raise ConfigError(
                "model.init_args.unet.init_args.cross_attention_dim", cfg.cross_attention_dim,
                f"must equal the conditioner's token width embed_dim = {self.conditioner.embed_dim}")
        if self.autoencoder.latent_channels != cfg.in_channels:
            raise ConfigError(
                "model.init_args.unet.init_args.in_channels", cfg.in_channels,
                f"must equal the autoencoder's latent_channels = {self.autoencoder.latent_channels}")
        if self.noise_draws < 1:
            raise ConfigError("model.init_args.noise_draws", self.noise_draws, "must be >= 1")
        if not 0 <= self.cond_drop_prob < 1:
            raise ConfigError("model.init_args.cond_drop_prob", self.cond_drop_prob, "must be in [0, 1)")

    # --- checks against the data and the trainer (before any private record is read or encoded) ---
    def preflight(self, dm: object) -> None:
        """Every check that needs the parts, the trainer and the data's geometry and size, but reads or encodes no
        record: shapes, DP on private data, the trainer, the privacy plan (delta vs N, sigma, one step's cost).
        A latent cache calls it before encoding (hours at LAION scale); :meth:`setup` calls it again.
        """
        if dm is not None:
            check_data_compatible(self, dm)
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return
        check_private_data(dm, self.privacy is not None, self.allow_non_private)
        if self.privacy is not None and self.dp is None:
            check_trainer(trainer)
            n = getattr(dm, "planned_num_train_samples", None)  # a latent cache's N, known before it is built
            if n is not None:
                self._plan_privacy(dm, n)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        self.preflight(dm)
        if stage == "fit" and self.privacy is not None:
            self._setup_privacy(dm)

    def _plan_privacy(self, dm: object, num_samples: int) -> None:
        """Plan the accounting (N, q, sigma, delta) and attach the per-example clipping."""
        trainer = self.trainer
        p = plan(self.privacy, num_samples, dm.batch_size, trainer.max_steps, trainer.max_epochs)
        self.dp = DPSGDEngine(self.privacy, p, self.trained_modules, start_step=trainer.global_step,
                              rank=trainer.global_rank, world_size=trainer.world_size)

    def _setup_privacy(self, dm: object) -> None:
        """Plan the accounting if the preflight could not, and hand the training loader to the DP engine."""
        if dm is None or not hasattr(dm, "num_train_samples"):
            raise ConfigError("data", type(dm).__name__,
                              "a DP stage needs a map-style dataset of known size N (num_train_samples) for Poisson "
                              "sampling; wrap a stream in dpldm.datamodules.LatentCacheDataModule (a latent cache)")
        if self.dp is not None and self.dp.plan.num_samples != dm.num_train_samples:  # the preflight's N was off
            self.dp.detach()
            self.dp = None
        if self.dp is None:
            self._plan_privacy(dm, dm.num_train_samples)
        # Poisson sampling at the accounted q, decided in one place: under DDP each rank samples its own shard.
        dm.train_loader_factory = self.dp.train_loader

    def on_fit_start(self) -> None:
        # Lightning keeps submodule modes as found; a UNet from `from_pretrained` arrives in eval mode.
        # Train mode for the trained parts (the frozen ones refuse it): dropout, and Opacus hooks, need it.
        self.train()
        n_train, n_all = count(self.trainable_parameters()), count(list(self.parameters()))
        self.print(f"trainable scope: {n_train:,} of {n_all:,} parameters ({n_train / n_all:.1%}); "
                   f"{1 - n_train / n_all:.1%} fewer than training everything")
        if self.dp is not None:
            self.print(self.dp.describe())
        for logger in self.trainer.loggers:
            logger.log_hyperparams({"scope/trained_parameters": n_train, "scope/total_parameters": n_all,
                                    "scope/reduction": 1 - n_train / n_all})

    def on_train_start(self) -> None:
        if self.dp is not None:  # invariant: the loader in use is the Poisson one, at the accounted rate
            rate = poisson_rate(self.trainer.train_dataloader)
            if rate is None or abs(rate - self.dp.plan.sample_rate) > 1e-12:
                raise RuntimeError(f"DP stage without the Poisson sampler at q = {self.dp.plan.sample_rate} "
                                   f"(the training loader samples at {rate})")

    def configure_callbacks(self) -> list[L.Callback]:
        from dpldm.callbacks.privacy import PrivacyMonitor

        return [PrivacyMonitor()] if self.privacy is not None else []

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.unet.config.in_channels, self.latent_size, self.latent_size)

    # --- training ---
    def per_example_loss(self, batch: dict) -> Tensor:
        """Denoising loss per example [B] (mean over the K noise draws)."""
        if "moments" in batch:  # from a latent cache: posterior moments computed once, [B, 2c, h, w]
            latents = self.autoencoder.from_moments(batch["moments"])  # [B, c, h, w]
        else:  # the DP-LDM way: through the frozen encoder on every step
            latents = self.autoencoder.encode(batch["image"])  # [B, c, h, w]
        cond = self.conditioner.select(batch)
        if self.training and self.cond_drop_prob > 0:
            drop = torch.rand(len(cond), device=latents.device) < self.cond_drop_prob
            cond = self.conditioner.drop(cond, drop)
        context = self.conditioner(cond)  # [B, T, D]
        return denoising_loss(self.unet, latents, context, self.noise_scheduler, self.timesteps,
                              self.weighting, self.noise_draws)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if self.dp is not None:
            return self._dp_training_step(batch)
        loss = self.per_example_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=_batch_size(batch))
        return loss

    def _dp_training_step(self, batch: dict) -> None:
        """One DP-SGD step over a Poisson batch, in physical micro-batches (dpldm.privacy.engine)."""
        if self.dp.exhausted():  # one more step would exceed the target epsilon
            self.trainer.should_stop = True
            rank_zero_warn(f"DP-SGD stopped at step {self.dp.accountant.steps} of {self.dp.plan.planned_steps} planned: "
                           f"one more step would take epsilon past the target {self.privacy.epsilon} "
                           f"(spent: {self.dp.accountant.epsilon():.4g})")
            return None
        with self._without_ddp_sync():  # the engine sums the clipped gradients over ranks, noise once
            total, n = self.dp.step(batch, self.per_example_loss, self.optimizers(), self.noise_draws,
                                    backward=self.manual_backward)
        if self.privacy.log_private_metrics and n:
            self.log("train/loss", total / n, prog_bar=True, batch_size=n)
        return None

    def _without_ddp_sync(self) -> contextlib.AbstractContextManager:
        """DDP's own gradient all-reduce off: it would average unclipped gradients (and wait for weight
        gradients that the fast clipping never makes)."""
        wrapper = self.trainer.strategy.model
        return wrapper.no_sync() if isinstance(wrapper, DistributedDataParallel) else contextlib.nullcontext()

    def on_train_end(self) -> None:
        # How many private examples had a non-finite gradient is a statistic of the private data (not DP): it
        # reaches the console only when declared, like the private losses.
        if self.dp is not None and self.dp.nonfinite_examples and self.privacy.log_private_metrics:
            rank_zero_warn(f"{self.dp.nonfinite_examples} per-example gradient(s) were not finite and were zeroed "
                           "before clipping (still DP; this count is not DP: shown because log_private_metrics is "
                           "true). Lower the learning rate or use 32-true precision if it keeps happening.")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.dp is not None and not self.privacy.log_private_metrics:
            return  # the validation loss of private data is not DP: logged only when declared
        loss = self.per_example_loss(batch).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=_batch_size(batch))

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """``dpldm predict``: one sample per condition of the batch (seeded by the batch index), as
        ``{"images": [B, C, H, W] in [-1, 1], "cond": the B conditions}``."""
        cond = self.conditioner.raw(batch)  # labels [B] or B captions
        gen = torch.Generator(self.device).manual_seed(batch_idx)
        return {"images": self.sample(cond, generator=gen).cpu(),
                "cond": cond.tolist() if isinstance(cond, Tensor) else list(cond)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        return self.dp.wrap(optimizer) if self.dp is not None else optimizer

    def on_train_batch_end(self, outputs: object, batch: dict, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
            self.ema.step(self.trainable_parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        if self.dp is not None:  # invariant: accountant state in every checkpoint
            checkpoint["privacy"] = {"accountant": self.dp.accountant.state_dict(), **self.dp.report()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        if self.dp is not None and "privacy" in checkpoint:
            # Resuming (after setup, before the loaders exist): continue the same accountant, and draw
            # fresh sampling and noise streams for the remaining steps (never replay the first ones).
            step = checkpoint["global_step"]
            self.dp.resume(checkpoint["privacy"]["accountant"], step)  # the loader samples from this step on

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily swap the EMA weights in (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = self.trainable_parameters()
        self.ema.to(self.device)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # --- sampling and export ---
    @torch.no_grad()
    def sample(self, cond: object, guidance_scale: float | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None, progress: bool = False, eta: float = 0.0,
               solver: Solver | None = None) -> Tensor:
        """Images [B, C, H, W] in [-1, 1] for a batch of conditions (EMA weights if kept)."""
        was_training = self.training
        self.eval()
        with self.ema_weights():
            z = sample_latents(self.unet, self.conditioner, cond, self.noise_scheduler, self.latent_shape,
                               num_steps or self.sampling_steps,
                               self.guidance_scale if guidance_scale is None else guidance_scale,
                               eta=eta, generator=generator, progress=progress, solver=solver or self.solver)
            images = self.autoencoder.decode(z)
        self.train(was_training)
        return images

    def export_pretrained(self, dirpath: str) -> None:
        """Write the UNet (EMA weights if kept; LoRA adapters merged) in diffusers format to ``dirpath/unet``, its
        training schedule to ``dirpath/scheduler``, and a trained conditioner's weights to
        ``dirpath/conditioner.pt``."""
        with self.ema_weights():
            merged_unet(self.unet).save_pretrained(os.path.join(dirpath, "unet"))
            self.noise_scheduler.save_pretrained(os.path.join(dirpath, "scheduler"))  # what the next stage trains on
            trained = {n: p.detach() for n, p in self.conditioner.named_parameters() if p.requires_grad}
            if trained:  # only the trained part: never a copy of a frozen text tower
                torch.save(trained, os.path.join(dirpath, "conditioner.pt"))


def _batch_size(batch: dict) -> int:
    return len(batch["moments"] if "moments" in batch else batch["image"])


def check_data_compatible(model: LatentDiffusion, dm: object) -> None:
    """Fail before training when the data cannot go through the model.

    Args:
        model: the diffusion model.
        dm: a DataModule exposing ``image_size``, ``channels`` and (for labels) ``num_classes``.
    """
    ae, size = model.autoencoder, getattr(dm, "image_size", None)
    data = "data.init_args.source.init_args" if hasattr(dm, "source") else "data.init_args"  # a latent cache's source
    if size is not None:
        if size % ae.downsample_factor:
            raise ConfigError(f"{data}.image_size", size,
                              f"must be a multiple of the autoencoder's downsampling factor {ae.downsample_factor}")
        latent, need = size // ae.downsample_factor, unet_downsample_factor(model.unet)
        if latent % need:
            raise ConfigError(f"{data}.image_size", size,
                              f"gives {latent}x{latent} latents; the UNet needs a multiple of {need}")
        if latent != model.latent_size:
            raise ConfigError("model.init_args.latent_size", model.latent_size,
                              f"must equal the latent size image_size / f = {size} / {ae.downsample_factor} = {latent} "
                              f"(default: the UNet's sample_size; set latent_size: {latent} to train at this size)")
    channels = getattr(dm, "channels", None)
    if channels is not None and channels != ae.in_channels:
        raise ConfigError(f"{data}.channels", channels,
                          f"the autoencoder takes {ae.in_channels}-channel images")
    classes, model_classes = getattr(dm, "num_classes", None), getattr(model.conditioner, "num_classes", None)
    if classes is not None and model_classes is not None and classes != model_classes:
        raise ConfigError("model.init_args.conditioner.init_args.num_classes", model_classes,
                          f"must equal the data's number of classes ({classes})")
