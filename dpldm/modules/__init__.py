"""Models: frozen autoencoder, conditioners, the UNet denoiser, and the LightningModules that train them."""

from dpldm.modules.autoencoder import FrozenAutoencoder, build_autoencoder, load_autoencoder
from dpldm.modules.autoencoder_module import AutoencoderTraining
from dpldm.modules.conditioning import ClassEmbedder, Conditioner, OpenCLIPTextEncoder, Unconditional
from dpldm.modules.diffusion import LatentDiffusion
from dpldm.modules.loss import MinSNRWeighting, UniformTimesteps, UnitWeighting
from dpldm.modules.pipeline_text import PipelineTextEncoder
from dpldm.modules.unet import build_unet, load_unet
from dpldm.modules.unet_updown import UpDownUNet2DConditionModel

__all__ = [
    "AutoencoderTraining", "ClassEmbedder", "Conditioner", "FrozenAutoencoder", "LatentDiffusion",
    "MinSNRWeighting", "OpenCLIPTextEncoder", "PipelineTextEncoder", "Unconditional", "UniformTimesteps", "UnitWeighting",
    "UpDownUNet2DConditionModel", "build_autoencoder", "build_unet", "load_autoencoder", "load_unet",
]
