"""Stage 1: train the autoencoder on public images (non-private; Rombach et al., 2022, Sec. 3.1).

Loss = L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)). The perceptual and adversarial terms
of LDM are left to GPU users; the KL-regularised L1 autoencoder is enough for small images.
On export the latent scale factor 1/std(z) is measured on *public* training batches and written
into the diffusers config, so later (private) stages never compute a statistic of private data.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from diffusers import AutoencoderKL
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torch.nn import functional as F

from dpldm.privacy.settings import check_private_data


def _adam(params: object) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=2e-4)


class AutoencoderTraining(L.LightningModule):
    """Fits a KL autoencoder to public data.

    Args:
        vae: the autoencoder to train (``dpldm.modules.autoencoder.build_autoencoder``).
        kl_weight: weight of the KL term.
        optimizer: optimizer factory.
        scale_batches: public training batches used to measure the latent scale factor on export.
        allow_non_private: declare a fit on data not marked public (it is not DP); refused without it.
    """

    def __init__(self, vae: AutoencoderKL, kl_weight: float = 1e-6, optimizer: OptimizerCallable = _adam,
                 scale_batches: int = 16, allow_non_private: bool = False):
        super().__init__()
        self.vae, self.kl_weight, self.optimizer_factory, self.scale_batches = vae, kl_weight, optimizer, scale_batches
        self.allow_non_private = allow_non_private

    def setup(self, stage: str) -> None:
        if stage == "fit":  # stage 1 is not DP: public data only, unless declared
            check_private_data(self.trainer.datamodule, False, self.allow_non_private,
                               field="model.init_args.allow_non_private")

    def _losses(self, images: Tensor, sample: bool) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample() if sample else posterior.mode()
        recon = self.vae.decode(z).sample
        return F.l1_loss(recon, images), posterior.kl().mean() / images[0].numel()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        rec, kl = self._losses(batch["image"], sample=True)
        self.log_dict({"train/rec": rec, "train/kl": kl}, prog_bar=True, batch_size=len(batch["image"]))
        return rec + self.kl_weight * kl

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        rec, kl = self._losses(batch["image"], sample=False)
        self.log_dict({"val/rec": rec, "val/kl": kl}, prog_bar=True, batch_size=len(batch["image"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.vae.parameters())

    @torch.no_grad()
    def public_scale_factor(self) -> float:
        """1 / std of latent means over up to ``scale_batches`` public training batches."""
        zs = []
        for i, batch in enumerate(self.trainer.datamodule.train_dataloader()):
            if i >= self.scale_batches:
                break
            zs.append(self.vae.encode(batch["image"].to(self.device)).latent_dist.mode().flatten())
        return float(1.0 / torch.cat(zs).std())

    def export_pretrained(self, dirpath: str) -> None:
        """Save the autoencoder in diffusers format with its public scale factor."""
        was_training = self.training
        self.eval()
        self.vae.register_to_config(scaling_factor=self.public_scale_factor())
        self.vae.save_pretrained(dirpath)
        self.train(was_training)
