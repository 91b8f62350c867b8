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


def test_loading_is_strict_about_keys_that_do_not_fit(tmp_path):
    """Weights that do not fill the config (a missing block) are an error listing the keys, not a random init."""
    from safetensors.torch import load_file, save_file

    from dpldm.modules.hub import PretrainedMismatchError

    build_unet(**TINY_UNET).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    dropped = sorted(k for k in weights if k.startswith("conv_out"))
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(PretrainedMismatchError, match="missing keys.*conv_out"):
        load_unet(str(tmp_path))


def test_variant_and_dtype_are_passed_to_diffusers(tmp_path):
    unet = build_unet(**TINY_UNET)
    unet.save_pretrained(tmp_path, variant="fp16")
    loaded = load_unet(str(tmp_path), variant="fp16", torch_dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    for a, b in zip(unet.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b)
    with pytest.raises(PretrainedNotFoundError, match="variant 'ema'"):
        load_unet(str(tmp_path), variant="ema")
    with pytest.raises(ConfigError, match="torch_dtype.*float16"):
        load_unet(str(tmp_path), variant="fp16", torch_dtype="half")


def test_offline_error_gives_the_hf_download_command():
    with pytest.raises(PretrainedNotFoundError, match=r"hf download CompVis/x --revision v1 --include 'unet/\*'"):
        load_unet("CompVis/x", subfolder="unet", revision="v1")


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    """A relative path that does not exist (an earlier stage not run yet) gets no `hf download` advice."""
    missing = tmp_path / "runs" / "public" / "ldm" / "pretrained"
    with pytest.raises(PretrainedNotFoundError, match="is not a directory .* run that stage first") as err:
        load_unet(str(missing), subfolder="unet")
    assert "hf download" not in str(err.value) and "model.init_args.unet.init_args.path" in str(err.value)
