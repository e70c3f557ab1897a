"""SMILES -> feature vectors, with a serializable spec.

A spec string such as ``physchem``, ``morgan:r=2,n=1024``, ``morgan_count:r=2,n=256``
or ``physchem+morgan:r=2,n=512`` names the parts; `fit_featurizer` adds the
standardization fitted on the training molecules. The fitted spec travels in
the bundle manifest so a client featurizes exactly as the model was trained.

``grid:r=2,size=32`` is the molecule image of the CNN models (ChemXor's input): the RDKit
Morgan count fingerprint of radius r with size*size hashed bins, bin i at row i // size,
column i % size, counts capped at `GRID_CAP` and divided by it (values k/7 in [0, 1], no
standardization). It must be the only part; `featurize` then returns (n, 1, size, size).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import FeaturizerError, InvalidSmilesError
from .tabular import TABULAR, TabularSpec

# RDKit descriptor names, in the order they appear in the feature vector.
PHYSCHEM_DESCRIPTORS: tuple[str, ...] = (
    "MolLogP",
    "TPSA",
    "MolWt",
    "NumHDonors",
    "NumHAcceptors",
    "NumRotatableBonds",
    "NumAromaticRings",
    "FractionCSP3",
    "RingCount",
    "HeavyAtomCount",
)
PART_KINDS = ("physchem", "morgan", "morgan_count", "grid")
COUNT_CAP = 15  # morgan_count values are clipped here so a few bits represent them
GRID_CAP = 7  # grid pixels: min(count, 7) / 7, exactly 3 bits (99% of non-zero counts are <= 7)
SCALES = ("standard", "quantile")  # quantile: each column mapped to [-1, 1] by its training quantiles
N_QUANTILES = 65


def canonical_smiles(smiles: str) -> str | None:
    """RDKit canonical SMILES, or None when RDKit cannot parse it."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    if not isinstance(smiles, str) or not smiles.strip():
        return None
    mol = Chem.MolFromSmiles(smiles.strip())
    return Chem.MolToSmiles(mol) if mol is not None else None


@dataclass(frozen=True)
class Part:
    kind: str
    radius: int = 2
    n_bits: int = 1024
    scale: str = "standard"

    def __post_init__(self):
        if self.kind not in PART_KINDS:
            raise FeaturizerError(f"unknown feature part {self.kind!r}; expected one of {', '.join(PART_KINDS)}")
        if self.scale not in SCALES or (self.scale != "standard" and self.kind not in ("physchem", "morgan_count")):
            raise FeaturizerError(f"{self.kind}: scale {self.scale!r} not possible; use scale=quantile on physchem or morgan_count")
        if self.kind != "physchem" and not (1 <= self.radius <= 6 and 8 <= self.n_bits <= 16384):
            raise FeaturizerError(
                f"{self.kind}: radius {self.radius} / size {self.n_bits} out of range; use r in 1..6 and n in 8..16384"
            )
        if self.kind == "grid" and (self.side**2 != self.n_bits or not 4 <= self.side <= 64):
            raise FeaturizerError(f"grid: {self.n_bits} bins do not form a square image of side 4..64; use e.g. grid:r=2,size=32")

    @property
    def side(self) -> int:
        """Image side of a grid part (size*size = n_bits)."""
        return math.isqrt(self.n_bits)

    @property
    def width(self) -> int:
        return len(PHYSCHEM_DESCRIPTORS) if self.kind == "physchem" else self.n_bits

    @property
    def names(self) -> list[str]:
        if self.kind == "physchem":
            return list(PHYSCHEM_DESCRIPTORS)
        return [f"{self.kind}_r{self.radius}_{i}" for i in range(self.n_bits)]

    def __str__(self) -> str:
        if self.kind == "grid":
            return f"grid:r={self.radius},size={self.side}"
        text = self.kind if self.kind == "physchem" else f"{self.kind}:r={self.radius},n={self.n_bits}"
        return text if self.scale == "standard" else f"{text}{',' if ':' in text else ':'}scale={self.scale}"


@dataclass(frozen=True)
class FeaturizerSpec:
    parts: tuple[Part, ...]
    # standardization fitted on training data; applied to physchem and count columns only
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    knots: tuple[tuple[float, ...], ...] | None = None  # per column training quantiles (empty: not quantile-scaled)

    def __post_init__(self):
        if len(self.parts) > 1 and any(p.kind == "grid" for p in self.parts):
            raise FeaturizerError(f"'grid' is an image and cannot be joined with other parts in {self}; use it alone")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one molecule's features: (1, size, size) for a grid image, else (width,)."""
        if self.parts and self.parts[0].kind == "grid":
            return (1, self.parts[0].side, self.parts[0].side)
        return (self.width,)

    @classmethod
    def parse(cls, text: str) -> FeaturizerSpec:
        """Parse ``physchem+morgan:r=2,n=1024``."""
        parts = []
        for chunk in filter(None, (c.strip() for c in text.split("+"))):
            kind, _, opts = chunk.partition(":")
            kwargs = {}
            for opt in filter(None, opts.split(",")):
                key, _, val = opt.partition("=")
                if key.strip() == "scale" and val.strip() in SCALES:
                    kwargs["scale"] = val.strip()
                    continue
                if kind.strip() == "grid" and key.strip() == "size" and val.strip().isdigit():
                    kwargs["n_bits"] = int(val) ** 2  # a grid's size is its side
                    continue
                key = {"r": "radius", "radius": "radius", "n": "n_bits", "size": "n_bits", "n_bits": "n_bits"}.get(key.strip())
                if key is None or not val.strip().isdigit():
                    raise FeaturizerError(
                        f"feature option {opt!r} in {text!r} not understood; write e.g. 'morgan:r=2,n=1024'"
                    )
                kwargs[key] = int(val)
            parts.append(Part(kind.strip(), **kwargs))
        if not parts:
            raise FeaturizerError(f"empty feature spec {text!r}; use e.g. 'physchem' or 'morgan:r=2,n=1024'")
        return cls(tuple(parts))

    def __str__(self) -> str:
        return "+".join(map(str, self.parts))

    @property
    def width(self) -> int:
        return sum(p.width for p in self.parts)

    @property
    def names(self) -> list[str]:
        return [n for p in self.parts for n in p.names]

    @property
    def is_fitted(self) -> bool:
        return self.mean is not None

    input_kind = "smiles"  # what `check_input`, `fit` and `transform` take: SMILES strings

    def check_input(self, smiles) -> tuple[str | None, str]:
        """(canonical SMILES, "") or (None, the reason RDKit rejected it and the fix)."""
        canon = canonical_smiles(smiles)
        if canon is None:
            return None, f"SMILES {smiles!r} could not be parsed by RDKit; fix it or pass --skip-invalid"
        return canon, ""

    def fit(self, train_inputs) -> FeaturizerSpec:
        return fit_featurizer(self, train_inputs)

    def transform(self, inputs) -> np.ndarray:
        return featurize(self, inputs)

    def to_dict(self) -> dict:
        return {
            "spec": str(self),
            "parts": [dataclasses.asdict(p) for p in self.parts],
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            **({"knots": [list(k) for k in self.knots]} if self.knots else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeaturizerSpec:
        try:
            parts = tuple(Part(**p) for p in d["parts"])
            mean = None if d.get("mean") is None else tuple(float(v) for v in d["mean"])
            std = None if d.get("std") is None else tuple(float(v) for v in d["std"])
        except (KeyError, TypeError) as exc:
            raise FeaturizerError(f"featurizer spec {d!r} is malformed ({exc}); rebuild the bundle") from exc
        knots = tuple(tuple(float(v) for v in k) for k in d["knots"]) if d.get("knots") else None
        spec = cls(parts, mean, std, knots)
        if mean is not None and (len(mean) != spec.width or std is None or len(std) != spec.width):
            raise FeaturizerError(f"featurizer spec {spec} has {len(mean)} scaler values for {spec.width} features")
        return spec


def _part_matrix(part: Part, mols) -> np.ndarray:
    from rdkit.Chem import Descriptors, rdFingerprintGenerator

    if part.kind == "physchem":
        fns = [getattr(Descriptors, name) for name in PHYSCHEM_DESCRIPTORS]
        return np.array([[fn(m) for fn in fns] for m in mols], dtype=np.float64)
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=part.radius, fpSize=part.n_bits)
    if part.kind == "morgan":
        return np.array([gen.GetFingerprintAsNumPy(m) for m in mols], dtype=np.float64)
    counts = np.array([gen.GetCountFingerprintAsNumPy(m) for m in mols], dtype=np.float64)
    if part.kind == "grid":
        return np.minimum(counts, GRID_CAP) / GRID_CAP
    return np.minimum(counts, COUNT_CAP)


def raw_features(spec: FeaturizerSpec, smiles: Sequence[str]) -> np.ndarray:
    """Unscaled features; raises `InvalidSmilesError` naming the first bad molecule (1-based)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mols = []
    for i, smi in enumerate(smiles, start=1):
        mol = Chem.MolFromSmiles(smi) if isinstance(smi, str) and smi.strip() else None
        if mol is None:
            raise InvalidSmilesError(
                f"molecule {i}: SMILES {smi!r} could not be parsed by RDKit; fix or remove it"
            )
        mols.append(mol)
    if not mols:
        return np.zeros((0, spec.width))
    return np.hstack([_part_matrix(p, mols) for p in spec.parts])


def _scaled_mask(spec: FeaturizerSpec) -> np.ndarray:
    return np.concatenate([np.full(p.width, p.kind not in ("morgan", "grid") and p.scale == "standard") for p in spec.parts])


def _apply_knots(spec: FeaturizerSpec, X: np.ndarray) -> np.ndarray:
    """Quantile-scaled columns -> [-1, 1] by piecewise-linear interpolation of their training quantiles
    (ties averaged in both directions, the extremes mapped to -1 and 1, as scikit-learn's QuantileTransformer does)."""
    if not spec.knots:
        return X
    X = np.array(X, dtype=np.float64)
    for j, k in enumerate(spec.knots):
        if k:
            k, r = np.asarray(k), np.linspace(-1.0, 1.0, len(k))
            x = X[:, j]
            X[:, j] = np.where(x <= k[0], -1.0, np.where(x >= k[-1], 1.0, 0.5 * (np.interp(x, k, r) - np.interp(-x, -k[::-1], -r[::-1]))))
    return X


def fit_featurizer(spec: FeaturizerSpec, train_smiles: Sequence[str]) -> FeaturizerSpec:
    """Return `spec` with standardization fitted on `train_smiles` (bit columns stay 0/1)."""
    if isinstance(spec, TabularSpec):  # numeric rows instead of SMILES (molcloak.pipeline.tabular)
        return spec.fit(train_smiles)
    X = raw_features(spec, train_smiles)
    if any(p.scale == "quantile" for p in spec.parts):
        quantile = np.concatenate([np.full(p.width, p.scale == "quantile") for p in spec.parts])
        levels = np.linspace(0, 1, N_QUANTILES)
        knots = tuple(tuple(map(float, np.quantile(X[:, j], levels))) if q else () for j, q in enumerate(quantile))
        spec = dataclasses.replace(spec, knots=knots)
        X = _apply_knots(spec, X)
    mask = _scaled_mask(spec)
    mean = np.where(mask, X.mean(axis=0), 0.0)
    std = np.where(mask, X.std(axis=0), 1.0)
    std = np.where(std < 1e-8, 1.0, std)
    return dataclasses.replace(spec, mean=tuple(map(float, mean)), std=tuple(map(float, std)))


def featurize(spec: FeaturizerSpec, smiles: Sequence[str]) -> np.ndarray:
    """Features (float32) as the model sees it, shape (n, *spec.shape); the spec must be fitted."""
    if isinstance(spec, TabularSpec):  # numeric rows (matrix or records) instead of SMILES
        return spec.transform(smiles)
    if not spec.is_fitted:
        raise FeaturizerError(f"featurizer {spec} is not fitted; call fit_featurizer on the training molecules")
    X = _apply_knots(spec, raw_features(spec, smiles))
    return ((X - np.asarray(spec.mean)) / np.asarray(spec.std)).astype(np.float32).reshape((-1,) + spec.shape)


def spec_from_dict(d: dict) -> FeaturizerSpec | TabularSpec:
    """The fitted featurizer spec stored in a manifest or checkpoint: molecular or tabular."""
    if isinstance(d, dict) and d.get("kind") == TABULAR:
        return TabularSpec.from_dict(d)
    return FeaturizerSpec.from_dict(d)
