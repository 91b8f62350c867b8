"""The benchmarks run (their numbers are read by people, not asserted): bench/dp_step.py with the options the
GPU check (bench/gpu_check.sh) uses, on the CPU at the smallest size."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_dp_step_bench_prints_the_dp_ratio_and_sampling_throughput_under_bf16():
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "dp_step.py"), "--geometries", "quickstart",
                           "--batch-sizes", "4", "--steps", "1", "--physical", "2", "--scopes", "attention",
                           "--precision", "bf16", "--sampling", "--threads", "1"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "cpu, precision bf16" in out
    row = next(line for line in out.splitlines() if line.startswith("quickstart") and "attention" in line)
    assert row.split()[-4].endswith("x") and float(row.split()[-4][:-1]) > 0  # DP / non-DP time
    assert "images/s" in out

