"""A W&B sweep file (the YAML ``wandb sweep`` takes), validated and expanded into runs: the grid in file order,
or seeded random draws (``bayes`` is random search here). Used by ``dpldm sweep`` (:mod:`dpldm.commands.sweep`).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpldm.errors import ConfigError

# W&B's sweep config schema (github.com/wandb/sweeps, config/schema.json): the keys it allows.
TOP_KEYS = {"apiVersion", "kind", "controller", "description", "program", "job", "image_uri", "entity", "project",
            "method", "command", "name", "run_cap", "metric", "metrics", "scheduler", "early_terminate", "parameters"}
METRIC_KEYS = {"name", "goal", "target", "impute", "impute_while_running"}
PARAM_KEYS = {"value", "values", "probabilities", "distribution", "min", "max", "q"}
# The distributions drawn from here (W&B also has normal, beta, inv_log_uniform, ...: use wandb agent for those).
DISTRIBUTIONS = ("constant", "categorical", "categorical_w_probabilities", "int_uniform", "uniform", "q_uniform",
                 "log_uniform", "q_log_uniform", "log_uniform_values", "q_log_uniform_values")
EXAMPLE = 'e.g. [dpldm, fit, --config, configs/quickstart/finetune.yaml, "${args}"]'


@dataclass
class Sweep:
    """A validated sweep file.

    Args:
        method: ``grid``, ``random`` or ``bayes``.
        parameters: config key -> normalised spec (``distribution`` and its fields).
        command: the arguments after ``fit``, with ``${args}`` where the parameters go.
        metric: the metric to optimise, or ``None``.
        goal: ``maximize`` or ``minimize``.
        run_cap: W&B's cap on the number of runs, if set.
    """

    method: str
    parameters: dict[str, dict]
    command: list[str]
    metric: str | None = None
    goal: str = "minimize"
    run_cap: int | None = None

    @property
    def configs(self) -> list[str]:
        """The run config files that the command passes with ``--config``."""
        return [a.split("=", 1)[1] if "=" in a else b for a, b in zip(self.command, [*self.command[1:], ""])
                if a == "--config" or a.startswith("--config=")]


def load_sweep(source: str | os.PathLike | dict) -> Sweep:
    """Read and validate a W&B sweep file; a mistake raises a ConfigError naming the key at fault.

    Args:
        source: the YAML file, or its parsed contents.
    """
    try:
        doc = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text())
    except OSError as e:
        raise ConfigError("sweep file", str(source), f"cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError("sweep file", str(source), f"is not valid YAML: {e}".replace("\n", " ")) from None
    require(isinstance(doc, dict), "sweep file", type(doc).__name__, "must be a mapping: method, parameters, command")
    _known(doc, TOP_KEYS, "")
    method = doc.get("method")
    require(method in ("grid", "random", "bayes"), "method", method, "must be grid, random or bayes")
    metric = {} if doc.get("metric") is None and method == "bayes" else doc.get("metric")  # bayes needs one
    require(metric is None or isinstance(metric, dict) and bool(metric.get("name")), "metric.name", metric,
             "must name a logged metric: {name: ..., goal: maximize|minimize}")
    _known(metric or {}, METRIC_KEYS, "metric.")
    require(not str((metric or {}).get("name", "")).startswith("test/"), "metric.name", (metric or {}).get("name"),
             "a sweep must not choose on the test split: optimise the val/ metric (the final test/ value is "
             "reported once, for the chosen run)")
    goal = (metric or {}).get("goal", "minimize")
    require(goal in ("minimize", "maximize"), "metric.goal", goal, "must be minimize or maximize")
    params, run_cap = doc.get("parameters"), doc.get("run_cap")
    require(isinstance(params, dict) and bool(params), "parameters", params,
             "must map config keys to specs, e.g. model.init_args.privacy.init_args.epsilon: {values: [1, 10]}")
    require(run_cap is None or type(run_cap) is int and run_cap >= 1, "run_cap", run_cap, "must be an integer >= 1")
    return Sweep(method, {str(k): _parameter(str(k), v, method) for k, v in params.items()},
                 _command(doc.get("command")), metric and str(metric["name"]), goal, run_cap)


def require(ok: bool, field: str, value: Any, bound: str) -> None:
    if not ok:
        raise ConfigError(field, value, bound)


def _known(spec: dict, keys: set[str], prefix: str) -> None:
    for bad in sorted(set(spec) - keys, key=str)[:1]:
        nested = bad == "parameters" and prefix
        raise ConfigError(f"{prefix}{bad}", spec[bad], "nested parameters are not supported here: name the dotted "
                          "config key" if nested else f"unknown key (W&B's: {', '.join(sorted(keys))})")


def _parameter(name: str, spec: Any, method: str) -> dict:
    key = f"parameters.{name}"
    require(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name)), key, name, "must be a dotted config key")
    require(isinstance(spec, dict), key, spec, "must be {values: [...]}, {value: x} or {min: a, max: b, ...}")
    lo, hi, q, values, probs = (spec.get(k) for k in ("min", "max", "q", "values", "probabilities"))
    dist = spec.get("distribution") or ("constant" if "value" in spec else "categorical" if "values" in spec
                                        else "int_uniform" if type(lo) is int and type(hi) is int else "uniform")
    require(dist in DISTRIBUTIONS, f"{key}.distribution", dist, f"dpldm sweep draws from {', '.join(DISTRIBUTIONS)}")
    _known(spec, PARAM_KEYS, key + ".")
    require(method != "grid" or dist in ("constant", "categorical"), key, spec,
             "a grid needs `values: [...]` (or `value: x`) for every parameter")
    if dist == "constant":
        require("value" in spec, f"{key}.value", None, "a constant parameter needs `value`")
        return {"distribution": dist, "value": spec["value"]}
    if dist.startswith("categorical"):
        require(isinstance(values, list) and bool(values), f"{key}.values", values, "must be a non-empty list")
        require(probs is None or isinstance(probs, list) and len(probs) == len(values) and all(
            isinstance(p, (int, float)) and p >= 0 for p in probs) and sum(probs) > 0, f"{key}.probabilities", probs,
            f"must be {len(values)} numbers >= 0, one per value")
        return {"distribution": "categorical", "values": values, "probabilities": probs}
    for k, v in (("min", lo), ("max", hi)):
        require(isinstance(v, (int, float)) and not isinstance(v, bool), f"{key}.{k}", v, f"{dist} needs numbers")
    require(lo < hi, f"{key}.max", hi, f"must be > min ({lo})")
    require(dist != "int_uniform" or type(lo) is int and type(hi) is int, f"{key}.min", lo, "must be an integer")
    require(not dist.endswith("_values") or lo > 0, f"{key}.min", lo, f"must be > 0 for {dist} "
             "(log_uniform takes ln(min) and ln(max))")
    require(q is None or isinstance(q, (int, float)) and q > 0, f"{key}.q", q, "must be > 0")
    return {"distribution": dist, "min": lo, "max": hi, "q": q or 1}


def _command(cmd: Any) -> list[str]:
    require(isinstance(cmd, list) and all(isinstance(c, (str, int, float)) for c in cmd), "command", cmd,
             f"dpldm sweep needs a command list, {EXAMPLE}")
    cmd = [str(c) for c in cmd]
    require("fit" in cmd, "command", cmd, f"must run `dpldm fit`, {EXAMPLE}")
    rest = cmd[cmd.index("fit") + 1:]
    require("${args}" in rest, "command", cmd, f'must pass the parameters with "${{args}}" (--key=value), {EXAMPLE}')
    for i in reversed([i for i, a in enumerate(rest) if a.split("=", 1)[0] == "--trainer.default_root_dir"]):
        del rest[i:i + (1 if "=" in rest[i] else 2)]  # the W&B runs' folder: dpldm sweep gives each run its own
    macros = [c for c in rest if "${" in c and c != "${args}"]
    require(not macros, "command", macros[:1], "dpldm sweep only fills in ${args}")
    require(bool(Sweep("grid", {}, rest).configs), "command", cmd, f"must name a run config with --config, {EXAMPLE}")
    return rest


def expand(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The parameter sets to run.

    Args:
        sweep: a validated sweep.
        count: at most this many (grid: the first ones); random/bayes default to ``run_cap`` or 10.
        seed: seed of the random draws.
    """
    if sweep.method == "grid":  # in file order, the first parameter varying slowest
        choices = [[s["value"]] if s["distribution"] == "constant" else s["values"] for s in sweep.parameters.values()]
        return [dict(zip(sweep.parameters, combo)) for combo in itertools.product(*choices)][:count]
    rng = random.Random(seed)
    return [{name: draw(spec, rng) for name, spec in sweep.parameters.items()}
            for _ in range(count or sweep.run_cap or 10)]


def draw(spec: dict, rng: random.Random) -> Any:
    """One value of a normalised parameter ``spec``, as W&B's random search draws it (floats: 4 digits)."""
    dist, lo, hi = spec["distribution"], spec.get("min"), spec.get("max")
    if dist == "constant":
        return spec["value"]
    if dist == "categorical":
        return rng.choices(spec["values"], weights=spec["probabilities"])[0]
    if dist == "int_uniform":
        return rng.randint(lo, hi)
    if dist.endswith("_values"):
        lo, hi = math.log(lo), math.log(hi)
    x = rng.uniform(lo, hi)
    if "log_uniform" in dist:
        x, lo, hi = math.exp(x), math.exp(lo), math.exp(hi)
    if dist.startswith("q_"):
        x = round(x / spec["q"]) * spec["q"]
    return min(max(float(f"{x:.4g}"), lo), hi)
