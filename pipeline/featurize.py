"""The featurizer protocol, and SMILES -> feature vectors with a serializable spec.

`Featurizer` is what the pipeline needs of a featurizer, for molecules and tabular rows alike:
``spec.fit(training inputs)`` returns a fitted copy, ``spec.transform(inputs)`` the float32
features, ``spec.to_dict()`` what the bundle stores and `featurizer_from_dict` reads back (the
class is chosen by the dict's "kind" key in `FEATURIZERS`). The fitted spec travels in the
bundle manifest so a client featurizes exactly as the model was trained.

`FeaturizerSpec` featurizes SMILES. A spec string such as ``physchem``, ``morgan:r=2,n=1024``,
``morgan_count:r=2,n=256`` or ``physchem+morgan:r=2,n=512`` names its parts; each part kind is
one entry of `PART_KINDS` (how to compute one molecule's values, width, names, whether the columns
are scaled, which options it takes). ``fit`` adds what it learns on the training molecules, in the
order ``transform`` applies it: the training medians that replace a missing value of an imputed kind
(rdkit2d), the quantile knots (``scale=quantile``: each column mapped to [-1, 1]), the standardization
of the other scaled columns, and the feature selection of a final ``select:k=K`` (`feature_selection`:
K columns chosen on the training molecules, by a seeded teacher's importance when ``fit`` is given the
training labels, by variance otherwise). A map, ``rff:n=N`` or ``minhash:n=N``, turns the columns of the parts
before it into N random features of a kernel (`random_features`: drawn from a seed, fitted on nothing); parts
after it are not mapped and follow those features (``rdkit2d:scale=quantile+rff:n=2048+morgan:r=2,n=2048``). It
also stores the training median of every descriptor column (physchem, rdkit2d), which ``transform`` does not use:
the explanations' neutral values (`neutral_raw`).
A molecule that a non-imputed part cannot featurize is a `FeaturizerError` naming it.

``grid:r=2,size=32`` is the molecule image of the CNN models (ChemXor's input): the RDKit
Morgan count fingerprint of radius r with size*size hashed bins, bin i at row i // size,
column i % size, counts capped at `GRID_CAP` and divided by it (values k/7 in [0, 1], no
standardization). It must be the only part; ``transform`` then returns (n, 1, size, size).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import FeaturizerError
from .feature_kinds import N_QUANTILES, Part, apply_knots, part_kind
from .feature_selection import SELECT, Selection, fit_selection
from .random_features import MAPS, MINHASH, FeatureMap, MinHash, map_from_dict, parse_map
from .raw_values import descriptor_mask, imputed_mask, part_mask, raw_features
from .tabular import TABULAR, TabularSpec

MOLECULAR = "molecular"  # the "kind" of a SMILES featurizer's dict (manifests without "kind" are molecular)


@runtime_checkable
class Featurizer(Protocol):
    """A serializable featurizer: inputs of one kind -> float32 features of a fixed shape.

    - `input_kind`: what `check_input`, `fit` and `transform` take: "smiles" (SMILES strings) or
      "rows" (mappings column -> value, or sequences in column order).
    - `check_input(item)`: (the value the featurizer will read, "") or (None, why the item is unusable
      and the fix); one input, never raises for bad data.
    - `fit(train_inputs, targets=None)`: a fitted copy (scaling, and feature selection when the spec has
      one, learned on the training inputs only; `targets`, the training labels, may guide the selection
      and may be ignored).
    - `transform(inputs)`: features of shape (n, *shape), float32; the spec must be fitted.
    - `width` (features per input), `shape`, `names` (one per feature), `is_fitted`.
    - `to_dict()`: JSON-able, with a "kind" key `featurizer_from_dict` reads back.
    """

    input_kind: str

    def check_input(self, item: Any, /) -> tuple[Any | None, str]: ...

    def fit(self, train_inputs: Any, targets: Any = None) -> Featurizer: ...

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
    medians: tuple[float, ...] | None = (
        None  # training medians of the imputed parts' columns, in column order
    )
    select: Selection | None = None  # a final select:k=K; fitted: the kept columns
    # training medians of the descriptor parts' columns (after imputation), in column order; None when the
    # spec has no descriptor part or was saved before they were stored (`neutral_raw` then uses the mean)
    descriptor_medians: tuple[float, ...] | None = None
    # rff:n=N or minhash:n=N: random features (of a Gaussian or Tanimoto kernel) of the columns of the parts before
    # it; or a final linear: the columns as they are, for a linear model (`random_features.Linear`)
    feature_map: FeatureMap | None = None
    # how many leading parts the map maps (None: all); the parts after it are not mapped (imputed and scaled as
    # without a map) and follow the map's features: ``rdkit2d:scale=quantile+rff:n=2048+morgan:r=2,n=2048`` is rff
    # of the descriptors and the bits
    mapped: int | None = None

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
        for step, verb in ((self.select, "select"), (self.feature_map, "map")):
            if images and step is not None:
                raise FeaturizerError(
                    f"{images[0]!r} is an image: {step} cannot {verb} its pixels; remove it"
                )
        described = [p.kind for p in self.parts[: self.mapped] if part_kind(p.kind).descriptor]
        if isinstance(self.feature_map, MinHash) and described:
            raise FeaturizerError(
                f"{MINHASH} maps fingerprint parts (the substructures a molecule has), and {described[0]!r} is "
                f"descriptors: map them with rff, e.g. '{described[0]}:scale=quantile+rff:n=2048'"
            )
        if self.mapped is not None:
            self._check_kept()
        if isinstance(self.feature_map, MinHash):
            self.feature_map.check_columns(self.select.k if self.select else self.mapped_width)

    def _check_kept(self) -> None:
        """The parts after the map (`mapped`): at least one before and after it, a map that maps, no select."""
        if self.feature_map is None or not 1 <= self.mapped < len(self.parts):
            raise FeaturizerError(
                f"'{self}': {self.mapped!r} mapped parts of {len(self.parts)}; a map needs parts before it, and "
                "keeps the parts after it, e.g. 'rdkit2d:scale=quantile+rff:n=2048+morgan:r=2,n=2048'"
            )
        if self.feature_map.n is None:
            raise FeaturizerError(
                f"{self.feature_map} must be the last part of '{self}' (it keeps every column as it is); "
                "move the parts after it before it"
            )
        if self.select is not None:
            raise FeaturizerError(
                f"'{self}': select cannot be combined with kept parts (those after the map); drop the select or "
                "move those parts before the map"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one molecule's features: (1, size, size) for a grid image, else (width,)."""
        if part_kind(self.parts[0].kind).image:
            return (1, self.parts[0].side, self.parts[0].side)
        return (self.width,)

    @classmethod
    def parse(cls, text: str) -> FeaturizerSpec:
        """Parse ``physchem+morgan:r=2,n=1024`` (optionally followed by ``+select:k=K``, then ``+rff:n=N``,
        ``+minhash:n=N`` or ``+linear``; parts after an rff or minhash map are kept beside its features)."""
        chunks = [c.strip() for c in text.split("+") if c.strip()]
        if not chunks:
            raise FeaturizerError(f"empty feature spec {text!r}; use e.g. 'physchem' or 'morgan:r=2,n=1024'")
        maps = [i for i, c in enumerate(chunks) if c.partition(":")[0].strip() in MAPS]
        if len(maps) > 1 or maps == [0]:
            kind = chunks[maps[-1]].partition(":")[0].strip()
            raise FeaturizerError(
                f"{kind} must appear once in {text!r}, after the parts it maps (one map per spec); write e.g. "
                "'rdkit2d+rff:n=2048', 'morgan:r=2,n=2048+minhash:n=1024' or 'morgan:r=2,n=2048+linear'"
            )
        kept = chunks[maps[0] + 1 :] if maps else []
        if any(c.partition(":")[0].strip() == SELECT for c in kept):
            raise FeaturizerError(
                f"select must come before the map in {text!r}, and then no part may follow the map; move it "
                "before the map, or drop it"
            )
        kept = [Part.parse(chunk, text) for chunk in kept]
        feature_map = parse_map(chunks[maps[0]], text) if maps else None
        chunks = chunks[: maps[0]] if maps else chunks
        selects = [i for i, c in enumerate(chunks) if c.partition(":")[0].strip() == SELECT]
        if len(selects) > 1:
            raise FeaturizerError(f"select appears {len(selects)} times in {text!r}; keep one, at the end")
        if selects and selects[0] != len(chunks) - 1:
            raise FeaturizerError(
                f"select must be the last part of {text!r} (it keeps columns of the parts before it); move it to the end"
            )
        if selects and len(chunks) == 1:
            raise FeaturizerError(f"{text!r} has nothing to select from; write e.g. 'rdkit2d+select:k=64'")
        select = Selection.parse(chunks.pop(), text) if selects else None
        parts = tuple(Part.parse(chunk, text) for chunk in chunks)
        mapped = len(parts) if kept else None
        return cls(parts + tuple(kept), select=select, feature_map=feature_map, mapped=mapped)

    def __str__(self) -> str:
        steps = tuple(step for step in (self.select, self.feature_map) if step)
        return "+".join(map(str, self.mapped_parts + steps + self.kept_parts))

    @property
    def mapped_parts(self) -> tuple[Part, ...]:
        """The parts the map (if any) maps: all, or those before the kept ones."""
        return self.parts[: self.mapped]

    @property
    def kept_parts(self) -> tuple[Part, ...]:
        """The parts after the map, kept as they are beside its features."""
        return self.parts[len(self.mapped_parts) :]

    @property
    def mapped_width(self) -> int:
        """Raw columns of `mapped_parts` (they come first)."""
        return sum(p.width for p in self.mapped_parts)

    @property
    def raw_width(self) -> int:
        """Columns before selection (what `raw_features` returns)."""
        return sum(p.width for p in self.parts)

    @property
    def width(self) -> int:
        if self.feature_map is not None and self.feature_map.n is not None:  # linear: the columns as they are
            return self.feature_map.n + self.raw_width - self.mapped_width
        return self.select.k if self.select else self.raw_width

    @property
    def raw_names(self) -> list[str]:
        return [n for p in self.parts for n in p.names]

    @property
    def names(self) -> list[str]:
        if self.feature_map is not None and self.feature_map.n is not None:
            return self.feature_map.names + self.raw_names[self.mapped_width :]
        if self.select is None:
            return self.raw_names
        if not self.select.is_fitted:
            raise FeaturizerError(
                f"featurizer {self}: the selected columns are known after .fit(training SMILES)"
            )
        return list(self.select.names)

    @property
    def is_fitted(self) -> bool:
        return self.mean is not None and (self.select is None or self.select.is_fitted)

    def check_input(self, smiles) -> tuple[str | None, str]:
        """(canonical SMILES, "") or (None, the reason RDKit rejected it and the fix)."""
        canon = canonical_smiles(smiles)
        if canon is None:
            return None, f"SMILES {smiles!r} could not be parsed by RDKit; fix it or pass --skip-invalid"
        return canon, ""

    def fit(self, train_inputs: Sequence[str], targets: Any = None) -> FeaturizerSpec:
        """This spec fitted on the training SMILES: imputation, scaling (bit and pixel columns stay as they
        are) and a final select:k=K, ranked by a teacher on `targets` (the training labels, (n,) or
        (n, tasks) with NaN for a missing label) when given, else by variance. Without select, `targets`
        is not used."""
        return self.fit_raw(raw_features(self, train_inputs), targets)

    def fit_raw(self, X: np.ndarray, targets: Any = None) -> FeaturizerSpec:
        """`fit` on the training molecules' `raw_features` (a search fitting one spec on several subsets of
        the same molecules computes them once)."""
        if not len(X):
            raise FeaturizerError(
                f"featurizer {self} cannot be fitted on 0 molecules; pass the training SMILES"
            )
        spec = dataclasses.replace(self, select=None if self.select is None else Selection(self.select.k))
        imputed = imputed_mask(spec)
        if imputed.any():
            with warnings.catch_warnings():  # a column missing for every training molecule: imputed 0
                warnings.simplefilter("ignore", RuntimeWarning)
                medians = np.nan_to_num(np.nanmedian(X[:, imputed], axis=0), nan=0.0)
            spec = dataclasses.replace(spec, medians=tuple(map(float, medians)))
            X = impute(spec, X)
        described = descriptor_mask(spec)
        if described.any():
            medians = np.median(X[:, described], axis=0)
            spec = dataclasses.replace(spec, descriptor_medians=tuple(map(float, medians)))
        if any(p.scale == "quantile" for p in self.parts):
            quantile = part_mask(spec, lambda p: p.scale == "quantile")
            levels = np.linspace(0, 1, N_QUANTILES)
            knots = tuple(
                tuple(map(float, np.quantile(X[:, j], levels))) if q else () for j, q in enumerate(quantile)
            )
            spec = dataclasses.replace(spec, knots=knots)
            X = apply_knots(spec, X)
        mask = _scaled_mask(spec)
        mean = np.where(mask, X.mean(axis=0), 0.0)
        std = np.where(mask, X.std(axis=0), 1.0)
        std = np.where(std < 1e-8, 1.0, std)
        spec = dataclasses.replace(spec, mean=tuple(map(float, mean)), std=tuple(map(float, std)))
        if self.select is None:
            return spec
        X = (X - np.asarray(spec.mean)) / np.asarray(spec.std)
        return dataclasses.replace(spec, select=fit_selection(self.select, X, spec.raw_names, targets))

    def transform(self, inputs: Sequence[str]) -> np.ndarray:
        """Features (float32) as the model sees them, shape (n, *self.shape); the spec must be fitted."""
        if not self.is_fitted:
            raise FeaturizerError(f"featurizer {self} is not fitted; call .fit(training SMILES) first")
        return self.transform_raw(raw_features(self, inputs))

    def transform_raw(self, X: np.ndarray) -> np.ndarray:
        """`transform` of molecules' `raw_features`."""
        if not self.is_fitted:
            raise FeaturizerError(f"featurizer {self} is not fitted; call .fit(training SMILES) first")
        raw = impute(self, X)
        X = (apply_knots(self, raw) - np.asarray(self.mean)) / np.asarray(self.std)
        if self.select is not None:
            X, raw = self.select.apply(X), self.select.apply(raw)
        if self.feature_map is not None:  # minhash: the columns present, raw values before any scaling
            k = X.shape[1] if self.select is not None else self.mapped_width
            mapped = self.feature_map.apply((raw if isinstance(self.feature_map, MinHash) else X)[:, :k])
            X = np.hstack([mapped, X[:, k:]]) if k < X.shape[1] else mapped
        return X.astype(np.float32).reshape((-1,) + self.shape)

    def to_dict(self) -> dict:
        return {
            "kind": MOLECULAR,
            "spec": str(self),
            "parts": [dataclasses.asdict(p) for p in self.parts],
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            **({"knots": [list(k) for k in self.knots]} if self.knots else {}),
            **({"medians": list(self.medians)} if self.medians is not None else {}),
            **(
                {"descriptor_medians": list(self.descriptor_medians)}
                if self.descriptor_medians is not None
                else {}
            ),
            **({"select": self.select.to_dict()} if self.select is not None else {}),
            **({"map": self.feature_map.to_dict()} if self.feature_map is not None else {}),
            **({"mapped_parts": self.mapped} if self.mapped is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeaturizerSpec:
        try:
            parts = tuple(Part(**p) for p in d["parts"])
            mean = None if d.get("mean") is None else tuple(float(v) for v in d["mean"])
            std = None if d.get("std") is None else tuple(float(v) for v in d["std"])
            knots = tuple(tuple(float(v) for v in k) for k in d["knots"]) if d.get("knots") else None
            medians = None if d.get("medians") is None else tuple(float(v) for v in d["medians"])
            described = d.get("descriptor_medians")
            described = None if described is None else tuple(float(v) for v in described)
            mapped = d.get("mapped_parts")
        except (KeyError, TypeError, ValueError) as exc:
            raise FeaturizerError(f"featurizer spec {d!r} is malformed ({exc}); rebuild the bundle") from exc
        if mapped is not None and (type(mapped) is not int or not 1 <= mapped < len(parts)):
            raise FeaturizerError(
                f"featurizer spec {d.get('spec')!r}: mapped_parts={mapped!r} must be an integer in "
                f"1..{len(parts) - 1}; rebuild the bundle"
            )
        if mapped != _mapped_of(d.get("spec")):  # a kept part removed or added behind the spec string's back
            raise FeaturizerError(
                f"featurizer spec {d.get('spec')!r} does not match its mapped_parts={mapped!r}; rebuild the bundle"
            )
        stored = d.get("map", d.get("rff"))  # "rff": session 21's bundles
        feature_map = None if stored is None else map_from_dict(stored)
        fitted = {"descriptor_medians": described, "feature_map": feature_map, "mapped": mapped}
        spec = cls(parts, mean, std, knots, medians, **fitted)
        if d.get("select") is not None:
            spec = dataclasses.replace(spec, select=Selection.from_dict(d["select"], spec.raw_names))
        width = spec.raw_width
        if mean is not None and (len(mean) != width or std is None or len(std) != width):
            raise FeaturizerError(
                f"featurizer spec {spec} has {len(mean)} scaler values for {width} features"
            )
        n_imputed = int(imputed_mask(spec).sum())
        if mean is not None and n_imputed and (medians is None or len(medians) != n_imputed):
            raise FeaturizerError(
                f"featurizer spec {spec} has {0 if medians is None else len(medians)} imputation medians "
                f"for {n_imputed} imputed columns; rebuild the bundle"
            )
        n_described = int(descriptor_mask(spec).sum())
        if described is not None and len(described) != n_described:
            raise FeaturizerError(
                f"featurizer spec {spec} has {len(described)} descriptor medians for {n_described} descriptor "
                "columns; rebuild the bundle"
            )
        return spec

    def neutral_raw(self) -> np.ndarray:
        """The neutral raw value of every raw column (float64, (raw_width,), before selection), which the
        private explanations put in place of a column group: the training median of a descriptor column
        (physchem, rdkit2d), 0 (off) for a fingerprint or image column, the median knot of a quantile-scaled
        column. A spec saved before the descriptor medians were stored uses the training mean of its
        non-imputed descriptor columns (the imputed ones have their medians)."""
        if not self.is_fitted:
            raise FeaturizerError(f"featurizer {self} is not fitted; call .fit(training SMILES) first")
        out = np.zeros(self.raw_width)
        described = descriptor_mask(self)
        if self.descriptor_medians is not None:
            out[described] = self.descriptor_medians
        else:
            out[described] = np.asarray(self.mean)[described]
            if self.medians is not None:
                out[imputed_mask(self)] = self.medians
        for j, knots in enumerate(self.knots or ()):
            if knots:
                out[j] = knots[N_QUANTILES // 2]
        return out


def _mapped_of(text: Any):
    """The `mapped` of a stored spec string (None when it has no kept parts or does not parse)."""
    try:
        return FeaturizerSpec.parse(text).mapped if isinstance(text, str) else None
    except FeaturizerError:
        return None


def impute(spec: FeaturizerSpec, X: np.ndarray) -> np.ndarray:
    """Raw features `X` (n, raw_width) with the missing values (NaN) of the imputed columns replaced by the
    fitted spec's training medians; `X` itself when nothing is missing or the spec has no medians."""
    if spec.medians is None:
        return X
    cols = np.flatnonzero(imputed_mask(spec))
    block = X[:, cols]
    missing = np.isnan(block)
    if missing.any():
        X = np.array(X)
        X[:, cols] = np.where(missing, np.asarray(spec.medians), block)
    return X


def _scaled_mask(spec: FeaturizerSpec) -> np.ndarray:
    return part_mask(spec, lambda p: part_kind(p.kind).scaled and p.scale == "standard")


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
