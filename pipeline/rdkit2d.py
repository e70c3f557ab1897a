"""The ``rdkit2d`` feature part: RDKit's full 2D descriptor set, fixed by name, with missing values.

`RDKIT2D_DESCRIPTORS` is the list of `rdkit.Chem.Descriptors._descList` (RDKit 2026.09: 217 descriptors)
written out here, so the column order never depends on the installed RDKit: a bundle's client computes the
same named columns as training did. A descriptor missing from the installed RDKit makes the part
itself invalid (`check_rdkit2d`: a `FeaturizerError` when the spec is parsed or read); changing this list would change every rdkit2d bundle, so a new list needs a new kind name.

Missing values. Some descriptors raise or give no usable number on odd molecules (``SPS`` divides by zero
on ``[H+]``; the Gasteiger partial charges are NaN on some metals; BCUT2D fails on atoms without
parameters). For this kind a descriptor that raises, is not finite, or whose magnitude exceeds
`MISSING_ABOVE` is MISSING: `rdkit2d_values` returns NaN for it, and the featurizer replaces it by the
median of that column over the training molecules (stored in the fitted spec, so a client imputes exactly
as training did; a column missing for every training molecule is imputed 0).

``Ipc`` (the information content of the characteristic polynomial) grows exponentially with molecule size
and overflows on large molecules; the column is ``log1p_Ipc`` = log(1 + Ipc) instead (an overflow to
infinity is still missing, hence imputed).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np

from .errors import FeaturizerError

RDKIT2D_DESCRIPTORS: tuple[str, ...] = tuple(
    """
    MaxAbsEStateIndex MaxEStateIndex MinAbsEStateIndex MinEStateIndex qed SPS MolWt HeavyAtomMolWt ExactMolWt
    NumValenceElectrons NumRadicalElectrons MaxPartialCharge MinPartialCharge MaxAbsPartialCharge
    MinAbsPartialCharge FpDensityMorgan1 FpDensityMorgan2 FpDensityMorgan3 BCUT2D_MWHI BCUT2D_MWLOW
    BCUT2D_CHGHI BCUT2D_CHGLO BCUT2D_LOGPHI BCUT2D_LOGPLOW BCUT2D_MRHI BCUT2D_MRLOW AvgIpc BalabanJ BertzCT
    Chi0 Chi0n Chi0v Chi1 Chi1n Chi1v Chi2n Chi2v Chi3n Chi3v Chi4n Chi4v HallKierAlpha Ipc Kappa1 Kappa2
    Kappa3 LabuteASA PEOE_VSA1 PEOE_VSA10 PEOE_VSA11 PEOE_VSA12 PEOE_VSA13 PEOE_VSA14 PEOE_VSA2 PEOE_VSA3
    PEOE_VSA4 PEOE_VSA5 PEOE_VSA6 PEOE_VSA7 PEOE_VSA8 PEOE_VSA9 SMR_VSA1 SMR_VSA10 SMR_VSA2 SMR_VSA3
    SMR_VSA4 SMR_VSA5 SMR_VSA6 SMR_VSA7 SMR_VSA8 SMR_VSA9 SlogP_VSA1 SlogP_VSA10 SlogP_VSA11 SlogP_VSA12
    SlogP_VSA2 SlogP_VSA3 SlogP_VSA4 SlogP_VSA5 SlogP_VSA6 SlogP_VSA7 SlogP_VSA8 SlogP_VSA9 TPSA
    EState_VSA1 EState_VSA10 EState_VSA11 EState_VSA2 EState_VSA3 EState_VSA4 EState_VSA5 EState_VSA6
    EState_VSA7 EState_VSA8 EState_VSA9 VSA_EState1 VSA_EState10 VSA_EState2 VSA_EState3 VSA_EState4
    VSA_EState5 VSA_EState6 VSA_EState7 VSA_EState8 VSA_EState9 FractionCSP3 HeavyAtomCount NHOHCount
    NOCount NumAliphaticCarbocycles NumAliphaticHeterocycles NumAliphaticRings NumAmideBonds
    NumAromaticCarbocycles NumAromaticHeterocycles NumAromaticRings NumAtomStereoCenters NumBridgeheadAtoms
    NumHAcceptors NumHDonors NumHeteroatoms NumHeterocycles NumRotatableBonds NumSaturatedCarbocycles
    NumSaturatedHeterocycles NumSaturatedRings NumSpiroAtoms NumUnspecifiedAtomStereoCenters Phi RingCount
    MolLogP MolMR fr_Al_COO fr_Al_OH fr_Al_OH_noTert fr_ArN fr_Ar_COO fr_Ar_N fr_Ar_NH fr_Ar_OH fr_COO
    fr_COO2 fr_C_O fr_C_O_noCOO fr_C_S fr_HOCCN fr_Imine fr_NH0 fr_NH1 fr_NH2 fr_N_O fr_Ndealkylation1
    fr_Ndealkylation2 fr_Nhpyrrole fr_SH fr_aldehyde fr_alkyl_carbamate fr_alkyl_halide fr_allylic_oxid
    fr_amide fr_amidine fr_aniline fr_aryl_methyl fr_azide fr_azo fr_barbitur fr_benzene fr_benzodiazepine
    fr_bicyclic fr_diazo fr_dihydropyridine fr_epoxide fr_ester fr_ether fr_furan fr_guanido fr_halogen
    fr_hdrzine fr_hdrzone fr_imidazole fr_imide fr_isocyan fr_isothiocyan fr_ketone fr_ketone_Topliss
    fr_lactam fr_lactone fr_methoxy fr_morpholine fr_nitrile fr_nitro fr_nitro_arom fr_nitro_arom_nonortho
    fr_nitroso fr_oxazole fr_oxime fr_para_hydroxylation fr_phenol fr_phenol_noOrthoHbond fr_phos_acid
    fr_phos_ester fr_piperdine fr_piperzine fr_priamide fr_prisulfonamd fr_pyridine fr_quatN fr_sulfide
    fr_sulfonamd fr_sulfone fr_term_acetylene fr_tetrazole fr_thiazole fr_thiocyan fr_thiophene
    fr_unbrch_alkane fr_urea
    """.split()
)
LOG_DESCRIPTORS = ("Ipc",)  # columns replaced by log1p(value), named log1p_<name>
MISSING_ABOVE = (
    1e12  # a descriptor value larger in magnitude is treated as missing (an overflow, not a measurement)
)
# descriptors sharing one cached intermediate on the molecule: RDKit recomputes it on every call unless force=False
_CACHED_ON_MOL = ("MaxAbsEStateIndex", "MaxEStateIndex", "MinAbsEStateIndex", "MinEStateIndex")


def rdkit2d_names(part: Any = None) -> list[str]:
    """The column names, in feature order (``log1p_Ipc`` for ``Ipc``)."""
    return [f"log1p_{n}" if n in LOG_DESCRIPTORS else n for n in RDKIT2D_DESCRIPTORS]


def check_rdkit2d(part: Any = None) -> str:
    """Empty when the installed RDKit has every descriptor of the list, else what is missing and the fix."""
    return _missing_descriptors()


@functools.cache
def _missing_descriptors() -> str:
    import rdkit
    from rdkit.Chem import Descriptors

    table = dict(Descriptors._descList)
    missing = [n for n in RDKIT2D_DESCRIPTORS if n not in table and not hasattr(Descriptors, n)]
    if not missing:
        return ""
    return (
        f"rdkit2d: RDKit {rdkit.__version__} lacks the descriptor(s) {', '.join(missing)}; install "
        "RDKit 2026.09 or newer (the list rdkit2d is fixed to)"
    )


@functools.cache
def _functions() -> tuple[Callable[[Any], float], ...]:
    """The RDKit function of each descriptor, in `RDKIT2D_DESCRIPTORS` order."""
    from rdkit.Chem import Descriptors

    problem = check_rdkit2d()
    if problem:
        raise FeaturizerError(problem)
    table = dict(Descriptors._descList)
    fns = []
    for name in RDKIT2D_DESCRIPTORS:
        fn = table.get(name) or getattr(Descriptors, name)
        fns.append(functools.partial(fn, force=False) if name in _CACHED_ON_MOL else fn)
    return tuple(fns)


def _value(name: str, fn: Callable[[Any], float], mol) -> float:
    try:
        value = float(fn(mol))
    except Exception:  # RDKit descriptors raise anything (ZeroDivisionError, ValueError, RuntimeError, ...)
        return math.nan
    if name in LOG_DESCRIPTORS and value >= 0:
        value = math.log1p(value)
    return value if math.isfinite(value) and abs(value) <= MISSING_ABOVE else math.nan


def rdkit2d_values(part: Any, mol) -> np.ndarray:
    """One molecule's `RDKIT2D_DESCRIPTORS`, NaN where a descriptor is missing (see the module docstring)."""
    return np.array([_value(n, f, mol) for n, f in zip(RDKIT2D_DESCRIPTORS, _functions())], dtype=np.float64)
