import json

import numpy as np
import pytest

from molcloak.pipeline import featurize
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
    "grid": ("grid:r=1,size=8", 64, "grid_r1_0"),
}


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
            "unknown feature part 'fingerprints'; expected one of physchem, morgan, morgan_count, grid",
        ),
        ("morgan:x=2", "feature option 'x=2'"),
        ("morgan:r=9,n=64", "radius 9 / size 64 out of range"),
        (
            "physchem:r=2",
            "feature part 'physchem' in 'physchem:r=2' does not take 'r=2' \\(it takes scale\\)",
        ),
        (
            "morgan:r=2,n=64,scale=quantile",
            "scale 'quantile' not possible; use scale=quantile on physchem or morgan_count",
        ),
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
    assert list(PART_KINDS) == ["physchem", "morgan", "morgan_count", "grid"]
    assert all(isinstance(e, PartKind) and e.description for e in PART_KINDS.values())
    assert [k for k, e in PART_KINDS.items() if e.scaled] == ["physchem", "morgan_count"]
    assert [k for k, e in PART_KINDS.items() if e.image] == ["grid"]


def test_unknown_kind_names_the_available_kinds():
    with pytest.raises(
        FeaturizerError,
        match="unknown feature part 'maccs'; expected one of physchem, morgan, morgan_count, grid",
    ):
        featurize.part_kind("maccs")
    with pytest.raises(FeaturizerError, match="unknown feature part 'maccs'"):
        FeaturizerSpec.from_dict({"parts": [{"kind": "maccs"}], "mean": None, "std": None})


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
    if kind in ("morgan", "grid"):
        assert set(np.unique(X)) <= ({0.0, 1.0} if kind == "morgan" else {k / 7 for k in range(8)})


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
