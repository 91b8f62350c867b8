"""The ``dpldm`` command: one entry point for every subcommand, fast to ask for help.

``fit``, ``validate`` and ``predict`` are a LightningCLI (:class:`dpldm.commands.lightning_cli.DPLDMCLI`: YAML
configs with ``class_path``/``init_args``); the others are drivers with a ``main(argv)`` of their own. Nothing
heavy is imported before a command is chosen, so ``dpldm --help`` answers at once. A user error (a config value
out of its bound, weights that are not where the config says) prints one short paragraph naming the field and
exits 2; ``--verbose`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module with main(argv), one-line summary); fit/validate/predict go to LightningCLI.
COMMANDS = {
    "fit": ("", "train a stage from a YAML config (DP-SGD when the config has privacy)"),
    "validate": ("", "run a config's validation loop on a checkpoint (public data only)"),
    "predict": ("", "sample the test split's conditions with a checkpoint (files via SampleWriter)"),
    "quickstart": ("dpldm.commands.quickstart", "the whole method end to end on scikit-learn's digits (CPU, minutes)"),
    "cache": ("dpldm.commands.cache", "build or check the latent cache a fit config trains on"),
    "sample": ("dpldm.commands.sample", "images from a finished run, for class labels or a prompts file"),
    "evaluate": ("dpldm.commands.evaluate", "a run's metrics (FID, downstream accuracy, CLIP score) on a checkpoint"),
    "export": ("dpldm.export", "a run as a diffusers pipeline folder with its privacy model card"),
    "privacy": ("dpldm.commands.privacy", "the privacy calculator: sigma for a target epsilon, or epsilon"),
    "sweep": ("dpldm.commands.sweep", "run a W&B sweep file locally (grid/random over epsilon, C, ...)"),
    "audit": ("dpldm.audit.run", "an empirical privacy audit with canaries (a lower bound on epsilon)"),
    "experiment": ("dpldm.commands.experiment", "the privacy-utility comparison of every method on digits/MNIST/Fashion"),
}
LIGHTNING = ("fit", "validate", "predict")
USER_ERRORS = ("ConfigError", "PretrainedNotFoundError", "PretrainedMismatchError", "CacheMismatchError")


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    return (f"usage: dpldm COMMAND [ARGS] [--verbose]\n\nDP fine-tuning of latent diffusion models (DP-LDM).\n\n"
            f"commands:\n{rows}\n\n`dpldm COMMAND --help` shows a command's options and defaults; --verbose shows "
            "the traceback of an error.")


def explain(err: BaseException) -> str | None:
    """The short message of a user error anywhere in ``err``'s chain (the innermost dpldm error, or a config
    parse error), or None for anything else (a bug: the traceback stays)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in reversed(chain):  # innermost first: what the user's value broke
        if type(e).__name__ in USER_ERRORS or isinstance(e, FileNotFoundError) and "init_args" in str(e):
            return str(e)
    for e in chain:
        text = str(e)
        if type(e).__name__ == "ArgumentError" or "Does not validate against" in text:
            lines = [ln.strip() for ln in text.splitlines()]
            bullets = [ln[2:] for ln in lines if ln.startswith("- ") and "Expected a <class 'NoneType'>" not in ln]
            return "\n".join(bullets[:5] or lines[:3])
    return None


def run(argv: list[str]) -> object:
    name = argv[0]
    if name in LIGHTNING:
        from dpldm.commands.lightning_cli import DPLDMCLI

        return DPLDMCLI(args=argv)
    return importlib.import_module(COMMANDS[name][0]).main(argv[1:])


def main(argv: list[str] | None = None) -> object:
    """Entry point of the ``dpldm`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return None
    if argv[0] == "test":  # a test-set loss says little about a generator; its metrics are elsewhere
        print("dpldm test is not offered: `dpldm evaluate RUN` runs the run's metric callbacks (FID, downstream "
              "accuracy, CLIP score) on a checkpoint, and `dpldm predict --config CONFIG --ckpt_path CKPT` samples "
              "the test set's conditions.", file=sys.stderr)
        sys.exit(2)
    if argv[0] not in COMMANDS:
        print(f"dpldm: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    try:
        return run(argv)
    except Exception as err:
        message = None if verbose else explain(err)
        if message is None:
            raise
        print(f"dpldm {argv[0]}: error: {message}\n(--verbose shows the traceback)", file=sys.stderr)
        sys.exit(2)


def console() -> None:
    """The ``dpldm`` console script: :func:`main`, whose return value (a driver's results, for Python callers)
    is not an exit status. Returned to a console script, a dict would be printed and exit 1. Output that is not
    a terminal (a log file) gets a tqdm line at most every 30 s, not one every update."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")  # tqdm >= 4.66 reads its defaults from TQDM_*
    main()


if __name__ == "__main__":
    console()
