"""Packaging: one dependency list (pyproject) mirrored by environment.yml; the two README commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_pinned_dependencies_as_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pip_reqs = [r for r in pip if not r.startswith("-e")]
    assert sorted(map(str.strip, pip_reqs)) == sorted(deps)  # same names and the same pins
    assert any(r.startswith("-e .") for r in pip), "environment.yml must install dpldm itself"


def test_torch_is_pinned_to_the_local_build():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_readme_setup_shows_exactly_the_two_make_commands_and_ci_calls_make_test():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^\s*(make \w+)\s*$", setup, flags=re.M)
    assert commands == ["make quickstart", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^quickstart:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_required_layout():
    for d in ["dpldm", "dpldm/modules", "dpldm/datamodules", "configs", "notebooks", "tests"]:
        assert (ROOT / d).is_dir(), d
