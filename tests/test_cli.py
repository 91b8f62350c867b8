"""The front door: `dpldm --help` lists every command, fast (nothing heavy imported); unknown commands and
`dpldm test` exit 2 with a pointer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dpldm.cli import COMMANDS, main


def test_help_lists_every_command_without_importing_lightning_or_torch():
    code = ("import sys; from dpldm.cli import main; main(['--help']); "
            "heavy = [m for m in ('lightning', 'torch', 'diffusers') if m in sys.modules]; "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name, (module, summary) in COMMANDS.items():
        assert f"  {name}" in out and summary in out
    for name in ("quickstart", "cache", "sample", "evaluate", "export", "privacy", "sweep", "audit", "experiment",
                 "fit", "predict"):
        assert name in COMMANDS


@pytest.mark.parametrize("name", [n for n, (module, _) in COMMANDS.items() if module])
def test_each_driver_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dpldm {name}") and len(out.splitlines()) < 80  # its own, not the fit parser's


def test_an_unknown_command_exits_2_with_the_list(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fitt"])
    assert exit_.value.code == 2 and "unknown command 'fitt'" in capsys.readouterr().err


def test_a_driver_that_returns_results_exits_0_from_the_shell(tmp_path):
    """`dpldm experiment --report-only` returns the results to Python callers; the console script must not turn
    that dict into a dump on stderr and exit status 1."""
    results = tmp_path / "results"
    results.mkdir()
    script = Path(sys.executable).parent / "dpldm"  # the installed console script, as a shell runs it
    done = subprocess.run([str(script), "experiment", "--report-only", "--results", str(results),
                           "--doc", str(tmp_path / "results.md")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "results.md").exists() and "{" not in done.stdout + done.stderr


def test_the_console_script_is_the_exit_safe_entry():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "dpldm"]
    assert script.value == "dpldm.cli:console"
