import pytest
import torch

from dpldm.modules import FrozenAutoencoder, load_autoencoder
from dpldm.modules.hub import PretrainedNotFoundError


def test_frozen_autoencoder_has_no_grad_and_stays_in_eval(tiny_vae):
    ae = FrozenAutoencoder(tiny_vae)
    assert not any(p.requires_grad for p in ae.parameters())
    ae.train()  # Lightning calls .train() on the whole module tree
    assert not ae.training and not any(m.training for m in ae.modules())


def test_encode_decode_shapes_and_scale(tiny_vae):
    ae = FrozenAutoencoder(tiny_vae, scale_factor=0.5)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (3, 4, 4, 4) and not z.requires_grad
    assert ae.downsample_factor == 2
    # the scale factor multiplies the posterior mean: z = 0.5 * mode
    mode = tiny_vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, 0.5 * mode)
    out = ae.decode(z)
    assert out.shape == x.shape and out.abs().max() <= 1


def test_scale_factor_defaults_to_public_config(tiny_vae):
    tiny_vae.register_to_config(scaling_factor=0.25)
    assert FrozenAutoencoder(tiny_vae).scale_factor == 0.25


def test_save_and_load_roundtrip(tiny_vae, tmp_path):
    tiny_vae.register_to_config(scaling_factor=0.3)
    tiny_vae.save_pretrained(tmp_path / "ae")
    loaded = load_autoencoder(str(tmp_path / "ae"))
    assert loaded.config.scaling_factor == 0.3
    for a, b in zip(tiny_vae.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_offline_hub_id_names_the_id_and_config_key():
    with pytest.raises(PretrainedNotFoundError) as err:
        load_autoencoder("stabilityai/sd-vae-ft-mse")
    msg = str(err.value)
    assert "stabilityai/sd-vae-ft-mse" in msg
    assert "model.init_args.autoencoder.init_args.vae.init_args.path" in msg


def test_a_vq_autoencoder_loads_by_its_config_and_encodes_without_a_posterior(tmp_path):
    """CompVis' LDMs use VQ autoencoders: VQModel by its config's _class_name, encodings cached as they are,
    quantised by the decoder."""
    from diffusers import VQModel

    from dpldm.modules import FrozenAutoencoder

    torch.manual_seed(0)
    vq = VQModel(in_channels=3, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=32, norm_num_groups=4,
                 scaling_factor=0.5)
    vq.save_pretrained(tmp_path / "vqvae")
    loaded = load_autoencoder(str(tmp_path), subfolder="vqvae")
    assert type(loaded).__name__ == "VQModel"
    for a, b in zip(vq.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert type(load_autoencoder(str(tmp_path), subfolder="vqvae", weights=False)).__name__ == "VQModel"
    ae = FrozenAutoencoder(loaded)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    moments = ae.moments(x)
    assert moments.shape == (2, 4, 8, 8) and ae.latent_channels == 4 and ae.downsample_factor == 2
    torch.testing.assert_close(ae.encode(x), loaded.encode(x).latents * 0.5)
    out = ae.decode(ae.encode(x))
    torch.testing.assert_close(out, loaded.decode(loaded.encode(x).latents).sample.clamp(-1, 1))  # quantised inside
