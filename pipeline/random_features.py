"""Random feature maps drawn from a seed, so that a network without a hidden layer acts as a kernel machine.

Two maps, each after the parts of a feature spec it maps: ``rff:n=N`` (random Fourier features of descriptors, the
Gaussian kernel) and ``minhash:n=N`` (Tanimoto random features of fingerprint bits); parts after a map are not mapped
and follow its features (`featurize.FeaturizerSpec.mapped`). Neither is fitted on any molecule. A
third final part, ``linear``, maps nothing: the columns before it stay as they are, and like the other two it makes
the spec's model a kernel machine, here with the linear kernel (a logistic or ridge regression, no bootstrap).

**rff**

A feature spec may have ``rff:n=N`` (options ``g=G``, default 1, and ``seed=S``, default 0) after the parts it
maps, and after a ``select:k=K`` if it has one. The d columns of those parts (scaled, and selected) become the N values
cos(x·W + b), with every entry of W drawn from N(0, 2g/d) and of b from U(0, 2π) (Rahimi and Recht,
"Random features for large-scale kernel machines", 2007): a linear function of them approximates a
function of the Gaussian kernel exp(-g·|x - y|²/d). On the panel's descriptor-driven assays, a linear
model on 2,048 of them over the RDKit 2D descriptors ranks molecules like the RandomForest does, and its
circuit has no programmable bootstrap at all: no evaluation keys, no bootstrap latency
(evaluation/PERFORMANCE.md, session 21).

W and b come from the seed through a generator written here (splitmix64, then Box-Muller), so a client
draws the same map on any NumPy version; nothing is fitted, so the client bundle reveals nothing of the
owner's molecules through it (the columns before it are fitted as without it).

**minhash**

``minhash:n=N`` (option ``seed=S``) maps fingerprint parts (Morgan bits or counts, MACCS, atom pairs, torsions) to
N values of +1 or -1: for hash i, the columns a molecule has (its bits set; for counts, its substructures present)
are ranked by a random order of all columns, and the value is a random sign of the column that comes first. Two
molecules get the same column for hash i with probability their Tanimoto (Jaccard) similarity, and different
columns' signs agree half the time by chance, so the mean of the N products approximates the Tanimoto kernel
(Broder's min-wise hashing; random features for the Tanimoto kernel as in Tripp et al., 2023). A linear model
on them approximates a Tanimoto kernel machine, the classic model on binding data: on bace (scaffold seeds 0-2, a
float logistic regression on 1,024 of them over ECFP4) 0.844-0.870 ROC-AUC, against 0.841-0.848 for the
16-unit networks (evaluation/PERFORMANCE.md, session 22). A molecule with none of the columns maps to zeros.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .errors import FeaturizerError

RFF = "rff"
MINHASH = "minhash"
LINEAR = "linear"
MAPS = (RFF, MINHASH, LINEAR)  # the kinds of a spec's map (linear: last)
MAX_N = 16384
MAX_MINHASH_CELLS = 2**24  # n x input columns: the drawn orders and signs take 16 bytes per cell


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
        return cls(**_options(RFF, chunk, text, {"n": int, "g": float, "seed": int}, "rff:n=2048,g=1"))

    @property
    def names(self) -> list[str]:
        return [f"{RFF}{i}" for i in range(self.n)]

    def apply(self, X: np.ndarray) -> np.ndarray:
        """The N features of the rows `X` (n, d): cos(X·W + b), in [-1, 1]."""
        W, b = _draw(self.n, float(self.g), self.seed, X.shape[1])
        return np.cos(np.asarray(X, dtype=np.float64) @ W + b)

    def to_dict(self) -> dict:
        return {"kind": RFF, "n": self.n, "g": float(self.g), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> RandomFourier:
        try:
            return cls(int(d["n"]), float(d.get("g", 1.0)), int(d.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise FeaturizerError(f"rff spec {d!r} is malformed ({exc}); rebuild the bundle") from exc


@dataclass(frozen=True)
class MinHash:
    n: int
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise FeaturizerError(
                f"minhash: n={self.n!r} must be an integer in 1..{MAX_N}; write e.g. minhash:n=1024"
            )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise FeaturizerError(f"minhash: seed={self.seed!r} must be an integer in 0..2^32-1")

    def __str__(self) -> str:
        return f"{MINHASH}:n={self.n}" + ("" if self.seed == 0 else f",seed={self.seed}")

    @classmethod
    def parse(cls, chunk: str, text: str) -> MinHash:
        """The ``minhash:n=N[,seed=S]`` chunk of the spec string `text`."""
        return cls(**_options(MINHASH, chunk, text, {"n": int, "seed": int}, "minhash:n=1024"))

    @property
    def names(self) -> list[str]:
        return [f"{MINHASH}{i}" for i in range(self.n)]

    def apply(self, X: np.ndarray) -> np.ndarray:
        """The N features of the rows `X` (n, d; raw values, before scaling: `FeaturizerSpec.transform_raw` passes
        them): for each hash, the sign of the first of the row's columns above zero in the hash's order; 0 for every
        hash when the row has none."""
        X = np.asarray(X)
        self.check_columns(X.shape[1])
        order, signs = _orders(self.n, self.seed, X.shape[1])
        out = np.zeros((X.shape[0], self.n))
        hashes = np.arange(self.n)
        for i, row in enumerate(X > 0):
            present = np.flatnonzero(row)
            if len(present):
                out[i] = signs[hashes, present[np.argmin(order[:, present], axis=1)]]
        return out

    def check_columns(self, d: int) -> None:
        """A `FeaturizerError` when the map over `d` columns would draw more than `MAX_MINHASH_CELLS` ranks."""
        if self.n * d > MAX_MINHASH_CELLS:
            raise FeaturizerError(
                f"minhash:n={self.n} over {d} columns draws {self.n * d:,} ranks, over {MAX_MINHASH_CELLS:,}; "
                f"use n <= {MAX_MINHASH_CELLS // d} or fewer columns (e.g. select:k=K before it)"
            )

    def to_dict(self) -> dict:
        return {"kind": MINHASH, "n": self.n, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> MinHash:
        try:
            return cls(int(d["n"]), int(d.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise FeaturizerError(f"minhash spec {d!r} is malformed ({exc}); rebuild the bundle") from exc


@dataclass(frozen=True)
class Linear:
    """``linear``: no map, the columns as they are; it marks the spec's model as linear (the linear kernel)."""

    n = None  # as many features as the columns before it: `FeaturizerSpec.width`

    def __str__(self) -> str:
        return LINEAR

    @classmethod
    def parse(cls, chunk: str, text: str) -> Linear:
        if chunk.strip() != LINEAR:
            raise FeaturizerError(
                f"{LINEAR} takes no options, but {text!r} has {chunk.strip()!r}; write e.g. 'morgan:r=2,n=2048+linear'"
            )
        return cls()

    def apply(self, X: np.ndarray) -> np.ndarray:
        return X

    def to_dict(self) -> dict:
        return {"kind": LINEAR}

    @classmethod
    def from_dict(cls, d: dict) -> Linear:
        return cls()


FeatureMap = RandomFourier | MinHash | Linear
MAP_TYPES = {RFF: RandomFourier, MINHASH: MinHash, LINEAR: Linear}


def parse_map(chunk: str, text: str) -> FeatureMap:
    """A spec's map chunk (``rff:...``, ``minhash:...`` or ``linear``) of the spec string `text`."""
    return MAP_TYPES[chunk.partition(":")[0].strip()].parse(chunk, text)


def map_from_dict(d: dict) -> FeatureMap:
    """A map as `to_dict` stored it (a bundle of session 21 stored an rff map without "kind")."""
    kind = d.get("kind", RFF) if isinstance(d, dict) else None
    if kind not in MAPS:
        raise FeaturizerError(f"feature map {d!r} is not one of {', '.join(MAPS)}; rebuild the bundle")
    return MAP_TYPES[kind].from_dict(d)


def _options(kind: str, chunk: str, text: str, types: dict, example: str) -> dict:
    """The options of a map chunk ``kind:k=v,...``, each converted by `types`; n is required."""
    _, _, opts = chunk.partition(":")
    values: dict = {}
    for opt in filter(None, (o.strip() for o in opts.split(","))):
        key, _, val = (s.strip() for s in opt.partition("="))
        try:
            if key in values or key not in types:
                raise ValueError
            values[key] = types[key](val)
        except ValueError:
            raise FeaturizerError(
                f"{kind} option {opt!r} in {text!r} not understood; {kind} takes {', '.join(types)}, e.g. '{example}'"
            ) from None
    if "n" not in values:
        raise FeaturizerError(f"{kind} in {text!r} needs n, the number of features; write {example}")
    return values


@functools.lru_cache(maxsize=1)  # up to 256 MB each
def _orders(n: int, seed: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(order (n, d): each hash's random rank of every column, signs (n, d): +1 or -1), the same on every machine
    (`uniforms`, on a stream of its own: the seed's bits flipped, so minhash and rff of one seed differ)."""
    u = uniforms(seed ^ 0x5EED, 2 * n * d)
    return u[: n * d].reshape(n, d), np.where(u[n * d :] < 0.5, -1.0, 1.0).reshape(n, d)


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
