"""The owner's plaintext comparison, in a process of its own.

Concrete keeps thread-local state while it compiles (`concrete.fhe.extensions.tag`): compiling or
simulating from a Gradio worker thread fails with `'_thread._local' object has no attribute 'stack'`.
So the app never does either in its own threads: one child process (spawned, so that nothing of the
app's threads is inherited) compiles each local bundle once, in its main thread, when the app starts,
and runs every simulation there. The app waits for it with a timeout; any failure of the comparison
is reported as text next to the private result, never in its place.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from molcloak.pipeline.errors import MolcloakError

RUNS = 8  # simulated runs of one input: the spread of approximate rounding

_SIMULATORS: dict[str, object] = {}  # in the child: name -> Simulator, compiled in its main thread
_FAILED: dict[str, str] = {}  # in the child: name -> why its Simulator could not be built


def _load(bundles: dict[str, str]) -> None:
    """Child initializer (main thread of the child): compile every bundle's model once."""
    from molcloak.pipeline.predict import Simulator

    for name, path in bundles.items():
        try:
            _SIMULATORS[name] = Simulator(path)
        except Exception as exc:  # noqa: BLE001 - reported per model, the others keep working
            _FAILED[name] = f"{type(exc).__name__}: {exc}"[:300]


def _simulate(name: str, items: list, runs: int) -> dict:
    """Child: `runs` FHE simulations of `items` (raw outputs and predictions in task units, per run)."""
    if name not in _SIMULATORS:
        raise MolcloakError(
            f"the owner's model {name!r} could not be loaded: {_FAILED.get(name, 'not found')}"
        )
    sim = _SIMULATORS[name]
    out = [sim(items) for _ in range(runs)]
    cfg = sim.compiled.config
    return {
        "raw": [r.tolist() for r, _ in out],
        "values": [v.tolist() for _, v in out],
        "approximate": bool(cfg.rounding_bits is not None and cfg.rounding_method == "approximate"),
        "rounding_bits": cfg.rounding_bits,
    }


def _ready() -> list[str]:
    return sorted(_SIMULATORS)


class Comparison:
    """FHE simulation of the owner's bundles in a child process; `simulate` is safe from any thread."""

    def __init__(self, bundles: dict[str, Path]):
        self.names = set(bundles)
        self._pool = None
        if bundles:
            self._pool = ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_load,
                initargs=({k: str(v) for k, v in bundles.items()},),
            )
            self._warm = self._pool.submit(_ready)  # starts the child and its compilations now

    def simulate(self, name: str, items: list, runs: int = RUNS, timeout: float = 300.0) -> dict:
        """Simulated outputs of `items` under the owner's weights, `runs` times; raises MolcloakError."""
        if self._pool is None or name not in self.names:
            raise MolcloakError(f"no local weights for model {name!r}")
        try:
            return self._pool.submit(_simulate, name, list(items), runs).result(timeout=timeout)
        except FutureTimeout:
            raise MolcloakError(f"the plaintext comparison took longer than {timeout:.0f} s") from None
        except MolcloakError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken child must not break the page
            raise MolcloakError(f"the plaintext comparison failed ({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
