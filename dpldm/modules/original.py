"""Checkpoints in the original CompVis layout: a latent-diffusion / DP-LDM ``.ckpt`` or a Stable Diffusion single
file (``.ckpt`` / ``.safetensors``), with the YAML that built it.

One file holds the whole LDM (Rombach et al., 2022): the UNet under ``model.diffusion_model.*`` (EMA copy under
``model_ema.*``), the autoencoder under ``first_stage_model.*``, the conditioner under ``cond_stage_model.*``
and the latent scale as the buffer ``scale_factor``. The YAML gives the architectures (``unet_config``,
``first_stage_config``) and the forward process (``linear_start``, ``linear_end``, ``timesteps``,
``beta_schedule``, ``parameterization``). We translate the configs and keys with diffusers' own single-file
conversion (``diffusers.loaders.single_file_utils``) and load strictly: missing or unexpected keys are an error
that lists them, never a model with some weights left random. ``resblock_updown`` UNets (DP-LDM's) become
:class:`~dpldm.modules.unet_updown.UpDownUNet2DConditionModel`. Attention inside the autoencoder's blocks (``ddconfig.attn_resolutions``, as in DP-LDM's own autoencoders)
becomes diffusers' ``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from dpldm.errors import ConfigError
from dpldm.modules.hub import PretrainedMismatchError, PretrainedNotFoundError

SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
UNET, VAE, COND = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."

# CompVis' beta_schedule (ldm/modules/diffusionmodules/util.py: make_beta_schedule) -> diffusers' name.
# CompVis "linear" is linear in sqrt(beta): diffusers' "scaled_linear" (SD's schedule).
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def is_original_file(path: str) -> bool:
    """A single checkpoint file (CompVis / SD layout) rather than a diffusers folder or hub id."""
    return path.endswith(SUFFIXES) and not os.path.isdir(path)


@dataclass
class OriginalCheckpoint:
    """A CompVis-layout checkpoint and its YAML.

    Args:
        path: the checkpoint file.
        state: its state dict (the ``state_dict`` entry of a Lightning checkpoint).
        config: the YAML as a dict (``model.params`` holds the LDM's settings).
        field: the config key of ``path``, for errors.
    """

    path: str
    state: dict[str, Tensor]
    config: dict
    field: str

    @property
    def params(self) -> dict:
        return self.config["model"]["params"]

    def part(self, prefix: str) -> dict[str, Tensor]:
        """The entries under ``prefix`` (prefix kept)."""
        return {k: v for k, v in self.state.items() if k.startswith(prefix)}


def read_state(path: str, field: str) -> dict[str, Tensor]:
    """The state dict of a checkpoint file (safetensors or a torch pickle of tensors only)."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    if not os.path.isfile(path):
        raise PretrainedNotFoundError(f"`{field}` = {path!r}: no such checkpoint file")
    try:
        return load_single_file_checkpoint(path, local_files_only=True)
    except Exception as err:  # an unpickling error of a checkpoint holding more than tensors, a truncated file
        raise PretrainedNotFoundError(f"`{field}` = {path!r} could not be read as a checkpoint: "
                                      f"{type(err).__name__}: {err}") from err


def read_original(path: str, original_config: str | None, field: str) -> OriginalCheckpoint:
    """Read a CompVis-layout checkpoint with its YAML.

    Args:
        path: the ``.ckpt`` / ``.safetensors`` file.
        original_config: the YAML that built it (Stable Diffusion 1.x: ``v1-inference.yaml``).
        field: the config key of ``path``; its sibling ``original_config`` is named in errors.
    """
    import yaml

    key = field.rsplit(".", 1)[0] + ".original_config"
    if original_config is None:
        raise ConfigError(key, None, f"{field} = {path!r} is a single checkpoint file: give the YAML that built "
                                     "it (the model's `model.params`, e.g. Stable Diffusion 1.x's v1-inference.yaml)")
    if not os.path.isfile(original_config):
        raise ConfigError(key, original_config, "no such file")
    with open(original_config) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or "params" not in config.get("model", {}):
        raise ConfigError(key, original_config, "is not a CompVis model YAML (it has no model.params)")
    return OriginalCheckpoint(path, read_state(path, field), config, field)


def _strict_load(model: torch.nn.Module, state: dict[str, Tensor], source: int, ckpt: OriginalCheckpoint,
                 what: str) -> None:
    """Load ``state`` (converted from ``source`` checkpoint entries) into ``model``, or list what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    dropped = source - len(state)  # checkpoint entries the conversion had no place for
    if missing or unexpected or mismatched or dropped:
        listed = "; ".join(f"{name} ({len(keys)}): {', '.join(keys[:6])}" + (", ..." if len(keys) > 6 else "")
                           for name, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("mismatched shapes", mismatched)) if keys)
        if dropped:
            listed += ("; " if listed else "") + f"{dropped} checkpoint entries with no place in the model"
        raise PretrainedMismatchError(f"The {what} in `{ckpt.field}` = {ckpt.path!r} does not fit the architecture "
                                      f"its YAML describes: {listed}. Refusing to train from partly random weights.")
    model.load_state_dict(state, strict=True)


def _unet_config(ckpt: OriginalCheckpoint) -> dict:
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    params = (ckpt.params.get("unet_config") or {}).get("params")
    if params is None:
        raise ConfigError(ckpt.field.rsplit(".", 1)[0] + ".original_config", "...", "has no model.params.unet_config")
    if not params.get("use_spatial_transformer", False) or params.get("context_dim") is None:
        raise ConfigError("use_spatial_transformer / context_dim (in the YAML's unet_config)",
                          params.get("context_dim"), "dpldm fine-tunes a cross-attention UNet (UNet2DConditionModel)")
    config = create_unet_diffusers_config_from_ldm(ckpt.config, ckpt.state)
    config["sample_size"] = params.get("image_size", ckpt.params.get("image_size"))  # CompVis: the latent size
    if params.get("use_scale_shift_norm"):  # FiLM on the timestep: (1 + scale) * norm(h) + shift, in that order
        config["resnet_time_scale_shift"] = "scale_shift"
    config.pop("num_class_embeds", None)  # class labels reach dpldm's UNet as cross-attention tokens
    return config


def original_unet(ckpt: OriginalCheckpoint, weights: bool = True, ema: bool = True):
    """The UNet (``model.diffusion_model.*``; the EMA copy when the checkpoint has one and ``ema``).

    Its forward process, from the YAML, comes along as ``unet.base_scheduler_config``.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from dpldm.modules.unet_updown import UpDownUNet2DConditionModel

    config = _unet_config(ckpt)
    updown = bool(ckpt.params["unet_config"]["params"].get("resblock_updown"))
    unet = (UpDownUNet2DConditionModel if updown else UNet2DConditionModel).from_config(config)
    if weights:
        use_ema = ema and any(k.startswith("model_ema.") for k in ckpt.state)
        source, ups, downs = _resample_resblocks(ckpt, config, use_ema) if updown else (ckpt.state, {}, {})
        state = _moved(convert_ldm_unet_checkpoint(source, config, extract_ema=use_ema), downs) | ups
        _strict_load(unet, state, len(ckpt.part(UNET)), ckpt, "UNet" + (" (EMA)" if use_ema else ""))
    unet.base_scheduler_config = original_scheduler_config(ckpt)
    return unet


def _resample_resblocks(ckpt: OriginalCheckpoint, config: dict, ema: bool) -> tuple[dict, dict, dict]:
    """With ``resblock_updown``, a ResBlock ends each level where diffusers' converter expects a resample conv:
    ``input_blocks.{n}.0`` (``down=True``; the converter names it ``down_blocks.{b}.resnets.{layers_per_block}``,
    an index no diffusers block has, moved by :func:`_moved`) and the last ``output_blocks`` of a level, after its
    SpatialTransformer if any (``up=True``; taken out here, as the converter would misname or drop it).

    Returns the checkpoint for the converter, the up-ResBlocks under their diffusers names
    (``up_blocks.{b}.upsamplers.0.resnet.*``, the EMA copy's values when ``ema``; diffusers' own ResBlock rule),
    and the renames of the down-ResBlocks."""
    from diffusers.loaders.single_file_utils import update_unet_resnet_ldm_to_diffusers

    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    ups = {f"{UNET}output_blocks.{b * (layers + 1) + layers}.{2 if up_attention[b] else 1}.":
           f"up_blocks.{b}.upsamplers.0.resnet." for b in range(levels - 1)}
    downs = {f"down_blocks.{b}.resnets.{layers}.": f"down_blocks.{b}.downsamplers.0.resnet."
             for b in range(levels - 1)}
    source, renamed = {}, {}
    for key, value in ckpt.state.items():
        prefix = next((p for p in ups if key.startswith(p)), None)
        if prefix is None:
            source[key] = value
            continue
        if ema:  # CompVis LitEma names its copies without dots
            value = ckpt.state["model_ema." + "".join(key[len("model."):].split("."))]
        update_unet_resnet_ldm_to_diffusers([key], renamed, {key: value}, mapping={"old": prefix, "new": ups[prefix]})
    return source, renamed, downs


def _moved(state: dict[str, Tensor], renames: dict[str, str]) -> dict[str, Tensor]:
    """``state`` with each key starting with a ``renames`` prefix moved to its new prefix."""
    def move(key: str) -> str:
        old = next((p for p in renames if key.startswith(p)), None)
        return key if old is None else renames[old] + key[len(old):]
    return {move(k): v for k, v in state.items()}


def original_scheduler_config(ckpt: OriginalCheckpoint) -> dict:
    """A ``DDPMScheduler`` config of the LDM's forward process (CompVis ``DDPM`` defaults where the YAML is silent)."""
    params = ckpt.params
    schedule = params.get("beta_schedule", "linear")
    prediction = params.get("parameterization", "eps")
    if schedule not in BETA_SCHEDULES:
        raise ConfigError("beta_schedule (in the YAML's model.params)", schedule,
                          f"one of {', '.join(BETA_SCHEDULES)} (what diffusers' DDPMScheduler can express)")
    if prediction not in PREDICTION_TYPES:
        raise ConfigError("parameterization (in the YAML's model.params)", prediction,
                          f"one of {', '.join(PREDICTION_TYPES)}")
    return {"num_train_timesteps": int(params.get("timesteps", 1000)), "beta_schedule": BETA_SCHEDULES[schedule],
            "beta_start": float(params.get("linear_start", 1e-4)), "beta_end": float(params.get("linear_end", 2e-2)),
            "prediction_type": PREDICTION_TYPES[prediction], "clip_sample": False}


def original_autoencoder(ckpt: OriginalCheckpoint, weights: bool = True):
    """The autoencoder (``first_stage_model.*``): an ``AutoencoderKL``, or a ``VQModel`` for CompVis'
    ``VQModelInterface``. Its latent scale is the checkpoint's ``scale_factor`` buffer (set from the public
    training data when CompVis ``scale_by_std`` was on), else the YAML's, else CompVis' default 1.0."""
    from diffusers import AutoencoderKL, VQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    stage = ckpt.params.get("first_stage_config") or {}
    ddconfig = stage.get("params", {}).get("ddconfig", {})
    if ddconfig.get("attn_type", "vanilla") != "vanilla":
        raise ConfigError("first_stage_config.params.ddconfig.attn_type (in the YAML)", ddconfig["attn_type"],
                          "must be 'vanilla' (diffusers' autoencoders have softmax attention only)")
    if "scale_factor" in ckpt.state:
        scale = float(ckpt.state["scale_factor"])
    else:
        scale = float(ckpt.params.get("scale_factor", 1.0))
    config = create_vae_diffusers_config_from_ldm(ckpt.config, ckpt.state, scaling_factor=scale)
    config["sample_size"] = ddconfig.get("resolution", config["sample_size"])
    if ddconfig.get("ch_mult"):
        config["down_block_types"], config["up_block_types"] = _vae_block_types(ddconfig)
    vq = stage.get("target", "").endswith(("VQModel", "VQModelInterface"))
    if vq:
        config |= {"num_vq_embeddings": stage["params"]["n_embed"], "vq_embed_dim": stage["params"]["embed_dim"]}
    elif stage.get("params", {}).get("embed_dim", ddconfig.get("z_channels")) != ddconfig.get("z_channels"):
        raise ConfigError("first_stage_config.params.embed_dim (in the YAML)", stage["params"]["embed_dim"],
                          f"must equal ddconfig.z_channels ({ddconfig.get('z_channels')}) for diffusers' AutoencoderKL")
    vae = (VQModel if vq else AutoencoderKL).from_config(config)
    if weights:
        state = _with_block_attention(convert_ldm_vae_checkpoint(ckpt.state, config), ckpt,
                                      len(config["down_block_types"]))
        if vq:
            state["quantize.embedding.weight"] = ckpt.state.get(VAE + "quantize.embedding.weight")
        source = {k for k in ckpt.part(VAE) if "loss." not in k}  # CompVis keeps the training loss (LPIPS) here
        _strict_load(vae, {k: v for k, v in state.items() if v is not None}, len(source), ckpt, "autoencoder")
    return vae


def _vae_block_types(ddconfig: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Encoder and decoder block types. CompVis' ``Encoder`` / ``Decoder`` (ldm/modules/diffusionmodules/model.py)
    put an ``AttnBlock`` after each ResnetBlock of a level whose resolution (``resolution / 2**level``) is in
    ``attn_resolutions``; diffusers' decoder lists the levels from the lowest resolution up."""
    attention = set(ddconfig.get("attn_resolutions") or ())
    levels = [ddconfig.get("resolution", 0) // 2 ** i in attention for i in range(len(ddconfig.get("ch_mult", [])))]
    down = tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in levels)
    up = tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(levels))
    return down, up


def _with_block_attention(state: dict[str, Tensor], ckpt: OriginalCheckpoint, levels: int) -> dict[str, Tensor]:
    """Add the blocks' attention (``encoder.down.{i}.attn.{j}``, ``decoder.up.{i}.attn.{j}``: 1x1 convolutions)
    to a converted autoencoder state as diffusers' linear ``attentions``, renamed by diffusers' own mid-block rule.
    ``convert_ldm_vae_checkpoint`` knows only the middle block's attention: it copies these keys unrenamed."""
    from diffusers.loaders.single_file_utils import update_vae_attentions_ldm_to_diffusers

    source = {k[len(VAE):]: v for k, v in ckpt.part(VAE).items()}
    state = {k: v for k, v in state.items() if ".attn." not in k}
    for i in range(levels):
        for old, new in ((f"encoder.down.{i}.attn.", f"encoder.down_blocks.{i}.attentions."),
                         (f"decoder.up.{i}.attn.", f"decoder.up_blocks.{levels - 1 - i}.attentions.")):
            keys = [k for k in source if k.startswith(old)]
            update_vae_attentions_ldm_to_diffusers(keys, state, source, mapping={"old": old, "new": new})
    return state


def original_class_embedding(path: str, field: str) -> Tensor:
    """``cond_stage_model.embedding.weight`` [C, D] of a CompVis ``ClassEmbedder`` (one token per class), with a
    null class appended for classifier-free guidance: the mean of the public classes -> [C + 1, D]."""
    state = read_state(path, field)
    key = COND + "embedding.weight"
    if key not in state:
        raise ConfigError(field, path, f"has no {key} (a CompVis ClassEmbedder); its conditioner keys: "
                                       f"{sorted(k for k in state if k.startswith(COND))[:6]}")
    public = state[key].float()
    return torch.cat([public, public.mean(0, keepdim=True)])


def original_text_encoder(path: str, encoder_cls: type, config: object, field: str) -> torch.nn.Module:
    """The text encoder of a single file, as the class ``encoder_cls`` with ``config`` (from the diffusers pipeline
    of the same model): CompVis' ``BERTEmbedder`` as an ``LDMBertModel`` (:func:`_ldm_bert_state`), SD 1.x's
    ``FrozenCLIPEmbedder``
    (``cond_stage_model.transformer.*``, already CLIPTextModel keys) or SD 2.x's ``FrozenOpenCLIPEmbedder``
    (``cond_stage_model.model.*``, converted by diffusers' ``convert_open_clip_checkpoint``; the blocks past the
    config's depth, the text projection and the logit scale are not part of SD 2's conditioning). Loaded
    strictly; ``position_ids`` (a buffer transformers no longer saves) is skipped."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
        is_clip_model,
        is_open_clip_model,
    )

    state = {k: v for k, v in read_state(path, field).items() if not k.endswith("position_ids")}
    model = encoder_cls(config)
    if COND + "transformer.token_emb.weight" in state:  # CompVis' BERTEmbedder (the text-to-image LDM's)
        converted = _ldm_bert_state(state, config.encoder_layers)
    elif is_clip_model(state):
        converted = convert_ldm_clip_checkpoint(state)
    elif is_open_clip_model(state):
        converted = convert_open_clip_checkpoint(model, state, prefix=COND + "model.")
        # SD 2.x conditions on the penultimate layer: its encoder config has one block fewer than the file
        # (diffusers ignores block 23 by name, a full-size rule); drop every block past the config's depth.
        depth = config.num_hidden_layers
        converted = {k: v for k, v in converted.items()
                     if not (k.startswith("text_model.encoder.layers.") and int(k.split(".")[3]) >= depth)}
    else:
        raise ConfigError(field, path, f"has no text encoder dpldm reads (SD's {COND}transformer.text_model.*, "
                                       f"{COND}model.*, CompVis' BERTEmbedder); its conditioner keys: "
                                       f"{sorted(k for k in state if k.startswith(COND))[:6]}")
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # SD 2.x's diffusers encoder ends one block early (SD 2 conditions on the penultimate layer): the entries
    # diffusers drops there are by design, so only the model's side is checked for open_clip files.
    source = len(converted) if is_open_clip_model(state) else sum(k.startswith(COND) for k in state)
    _strict_load(model, converted, source, OriginalCheckpoint(path, state, {}, field), "text encoder")
    return model


def _ldm_bert_state(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """CompVis' ``BERTEmbedder`` (an x-transformers ``TransformerWrapper``: ``attn_layers.layers`` alternates
    [LayerNorm, Attention] and [LayerNorm, FeedForward(net: Linear, GELU, Dropout, Linear)]) -> diffusers'
    ``LDMBertModel`` keys, the correspondence diffusers' ``convert_from_ckpt.convert_ldm_bert_checkpoint``
    copies module by module (that function needs the CompVis modules built; this reads the state dict)."""
    src = COND + "transformer."
    names = {"model.embed_tokens.weight": "token_emb.weight", "model.embed_positions.weight": "pos_emb.emb.weight",
             "model.layer_norm.weight": "norm.weight", "model.layer_norm.bias": "norm.bias",
             "to_logits.weight": "to_logits.weight", "to_logits.bias": "to_logits.bias"}
    for i in range(depth):
        attention, feed_forward, ours = f"attn_layers.layers.{2 * i}.", f"attn_layers.layers.{2 * i + 1}.", \
            f"model.layers.{i}."
        for p in ("weight", "bias"):
            names[f"{ours}self_attn_layer_norm.{p}"] = f"{attention}0.{p}"
            names[f"{ours}self_attn.out_proj.{p}"] = f"{attention}1.to_out.{p}"
            names[f"{ours}final_layer_norm.{p}"] = f"{feed_forward}0.{p}"
            names[f"{ours}fc1.{p}"] = f"{feed_forward}1.net.0.0.{p}"
            names[f"{ours}fc2.{p}"] = f"{feed_forward}1.net.2.{p}"
        for x in "qkv":
            names[f"{ours}self_attn.{x}_proj.weight"] = f"{attention}1.to_{x}.weight"
    return {new: state[src + old] for new, old in names.items() if src + old in state}
