# molcloak: `make demo` runs the main job, `make test` the whole suite. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.molcloak-installed
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test test-fast clean

install: $(STAMP)

# One resolver run for everything (concrete-ml pins torch/numpy/pandas/scikit-learn).
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "molcloak needs Python 3.11 (concrete-ml 1.9); set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/molcloak demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not browser"

clean:
	rm -rf demo runs bundles .pytest_cache
