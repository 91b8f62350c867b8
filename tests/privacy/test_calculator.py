import json
import subprocess
import sys

import pytest

from dpldm.privacy import epsilon_for


def run(*args):
    return subprocess.run([sys.executable, "-m", "dpldm", "privacy", *args], capture_output=True, text=True)


def test_epsilon_from_sigma_json_last_line():
    out = run("--sample-rate", "0.01", "--noise-multiplier", "1.1", "--steps", "1000", "--delta", "1e-5", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res) == {"epsilon", "noise_multiplier", "sample_rate", "steps", "delta", "accountant"}
    assert res["epsilon"] == pytest.approx(epsilon_for(1.1, 0.01, 1000, 1e-5, "prv"))


def test_sigma_from_epsilon_rdp(capsys):
    from dpldm.privacy.calculator import main

    res = main(["--sample-rate", "0.01", "--epsilon", "3", "--steps", "1000", "--delta", "1e-5",
                "--accountant", "rdp", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res
    assert res["accountant"] == "rdp" and 2.97 <= res["epsilon"] <= 3.0 and res["noise_multiplier"] > 0


def test_bad_value_names_the_flag(capsys):
    from dpldm.privacy.calculator import main

    with pytest.raises(SystemExit):
        main(["--sample-rate", "1.5", "--epsilon", "3", "--steps", "10", "--delta", "1e-5"])
    assert "--sample-rate must be in (0, 1]" in capsys.readouterr().err
