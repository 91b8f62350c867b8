import pytest
import torch

from dpldm.errors import ConfigError
from dpldm.modules import build_unet, load_unet
from dpldm.modules.hub import PretrainedNotFoundError
from dpldm.modules.unet import unet_downsample_factor
from tests.conftest import TINY_UNET


def test_build_unet_blocks_follow_attention_flags():
    unet = build_unet(**{**TINY_UNET, "attention": (False, True)})
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert unet.config.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D")
    assert unet_downsample_factor(unet) == 2
    out = unet(torch.randn(2, 4, 4, 4), torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 3, 16)).sample
    assert out.shape == (2, 4, 4, 4)


def test_attention_flags_must_match_blocks():
    with pytest.raises(ConfigError, match="attention"):
        build_unet(**{**TINY_UNET, "attention": (True,)})


def test_load_unet_offline_error_names_key():
    with pytest.raises(PretrainedNotFoundError, match="model.init_args.unet.init_args.path"):
        load_unet("CompVis/ldm-text2im-large-256", subfolder="unet")


def test_local_dir_without_weights_is_reported(tmp_path):
    with pytest.raises(PretrainedNotFoundError, match="no diffusers-format weights"):
        load_unet(str(tmp_path))
