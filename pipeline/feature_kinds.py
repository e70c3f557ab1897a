"""The molecular feature part kinds: one registry entry per kind (physchem, morgan, morgan_count, grid).

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
def _morgan_generator(radius: int, n_bits: int):
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)


def _morgan_bits(part: Part, mol) -> np.ndarray:
    return _morgan_generator(part.radius, part.n_bits).GetFingerprintAsNumPy(mol)


def _morgan_counts(part: Part, mol) -> np.ndarray:
    return np.minimum(_morgan_generator(part.radius, part.n_bits).GetCountFingerprintAsNumPy(mol), COUNT_CAP)


def _grid_pixels(part: Part, mol) -> np.ndarray:
    counts = _morgan_generator(part.radius, part.n_bits).GetCountFingerprintAsNumPy(mol).astype(np.float64)
    return np.minimum(counts, GRID_CAP) / GRID_CAP


def _check_fingerprint(part: Part) -> str:
    if 1 <= part.radius <= 6 and 8 <= part.n_bits <= 16384:
        return ""
    return f"{part.kind}: radius {part.radius} / size {part.n_bits} out of range; use r in 1..6 and n in 8..16384"


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


# The molecular part kinds. A new kind is one entry here plus its compute function (`descriptor_compute(names)`
# for a list of RDKit descriptors); `Part`, parsing, `str`, scaling and the error reports follow from the entry.
PART_KINDS: dict[str, PartKind] = {
    "physchem": PartKind(
        descriptor_compute(PHYSCHEM_DESCRIPTORS),
        lambda p: len(PHYSCHEM_DESCRIPTORS),
        lambda p: list(PHYSCHEM_DESCRIPTORS),
        "10 RDKit physico-chemical descriptors (logP, TPSA, ...)",
    ),
    "morgan": PartKind(
        _morgan_bits,
        _bins,
        _bin_names,
        "Morgan (ECFP) bits of radius r, n bins",
        ("r", "n"),
        scaled=False,
        check=_check_fingerprint,
    ),
    "morgan_count": PartKind(
        _morgan_counts,
        _bins,
        _bin_names,
        f"Morgan counts of radius r, n bins, capped at {COUNT_CAP}",
        ("r", "n"),
        check=_check_fingerprint,
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
        raise FeaturizerError(f"unknown feature part {name!r}; expected one of {', '.join(PART_KINDS)}")
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
