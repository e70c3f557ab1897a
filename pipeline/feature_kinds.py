"""The molecular feature part kinds: one registry entry per kind.

Descriptors: physchem (10), rdkit2d (RDKit's 217 2D descriptors, missing values imputed: see `rdkit2d`).
Fingerprints (RDKit's fingerprint generators, one cached generator per options): morgan / morgan_count
(ECFP), fmorgan / fmorgan_count (feature-Morgan, FCFP: pharmacophoric atom invariants), atompair_count,
torsion_count (hashed atom pairs and topological torsions), maccs (the 167 MACCS keys); counts are capped
at `COUNT_CAP`. Images: grid (the CNN models' input).

A part kind says how to compute one molecule's raw values, the width and names of its columns,
which options it reads and whether its columns are scaled. `Part` is one parsed ``kind:opt=value``
chunk of a feature spec; `featurize.FeaturizerSpec` joins parts and fits the scaling. Adding a kind
is one `PART_KINDS` entry plus its compute function.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .errors import FeaturizerError
from .rdkit2d import RDKIT2D_DESCRIPTORS, check_rdkit2d, rdkit2d_names, rdkit2d_values

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
MACCS_KEYS = 167  # RDKit's MACCS keys: bit 0 unused, bits 1..166 the public keys
COUNT_CAP = 15  # morgan_count values are clipped here so a few bits represent them
GRID_CAP = 7  # grid pixels: min(count, 7) / 7, exactly 3 bits (99% of non-zero counts are <= 7)
SCALES = ("standard", "quantile")  # quantile: each column mapped to [-1, 1] by its training quantiles


def _no_problem(part: Part) -> str:
    return ""


class PartKind(NamedTuple):
    """One kind of molecular feature part: an entry of `PART_KINDS`.

    `compute(part, mol)` returns one RDKit molecule's raw values (`width(part)` numbers, before
    scaling); an exception it raises becomes a `FeaturizerError` naming the molecule (see
    `descriptor_compute` for descriptor lists, which also name the descriptor that failed).
    """

    compute: Callable[[Part, Any], Sequence[float] | np.ndarray]
    width: Callable[[Part], int]
    names: Callable[[Part], list[str]]
    description: str
    options: tuple[
        str, ...
    ] = ()  # spec options it reads, in the order `str` writes them: r (radius), n (bits), size
    scaled: bool = (
        True  # columns standardized, scale=quantile allowed; False: bits or pixels used as they are
    )
    check: Callable[[Part], str] = _no_problem  # "" or what is wrong with the part's options and the fix
    image: bool = False  # a (1, side, side) molecule image: the only part of its spec
    imputed: bool = False  # compute gives NaN for a missing value, the fitted spec imputes the median
    slow: bool = False  # milliseconds per molecule: big batches are featurized on several processes
    descriptor: bool = False  # named descriptor values: the fitted spec stores their training medians


@functools.cache
def _rdkit_descriptor(name: str) -> Callable[[Any], float]:
    from rdkit.Chem import Descriptors

    return getattr(Descriptors, name)


def descriptor_compute(
    names: Sequence[str], lookup: Callable[[str], Callable[[Any], float]] = _rdkit_descriptor
):
    """The `PartKind.compute` of a descriptor list: each named descriptor (RDKit's by default) on the molecule.

    A descriptor that raises becomes a `FeaturizerError` naming it (the featurizer adds the molecule)."""

    def compute(part: Part, mol) -> list[float]:
        values = []
        for name in names:
            try:
                values.append(float(lookup(name)(mol)))
            except Exception as exc:  # RDKit descriptors raise anything (ZeroDivisionError, ...)
                raise FeaturizerError(f"descriptor {name!r} raised {type(exc).__name__}: {exc}") from exc
        return values

    return compute


@functools.cache
def fingerprint_generator(family: str, radius: int, n_bits: int):
    """RDKit's fingerprint generator (rdFingerprintGenerator) of a family: "morgan", "fmorgan" (feature
    invariants), "atompair" or "torsion" (these two ignore `radius`); cached, one per (family, radius, n_bits)."""
    from rdkit.Chem import rdFingerprintGenerator as gen

    if family == "atompair":
        return gen.GetAtomPairGenerator(fpSize=n_bits)
    if family == "torsion":
        return gen.GetTopologicalTorsionGenerator(fpSize=n_bits)
    invariants = gen.GetMorganFeatureAtomInvGen() if family == "fmorgan" else None
    return gen.GetMorganGenerator(radius=radius, fpSize=n_bits, atomInvariantsGenerator=invariants)


def _bits(family: str) -> Callable[[Part, Any], np.ndarray]:
    def compute(part: Part, mol) -> np.ndarray:
        return fingerprint_generator(family, part.radius, part.n_bits).GetFingerprintAsNumPy(mol)

    return compute


def _counts(family: str) -> Callable[[Part, Any], np.ndarray]:
    """Hashed counts of a fingerprint family, capped at `COUNT_CAP`."""

    def compute(part: Part, mol) -> np.ndarray:
        counts = fingerprint_generator(family, part.radius, part.n_bits).GetCountFingerprintAsNumPy(mol)
        return np.minimum(counts, COUNT_CAP)

    return compute


def _maccs_bits(part: Part, mol) -> np.ndarray:
    from rdkit.Chem import MACCSkeys

    out = np.zeros(MACCS_KEYS)
    out[list(MACCSkeys.GenMACCSKeys(mol).GetOnBits())] = 1.0
    return out


def _grid_pixels(part: Part, mol) -> np.ndarray:
    counts = (
        fingerprint_generator("morgan", part.radius, part.n_bits)
        .GetCountFingerprintAsNumPy(mol)
        .astype(np.float64)
    )
    return np.minimum(counts, GRID_CAP) / GRID_CAP


def _check_fingerprint(part: Part) -> str:
    if 1 <= part.radius <= 6 and 8 <= part.n_bits <= 16384:
        return ""
    return f"{part.kind}: radius {part.radius} / size {part.n_bits} out of range; use r in 1..6 and n in 8..16384"


def _check_hashed(part: Part) -> str:
    if 8 <= part.n_bits <= 16384:
        return ""
    return f"{part.kind}: size {part.n_bits} out of range; use n in 8..16384"


def _check_grid(part: Part) -> str:
    problem = _check_fingerprint(part)
    if not problem and (part.side**2 != part.n_bits or not 4 <= part.side <= 64):
        problem = (
            f"grid: {part.n_bits} bins do not form a square image of side 4..64; use e.g. grid:r=2,size=32"
        )
    return problem


def _bins(part: Part) -> int:
    return part.n_bits


def _bin_names(part: Part) -> list[str]:
    return [f"{part.kind}_r{part.radius}_{i}" for i in range(part.n_bits)]


def _hashed_names(part: Part) -> list[str]:
    return [f"{part.kind}_{i}" for i in range(part.n_bits)]


# The molecular part kinds. A new kind is one entry here plus its compute function (`descriptor_compute(names)`
# for a list of RDKit descriptors); `Part`, parsing, `str`, scaling and the error reports follow from the entry.
PART_KINDS: dict[str, PartKind] = {
    "physchem": PartKind(
        descriptor_compute(PHYSCHEM_DESCRIPTORS),
        lambda p: len(PHYSCHEM_DESCRIPTORS),
        lambda p: list(PHYSCHEM_DESCRIPTORS),
        "10 RDKit physico-chemical descriptors (logP, TPSA, ...)",
        descriptor=True,
    ),
    "morgan": PartKind(
        _bits("morgan"),
        _bins,
        _bin_names,
        "Morgan (ECFP) bits of radius r, n bins",
        ("r", "n"),
        scaled=False,
        check=_check_fingerprint,
    ),
    "morgan_count": PartKind(
        _counts("morgan"),
        _bins,
        _bin_names,
        f"Morgan counts of radius r, n bins, capped at {COUNT_CAP}",
        ("r", "n"),
        check=_check_fingerprint,
    ),
    "rdkit2d": PartKind(
        rdkit2d_values,
        lambda p: len(RDKIT2D_DESCRIPTORS),
        rdkit2d_names,
        f"the {len(RDKIT2D_DESCRIPTORS)} RDKit 2D descriptors (log1p of Ipc; a missing value gets the training median)",
        check=check_rdkit2d,
        imputed=True,
        slow=True,
        descriptor=True,
    ),
    "maccs": PartKind(
        _maccs_bits,
        lambda p: MACCS_KEYS,
        lambda p: [f"maccs_{i}" for i in range(MACCS_KEYS)],
        f"the {MACCS_KEYS} MACCS keys (bits)",
        scaled=False,
    ),
    "fmorgan": PartKind(
        _bits("fmorgan"),
        _bins,
        _bin_names,
        "feature-Morgan (FCFP) bits of radius r, n bins",
        ("r", "n"),
        scaled=False,
        check=_check_fingerprint,
    ),
    "fmorgan_count": PartKind(
        _counts("fmorgan"),
        _bins,
        _bin_names,
        f"feature-Morgan (FCFP) counts of radius r, n bins, capped at {COUNT_CAP}",
        ("r", "n"),
        check=_check_fingerprint,
    ),
    "atompair_count": PartKind(
        _counts("atompair"),
        _bins,
        _hashed_names,
        f"hashed atom-pair counts, n bins, capped at {COUNT_CAP}",
        ("n",),
        check=_check_hashed,
    ),
    "torsion_count": PartKind(
        _counts("torsion"),
        _bins,
        _hashed_names,
        f"hashed topological-torsion counts, n bins, capped at {COUNT_CAP}",
        ("n",),
        check=_check_hashed,
    ),
    "grid": PartKind(
        _grid_pixels,
        _bins,
        _bin_names,
        "Morgan counts as a size x size image for the CNN models",
        ("r", "size"),
        scaled=False,
        check=_check_grid,
        image=True,
    ),
}
OPTION_FIELDS = {"r": "radius", "radius": "radius", "n": "n_bits", "n_bits": "n_bits", "size": "n_bits"}


def part_kind(name: str) -> PartKind:
    """The registry entry of a part kind, or a `FeaturizerError` naming the kinds available."""
    if name not in PART_KINDS:
        raise FeaturizerError(
            f"unknown feature part {name!r}; expected one of {', '.join(PART_KINDS)} "
            "(and optionally select:k=K, then a map such as rff:n=N, after the parts it maps)"
        )
    return PART_KINDS[name]


@dataclass(frozen=True)
class Part:
    kind: str
    radius: int = 2
    n_bits: int = 1024
    scale: str = "standard"

    def __post_init__(self):
        entry = part_kind(self.kind)
        if self.scale not in SCALES or (self.scale != "standard" and not entry.scaled):
            scaled = " or ".join(k for k, e in PART_KINDS.items() if e.scaled)
            raise FeaturizerError(
                f"{self.kind}: scale {self.scale!r} not possible; use scale=quantile on {scaled}"
            )
        problem = entry.check(self)
        if problem:
            raise FeaturizerError(problem)

    @property
    def side(self) -> int:
        """Image side of a grid part (size*size = n_bits)."""
        return math.isqrt(self.n_bits)

    @property
    def width(self) -> int:
        return part_kind(self.kind).width(self)

    @property
    def names(self) -> list[str]:
        return part_kind(self.kind).names(self)

    def __str__(self) -> str:
        values = {"r": self.radius, "n": self.n_bits, "size": self.side}
        opts = [f"{k}={values[k]}" for k in part_kind(self.kind).options]
        opts += [f"scale={self.scale}"] if self.scale != "standard" else []
        return self.kind + (":" + ",".join(opts) if opts else "")

    @classmethod
    def parse(cls, chunk: str, text: str) -> Part:
        """One ``kind:opt=value,...`` chunk of the spec string `text`."""
        kind, _, opts = (s.strip() for s in chunk.partition(":"))
        entry = part_kind(kind)
        read = {OPTION_FIELDS[k] for k in entry.options}
        kwargs: dict[str, Any] = {}
        for opt in filter(None, (o.strip() for o in opts.split(","))):
            key, _, val = (s.strip() for s in opt.partition("="))
            if key == "scale" and val in SCALES:
                kwargs["scale"] = val
                continue
            field = OPTION_FIELDS.get(key)
            if field is None or not val.isdigit():
                raise FeaturizerError(
                    f"feature option {opt!r} in {text!r} not understood; write e.g. 'morgan:r=2,n=1024'"
                )
            if field not in read:
                takes = (
                    ", ".join(entry.options + ("scale",) if entry.scaled else entry.options) or "no option"
                )
                raise FeaturizerError(
                    f"feature part {kind!r} in {text!r} does not take {opt!r} (it takes {takes}); remove it"
                )
            kwargs[field] = (
                int(val) ** 2 if key == "size" and entry.image else int(val)
            )  # an image's size is its side
        return cls(kind, **kwargs)


N_QUANTILES = 65  # knots of a quantile-scaled column (`FeaturizerSpec.fit_raw`)


def apply_knots(spec, X: np.ndarray) -> np.ndarray:
    """Raw (imputed) features `X` (n, raw_width) with the quantile-scaled columns mapped to [-1, 1] by piecewise-linear interpolation of their training quantiles
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
