"""Input groups of a model and their neutral perturbations, computed on the client from the client bundle.

An input group is what an explanation attributes to: one descriptor column (physchem, rdkit2d), one
column of a tabular model, one atom of the molecule (for fingerprint parts: every fingerprint
environment the atom belongs to), or a whole fingerprint part. Perturbations are made in raw feature
space (before imputation, quantile scaling, standardization and selection) and featurized with the
model's fitted spec, so they reach the encrypted model exactly as a real molecule's features would:

- a descriptor or tabular column -> its neutral value, the fitted featurizer's `neutral_raw()`: the
  training median of the column (the middle quantile knot of a ``scale=quantile`` column), or its
  training mean (the standardization mean) in a bundle saved before the medians were stored;
- an atom -> off in every fingerprint part that maps bits to atoms (RDKit's fingerprint generators'
  AdditionalOutput: the bit info map of Morgan/feature-Morgan, the atom pairs, the torsion paths): a bit
  whose environments include the atom is cleared (as RDKit's SimilarityMaps do), a count loses the
  environments that include the atom (then is capped as in featurization);
- a whole fingerprint part (MACCS keys, which map to no atom) -> all off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .feature_kinds import COUNT_CAP, GRID_CAP, fingerprint_generator
from .featurize import FeaturizerSpec, raw_features

DESCRIPTORS = ("physchem", "rdkit2d")
# fingerprint parts whose bits map to atoms: kind -> (generator family, cap of the counts or None for bits, divisor)
ATOM_MAPPED = {
    "morgan": ("morgan", None, 1),
    "fmorgan": ("fmorgan", None, 1),
    "morgan_count": ("morgan", COUNT_CAP, 1),
    "fmorgan_count": ("fmorgan", COUNT_CAP, 1),
    "atompair_count": ("atompair", COUNT_CAP, 1),
    "torsion_count": ("torsion", COUNT_CAP, 1),
    "grid": ("morgan", GRID_CAP, GRID_CAP),
}
ALL_ATOMS = "all atoms (every fingerprint environment off)"


@dataclass(frozen=True)
class Group:
    name: str
    kind: str  # "descriptor", "column", "atom", "fingerprint"
    atom: int | None = None  # the atom index of an "atom" group

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            **({"atom": self.atom} if self.atom is not None else {}),
        }


MAPPED = -1  # `Featurization.kept` of a model input that a feature map computes from several raw columns


def kept_cols(spec: FeaturizerSpec) -> list[int]:
    """The raw columns a fitted spec reads, in order: the selected ones, or all."""
    return list(spec.select.kept) if spec.select is not None else list(range(spec.raw_width))


class Featurization:
    """The model's fitted featurizer seen from raw features: raw rows, neutral values, groups and columns."""

    def __init__(self, featurizer):
        self.spec = featurizer
        self.molecular = isinstance(featurizer, FeaturizerSpec)
        self.mapped_cols = np.array([], dtype=int)  # raw columns a feature map mixes into its N inputs
        if self.molecular:
            self.slices, start = [], 0
            for part in featurizer.parts:
                self.slices.append((part, slice(start, start + part.width)))
                start += part.width
            kept = kept_cols(featurizer)
            feature_map = featurizer.feature_map
            if feature_map is not None and feature_map.n is not None:  # a map's N inputs mix its columns
                self.mapped_cols = np.asarray(kept[: featurizer.mapped_width], dtype=int)
                kept = [MAPPED] * feature_map.n + kept[featurizer.mapped_width :]
            self.kept = np.asarray(kept, dtype=int)  # raw column of each model input (MAPPED: a map's)
        else:
            self.slices, self.kept = [], np.arange(featurizer.width)

    @property
    def atom_mapped(self) -> bool:
        return any(p.kind in ATOM_MAPPED for p, _ in self.slices)

    def raw(self, inputs) -> np.ndarray:
        """Raw features (n, raw width): unscaled, NaN where an imputed descriptor is missing."""
        if self.molecular:
            return raw_features(self.spec, inputs)
        return self.spec.matrix(np.asarray(inputs, dtype=np.float64))

    def features(self, raw: np.ndarray) -> np.ndarray:
        """What the model reads, from raw rows: the same steps as the featurizer's transform."""
        spec = self.spec
        if not self.molecular:
            return ((raw - np.asarray(spec.mean)) / np.asarray(spec.std)).astype(np.float32)
        return spec.transform_raw(np.asarray(raw, dtype=np.float64))

    def neutral(self) -> np.ndarray:
        """Neutral raw value of every column: the featurizer's `neutral_raw` (see the module docstring)."""
        return self.spec.neutral_raw()

    def column_groups(self) -> list[tuple[Group, np.ndarray]]:
        """Groups of raw columns with at least one model input: each descriptor or tabular column, each
        fingerprint part as a block (for permutation importance and the descriptor attributions)."""
        kept = set(self.kept.tolist()) | set(self.mapped_cols.tolist())
        if not self.molecular:
            return [(Group(name, "column"), np.array([j])) for j, name in enumerate(self.spec.columns)]
        names = self.spec.raw_names
        out = []
        for part, cols in self.slices:
            idx = np.arange(cols.start, cols.stop)
            if part.kind in DESCRIPTORS:
                out += [(Group(names[j], "descriptor"), np.array([j])) for j in idx if j in kept]
            elif kept & set(idx.tolist()):
                out.append((Group(str(part), "fingerprint"), idx))
        return out

    def inputs_of(self, raw_cols: np.ndarray) -> np.ndarray:
        """Model input positions fed by these raw columns (after selection); a mapped column feeds every one of
        its map's inputs (`rff:n=N` mixes all the columns it maps)."""
        mapped = np.isin(raw_cols, self.mapped_cols).any() if len(self.mapped_cols) else False
        return np.flatnonzero(np.isin(self.kept, raw_cols) | ((self.kept == MAPPED) & mapped))

    def input_groups(self) -> list[tuple[Group, np.ndarray]]:
        """`column_groups` as model input positions, for permutation importance: the columns a map mixes are one
        group (its N inputs), named after the map and its parts; permuting one of them alone is not possible."""
        groups, mapped = [], []
        for group, cols in self.column_groups():
            inputs = self.inputs_of(cols)
            if len(self.mapped_cols) and np.isin(cols, self.mapped_cols).any():
                mapped.append(inputs)
            else:
                groups.append((group, inputs))
        if mapped:
            spec = self.spec
            name = f"{spec.feature_map} of {'+'.join(map(str, spec.mapped_parts))}"
            groups.insert(0, (Group(name, "fingerprint"), np.unique(np.concatenate(mapped))))
        return groups

    def molecule_groups(self, smiles: str | None) -> list[tuple[Group, Callable[[np.ndarray], np.ndarray]]]:
        """One molecule's (or row's) groups, each with the perturbation of its raw row: descriptors and
        columns, then (fingerprint models) one group per atom and the all-atoms group, then blocks that
        map to no atom."""
        neutral = self.neutral()
        groups = []
        for group, cols in self.column_groups():
            if group.kind in ("descriptor", "column"):
                groups.append((group, _set(cols, neutral[cols])))
        if not self.molecular or not self.atom_mapped:
            groups += [(g, _set(cols, 0.0)) for g, cols in self.column_groups() if g.kind == "fingerprint"]
            return groups
        from rdkit import Chem

        mol = Chem.MolFromSmiles(smiles)
        occurrences = {
            i: atom_occurrences(part, mol)
            for i, (part, _) in enumerate(self.slices)
            if part.kind in ATOM_MAPPED
        }
        for a in range(mol.GetNumAtoms()):
            label = f"atom {a} {mol.GetAtomWithIdx(a).GetSymbol()}"
            groups.append((Group(label, "atom", a), self._without(occurrences, {a})))
        groups.append(
            (Group(ALL_ATOMS, "fingerprint"), self._without(occurrences, set(range(mol.GetNumAtoms()))))
        )
        unmapped = [(g, cols) for g, cols in self.column_groups() if g.kind == "fingerprint"]
        kinds = {str(p): p.kind for p, _ in self.slices}
        groups += [(g, _set(cols, 0.0)) for g, cols in unmapped if kinds[g.name] not in ATOM_MAPPED]
        return groups

    def _without(self, occurrences: dict, atoms: set[int]) -> Callable[[np.ndarray], np.ndarray]:
        def perturb(raw: np.ndarray) -> np.ndarray:
            out = raw.copy()
            for i, occ in occurrences.items():
                part, cols = self.slices[i]
                _, cap, divisor = ATOM_MAPPED[part.kind]
                block = out[cols]
                for bit, envs in occ.items():
                    hit = sum(1 for env in envs if env & atoms)
                    if hit:
                        block[bit] = 0.0 if cap is None else min(len(envs) - hit, cap) / divisor
                out[cols] = block
            return out

        return perturb


def _set(cols: np.ndarray, values) -> Callable[[np.ndarray], np.ndarray]:
    def perturb(raw: np.ndarray) -> np.ndarray:
        out = raw.copy()
        out[cols] = values
        return out

    return perturb


def atom_occurrences(part, mol) -> dict[int, list[frozenset[int]]]:
    """bit -> the atoms of each environment (occurrence) that sets or counts it, from RDKit's AdditionalOutput."""
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    family = ATOM_MAPPED[part.kind][0]
    gen = fingerprint_generator(family, part.radius, part.n_bits)
    ao = rdFingerprintGenerator.AdditionalOutput()
    ao.AllocateBitInfoMap()
    ao.AllocateBitPaths()
    gen.GetCountFingerprintAsNumPy(mol, additionalOutput=ao)
    if family == "torsion":
        return {bit: [frozenset(p) for p in paths] for bit, paths in ao.GetBitPaths().items()}
    info = ao.GetBitInfoMap()
    if family == "atompair":
        return {bit: [frozenset(pair) for pair in pairs] for bit, pairs in info.items()}

    def environment(center: int, radius: int) -> frozenset[int]:
        atoms = {center}
        for b in Chem.FindAtomEnvironmentOfRadiusN(mol, radius, center) if radius else ():
            bond = mol.GetBondWithIdx(b)
            atoms |= {bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()}
        return frozenset(atoms)

    return {bit: [environment(c, r) for c, r in envs] for bit, envs in info.items()}
