"""Random Fourier features: a map drawn from a seed, so that a network without a hidden layer acts as a kernel machine.

A feature spec may end in ``rff:n=N`` (options ``g=G``, default 1, and ``seed=S``, default 0), after a
``select:k=K`` if it has one. The d columns before it (scaled, and selected) become the N values
cos(x·W + b), with every entry of W drawn from N(0, 2g/d) and of b from U(0, 2π) (Rahimi and Recht,
"Random features for large-scale kernel machines", 2007): a linear function of them approximates a
function of the Gaussian kernel exp(-g·|x - y|²/d). On the panel's descriptor-driven assays, a linear
model on 2,048 of them over the RDKit 2D descriptors ranks molecules like the RandomForest does, and its
circuit has no programmable bootstrap at all: no evaluation keys, no bootstrap latency
(evaluation/PERFORMANCE.md, session 21).

W and b come from the seed through a generator written here (splitmix64, then Box-Muller), so a client
draws the same map on any NumPy version; nothing is fitted, so the client bundle reveals nothing of the
owner's molecules through it (the columns before it are fitted as without it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .errors import FeaturizerError

RFF = "rff"
MAX_N = 16384


@dataclass(frozen=True)
class RandomFourier:
    n: int
    g: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise FeaturizerError(
                f"rff: n={self.n!r} must be an integer in 1..{MAX_N}; write e.g. rff:n=2048"
            )
        if not isinstance(self.g, (int, float)) or not 0 < self.g < 1e6:
            raise FeaturizerError(f"rff: g={self.g!r} must be a positive number; write e.g. rff:n=2048,g=1")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise FeaturizerError(f"rff: seed={self.seed!r} must be an integer in 0..2^32-1")

    def __str__(self) -> str:
        extra = ("" if self.g == 1 else f",g={self.g:g}") + ("" if self.seed == 0 else f",seed={self.seed}")
        return f"{RFF}:n={self.n}{extra}"

    @classmethod
    def parse(cls, chunk: str, text: str) -> RandomFourier:
        """The ``rff:n=N[,g=G][,seed=S]`` chunk of the spec string `text`."""
        _, _, opts = chunk.partition(":")
        values: dict = {}
        for opt in filter(None, (o.strip() for o in opts.split(","))):
            key, _, val = (s.strip() for s in opt.partition("="))
            try:
                if key in values or key not in ("n", "g", "seed"):
                    raise ValueError
                values[key] = float(val) if key == "g" else int(val)
            except ValueError:
                raise FeaturizerError(
                    f"rff option {opt!r} in {text!r} not understood; rff takes n, g and seed, e.g. 'rff:n=2048,g=1'"
                ) from None
        if "n" not in values:
            raise FeaturizerError(f"rff in {text!r} needs n, the number of features; write rff:n=2048")
        return cls(**values)

    @property
    def names(self) -> list[str]:
        return [f"{RFF}{i}" for i in range(self.n)]

    def apply(self, X: np.ndarray) -> np.ndarray:
        """The N features of the rows `X` (n, d): cos(X·W + b), in [-1, 1]."""
        W, b = _draw(self.n, float(self.g), self.seed, X.shape[1])
        return np.cos(np.asarray(X, dtype=np.float64) @ W + b)

    def to_dict(self) -> dict:
        return {"n": self.n, "g": float(self.g), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> RandomFourier:
        try:
            return cls(int(d["n"]), float(d.get("g", 1.0)), int(d.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise FeaturizerError(f"rff spec {d!r} is malformed ({exc}); rebuild the bundle") from exc


@functools.lru_cache(maxsize=8)
def _draw(n: int, g: float, seed: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(W (d, n), b (n,)) of the map, the same on every machine for the same arguments."""
    u = uniforms(seed, 2 * d * n + n)
    u1, u2 = u[: d * n], u[d * n : 2 * d * n]
    normal = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller
    W = (normal * np.sqrt(2.0 * g / d)).reshape(d, n)
    return W, 2.0 * np.pi * u[2 * d * n :]


def uniforms(seed: int, count: int) -> np.ndarray:
    """`count` numbers in (0, 1) from splitmix64 over the counter 1..count (stream `seed`): a generator whose
    output is fixed by this code, not by a library version."""
    with np.errstate(over="ignore"):
        state = np.uint64(seed) * np.uint64(0xD1B54A32D192ED03) + np.arange(
            1, count + 1, dtype=np.uint64
        ) * np.uint64(0x9E3779B97F4A7C15)
        z = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
