"""The featurizer protocol, and SMILES -> feature vectors with a serializable spec.

`Featurizer` is what the pipeline needs of a featurizer, for molecules and tabular rows alike:
``spec.fit(training inputs)`` returns a fitted copy, ``spec.transform(inputs)`` the float32
features, ``spec.to_dict()`` what the bundle stores and `featurizer_from_dict` reads back (the
class is chosen by the dict's "kind" key in `FEATURIZERS`). The fitted spec travels in the
bundle manifest so a client featurizes exactly as the model was trained.

`FeaturizerSpec` featurizes SMILES. A spec string such as ``physchem``, ``morgan:r=2,n=1024``,
``morgan_count:r=2,n=256`` or ``physchem+morgan:r=2,n=512`` names its parts; each part kind is
one entry of `PART_KINDS` (how to compute one molecule's values, width, names, whether the columns
are scaled, which options it takes). ``fit`` adds the scaling fitted on the training molecules.

``grid:r=2,size=32`` is the molecule image of the CNN models (ChemXor's input): the RDKit
Morgan count fingerprint of radius r with size*size hashed bins, bin i at row i // size,
column i % size, counts capped at `GRID_CAP` and divided by it (values k/7 in [0, 1], no
standardization). It must be the only part; ``transform`` then returns (n, 1, size, size).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import FeaturizerError, InvalidSmilesError
from .feature_kinds import Part, part_kind
from .tabular import TABULAR, TabularSpec

N_QUANTILES = 65
MOLECULAR = "molecular"  # the "kind" of a SMILES featurizer's dict (manifests without "kind" are molecular)


@runtime_checkable
class Featurizer(Protocol):
    """A serializable featurizer: inputs of one kind -> float32 features of a fixed shape.

    - `input_kind`: what `check_input`, `fit` and `transform` take: "smiles" (SMILES strings) or
      "rows" (mappings column -> value, or sequences in column order).
    - `check_input(item)`: (the value the featurizer will read, "") or (None, why the item is unusable
      and the fix); one input, never raises for bad data.
    - `fit(train_inputs)`: a fitted copy (scaling learned on the training inputs only).
    - `transform(inputs)`: features of shape (n, *shape), float32; the spec must be fitted.
    - `width` (features per input), `shape`, `names` (one per feature), `is_fitted`.
    - `to_dict()`: JSON-able, with a "kind" key `featurizer_from_dict` reads back.
    """

    input_kind: str

    def check_input(self, item: Any, /) -> tuple[Any | None, str]: ...

    def fit(self, train_inputs: Any) -> Featurizer: ...

    def transform(self, inputs: Any) -> np.ndarray: ...

    @property
    def width(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def names(self) -> list[str]: ...

    @property
    def is_fitted(self) -> bool: ...

    def to_dict(self) -> dict: ...


def canonical_smiles(smiles: str) -> str | None:
    """RDKit canonical SMILES, or None when RDKit cannot parse it."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    if not isinstance(smiles, str) or not smiles.strip():
        return None
    mol = Chem.MolFromSmiles(smiles.strip())
    return Chem.MolToSmiles(mol) if mol is not None else None


# ---------------------------------------------------------------- part kinds


# ---------------------------------------------------------------- the SMILES featurizer


@dataclass(frozen=True)
class FeaturizerSpec:
    parts: tuple[Part, ...]
    # standardization fitted on training data; applied to the scaled parts' columns only
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    knots: tuple[tuple[float, ...], ...] | None = (
        None  # per column training quantiles (empty: not quantile-scaled)
    )

    input_kind = "smiles"  # what `check_input`, `fit` and `transform` take: SMILES strings

    def __post_init__(self):
        if not self.parts:
            raise FeaturizerError(
                "a featurizer spec needs at least one part; use e.g. 'physchem' or 'morgan:r=2,n=1024'"
            )
        images = [p.kind for p in self.parts if part_kind(p.kind).image]
        if images and len(self.parts) > 1:
            raise FeaturizerError(
                f"{images[0]!r} is an image and cannot be joined with other parts in {self}; use it alone"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one molecule's features: (1, size, size) for a grid image, else (width,)."""
        if part_kind(self.parts[0].kind).image:
            return (1, self.parts[0].side, self.parts[0].side)
        return (self.width,)

    @classmethod
    def parse(cls, text: str) -> FeaturizerSpec:
        """Parse ``physchem+morgan:r=2,n=1024``."""
        parts = [Part.parse(chunk, text) for chunk in filter(None, (c.strip() for c in text.split("+")))]
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

    def check_input(self, smiles) -> tuple[str | None, str]:
        """(canonical SMILES, "") or (None, the reason RDKit rejected it and the fix)."""
        canon = canonical_smiles(smiles)
        if canon is None:
            return None, f"SMILES {smiles!r} could not be parsed by RDKit; fix it or pass --skip-invalid"
        return canon, ""

    def fit(self, train_inputs: Sequence[str]) -> FeaturizerSpec:
        """This spec with its scaling fitted on the training SMILES (bit and pixel columns stay as they are)."""
        X = raw_features(self, train_inputs)
        if not len(X):
            raise FeaturizerError(
                f"featurizer {self} cannot be fitted on 0 molecules; pass the training SMILES"
            )
        spec = self
        if any(p.scale == "quantile" for p in self.parts):
            quantile = np.concatenate([np.full(p.width, p.scale == "quantile") for p in self.parts])
            levels = np.linspace(0, 1, N_QUANTILES)
            knots = tuple(
                tuple(map(float, np.quantile(X[:, j], levels))) if q else () for j, q in enumerate(quantile)
            )
            spec = dataclasses.replace(spec, knots=knots)
            X = _apply_knots(spec, X)
        mask = _scaled_mask(spec)
        mean = np.where(mask, X.mean(axis=0), 0.0)
        std = np.where(mask, X.std(axis=0), 1.0)
        std = np.where(std < 1e-8, 1.0, std)
        return dataclasses.replace(spec, mean=tuple(map(float, mean)), std=tuple(map(float, std)))

    def transform(self, inputs: Sequence[str]) -> np.ndarray:
        """Features (float32) as the model sees them, shape (n, *self.shape); the spec must be fitted."""
        if not self.is_fitted:
            raise FeaturizerError(f"featurizer {self} is not fitted; call .fit(training SMILES) first")
        X = _apply_knots(self, raw_features(self, inputs))
        return (
            ((X - np.asarray(self.mean)) / np.asarray(self.std))
            .astype(np.float32)
            .reshape((-1,) + self.shape)
        )

    def to_dict(self) -> dict:
        return {
            "kind": MOLECULAR,
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
            raise FeaturizerError(
                f"featurizer spec {spec} has {len(mean)} scaler values for {spec.width} features"
            )
        return spec


def _molecules(smiles: Sequence[str]) -> list:
    """RDKit molecules; raises `InvalidSmilesError` naming the first bad one (1-based)."""
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
    return mols


def _molecule_row(spec: FeaturizerSpec, i: int, smi: str, mol) -> np.ndarray:
    """One molecule's raw values, every part's `compute` concatenated; a failure names the molecule."""
    values = []
    for part in spec.parts:
        try:
            values.append(np.asarray(part_kind(part.kind).compute(part, mol), dtype=np.float64).ravel())
        except Exception as exc:  # RDKit raises anything; the user gets one line, not a traceback
            what = str(exc) if isinstance(exc, FeaturizerError) else f"raised {type(exc).__name__}: {exc}"
            raise FeaturizerError(
                f"molecule {i}: SMILES {smi!r}: feature part {str(part)!r}: {what}; expected numbers "
                "for every molecule; remove or fix this molecule, or use other features"
            ) from exc
        if len(values[-1]) != part.width:
            raise FeaturizerError(
                f"feature part {str(part)!r} computed {len(values[-1])} values for molecule {i}, "
                f"its width is {part.width}; fix its entry in PART_KINDS"
            )
    return np.concatenate(values)


def raw_features(spec: FeaturizerSpec, smiles: Sequence[str]) -> np.ndarray:
    """Unscaled features (n, width), float64.

    Raises `InvalidSmilesError` naming the first unparsable molecule and `FeaturizerError` naming the
    first molecule (1-based), its SMILES and the descriptor or part that failed or gave a non-finite value.
    """
    smiles = list(smiles)
    mols = _molecules(smiles)
    if not mols:
        return np.zeros((0, spec.width))
    X = np.vstack(
        [_molecule_row(spec, i, smi, mol) for i, (smi, mol) in enumerate(zip(smiles, mols), start=1)]
    )
    bad = np.argwhere(~np.isfinite(X))
    if len(bad):
        i, j = bad[0]
        raise FeaturizerError(
            f"molecule {i + 1}: SMILES {smiles[i]!r}: feature {spec.names[j]!r} is {X[i, j]}, "
            "expected a finite number; remove or fix this molecule, or use other features"
        )
    return X


def _scaled_mask(spec: FeaturizerSpec) -> np.ndarray:
    return np.concatenate(
        [np.full(p.width, part_kind(p.kind).scaled and p.scale == "standard") for p in spec.parts]
    )


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
            X[:, j] = np.where(
                x <= k[0],
                -1.0,
                np.where(x >= k[-1], 1.0, 0.5 * (np.interp(x, k, r) - np.interp(-x, -k[::-1], -r[::-1]))),
            )
    return X


# ---------------------------------------------------------------- the featurizer registry

FEATURIZERS: dict[str, Callable[[dict], Featurizer]] = {
    MOLECULAR: FeaturizerSpec.from_dict,
    TABULAR: TabularSpec.from_dict,
}


def featurizer_from_dict(d: dict) -> Featurizer:
    """The featurizer a manifest or checkpoint stores (`to_dict()`), by its "kind" (none: molecular)."""
    if not isinstance(d, dict):
        raise FeaturizerError(f"featurizer spec {d!r} is not a mapping; rebuild the bundle")
    kind = d.get("kind", MOLECULAR)
    if kind not in FEATURIZERS:
        raise FeaturizerError(
            f"unknown featurizer kind {kind!r}; expected one of {', '.join(FEATURIZERS)}; "
            "rebuild the bundle or upgrade molcloak"
        )
    return FEATURIZERS[kind](d)
