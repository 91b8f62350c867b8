"""Errors that name the config field at fault and the bound it broke.

Every check that runs before training raises :class:`ConfigError`, so a user sees
``model.init_args.unet.cross_attention_dim = 64: must equal the conditioner's embed_dim (32)``
instead of a shape mismatch deep inside a forward pass.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value outside its valid range.

    Args:
        field: dotted config key, as a user writes it in YAML (e.g. ``data.init_args.root``).
        value: the offending value.
        bound: what the value must satisfy, in words (e.g. ``must be > 0``).
    """

    def __init__(self, field: str, value: Any, bound: str):
        self.field, self.value, self.bound = field, value, bound
        super().__init__(f"{field} = {value!r}: {bound}")
