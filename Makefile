# Quick start: `make train` runs the main job, `make test` runs the test suite. Each makes its own
# virtual environment (.venv) and installs the project into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train test install kernel-bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

train: install
	$(BIN)/python -m train.main --arch v2 --width 1.0

test: install
	$(BIN)/python -m pytest -n 2 tests

# The native depthwise kernels alone, layer by layer, on one thread (bench/kernel_layers.cc,
# compiled with the library's own command).
kernel-bench: install
	$(BIN)/python -m bench.kernels
