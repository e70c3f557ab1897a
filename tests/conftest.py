"""Shared fixtures: tiny real models, compiled once per session (real Concrete ML, real keys)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

from molcloak.pipeline import data, workflow  # noqa: E402
from molcloak.pipeline.compile import CompileConfig  # noqa: E402
from molcloak.pipeline.train import TrainConfig  # noqa: E402

TINY = dict(hidden=[4], weight_bits=2, act_bits=2, input_bits=2)
TINY_TRAIN = TrainConfig(epochs=8, patience=8, seed=0)
# The tiny fixtures compile without approximate rounding at p_error 2^-40 per PBS, so that decrypted FHE
# outputs equal the simulation bit for bit (tests compare them exactly; Concrete simulates approximate
# rounding and larger p_error with randomness).
EXACT_P_ERROR = 2**-40


def _tiny(task: str, tmp: Path, rounding_bits=None):
    ds = data.load_bundled(task)
    ckpt = workflow.train_checkpoint(ds, model_options=TINY, train_config=TINY_TRAIN)
    compiled = workflow.compile_checkpoint(
        ckpt, CompileConfig(rounding_bits=rounding_bits, p_error=EXACT_P_ERROR)
    )
    bundle = tmp / f"{task}-bundle"
    workflow.deploy(ckpt, compiled, bundle, f"tiny-{task}")
    return ckpt, compiled, bundle


@pytest.fixture(scope="session")
def tiny_binary(tmp_path_factory):
    """A 10 -> 4 -> 2 sol-low classifier with 2-bit weights/activations, compiled and deployed."""
    return _tiny("sol-low", tmp_path_factory.mktemp("binary"))


@pytest.fixture(scope="session")
def tiny_regression(tmp_path_factory):
    return _tiny("sol-logs", tmp_path_factory.mktemp("regression"))


@pytest.fixture()
def csv_file(tmp_path):
    def write(text: str, name: str = "mols.csv") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


# ---------------------------------------------------------------- per-file seconds
# `make test` runs two files at a time (`--dist loadfile`). Sending the longest files first (session 19) ran the
# suite in 29 min 11 s against 26 min 14 s before (other changes ran too), most likely because two CPU-heavy files
# then ran side by side on the 2 cores (the demo test took 171 s against 72 s); xdist's default order (most tests
# first) pairs them with light files, so it is kept. The per-file seconds printed at the end are for such decisions.
_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Setup, call and teardown seconds per file (on xdist's controller: every worker's reports)."""
    name = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[name] = _FILE_SECONDS.get(name, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _FILE_SECONDS:
        return
    slowest = sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:12]
    terminalreporter.write_sep("=", "slowest files (seconds in setup, call and teardown)")
    terminalreporter.write_line("  ".join(f"{name.removeprefix('tests/')} {s:.0f}" for name, s in slowest))
