#!/usr/bin/env bash
# The prepared GPU check (README, "On a GPU"): a few minutes on one lent GPU. DP vs non-DP step time and memory
# side by side at DP-LDM's CIFAR-10 geometry (full width), in bf16-mixed and in fp32, attention scope and full
# UNet, and the sampling throughput; then the bf16-mixed DP fit tests that skip without a GPU.
#   bash bench/gpu_check.sh [OUT_DIR]        (writes OUT_DIR/gpu_check.txt; default bench/results)
# Python: $PYTHON, else .venv/bin/python, else python3 with dpldm's dependencies importable (on a machine that
# cannot reach PyPI: diffusers, opacus, jsonargparse, omegaconf and peft carried as wheels on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
mkdir -p "$out"
PY="${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  for precision in bf16 32; do
    "$PY" bench/dp_step.py --device cuda --precision "$precision" --geometries cifar-gpu --batch-sizes 256 \
      --physical 256 --steps 5 --sampling
  done
  HF_HUB_OFFLINE=1 WANDB_MODE=disabled "$PY" -m pytest -q tests/privacy/test_precision.py -k cuda
} 2>&1 | tee "$out/gpu_check.txt"
