"""Cost of one programmable bootstrap (PBS) on this machine, measured, and the latency model built on it.

A concrete-python circuit applying a table lookup to a vector of `n` encrypted `bits`-bit values
is compiled with the same `p_error` as the model; running it with n = 1 and n = 16 gives a fixed
cost and a per-lookup cost. A model circuit with `pbs` bootstraps whose widest integer has `bits`
bits is then predicted to take `fixed + pbs * per_pbs` seconds: the maximum bit width sets the
crypto parameters of the whole circuit. Measurements are stored in a JSON file (default
`~/.molcloak/pbs_calibration.json`) keyed by bit width and p_error, and reused.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

DEFAULT_PATH = Path(os.environ.get("MOLCLOAK_HOME", Path.home() / ".molcloak")) / "pbs_calibration.json"
SIZES = (1, 16)


def key(bits: int, p_error: float | None) -> str:
    return f"{bits}@{'default' if p_error is None else f'{p_error:g}'}"


def measure(bits: int, p_error: float | None, repeats: int = 3, seed: int = 0) -> dict:
    """Time a `bits`-bit table lookup on 1 and on 16 encrypted values; returns fixed and per-PBS seconds."""
    from concrete import fhe

    rng = np.random.default_rng(seed)
    table = fhe.LookupTable([int(v) for v in rng.integers(0, 2**bits, size=2**bits)])
    times = {}
    for n in SIZES:
        compiler = fhe.Compiler(lambda x: table[x], {"x": "encrypted"})
        inputset = [rng.integers(0, 2**bits, size=n) for _ in range(32)] + [np.full(n, 2**bits - 1), np.zeros(n, dtype=int)]
        circuit = compiler.compile(inputset, fhe.Configuration(p_error=p_error, show_progress=False))
        circuit.keygen()
        enc = circuit.encrypt(rng.integers(0, 2**bits, size=n))
        circuit.run(enc)  # warm-up: the first run pays one-time setup
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            circuit.run(enc)
            runs.append(time.perf_counter() - start)
        times[n] = statistics.median(runs)
    per_pbs = max((times[SIZES[1]] - times[SIZES[0]]) / (SIZES[1] - SIZES[0]), 0.0)
    return {
        "bits": bits, "p_error": p_error, "fixed_s": max(times[SIZES[0]] - per_pbs, 0.0), "per_pbs_s": per_pbs,
        "seconds": {str(n): t for n, t in times.items()}, "load_avg": os.getloadavg()[0],
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(), "cpus": os.cpu_count(),
    }


class Calibration:
    """Per (bit width, p_error) PBS costs, measured on demand and cached in a JSON file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else DEFAULT_PATH
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            self.entries = json.loads(self.path.read_text()).get("entries", {})

    def cost(self, bits: int, p_error: float | None) -> dict:
        k = key(bits, p_error)
        if k not in self.entries:
            self.entries[k] = measure(bits, p_error)
            self.save()
        return self.entries[k]

    def predict(self, pbs: int, bits: int, p_error: float | None) -> float:
        """Predicted server-side seconds for a circuit with `pbs` bootstraps and widest integer `bits`."""
        c = self.cost(max(int(bits), 1), p_error)
        return c["fixed_s"] + pbs * c["per_pbs_s"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": "seconds = fixed_s + pbs * per_pbs_s", "entries": self.entries}, indent=2))
        os.replace(tmp, self.path)
