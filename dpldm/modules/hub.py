"""Loading pretrained public weights: strictly, with the hub's options, and with an error that says what to do
offline.

``from_pretrained`` on a hub id needs the network; dpldm's tests and many clusters have none. When a load fails
we name the id, the config key that takes a local copy instead, and the ``hf download`` command that makes one.
A load that would leave weights randomly initialised (missing or unexpected keys, mismatched shapes) is an
error listing them, never a warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PretrainedNotFoundError(OSError):
    """Pretrained weights could not be found locally nor downloaded."""


class PretrainedMismatchError(ValueError):
    """The weights on disk do not fill the model they were loaded into."""


def dtype_of(name: str | None, config_key: str) -> torch.dtype | None:
    """``float32`` / ``float16`` / ``bfloat16`` -> the torch dtype (None keeps the stored one)."""
    if name is None:
        return None
    if name not in DTYPES:
        from dpldm.errors import ConfigError

        raise ConfigError(config_key, name, f"must be one of {', '.join(DTYPES)}")
    return DTYPES[name]


def download_hint(path: str, subfolder: str | None, revision: str | None) -> str:
    """The command that fetches ``path`` for offline use."""
    include = f" --include '{subfolder}/*'" if subfolder else ""
    return f"hf download {path}" + (f" --revision {revision}" if revision else "") + include + " --local-dir DIR"


def looks_like_hub_id(path: str) -> bool:
    """``name`` or ``owner/name`` as the hub spells repository ids (``runs/x/pretrained``, ``./x`` are not)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def load_pretrained(load: Callable[..., T], path: str, config_key: str, what: str, subfolder: str | None = None,
                    revision: str | None = None, variant: str | None = None,
                    torch_dtype: torch.dtype | None = None) -> T:
    """Call a diffusers ``from_pretrained`` (or ``load_config``) strictly, and turn a failure into an actionable
    error.

    Args:
        load: the ``from_pretrained`` (a diffusers or transformers model, a tokenizer) or ``load_config``
            classmethod to call.
        path: a local directory in diffusers format, or a hub id such as ``stabilityai/sd-vae-ft-mse``.
        config_key: the YAML key a user sets to point at a local copy (``...init_args.path``).
        what: a few words naming the part (``autoencoder``, ``UNet``) for the message.
        subfolder: optional subfolder inside ``path`` (``vae``, ``unet`` in a pipeline repo).
        revision: a hub branch, tag or commit.
        variant: a weights variant (``fp16``: ``diffusion_pytorch_model.fp16.safetensors``).
        torch_dtype: the dtype to load the weights in.

    Returns:
        The loaded model (or config).

    Raises:
        PretrainedNotFoundError: the weights are neither on disk nor downloadable.
        PretrainedMismatchError: the weights do not fill the model (missing, unexpected or mismatched keys).
    """
    owner = getattr(load, "__self__", None)  # the class of a classmethod
    is_model = isinstance(owner, type) and issubclass(owner, torch.nn.Module) and load.__name__ == "from_pretrained"
    options = {"subfolder": subfolder, "revision": revision}
    if is_model:  # not a config or a tokenizer: the load info lists the keys that did not fit
        options |= {"variant": variant, "torch_dtype": torch_dtype, "output_loading_info": True}
        if owner.__module__.startswith("diffusers"):
            options["low_cpu_mem_usage"] = False  # no `accelerate` needed
    try:
        loaded = load(path, **{k: v for k, v in options.items() if v is not None})
    except (OSError, ValueError, EnvironmentError) as err:  # hub errors derive from OSError/ValueError
        where = f"{path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "") + (
            f" at revision {revision!r}" if revision else "") + (f", variant {variant!r}" if variant else "")
        if os.path.isdir(path):
            reason = "the local directory has no diffusers-format weights"
        elif not looks_like_hub_id(path):  # a path that does not exist: no download command can help
            raise PretrainedNotFoundError(
                f"Could not load the pretrained {what}: `{config_key}` = {path!r} is not a directory (looked for "
                f"{os.path.abspath(path)!r}) and not a hub id. If an earlier stage writes it (e.g. a public stage's "
                "`pretrained/` folder), run that stage first; otherwise fix the path.") from err
        else:
            reason = "it is not a local directory and could not be downloaded (offline, or HF_HUB_OFFLINE=1?)"
        raise PretrainedNotFoundError(
            f"Could not load the pretrained {what} {where}: {reason}. Download it on a machine with internet "
            f"(`{download_hint(path, subfolder, revision)}`) and set `{config_key}` to the local directory. "
            f"Original error: {type(err).__name__}: {err}") from err
    if not is_model:
        return loaded
    model, info = loaded
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        listed = "; ".join(f"{k.replace('_', ' ')} ({len(v)}): {', '.join(map(str, list(v)[:8]))}"
                           + (", ..." if len(v) > 8 else "") for k, v in bad.items())
        raise PretrainedMismatchError(
            f"The pretrained {what} at `{config_key}` = {path!r} does not fit its own config: {listed}. "
            "Refusing to train from partly random weights; check the path and subfolder.")
    return model
