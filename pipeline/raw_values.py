"""Molecules -> the raw (unscaled) values of a feature spec's parts, and masks of its columns.

`raw_features` parses the SMILES with RDKit and concatenates each part's `compute` (`feature_kinds`)
per molecule, on several processes for big batches with a slow part; the fitted steps (imputation,
scaling, selection, maps) are `featurize.FeaturizerSpec`'s. A spec here is anything with ``parts``
(`feature_kinds.Part`), ``raw_width`` and ``raw_names``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from .errors import FeaturizerError, InvalidSmilesError
from .feature_kinds import Part, part_kind

PARALLEL_MIN = 1000  # molecules: from here a spec with a slow part is featurized on several processes


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


def _molecule_row(spec: Any, i: int, smi: str, mol) -> np.ndarray:
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


def featurize_jobs() -> int:
    """Processes for a big batch with a slow part: $MOLCLOAK_FEATURIZE_JOBS, else 1. Opt-in: on a 2-core
    machine shared with training or FHE work, two processes were slower than one (37.8 s vs 30.9 s for
    7,000 molecules of rdkit2d, under load)."""
    value = os.environ.get("MOLCLOAK_FEATURIZE_JOBS", "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise FeaturizerError(
            f"MOLCLOAK_FEATURIZE_JOBS={value!r} is not a positive integer; set it to e.g. 1 (one process) or 2"
        )
    return int(value)


def _rows(spec: Any, smiles: list[str], start: int, mols: list | None = None) -> np.ndarray:
    """Raw rows of `smiles`, the molecules numbered from start + 1 in error messages."""
    mols = _molecules(smiles) if mols is None else mols
    with np.errstate(all="ignore"), warnings.catch_warnings():  # RDKit's numpy code warns on odd molecules
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = [_molecule_row(spec, start + i, smi, mol) for i, (smi, mol) in enumerate(zip(smiles, mols), 1)]
    return np.vstack(rows)


def raw_features(spec: Any, smiles: Sequence[str]) -> np.ndarray:
    """Unscaled features (n, raw_width) before imputation and selection, float64; NaN marks a missing value
    of an imputed part (rdkit2d).

    Raises `InvalidSmilesError` naming the first unparsable molecule and `FeaturizerError` naming the
    first molecule (1-based), its SMILES and the descriptor or part that failed or gave a non-finite value
    (in a part that is not imputed). A batch of `PARALLEL_MIN` molecules or more with a slow part (rdkit2d:
    milliseconds per molecule) is split over `featurize_jobs()` processes (joblib); the values are the same.
    """
    smiles = list(smiles)
    mols = _molecules(smiles)
    if not mols:
        return np.zeros((0, spec.raw_width))
    jobs = featurize_jobs()
    if jobs > 1 and len(mols) >= PARALLEL_MIN and any(part_kind(p.kind).slow for p in spec.parts):
        from joblib import Parallel, delayed

        del mols  # the workers parse their own chunk (a molecule pickles without RDKit's cached values)
        cuts = np.linspace(0, len(smiles), 4 * jobs + 1).astype(int)
        chunks = Parallel(n_jobs=jobs)(delayed(_rows)(spec, smiles[a:b], a) for a, b in zip(cuts, cuts[1:]))
        X = np.vstack(chunks)
    else:
        X = _rows(spec, smiles, 0, mols)
    bad = np.argwhere(~np.isfinite(X[:, ~imputed_mask(spec)]))
    if len(bad):
        i, j = bad[0]
        j = np.flatnonzero(~imputed_mask(spec))[j]
        raise FeaturizerError(
            f"molecule {i + 1}: SMILES {smiles[i]!r}: feature {spec.raw_names[j]!r} is {X[i, j]}, "
            "expected a finite number; remove or fix this molecule, or use other features"
        )
    return X


def imputed_mask(spec: Any) -> np.ndarray:
    """Boolean mask (raw_width,) of the imputed parts' columns (rdkit2d): a missing value there is NaN in
    `raw_features` and the training median after `impute`."""
    return part_mask(spec, lambda p: part_kind(p.kind).imputed)


def part_mask(spec: Any, chosen: Callable[[Part], bool]) -> np.ndarray:
    """Boolean mask (raw_width,): the columns of the parts for which `chosen(part)` is true."""
    return np.concatenate([np.full(p.width, bool(chosen(p))) for p in spec.parts])


def descriptor_mask(spec: Any) -> np.ndarray:
    """Boolean mask (raw_width,) of the descriptor parts' columns (physchem, rdkit2d)."""
    return part_mask(spec, lambda p: part_kind(p.kind).descriptor)
