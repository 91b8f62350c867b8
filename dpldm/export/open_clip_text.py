"""An open_clip text tower as transformers' ``CLIPTextModel`` + ``CLIPTokenizer``, so that a run on
:class:`~dpldm.modules.OpenCLIPTextEncoder` exports without open_clip or dpldm.

open_clip's text transformer is CLIP's (Radford et al., 2021): token + learned position embeddings, pre-norm
blocks with a causal mask, ``ln_final``; the per-token output after ``ln_final`` is what dpldm conditions on,
which is ``CLIPTextModel``'s ``last_hidden_state``. The weights are renamed by diffusers' own open_clip
converter (``convert_open_clip_checkpoint``: the fused ``in_proj`` split into q, k, v), the tokenizer is CLIP's
BPE from the vocabulary file open_clip ships (the pipeline pads with id 0, as open_clip does). The export checks the
converted encoder against the run's on a few captions and refuses to write a different one.
"""

from __future__ import annotations

import gzip
import os

import torch
from torch import nn

PREFIX = "open_clip."  # not diffusers' "cond_stage_model.model.": its SD 2 rule would drop block 23 by name


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges as open_clip's ``SimpleTokenizer`` builds them: the 256 byte units,
    the same with ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in merges]


def clip_tokenizer(context_length: int):
    """A ``CLIPTokenizer`` with open_clip's vocabulary and context length (the pipeline pads with id 0 as open_clip
    does: :func:`dpldm.export.pipeline.open_clip_ids`)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def clip_text_model(encoder: nn.Module):
    """The frozen tower of an :class:`~dpldm.modules.OpenCLIPTextEncoder` as a ``CLIPTextModel`` (loaded
    strictly: every weight of the model comes from the tower)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = encoder.transformer.resblocks
    vocab_size, width = encoder.token_embedding.weight.shape
    activation = type(blocks[0].mlp.gelu).__name__
    if activation not in ("GELU", "QuickGELU"):
        raise ValueError(f"open_clip text blocks with {activation} have no CLIPTextModel equivalent")
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=len(blocks),
                            intermediate_size=blocks[0].mlp.c_fc.out_features,
                            num_attention_heads=blocks[0].attn.num_heads,
                            max_position_embeddings=encoder.positional_embedding.shape[0],
                            hidden_act="gelu" if activation == "GELU" else "quick_gelu",
                            layer_norm_eps=encoder.ln_final.eps, bos_token_id=vocab_size - 2,
                            eos_token_id=vocab_size - 1, pad_token_id=0)
    model = CLIPTextModel(config)
    tower = {"token_embedding.weight": encoder.token_embedding.weight,
             "positional_embedding": encoder.positional_embedding,
             **{f"transformer.{k}": v for k, v in encoder.transformer.state_dict().items()},
             **{f"ln_final.{k}": v for k, v in encoder.ln_final.state_dict().items()}}
    state = convert_open_clip_checkpoint(model, {PREFIX + k: v.detach().clone() for k, v in tower.items()}, PREFIX)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def check_same_features(encoder: nn.Module, text_model: nn.Module, tokenizer, captions: list[str]) -> None:
    """Raise unless the exported encoder gives the run's frozen features for ``captions`` (and the empty one)."""
    captions = [*captions, ""]
    from dpldm.export.pipeline import open_clip_ids

    ids = open_clip_ids(tokenizer, captions)
    want = encoder.frozen_features(captions).float()
    got = text_model(ids.to(want.device))[0].float()
    if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"the exported CLIPTextModel does not reproduce the run's open_clip features (max "
                           f"difference {(got - want).abs().max():.3g}); nothing was written")
