"""Loading pretrained public weights, with an error that says what to do offline.

``from_pretrained`` on a hub id needs the network; dpldm's tests and many clusters have none.
When a load fails we name the id and the config key that takes a local copy instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class PretrainedNotFoundError(OSError):
    """Pretrained weights could not be found locally nor downloaded."""


def load_pretrained(load: Callable[..., T], path: str, config_key: str, what: str, subfolder: str | None = None) -> T:
    """Call a diffusers-style ``from_pretrained`` and turn a failure into an actionable error.

    Args:
        load: the ``from_pretrained`` classmethod to call.
        path: a local directory in diffusers format, or a hub id such as ``stabilityai/sd-vae-ft-mse``.
        config_key: the YAML key a user sets to point at a local copy.
        what: a few words naming the part (``autoencoder``, ``UNet``) for the message.
        subfolder: optional subfolder inside ``path`` (``vae``, ``unet`` in a pipeline repo).

    Returns:
        The loaded model.

    Raises:
        PretrainedNotFoundError: the weights are neither on disk nor downloadable.
    """
    try:
        return load(path, subfolder=subfolder, low_cpu_mem_usage=False)  # no `accelerate` needed
    except (OSError, ValueError, EnvironmentError) as err:  # hub errors derive from OSError/ValueError
        where = f"{path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        local = os.path.isdir(path)
        reason = (
            "the local directory has no diffusers-format weights"
            if local
            else "it is not a local directory and could not be downloaded (offline, or HF_HUB_OFFLINE=1?)"
        )
        raise PretrainedNotFoundError(
            f"Could not load the pretrained {what} {where}: {reason}. "
            f"Download it on a machine with internet (e.g. `huggingface-cli download {path}`) and set "
            f"`{config_key}` to the local directory. Original error: {type(err).__name__}: {err}"
        ) from err
