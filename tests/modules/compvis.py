"""Write tiny models in the original CompVis layout, for the loaders' tests.

The key names follow CompVis' own modules (latent-diffusion ``openaimodel.UNetModel``, ``model.Encoder`` /
``Decoder``, ``encoders.modules.ClassEmbedder``), written out here from their construction order, independently
of diffusers' conversion code: a test that loads these files through that conversion checks the two against
each other.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # diffusers ResnetBlock2D -> CompVis ResBlock


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{RESNET[name]}.{tail}"


def unet_to_compvis(state: dict[str, Tensor], layers_per_block: int, attention: list[bool]) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict -> CompVis ``UNetModel`` keys (no prefix).

    CompVis numbers its blocks in one list per direction: ``input_blocks.0`` is conv_in, then per level
    ``layers_per_block`` x [ResBlock, SpatialTransformer?] and a Downsample (all but the last level);
    ``output_blocks`` has ``layers_per_block + 1`` x [ResBlock, SpatialTransformer?, Upsample (last of a level)].
    With ``resblock_updown`` the Downsample / Upsample is a ResBlock (diffusers: ``downsamplers.0.resnet``).
    """
    per = layers_per_block + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")
        if stem in fixed:
            new = f"{fixed[stem]}.{leaf}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = f"input_blocks.{1 + b * per + i}"
            new = f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.resnet\.(.*)", key):  # resblock_updown
            new = f"input_blocks.{1 + int(m[1]) * per + layers_per_block}.0.{_resnet(m[2])}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.resnet\.(.*)", key):
            b = int(m[1])
            position = 2 if list(reversed(attention))[b] else 1
            new = f"output_blocks.{b * per + layers_per_block}.{position}.{_resnet(m[2])}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + layers_per_block}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
            new = (f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets" else
                   f"middle_block.1.{m[3]}")
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            block = f"output_blocks.{int(m[1]) * per + int(m[3])}"
            new = f"{block}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"{block}.1.{m[4]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            has_attention = list(reversed(attention))[b]
            new = f"output_blocks.{b * per + layers_per_block}.{2 if has_attention else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"no CompVis name for {key}")
        out[new] = value
    return out


def vae_to_compvis(state: dict[str, Tensor], num_blocks: int) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` / ``VQModel`` state dict -> CompVis ``AutoencoderKL`` / ``VQModel`` keys.

    The decoder's ``up`` list runs from the lowest resolution in diffusers and from the highest in CompVis; the
    attention (middle block ``mid.attn_1``, block attention ``down.{i}.attn.{j}`` / ``up.{i}.attn.{j}``) is 1x1
    convolutions (``q``, ``k``, ``v``, ``proj_out``) in CompVis, linear in diffusers.
    """
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.", new)
        new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.", r"encoder.down.\1.attn.\2.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.",
                     lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.attn.{m[2]}.", new)
        if m := re.match(r"(.*\.(?:mid\.attn_1|attn\.\d+))\.(.*)\.(weight|bias)", new):
            new = f"{m[1]}.{attention[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # linear -> 1x1 conv
        out[new] = value
    return out


def write_compvis(path, unet: dict[str, Tensor], vae: dict[str, Tensor], embedding: Tensor | None = None,
                  ema: dict[str, Tensor] | None = None, scale_factor: float | None = None) -> None:
    """A Lightning checkpoint of a CompVis ``LatentDiffusion`` (``state_dict`` with its prefixes; ``.safetensors``
    for a Stable Diffusion style single file). ``ema``: CompVis ``LitEma`` copies (names without dots)."""
    state = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    state |= {f"first_stage_model.{k}": v for k, v in vae.items()}
    if embedding is not None:
        state["cond_stage_model.embedding.weight"] = embedding
    if ema is not None:
        state |= {"model_ema." + f"diffusion_model.{k}".replace(".", ""): v for k, v in ema.items()}
        state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10)
    if scale_factor is not None:
        state["scale_factor"] = torch.tensor(scale_factor)
    state = {k: v.contiguous() for k, v in state.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 10, "epoch": 1}, path)


def ldm_bert_to_compvis(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``LDMBertModel`` state dict -> CompVis ``BERTEmbedder`` keys (``cond_stage_model.transformer``,
    an x-transformers ``TransformerWrapper``): block i of LDMBert is ``attn_layers.layers.{2i}`` (``0``: its
    LayerNorm, ``1``: Attention with ``to_q``/``to_k``/``to_v``/``to_out``) and ``.{2i + 1}`` (``0``: LayerNorm,
    ``1.net``: Sequential(Sequential(Linear, GELU), Dropout, Linear))."""
    out = {}
    for key, value in state.items():
        new = {"model.embed_tokens.weight": "token_emb.weight", "model.embed_positions.weight": "pos_emb.emb.weight",
               "model.layer_norm.weight": "norm.weight", "model.layer_norm.bias": "norm.bias"}.get(key)
        if key.startswith("to_logits."):
            new = key
        elif m := re.match(r"model\.layers\.(\d+)\.(.*)", key):
            i, rest = int(m[1]), m[2]
            a, f = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
            rest = re.sub(r"self_attn\.([qkv])_proj", r"1.to_\1", rest)
            new = (f"{a}.{rest.replace('self_attn_layer_norm', '0').replace('self_attn.out_proj', '1.to_out')}"
                   if rest.startswith(("1.", "self_attn")) else
                   f"{f}.{rest.replace('final_layer_norm', '0').replace('fc1', '1.net.0.0').replace('fc2', '1.net.2')}")
        if new is None:
            raise KeyError(f"no CompVis name for {key}")
        out[f"cond_stage_model.transformer.{new}"] = value
    return out
