import json
import subprocess
import sys

import pytest

from dpldm.privacy import epsilon_for


def run(*args):
    return subprocess.run([sys.executable, "-m", "dpldm", "privacy", *args], capture_output=True, text=True)


def test_epsilon_from_sigma_json_is_the_whole_stdout():
    out = run("--sample-rate", "0.01", "--noise-multiplier", "1.1", "--steps", "1000", "--delta", "1e-5", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)  # pure JSON: no text line before it
    assert set(res) == {"epsilon", "noise_multiplier", "sample_rate", "steps", "delta", "accountant"}
    assert res["epsilon"] == pytest.approx(epsilon_for(1.1, 0.01, 1000, 1e-5, "prv"))


def test_text_output_without_json(capsys):
    from dpldm.commands.privacy import main

    res = main(["--sample-rate", "0.01", "--noise-multiplier", "1.1", "--steps", "1000", "--delta", "1e-5"])
    out = capsys.readouterr().out
    assert out.startswith("epsilon = ") and f"{res['epsilon']:.4f}" in out and "{" not in out


def test_sigma_from_epsilon_rdp(capsys):
    from dpldm.commands.privacy import main

    res = main(["--sample-rate", "0.01", "--epsilon", "3", "--steps", "1000", "--delta", "1e-5",
                "--accountant", "rdp", "--json"])
    assert json.loads(capsys.readouterr().out) == res
    assert res["accountant"] == "rdp" and 2.97 <= res["epsilon"] <= 3.0 and res["noise_multiplier"] > 0


SIGMA = ["--sample-rate", "0.01", "--noise-multiplier", "1.1", "--steps", "1000", "--delta", "1e-5"]


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


@pytest.mark.parametrize("args, message", [
    (with_flag(SIGMA, "--sample-rate", "1.5"), "--sample-rate must be in (0, 1]"),
    (with_flag(SIGMA, "--delta", "1"), "--delta must be in (0, 1)"),
    (with_flag(SIGMA, "--delta", "0"), "--delta must be in (0, 1)"),
    (with_flag(SIGMA, "--delta", "nan"), "--delta must be in (0, 1)"),
    (with_flag(SIGMA, "--steps", "0"), "--steps must be >= 1"),
    (with_flag(SIGMA, "--noise-multiplier", "inf"), "--noise-multiplier must be finite and > 0"),
    (with_flag(SIGMA, "--noise-multiplier", "0"), "--noise-multiplier must be finite and > 0"),
    (["--sample-rate", "0.01", "--epsilon", "inf", "--steps", "10", "--delta", "1e-5"],
     "--epsilon must be finite and > 0"),
    (["--sample-rate", "0.01", "--epsilon", "-1", "--steps", "10", "--delta", "1e-5"],
     "--epsilon must be finite and > 0"),
    # delta so large that (0, delta)-DP already holds: the accountants return a negative epsilon
    (with_flag(SIGMA, "--delta", "0.5"), "--delta must be small enough that epsilon > 0"),
    (with_flag(SIGMA, "--delta", "0.5") + ["--accountant", "rdp"], "--delta must be small enough that epsilon > 0"),
])
def test_bad_values_exit_2_naming_the_flag_and_the_bound(args, message, capsys):
    from dpldm.commands.privacy import main

    with pytest.raises(SystemExit) as err:
        main(args)
    captured = capsys.readouterr()
    assert err.value.code == 2 and message in captured.err
    assert "epsilon = -" not in captured.out and captured.out == ""


def test_a_negative_epsilon_is_never_printed_from_the_command_line():
    out = run(*with_flag(SIGMA, "--delta", "0.5"), "--json")
    assert out.returncode == 2 and out.stdout == ""
    assert "--delta" in out.stderr and "1/N" in out.stderr
