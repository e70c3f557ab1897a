# molcloak: `make demo` runs the main job, `make test` the whole suite. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.molcloak-installed
export OMP_NUM_THREADS ?= 2

.PHONY: install chromium demo app lint format test test-fast bench clean

install: $(STAMP)

# One resolver run for everything (concrete-ml pins torch/numpy/pandas/scikit-learn).
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "molcloak needs Python 3.11 (concrete-ml 1.9); set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives it through executable_path; no browser download).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends chromium; }

# The main job: train, compile, deploy and run the sol-low demo in FHE, then open the browser app on it.
demo: $(STAMP)
	$(BIN)/molcloak demo
	$(BIN)/molcloak app --bundle demo/bundle

app: $(STAMP)
	$(BIN)/molcloak app --bundle demo/bundle

# ruff (configured in pyproject.toml): lint and formatting, checked before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two test files at a time (pytest-xdist; a file's tests stay together in one process, in order): most of the
# suite waits on a server, a keygen or a single-threaded compile, so two share the 2 cores well. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: $(STAMP) chromium lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not browser"

# molcloak against its peers (README "Performance"); the "bench" extra adds TenSEAL for the CKKS row.
bench: $(STAMP)
	$(BIN)/python -m pip install -e ".[bench]"
	$(BIN)/molcloak bench --json bench.json --markdown bench.md

clean:
	rm -rf demo runs bundles .pytest_cache
