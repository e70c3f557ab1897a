import json

import numpy as np
import pytest

from molcloak.pipeline import featurize, raw_values
from molcloak.pipeline.errors import FeaturizerError, InvalidSmilesError
from molcloak.pipeline.feature_kinds import (
    COUNT_CAP,
    PART_KINDS,
    PHYSCHEM_DESCRIPTORS,
    PartKind,
    descriptor_compute,
)
from molcloak.pipeline.featurize import Featurizer, FeaturizerSpec, featurizer_from_dict, raw_features
from molcloak.pipeline.tabular import TabularSpec

TRAIN = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CCCCCCCC", "OC(=O)c1ccccc1"]
TEST = ["CCN", "c1ccncc1", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"]
ROWS = np.array([[1.0, 2.0, -3.0], [4.0, 0.5, 6.0], [7.0, 8.0, 9.5], [0.0, 1.0, 2.0]])
# one spec per part kind, with the width and the first feature name the registry gives it
KIND_SPECS = {
    "physchem": ("physchem", 10, "MolLogP"),
    "morgan": ("morgan:r=3,n=64", 64, "morgan_r3_0"),
    "morgan_count": ("morgan_count:r=2,n=32,scale=quantile", 32, "morgan_count_r2_0"),
    "rdkit2d": ("rdkit2d:scale=quantile", 217, "MaxAbsEStateIndex"),
    "maccs": ("maccs", 167, "maccs_0"),
    "fmorgan": ("fmorgan:r=2,n=64", 64, "fmorgan_r2_0"),
    "fmorgan_count": ("fmorgan_count:r=3,n=32", 32, "fmorgan_count_r3_0"),
    "atompair_count": ("atompair_count:n=64,scale=quantile", 64, "atompair_count_0"),
    "torsion_count": ("torsion_count:n=32", 32, "torsion_count_0"),
    "grid": ("grid:r=1,size=8", 64, "grid_r1_0"),
}
KINDS = "physchem, morgan, morgan_count, rdkit2d, maccs, fmorgan, fmorgan_count, atompair_count, torsion_count, grid"


def test_parse_and_str_round_trip():
    spec = FeaturizerSpec.parse("physchem+morgan:r=3,n=512+morgan_count:r=2,n=64")
    assert str(spec) == "physchem+morgan:r=3,n=512+morgan_count:r=2,n=64"
    assert spec.width == 10 + 512 + 64
    assert FeaturizerSpec.parse(str(spec)) == spec


def test_dict_round_trip_through_json_keeps_scaler():
    spec = FeaturizerSpec.parse("physchem+morgan:r=2,n=64").fit(TRAIN)
    again = FeaturizerSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert np.array_equal(again.transform(TRAIN), spec.transform(TRAIN))


def test_featurization_is_deterministic():
    spec = FeaturizerSpec.parse("physchem+morgan_count:r=2,n=128").fit(TRAIN)
    a, b = spec.transform(TRAIN), spec.transform(list(TRAIN))
    assert a.dtype == np.float32 and np.array_equal(a, b)


def test_standardization_on_descriptors_not_on_bits():
    spec = FeaturizerSpec.parse("physchem+morgan:r=2,n=64").fit(TRAIN)
    X = spec.transform(TRAIN)
    assert np.allclose(X[:, :10].mean(axis=0), 0, atol=1e-5)
    assert set(np.unique(X[:, 10:])) <= {0.0, 1.0}


def test_counts_are_capped():
    X = raw_features(FeaturizerSpec.parse("morgan_count:r=1,n=32"), ["C" * 40])
    assert X.max() == COUNT_CAP


@pytest.mark.parametrize(
    "text,match",
    [
        (
            "fingerprints",
            f"unknown feature part 'fingerprints'; expected one of {KINDS} \\(and optionally select:k=K, then a map",
        ),
        ("morgan:x=2", "feature option 'x=2'"),
        ("morgan:r=9,n=64", "radius 9 / size 64 out of range"),
        (
            "physchem:r=2",
            "feature part 'physchem' in 'physchem:r=2' does not take 'r=2' \\(it takes scale\\)",
        ),
        (
            "morgan:r=2,n=64,scale=quantile",
            "scale 'quantile' not possible; use scale=quantile on physchem or morgan_count or rdkit2d or "
            "fmorgan_count or atompair_count or torsion_count",
        ),
        ("maccs:n=64", "feature part 'maccs' in 'maccs:n=64' does not take 'n=64' \\(it takes no option\\)"),
        ("atompair_count:r=2", "does not take 'r=2' \\(it takes n, scale\\)"),
        ("torsion_count:n=4", "torsion_count: size 4 out of range; use n in 8..16384"),
        ("fmorgan:r=7,n=64", "fmorgan: radius 7 / size 64 out of range"),
        ("", "empty feature spec"),
    ],
)
def test_bad_specs(text, match):
    with pytest.raises(FeaturizerError, match=match):
        FeaturizerSpec.parse(text)


def test_invalid_smiles_is_named():
    spec = FeaturizerSpec.parse("physchem").fit(TRAIN)
    with pytest.raises(InvalidSmilesError, match=r"molecule 2: SMILES 'C1CC' could not be parsed"):
        spec.transform(["CCO", "C1CC"])


def test_unfitted_spec_is_refused():
    with pytest.raises(FeaturizerError, match="not fitted"):
        FeaturizerSpec.parse("physchem").transform(TRAIN)
    with pytest.raises(FeaturizerError, match="cannot be fitted on 0 molecules"):
        FeaturizerSpec.parse("physchem").fit([])


# ---------------------------------------------------------------- the part-kind registry


def test_registry_holds_the_documented_kinds():
    assert ", ".join(PART_KINDS) == KINDS
    assert all(isinstance(e, PartKind) and e.description for e in PART_KINDS.values())
    assert [k for k, e in PART_KINDS.items() if not e.scaled] == ["morgan", "maccs", "fmorgan", "grid"]
    assert [k for k, e in PART_KINDS.items() if e.image] == ["grid"]
    assert [k for k, e in PART_KINDS.items() if e.imputed] == ["rdkit2d"]


def test_unknown_kind_names_the_available_kinds():
    with pytest.raises(
        FeaturizerError,
        match=f"unknown feature part 'ecfp'; expected one of {KINDS}",
    ):
        featurize.part_kind("ecfp")
    with pytest.raises(FeaturizerError, match="unknown feature part 'ecfp'"):
        FeaturizerSpec.from_dict({"parts": [{"kind": "ecfp"}], "mean": None, "std": None})


@pytest.mark.parametrize("kind", list(KIND_SPECS))
def test_each_kind_width_names_and_values(kind):
    text, width, first = KIND_SPECS[kind]
    spec = FeaturizerSpec.parse(text)
    assert spec.parts[0].kind == kind and str(spec) == text
    assert spec.width == width and len(spec.names) == width and spec.names[0] == first
    assert len(set(spec.names)) == width
    X = raw_features(spec, TRAIN)
    assert X.shape == (len(TRAIN), width) and X.dtype == np.float64 and np.all(np.isfinite(X))
    if kind == "physchem":
        assert spec.names == list(PHYSCHEM_DESCRIPTORS)
        assert X[0, spec.names.index("HeavyAtomCount")] == 3  # ethanol: C, C, O
    if kind in ("morgan", "grid", "maccs", "fmorgan"):
        assert set(np.unique(X)) <= ({k / 7 for k in range(8)} if kind == "grid" else {0.0, 1.0})
    if kind.endswith("_count"):
        assert set(np.unique(X)) <= set(range(COUNT_CAP + 1)) and X.max() >= 1
    assert np.array_equal(raw_features(spec, list(reversed(TRAIN))), X[::-1])  # per molecule, deterministic


@pytest.mark.parametrize("kind", list(KIND_SPECS))
def test_each_kind_round_trips_through_the_registry(kind):
    spec = FeaturizerSpec.parse(KIND_SPECS[kind][0])
    fitted = spec.fit(TRAIN)
    stored = json.loads(json.dumps(fitted.to_dict()))
    assert stored["kind"] == "molecular"
    again = featurizer_from_dict(stored)
    assert again == fitted and isinstance(again, FeaturizerSpec)
    X = fitted.transform(TEST)
    assert X.shape == (len(TEST), *spec.shape) and X.dtype == np.float32
    assert np.array_equal(again.transform(TEST), X)
    assert spec.fit(TRAIN) == fitted and np.array_equal(spec.fit(TRAIN).transform(TEST), X)  # determinism


def test_tabular_round_trips_through_the_registry():
    spec = TabularSpec(("a", "b", "c"))
    fitted = spec.fit(ROWS)
    stored = json.loads(json.dumps(fitted.to_dict()))
    assert stored["kind"] == "tabular"
    again = featurizer_from_dict(stored)
    assert again == fitted and isinstance(again, TabularSpec)
    records = [{"c": str(r[2]), "a": str(r[0]), "b": str(r[1]), "extra": "x"} for r in ROWS]
    assert np.array_equal(again.transform(records), fitted.transform(ROWS))
    assert spec.fit(ROWS) == fitted


def test_old_manifest_without_kind_still_loads():
    """A manifest written before featurizer dicts had "kind" (and with physchem's unused defaults stored)."""
    old = {
        "spec": "physchem+morgan:r=2,n=16",
        "parts": [
            {"kind": "physchem", "radius": 2, "n_bits": 1024, "scale": "standard"},
            {"kind": "morgan", "radius": 2, "n_bits": 16, "scale": "standard"},
        ],
        "mean": [0.5] * 26,
        "std": [2.0] * 26,
    }
    spec = featurizer_from_dict(old)
    assert isinstance(spec, FeaturizerSpec) and str(spec) == old["spec"] and spec.is_fitted
    assert spec.transform(TEST).shape == (len(TEST), 26)
    assert spec.to_dict() == {"kind": "molecular", **old}


@pytest.mark.parametrize(
    "d,match",
    [
        (
            {"kind": "images", "parts": []},
            "unknown featurizer kind 'images'; expected one of molecular, tabular",
        ),
        ({"kind": "tabular"}, "tabular featurizer spec .* is malformed"),
        ({"spec": "physchem"}, "featurizer spec .* is malformed"),
        (["physchem"], "is not a mapping"),
    ],
)
def test_bad_featurizer_dicts(d, match):
    with pytest.raises(FeaturizerError, match=match):
        featurizer_from_dict(d)


@pytest.mark.parametrize("spec", [FeaturizerSpec.parse("physchem"), TabularSpec(("a", "b", "c"))])
def test_both_featurizers_satisfy_the_protocol(spec):
    fitted = spec.fit(TRAIN if spec.input_kind == "smiles" else ROWS)
    for featurizer in (spec, fitted):
        assert isinstance(featurizer, Featurizer)
    assert not spec.is_fitted and fitted.is_fitted
    assert fitted.input_kind in ("smiles", "rows") and fitted.shape == (fitted.width,) == (len(fitted.names),)
    good, bad = (
        ("OCC", "C1CC")
        if spec.input_kind == "smiles"
        else ({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "x", "c": "3"})
    )
    assert fitted.check_input(good)[1] == "" and fitted.check_input(good)[0] is not None
    value, reason = fitted.check_input(bad)
    assert value is None and "fix it" in reason
    assert fitted.transform([good]).shape == (1, fitted.width)
    assert featurizer_from_dict(fitted.to_dict()) == fitted
    assert not isinstance(object(), Featurizer)


# ---------------------------------------------------------------- descriptors that fail on a molecule


def _boom(mol) -> float:
    if mol.GetNumAtoms() == 1:
        raise ZeroDivisionError("division by zero")
    return float(mol.GetNumAtoms())


def _register(monkeypatch, name: str, compute, width: int = 1, names=("Boom",)) -> None:
    """A part kind that exists only in this test."""
    entry = PartKind(compute, lambda p: width, lambda p: list(names), "a test descriptor")
    monkeypatch.setitem(PART_KINDS, name, entry)


def test_a_raising_descriptor_names_the_molecule_smiles_and_descriptor(monkeypatch):
    _register(monkeypatch, "boom", descriptor_compute(["Boom"], lambda name: _boom))
    spec = FeaturizerSpec.parse("physchem+boom")
    assert spec.width == 11 and spec.names[-1] == "Boom"
    assert raw_features(spec, ["CCO", "CC"])[:, -1].tolist() == [3.0, 2.0]
    with pytest.raises(
        FeaturizerError,
        match=r"^molecule 2: SMILES 'C': feature part 'boom': descriptor 'Boom' raised "
        r"ZeroDivisionError: division by zero; .*remove or fix this molecule",
    ):
        spec.fit(["CCO", "C", "CCN"])


def test_a_real_rdkit_descriptor_that_raises_is_reported(monkeypatch):
    """RDKit's SPS divides by zero on a lone proton."""
    _register(monkeypatch, "sps", descriptor_compute(["SPS"]), names=("SPS",))
    spec = FeaturizerSpec.parse("sps").fit(["CCO", "c1ccccc1"])
    with pytest.raises(
        FeaturizerError,
        match=r"molecule 3: SMILES '\[H\+\]': feature part 'sps': descriptor 'SPS' "
        r"raised ZeroDivisionError",
    ):
        spec.transform(["CCO", "CCN", "[H+]"])


def test_a_failing_part_or_a_non_finite_value_is_named(monkeypatch):
    def broken(part, mol):
        raise RuntimeError("Pre-condition Violation")

    _register(monkeypatch, "broken", broken)
    with pytest.raises(
        FeaturizerError, match=r"molecule 1: SMILES 'CCO': feature part 'broken': raised RuntimeError"
    ):
        FeaturizerSpec.parse("broken").fit(["CCO"])
    _register(monkeypatch, "nan", descriptor_compute(["Boom"], lambda name: lambda m: float("nan")))
    with pytest.raises(
        FeaturizerError, match=r"molecule 1: SMILES 'CCO': feature 'Boom' is nan, expected a finite number"
    ):
        FeaturizerSpec.parse("morgan:r=1,n=8+nan").fit(["CCO"])
    _register(monkeypatch, "short", lambda part, mol: [1.0], width=2)
    with pytest.raises(FeaturizerError, match="computed 1 values for molecule 1, its width is 2"):
        FeaturizerSpec.parse("short").fit(["CCO"])


# ---------------------------------------------------------------- the kinds chemists expect, checked against RDKit


def test_fingerprint_kinds_match_rdkit():
    from rdkit import Chem
    from rdkit.Chem import MACCSkeys, rdFingerprintGenerator

    mols = [Chem.MolFromSmiles(s) for s in TRAIN]
    fcfp = rdFingerprintGenerator.GetMorganGenerator(
        radius=2, fpSize=64, atomInvariantsGenerator=rdFingerprintGenerator.GetMorganFeatureAtomInvGen()
    )
    ap = rdFingerprintGenerator.GetAtomPairGenerator(fpSize=64)
    tt = rdFingerprintGenerator.GetTopologicalTorsionGenerator(fpSize=32)
    cases = {
        "maccs": [[int(b) for b in MACCSkeys.GenMACCSKeys(m)] for m in mols],
        "fmorgan:r=2,n=64": [fcfp.GetFingerprintAsNumPy(m) for m in mols],
        "fmorgan_count:r=2,n=64": [np.minimum(fcfp.GetCountFingerprintAsNumPy(m), COUNT_CAP) for m in mols],
        "atompair_count:n=64": [np.minimum(ap.GetCountFingerprintAsNumPy(m), COUNT_CAP) for m in mols],
        "torsion_count:n=32": [np.minimum(tt.GetCountFingerprintAsNumPy(m), COUNT_CAP) for m in mols],
    }
    for text, expected in cases.items():
        assert np.array_equal(raw_features(FeaturizerSpec.parse(text), TRAIN), np.array(expected)), text
    # feature-Morgan is not Morgan: pharmacophoric atom classes instead of atom identities
    morgan = raw_features(FeaturizerSpec.parse("morgan:r=2,n=64"), TRAIN)
    assert not np.array_equal(raw_features(FeaturizerSpec.parse("fmorgan:r=2,n=64"), TRAIN), morgan)
    # counts are capped: a long chain has more than COUNT_CAP identical atom pairs and torsions
    chain = raw_features(FeaturizerSpec.parse("atompair_count:n=64+torsion_count:n=32"), ["C" * 40])
    assert chain.max() == COUNT_CAP


def test_rdkit2d_is_the_fixed_named_descriptor_list():
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    from molcloak.pipeline.rdkit2d import RDKIT2D_DESCRIPTORS

    spec = FeaturizerSpec.parse("rdkit2d")
    assert spec.names == [n if n != "Ipc" else "log1p_Ipc" for n in RDKIT2D_DESCRIPTORS]
    assert {"MolLogP", "TPSA", "SPS", "qed", "fr_benzene", "log1p_Ipc"} <= set(spec.names)
    assert "Ipc" not in spec.names and len(set(spec.names)) == spec.width == len(RDKIT2D_DESCRIPTORS)
    X = raw_features(spec, TRAIN)
    assert np.all(np.isfinite(X))
    mol = Chem.MolFromSmiles(TRAIN[2])
    row = dict(zip(spec.names, X[2]))
    for name in ("MolLogP", "TPSA", "MaxEStateIndex", "MinAbsEStateIndex", "qed", "BertzCT", "fr_amide"):
        assert row[name] == pytest.approx(getattr(Descriptors, name)(mol), rel=1e-12), name
    assert row["log1p_Ipc"] == pytest.approx(np.log1p(Descriptors.Ipc(mol)), rel=1e-12)
    assert np.array_equal(raw_features(spec, TRAIN[::-1]), X[::-1])  # no state carried between molecules


def test_rdkit2d_imputes_a_failing_descriptor_with_the_training_median():
    """RDKit's SPS divides by zero on a lone proton: missing, replaced by the training median of SPS."""
    spec = FeaturizerSpec.parse("rdkit2d")
    j = spec.names.index("SPS")
    raw = raw_features(spec, ["[H+]", "CCO"])
    assert np.isnan(raw[0, j]) and np.isfinite(raw[1, j])
    assert np.isfinite(np.delete(raw[0], j)).all()  # only SPS is missing for [H+]
    fitted = spec.fit(TRAIN)
    train_sps = raw_features(spec, TRAIN)[:, j]
    assert len(fitted.medians) == 217 and fitted.medians[j] == np.median(train_sps)
    X = fitted.transform(["[H+]", "CCO"])
    assert np.all(np.isfinite(X))
    expected = (np.median(train_sps) - fitted.mean[j]) / fitted.std[j]
    assert X[0, j] == pytest.approx(expected, abs=1e-6)
    # the client imputes exactly as training did: the medians travel in the stored spec
    again = featurizer_from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again == fitted and np.array_equal(again.transform(["[H+]", "CCO"]), X)
    # a molecule with a missing descriptor among the training molecules: the median of the others
    with_proton = spec.fit(TRAIN + ["[H+]"])
    assert with_proton.medians[j] == np.median(train_sps)
    assert np.all(np.isfinite(with_proton.transform(TRAIN + ["[H+]"])))


@pytest.mark.parametrize(
    "key,match",
    [
        ("medians", "216 imputation medians for 217 imputed columns; rebuild the bundle"),
        ("descriptor_medians", "226 descriptor medians for 227 descriptor columns; rebuild the bundle"),
    ],
)
def test_missing_medians_in_a_stored_spec_are_refused(key, match):
    d = FeaturizerSpec.parse("physchem+rdkit2d").fit(TRAIN).to_dict()
    d[key] = d[key][:-1]
    with pytest.raises(FeaturizerError, match=match):
        featurizer_from_dict(d)


def test_other_kinds_still_refuse_a_failing_molecule(monkeypatch):
    """Only imputed kinds (rdkit2d) treat a failure as missing; a physchem-like list names the molecule."""
    _register(monkeypatch, "sps", descriptor_compute(["SPS"]), names=("SPS",))
    with pytest.raises(FeaturizerError, match=r"molecule 2: SMILES '\[H\+\]': feature part 'sps'"):
        FeaturizerSpec.parse("rdkit2d+sps").fit(["CCO", "[H+]"])


def test_big_batches_featurize_in_parallel_with_the_same_values(monkeypatch):
    smiles = TRAIN + TEST + ["[H+]"]
    spec = FeaturizerSpec.parse("physchem+rdkit2d+morgan:r=1,n=16")
    monkeypatch.setenv("MOLCLOAK_FEATURIZE_JOBS", "1")
    serial = raw_features(spec, smiles)
    monkeypatch.setenv("MOLCLOAK_FEATURIZE_JOBS", "2")
    monkeypatch.setattr(raw_values, "PARALLEL_MIN", 4)
    assert raw_values.featurize_jobs() == 2
    assert np.array_equal(raw_features(spec, smiles), serial, equal_nan=True)
    with pytest.raises(InvalidSmilesError, match=r"molecule 9: SMILES 'C1CC'"):
        raw_features(spec, smiles[:8] + ["C1CC"])


def test_rdkit2d_refuses_an_rdkit_without_one_of_its_descriptors(monkeypatch):
    from molcloak.pipeline import rdkit2d

    monkeypatch.setattr(rdkit2d, "RDKIT2D_DESCRIPTORS", rdkit2d.RDKIT2D_DESCRIPTORS + ("NoSuchDescriptor",))
    rdkit2d._missing_descriptors.cache_clear()
    try:
        with pytest.raises(
            FeaturizerError, match=r"^rdkit2d: RDKit \S+ lacks the descriptor\(s\) NoSuchDescriptor"
        ):
            FeaturizerSpec.parse("physchem+rdkit2d")
    finally:
        rdkit2d._missing_descriptors.cache_clear()


# ---------------------------------------------------------------- training medians and neutral values


def test_descriptor_medians_are_the_training_medians_and_make_the_neutral_values():
    spec = FeaturizerSpec.parse("physchem+morgan_count:r=2,n=32+physchem:scale=quantile").fit(TRAIN)
    raw = raw_features(spec, TRAIN)
    desc = np.r_[0:10, 42:52]
    assert np.array_equal(spec.descriptor_medians, np.median(raw[:, desc], axis=0))
    neutral = spec.neutral_raw()
    assert neutral.shape == (spec.raw_width,)
    assert np.array_equal(neutral[:10], np.median(raw[:, :10], axis=0))  # descriptors: training median
    assert np.array_equal(neutral[10:42], np.zeros(32))  # fingerprint counts: off
    assert np.array_equal(neutral[42:], [k[len(k) // 2] for k in spec.knots[42:]])  # quantile: median knot
    again = featurizer_from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and np.array_equal(again.neutral_raw(), neutral)
    # the medians are learned on the training molecules only
    assert spec.fit(TRAIN + TEST).descriptor_medians != spec.descriptor_medians


def test_rdkit2d_descriptor_medians_skip_the_missing_values():
    spec = FeaturizerSpec.parse("rdkit2d").fit(TRAIN + ["[H+]"])
    j = spec.names.index("SPS")
    assert spec.descriptor_medians == spec.medians  # imputed columns: the imputation medians
    assert spec.neutral_raw()[j] == np.median(raw_features(spec, TRAIN)[:, j])


def test_fingerprint_only_specs_store_no_medians_and_are_neutral_at_zero():
    spec = FeaturizerSpec.parse("morgan:r=2,n=64").fit(TRAIN)
    assert spec.descriptor_medians is None and "descriptor_medians" not in spec.to_dict()
    assert np.array_equal(spec.neutral_raw(), np.zeros(64))


def test_a_spec_saved_before_the_descriptor_medians_falls_back_to_the_mean():
    """An older bundle's spec has no "descriptor_medians": it loads, featurizes as before, and its neutral
    values are the training means of the non-imputed descriptors (the imputed ones keep their medians)."""
    fitted = FeaturizerSpec.parse("physchem+rdkit2d+morgan:r=2,n=16").fit(TRAIN)
    old = fitted.to_dict()
    del old["descriptor_medians"]
    spec = featurizer_from_dict(json.loads(json.dumps(old)))
    assert spec.descriptor_medians is None and spec.to_dict() == old
    assert np.array_equal(spec.transform(TEST), fitted.transform(TEST))
    neutral = spec.neutral_raw()
    assert np.array_equal(neutral[:10], spec.mean[:10])
    assert np.array_equal(neutral[10:227], spec.medians) and np.array_equal(neutral[227:], np.zeros(16))


def test_an_unfitted_spec_has_no_neutral_values():
    with pytest.raises(FeaturizerError, match=r"not fitted; call \.fit\(training SMILES\) first"):
        FeaturizerSpec.parse("physchem").neutral_raw()


def test_the_bundle_stores_the_training_medians(tiny_binary):
    """A deployed physchem model's (quantile-scaled) client manifest holds the medians of its training molecules."""
    from molcloak.pipeline.bundle import load_manifest
    from molcloak.pipeline.data import load_bundled
    from molcloak.pipeline.splits import split_dataset

    ckpt, _, bundle = tiny_binary
    spec = load_manifest(bundle / "client").featurizer
    assert spec == ckpt.featurizer and spec.parts[0].kind == "physchem"
    ds = load_bundled("sol-low")
    train = [ds.smiles[i] for i in split_dataset(ds, seed=0).train]
    medians = np.median(raw_features(spec, train), axis=0)
    assert np.array_equal(spec.descriptor_medians, medians)
    assert np.allclose(spec.neutral_raw(), medians, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- random Fourier features


def test_random_fourier_features_are_drawn_from_the_seed_and_round_trip():
    from molcloak.pipeline import random_features

    spec = FeaturizerSpec.parse("physchem:scale=quantile+morgan:r=2,n=64+select:k=8+rff:n=32,g=0.5,seed=3")
    assert str(spec) == "physchem:scale=quantile+morgan:r=2,n=64+select:k=8+rff:n=32,g=0.5,seed=3"
    assert FeaturizerSpec.parse(str(spec)) == spec and spec.width == 32
    fitted = spec.fit(TRAIN)
    X = fitted.transform(TEST)
    assert X.shape == (3, 32) and X.dtype == np.float32 and np.abs(X).max() <= 1
    assert fitted.names[:2] == ["rff0", "rff1"]
    again = FeaturizerSpec.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again == fitted and np.array_equal(again.transform(TEST), X)
    # the map is the cosine of a seeded projection of the columns before it, fitted on nothing
    before = (
        FeaturizerSpec.parse("physchem:scale=quantile+morgan:r=2,n=64+select:k=8").fit(TRAIN).transform(TEST)
    )
    W, b = random_features._draw(32, 0.5, 3, 8)
    assert np.allclose(X, np.cos(before.astype(np.float64) @ W + b), atol=1e-6)
    other = FeaturizerSpec.parse("physchem:scale=quantile+morgan:r=2,n=64+select:k=8+rff:n=32,g=0.5,seed=4")
    assert not np.allclose(other.fit(TRAIN).transform(TEST), X)
    # the generator is this code's, not a library's: its numbers are fixed here for every version of NumPy
    assert random_features.uniforms(0, 3).tolist() == pytest.approx(
        [0.8833108082, 0.4315279970, 0.0264337716], abs=1e-9
    )
    W, _ = random_features._draw(256, 2.0, 0, 64)
    assert abs(W.mean()) < 0.01 and W.var() == pytest.approx(2 * 2.0 / 64, rel=0.05)


def test_minhash_features_approximate_the_tanimoto_similarity_and_round_trip():
    """Two molecules' minhash features agree, on average, as often as their Morgan bits' Tanimoto similarity."""
    from molcloak.pipeline import random_features

    spec = FeaturizerSpec.parse("morgan:r=2,n=256 + minhash:n=4096,seed=5")
    assert str(spec) == "morgan:r=2,n=256+minhash:n=4096,seed=5" and spec.width == 4096
    fitted = spec.fit(TRAIN)
    Z = fitted.transform(TEST).astype(np.float64)
    assert set(np.unique(Z)) <= {-1.0, 1.0} and fitted.names[0] == "minhash0"
    bits = FeaturizerSpec.parse("morgan:r=2,n=256").fit(TRAIN).transform(TEST) > 0
    inter = (bits[:, None] & bits[None]).sum(-1)
    tanimoto = inter / (bits[:, None] | bits[None]).sum(-1)
    assert np.abs(Z @ Z.T / 4096 - tanimoto).max() < 0.06  # 4,096 hashes: about 0.016 of noise per pair
    again = FeaturizerSpec.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again == fitted and np.array_equal(again.transform(TEST), fitted.transform(TEST))
    # each hash picks the sign of the first present column in its own order; no column present: all zeros
    order, signs = random_features._orders(8, 0, 4)
    rows = np.array([[0, 1, 1, 0], [0, 0, 0, 0]])
    first = [1 + np.argmin(order[h, 1:3]) for h in range(8)]
    assert random_features.MinHash(8).apply(rows).tolist() == [
        [signs[h, c] for h, c in enumerate(first)],
        [0.0] * 8,
    ]
    # counts are standardized before a map sees them: minhash reads the substructures present in the raw counts
    counts = FeaturizerSpec.parse("morgan_count:r=2,n=64+minhash:n=16").fit(TRAIN)
    raw = (
        FeaturizerSpec.parse("morgan_count:r=2,n=64").fit(TRAIN).transform(TEST)
    )  # standardized: not the raw
    present = raw_features(FeaturizerSpec.parse("morgan_count:r=2,n=64"), TEST)
    assert np.array_equal(
        counts.transform(TEST), random_features.MinHash(16).apply(present).astype(np.float32)
    )
    assert not np.array_equal(
        random_features.MinHash(16).apply(raw), random_features.MinHash(16).apply(present)
    )
    # a bundle of session 21 stored its rff map under "rff", without a kind: it still loads
    rff = FeaturizerSpec.parse("physchem+rff:n=8").fit(TRAIN)
    old = rff.to_dict()
    old["rff"] = {k: v for k, v in old.pop("map").items() if k != "kind"}
    assert np.array_equal(FeaturizerSpec.from_dict(old).transform(TEST), rff.transform(TEST))


def test_a_linear_spec_keeps_its_columns_as_they_are_and_round_trips():
    """``+linear`` maps nothing: it marks the spec's model as linear (`fit` then searches it as a kernel machine)."""
    spec = FeaturizerSpec.parse("physchem:scale=quantile+morgan:r=2,n=64+select:k=8+linear")
    assert str(spec) == "physchem:scale=quantile+morgan:r=2,n=64+select:k=8+linear" and spec.width == 8
    fitted, plain = spec.fit(TRAIN), FeaturizerSpec.parse(str(spec).removesuffix("+linear")).fit(TRAIN)
    assert np.array_equal(fitted.transform(TEST), plain.transform(TEST)) and fitted.names == plain.names
    again = FeaturizerSpec.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert (
        again == fitted
        and str(again) == str(spec)
        and np.array_equal(again.transform(TEST), plain.transform(TEST))
    )


def test_parts_after_a_map_are_kept_beside_its_features_and_round_trip():
    """``rdkit2d+rff:n=N+morgan``: rff maps the descriptors only; the bits follow its N features as they are."""
    spec = FeaturizerSpec.parse("physchem:scale=quantile + rff:n=32,seed=3 + morgan:r=2,n=64")
    assert str(spec) == "physchem:scale=quantile+rff:n=32,seed=3+morgan:r=2,n=64"
    assert spec.mapped_parts == spec.parts[:1] and spec.width == 32 + 64 and spec.raw_width == 10 + 64
    fitted = spec.fit(TRAIN)
    rff = FeaturizerSpec.parse("physchem:scale=quantile+rff:n=32,seed=3").fit(TRAIN)
    bits = FeaturizerSpec.parse("morgan:r=2,n=64").fit(TRAIN)
    X = fitted.transform(TEST)
    assert np.array_equal(X, np.hstack([rff.transform(TEST), bits.transform(TEST)]))
    assert fitted.names == rff.names + bits.names
    again = FeaturizerSpec.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again == fitted and str(again) == str(spec) and np.array_equal(again.transform(TEST), X)
    # a tampered manifest: the count of mapped parts out of range, of another type, or removed
    for bad in (0, 2, -1, 1.0, "1", True, None):
        stored = {**fitted.to_dict(), "mapped_parts": bad}
        with pytest.raises(FeaturizerError, match="mapped_parts=.*rebuild the bundle"):
            FeaturizerSpec.from_dict(stored)
    # minhash maps the bits before it and keeps the descriptors after it, which are scaled as without the map
    mixed = FeaturizerSpec.parse("morgan:r=2,n=64+minhash:n=16+physchem").fit(TRAIN)
    desc = FeaturizerSpec.parse("physchem").fit(TRAIN)
    assert mixed.width == 26 and np.allclose(mixed.transform(TEST)[:, 16:], desc.transform(TEST))


@pytest.mark.parametrize(
    "text,match",
    [
        ("morgan:r=2,n=64+minhash:n=8+rff:n=4", "rff must appear once in"),
        ("morgan:r=2,n=64+linear:n=8", "linear takes no options, but .* has 'linear:n=8'"),
        ("morgan:r=2,n=64+linear+select:k=4", "select must come before the map"),
        ("morgan:r=2,n=64+linear+physchem", "linear must be the last part of 'morgan.*physchem'"),
        ("rdkit2d+morgan:r=2,n=64+minhash:n=8", "minhash maps fingerprint parts.*'rdkit2d' is descriptors"),
        ("morgan:r=2,n=64+minhash:k=3", "minhash option 'k=3' .* not understood; minhash takes n, seed"),
        ("morgan:r=2,n=64+minhash:n=0", "minhash: n=0 must be an integer"),
        (
            "morgan:r=2,n=2048+minhash:n=16384",
            "minhash:n=16384 over 2048 columns draws 33,554,432 ranks.*n <= 8192",
        ),
        ("rff:n=64", "rff must appear once in 'rff:n=64', after the parts it maps"),
        ("physchem+rff:n=64+select:k=4", "select must come before the map"),
        ("physchem+select:k=4+rff:n=64+morgan:r=2,n=64", "select cannot be combined with kept parts"),
        ("morgan:r=2,n=64+minhash:n=8+physchem+rff:n=4", "rff must appear once in"),
        ("physchem+rff:g=1", "rff in 'physchem\\+rff:g=1' needs n"),
        ("physchem+rff:n=0", "rff: n=0 must be an integer in 1..16384"),
        ("physchem+rff:n=64,g=-1", "rff: g=-1.0 must be a positive number"),
        ("physchem+rff:n=64,k=2", "rff option 'k=2' in 'physchem\\+rff:n=64,k=2' not understood"),
        ("grid:r=1,size=8+rff:n=64", "'grid' is an image: rff:n=64 cannot map its pixels"),
    ],
)
def test_bad_random_feature_specs(text, match):
    with pytest.raises(FeaturizerError, match=match):
        FeaturizerSpec.parse(text)
