"""open_clip names as dpldm configs give them: an architecture (or a JSON architecture file) and a tag."""

from __future__ import annotations

import os


def resolve_open_clip(model_name: str, pretrained: str | None, field: str) -> tuple[str, str | None]:
    """open_clip's (architecture name, pretrained tag) for our config values.

    Args:
        model_name: an open_clip architecture, or a JSON architecture file (registered under its stem).
        pretrained: a tag; ``none``/``null``/empty mean random weights (``--...pretrained null`` on the
            command line arrives as the string "None").
        field: the config key of ``model_name``, for the error.
    """
    import open_clip

    if isinstance(pretrained, str) and pretrained.lower() in ("none", "null", ""):
        pretrained = None
    if model_name.endswith(".json"):
        if not os.path.isfile(model_name):
            raise FileNotFoundError(f"{field} = {model_name!r}: no such open_clip architecture file")
        open_clip.add_model_config(model_name)
        model_name = os.path.splitext(os.path.basename(model_name))[0]
    return model_name, pretrained
