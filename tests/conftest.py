"""Shared fixtures: tiny models built from configs, never downloaded weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup must fail fast, not retry for ~47 s
os.environ.setdefault("WANDB_MODE", "disabled")

import pickle

import numpy as np
import pytest
import torch

from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_autoencoder, build_unet

torch.set_num_threads(min(2, torch.get_num_threads()))

# Tiny geometry: 8x8x1 images -> 4x4x4 latents (f = 2) -> UNet with 2 resolutions.
TINY_AE = dict(in_channels=1, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4)
TINY_UNET = dict(sample_size=4, in_channels=4, block_out_channels=(16, 32), attention=(True, True),
                 attention_head_dim=8, cross_attention_dim=16, norm_num_groups=8)

# A tiny open_clip architecture (random weights, nothing downloaded), registered from a JSON file.
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 1}}


def write_tiny_clip(folder, name: str) -> str:
    """Write TINY_CLIP as ``folder/name.json``; open_clip registers it under ``name``."""
    import json

    path = folder / f"{name}.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


@pytest.fixture
def tiny_vae():
    torch.manual_seed(0)
    return build_autoencoder(**TINY_AE)


@pytest.fixture
def tiny_model(tiny_vae):
    torch.manual_seed(0)
    return LatentDiffusion(
        unet=build_unet(**TINY_UNET),
        autoencoder=FrozenAutoencoder(tiny_vae),
        conditioner=ClassEmbedder(num_classes=10, embed_dim=16),
    )


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, "label": torch.arange(6) % 10}


# --- tiny stand-ins for the CIFAR-10 pickles and the ImageNet32 npz batches ---

def asymmetric_images(n: int, offset: int = 0) -> np.ndarray:
    """``(n, 3072)`` uint8 CHW images: left half bright (200 + k), right half 0.

    The left/right asymmetry makes a horizontal flip visible; ``k`` tells images apart.

    Args:
        n: number of images.
        offset: added to ``k`` so different files hold different images.
    """
    images = np.zeros((n, 3, 32, 32), np.uint8)
    for k in range(n):
        images[k, :, :, :16] = 200 + offset + k
    return images.reshape(n, 3072)


@pytest.fixture
def cifar_root(tmp_path):
    """A root with ``cifar-10-batches-py/``: 5 train batches of 4 images, 1 test batch of 6."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        batch = {b"data": asymmetric_images(4, offset=4 * (i - 1)), b"labels": [(4 * (i - 1) + k) % 10 for k in range(4)]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": asymmetric_images(6), b"labels": [9, 8, 7, 6, 5, 4]}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    return tmp_path


@pytest.fixture
def imagenet_root(tmp_path):
    """A root with 3 train batches of 5 images (labels 1..1000) and a val batch of 4."""
    for i in range(1, 4):
        labels = np.array([1, 1000, 2, 500, 3])
        np.savez(tmp_path / f"train_data_batch_{i}.npz", data=asymmetric_images(5, 10 * i), labels=labels)
    np.savez(tmp_path / "val_data.npz", data=asymmetric_images(4), labels=np.array([1, 2, 3, 1000]))
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: they run fastest so, and two processes with two OpenMP
    threads each on a 2-core machine ran ~40x slower (use with ``pytestmark = pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def write_tiny_sd(folder, prediction_type: str = "epsilon"):
    """A tiny Stable-Diffusion-layout pipeline folder (random weights, nothing downloaded): ``unet/``, ``vae/``
    (f = 4, RGB), ``scheduler/``, ``text_encoder/`` (a 2-layer CLIPTextModel of width 16) and ``tokenizer/``
    (CLIP's real BPE, built from the vocabulary open_clip ships)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dpldm.export.open_clip_text import clip_vocabulary

    torch.manual_seed(0)
    build_unet(sample_size=8, in_channels=4, block_out_channels=(16, 32), attention=(True, True),
               attention_head_dim=8, cross_attention_dim=16, norm_num_groups=8).save_pretrained(folder / "unet")
    build_autoencoder(in_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                      norm_num_groups=4).save_pretrained(folder / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  steps_offset=1, prediction_type=prediction_type).save_pretrained(folder / "scheduler")  # SD's
    vocab, merges = clip_vocabulary()  # CLIP's, as open_clip's SimpleTokenizer builds it
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(folder / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                            eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    _write_index(folder, "StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"],
                 vae=["diffusers", "AutoencoderKL"], scheduler=["diffusers", "DDPMScheduler"],
                 text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
    return folder


def _write_index(folder, name: str, **components: list[str]) -> None:
    import json

    (folder / "model_index.json").write_text(json.dumps({"_class_name": name, "_diffusers_version": "0.42.1",
                                                        **components}))


def write_tiny_ldm_text(folder, vq: bool = False):
    """A tiny folder in the layout of CompVis/ldm-text2im-large-256 (DP-LDM's text base model): ``unet/`` (cross-
    attention width 16), ``vqvae/`` (an AutoencoderKL, f = 4, as that model has; ``vq``: a VQModel), ``scheduler/``, ``bert/`` (a 1-layer LDMBert of
    width 16) and ``tokenizer/`` (a BertTokenizer over a small word list)."""
    from diffusers import DDPMScheduler
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    torch.manual_seed(0)
    build_unet(sample_size=8, in_channels=4, block_out_channels=(16, 32), attention=(True, True),
               attention_head_dim=8, cross_attention_dim=16, norm_num_groups=8).save_pretrained(folder / "unet")
    if vq:  # a VQ-regularised autoencoder, as CompVis' other LDMs use
        from diffusers import VQModel

        VQModel(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                num_vq_embeddings=64, norm_num_groups=4).save_pretrained(folder / "vqvae")
    else:
        build_autoencoder(in_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                          norm_num_groups=4).save_pretrained(folder / "vqvae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False).save_pretrained(folder / "scheduler")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "item", "red", "square", "dog", "car",
             *map(str, range(10))]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder / "tokenizer")
    LDMBertModel(LDMBertConfig(vocab_size=len(words), encoder_layers=1, encoder_ffn_dim=32, encoder_attention_heads=2,
                               head_dim=8, d_model=16)).save_pretrained(folder / "bert")
    _write_index(folder, "LDMTextToImagePipeline", unet=["diffusers", "UNet2DConditionModel"],
                 vqvae=["diffusers", "VQModel" if vq else "AutoencoderKL"], scheduler=["diffusers", "DDPMScheduler"],
                 bert=["latent_diffusion", "LDMBertModel"], tokenizer=["transformers", "BertTokenizer"])
    return folder


def user_error(capsys, argv: list[str]) -> str:
    """``dpldm ARGV``, which must fail as a user error: exit status 2 and at most 10 lines on stderr (the message,
    naming the field); returns them."""
    from dpldm.cli import main

    capsys.readouterr()  # what came before
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert 0 < len(message.strip().splitlines()) <= 10, message
    return message


# --- the quickstart chain on tiny models (tests/test_quickstart.py, test_runs.py) ---
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AE = "autoencoder"
TINY = {
    AE: ["--trainer.fast_dev_run=true", "--model.init_args.vae.init_args.block_out_channels=[8,16,16]",
         "--model.init_args.vae.init_args.norm_num_groups=4", "--model.init_args.scale_batches=2",
         "--data.init_args.num_train=32", "--data.init_args.num_val=8", "--data.init_args.batch_size=8"],
    "ldm": ["--trainer.fast_dev_run=true", "--model.init_args.unet.init_args.block_out_channels=[16,32]",
            "--model.init_args.unet.init_args.attention_head_dim=8", "--model.init_args.unet.init_args.norm_num_groups=8",
            "--model.init_args.unet.init_args.cross_attention_dim=16",
            "--model.init_args.conditioner.init_args.embed_dim=16", "--model.init_args.sampling_steps=2",
            "--data.init_args.num_train=32", "--data.init_args.num_val=8", "--data.init_args.batch_size=8"],
    "finetune": ["--trainer.fast_dev_run=true", "--model.init_args.conditioner.init_args.embed_dim=16",
                 "--model.init_args.sampling_steps=2", "--data.init_args.batch_size=8"],
}


def tiny_args(out) -> list[str]:
    args = ["--out", str(out)]
    for stage, overrides in TINY.items():
        for o in overrides:
            args.append(f"--override={stage}:{o}")
    return args
