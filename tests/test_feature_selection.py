"""Feature selection (``select:k=K``): fitted on the training molecules only, stored in the spec, applied alike."""

import json

import numpy as np
import pytest

from molcloak.pipeline.errors import FeaturizerError
from molcloak.pipeline.feature_selection import MAX_CORRELATION, Selection, fit_selection
from molcloak.pipeline.featurize import FeaturizerSpec, featurizer_from_dict

TRAIN = [
    "CCO",
    "c1ccccc1O",
    "CC(=O)Nc1ccc(O)cc1",
    "CCCCCCCC",
    "OC(=O)c1ccccc1",
    "CCN(CC)CC",
    "c1ccncc1",
    "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "ClC(Cl)Cl",
    "CC(=O)OC1=CC=CC=C1C(=O)O",
    "NCCc1ccc(O)c(O)c1",
    "CN1CCC[C@H]1c1cccnc1",
    "O=C(O)CCC(=O)O",
    "c1ccc2ccccc2c1",
    "CCOC(=O)C",
    "Nc1ccccc1",
]
LABELS = np.array([int("N" in s or "n" in s) for s in TRAIN])  # has a nitrogen
TEST_A = ["CCCN", "c1ccsc1", "OCCO"]
TEST_B = ["CC(C)(C)O", "c1ccc(Cl)cc1", "CCCCCCN", "O=C1CCCCC1"]
SPEC = "physchem:scale=quantile+maccs+morgan_count:r=2,n=64+select:k=6"


def _synthetic(n: int = 200, seed: int = 0):
    """Columns: 0 constant, 1 near-constant (one row differs), 2 noise, 3 informative, 4 = 2 * col 3 + 1
    (a duplicate), 5 a balanced bit (the highest variance on the [0, 1] scale), 6-9 noise."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(size=(n, 10))
    X[:, 0] = 3.0
    X[:, 1] = 0.0
    X[0, 1] = 1.0
    X[:, 4] = 2 * X[:, 3] + 1
    X[:, 5] = np.arange(n) % 2
    return X, [f"c{j}" for j in range(10)]


def test_filters_then_teacher_picks_the_informative_column():
    X, names = _synthetic()
    y = (X[:, 3] > 0.5).astype(np.int64)
    sel = fit_selection(Selection(1), X, names, y)
    assert sel.kept == (3,) and sel.names == ("c3",)  # the duplicate (4) was dropped, the earlier kept
    assert sel.counts == (10, 8, 7)  # constant and near-constant, then one near-duplicate, dropped
    assert sel.method.startswith("ExtraTrees classifier importance")
    reg = fit_selection(Selection(1), X, names, X[:, 3] * 3.0 + 0.1 * X[:, 7])
    assert reg.kept == (3,) and reg.method.startswith("ExtraTrees regressor importance")


def test_without_labels_the_highest_variance_columns_are_kept():
    X, names = _synthetic()
    sel = fit_selection(Selection(1), X, names)
    assert sel.kept == (5,) and sel.method == "variance"  # the balanced bit: variance 0.25 > 1/12
    three = fit_selection(Selection(3), X, names)
    assert 5 in three.kept and list(three.kept) == sorted(three.kept)  # kept in spec order
    assert not {0, 1, 4} & set(three.kept)


def test_multitask_labels_mask_missing_values_and_average_the_tasks():
    X, names = _synthetic(300)
    y = np.column_stack([(X[:, 3] > 0.5), (X[:, 8] > 0.5)]).astype(np.float64)
    y[::3, 0] = np.nan  # missing labels of task 0
    y[1::3, 1] = np.nan
    sel = fit_selection(Selection(2), X, names, y)
    assert sel.kept == (3, 8) and "mean over 2 tasks" in sel.method
    no_labels = np.full((300, 2), np.nan)
    assert fit_selection(Selection(2), X, names, no_labels).method.startswith("variance (no task")


def test_k_larger_than_the_columns_left_after_filtering():
    X, names = _synthetic()
    with pytest.raises(
        FeaturizerError,
        match=rf"^select:k=8: only 7 of the 10 columns remain after dropping 2 near-constant and 1 near-duplicate "
        rf"\(\|r\| > {MAX_CORRELATION}\) columns on the 200 training molecules; use k <= 7",
    ):
        fit_selection(Selection(8), X, names)
    with pytest.raises(FeaturizerError, match="3 training labels for 200 training molecules"):
        fit_selection(Selection(2), X, names, [0, 1, 0])


def test_spec_syntax_width_and_names():
    spec = FeaturizerSpec.parse(SPEC)
    assert str(spec) == SPEC and FeaturizerSpec.parse(str(spec)) == spec
    assert spec.select == Selection(6) and spec.width == 6 and spec.raw_width == 10 + 167 + 64
    assert not spec.is_fitted
    with pytest.raises(FeaturizerError, match="known after .fit"):
        _ = spec.names
    fitted = spec.fit(TRAIN, LABELS)
    assert fitted.is_fitted and fitted.width == 6 == len(fitted.names) and fitted.shape == (6,)
    assert fitted.names == [fitted.raw_names[i] for i in fitted.select.kept]
    assert fitted.transform(TEST_A).shape == (3, 6)


def test_selection_is_fitted_on_the_training_molecules_only():
    spec = FeaturizerSpec.parse(SPEC)
    fitted = spec.fit(TRAIN, LABELS)
    assert spec.fit(TRAIN, LABELS) == fitted  # seeded: the same columns on a rerun
    full = FeaturizerSpec.parse(SPEC.rsplit("+", 1)[0]).fit(TRAIN)  # the same spec without selection
    for test in (TEST_A, TEST_B, TEST_A + TEST_B):  # whatever the test molecules, the same kept columns
        X = fitted.transform(test)
        assert np.array_equal(X, full.transform(test)[:, list(fitted.select.kept)])
    assert fitted.select.kept == spec.fit(TRAIN, LABELS).select.kept
    other = spec.fit(TRAIN[:8] + TEST_B, np.r_[LABELS[:8], [0, 0, 1, 0]])  # other training molecules
    assert other.mean != fitted.mean


def test_supervised_and_unsupervised_selection():
    spec = FeaturizerSpec.parse(SPEC)
    supervised, unsupervised = spec.fit(TRAIN, LABELS), spec.fit(TRAIN)
    assert (
        supervised.select.method.startswith("ExtraTrees classifier")
        and unsupervised.select.method == "variance"
    )
    assert supervised.select.kept != unsupervised.select.kept
    # MACCS key 161 is "N": the teacher finds the column that is the label
    assert "maccs_161" in supervised.names
    assert FeaturizerSpec.parse("physchem").fit(TRAIN, LABELS) == FeaturizerSpec.parse("physchem").fit(TRAIN)


def test_selection_round_trips_through_the_bundle_dict():
    fitted = FeaturizerSpec.parse("rdkit2d:scale=quantile+fmorgan_count:r=2,n=32+select:k=12").fit(
        TRAIN, LABELS
    )
    stored = json.loads(json.dumps(fitted.to_dict()))
    assert stored["spec"] == "rdkit2d:scale=quantile+fmorgan_count:r=2,n=32+select:k=12"
    assert stored["select"]["kept"] == list(fitted.select.kept) and stored["select"]["names"] == fitted.names
    assert stored["select"]["counts"][0] == 217 + 32 and stored["select"]["method"] == fitted.select.method
    again = featurizer_from_dict(stored)
    assert again == fitted
    assert np.array_equal(again.transform(TEST_B + ["[H+]"]), fitted.transform(TEST_B + ["[H+]"]))
    stored["select"]["names"][0] = "SomethingElse"  # a bundle from another descriptor list: refused
    with pytest.raises(FeaturizerError, match="does not match this featurizer's 249 columns.*rebuild it"):
        featurizer_from_dict(stored)
    stored["select"]["kept"] = stored["select"]["kept"][:-1]
    with pytest.raises(FeaturizerError, match="does not match"):
        featurizer_from_dict(stored)


def test_k_too_large_for_the_training_molecules():
    spec = FeaturizerSpec.parse("physchem+maccs+select:k=150")
    with pytest.raises(
        FeaturizerError, match=r"^select:k=150: only \d+ of the 177 columns remain after dropping"
    ):
        spec.fit(TRAIN)


@pytest.mark.parametrize(
    "text,match",
    [
        (
            "select:k=8+physchem",
            "select must be the last part of 'select:k=8\\+physchem'.*move it to the end",
        ),
        ("physchem+select:k=8+maccs", "select must be the last part"),
        ("physchem+select:k=4+select:k=2", "select appears 2 times in .*; keep one, at the end"),
        ("select:k=4", "has nothing to select from"),
        ("physchem+select", "select in 'physchem\\+select' needs k"),
        ("physchem+select:n=4", "select option 'n=4' in .* not understood; select takes k only"),
        ("physchem+select:k=0", "k=0 must be a positive integer"),
        ("grid:r=1,size=8+select:k=4", "'grid' is an image: select:k=4 cannot select its pixels"),
        ("physchem+ecfp+select:k=4", "unknown feature part 'ecfp'; expected one of physchem"),
    ],
)
def test_bad_select_specs(text, match):
    with pytest.raises(FeaturizerError, match=match):
        FeaturizerSpec.parse(text)


def test_the_workflow_fits_the_selection_on_the_training_split_only():
    """Changing the test molecules (and their labels) changes neither the kept columns nor the scaling."""
    from molcloak.pipeline.data import Dataset
    from molcloak.pipeline.tasks import TaskSpec
    from molcloak.pipeline.workflow import featurized

    def dataset(test: list[str], test_labels: list[int]) -> Dataset:
        smiles = TRAIN + test
        split = np.array(["train"] * len(TRAIN) + ["test"] * len(test))
        y = np.r_[LABELS, test_labels].astype(np.int64)
        task = TaskSpec("n", "binary", "has_n", ("0", "1"))
        return Dataset(smiles, y, task, np.arange(1, len(smiles) + 1), split)

    a, Xa, sa = featurized(dataset(TEST_A, [1, 0, 0]), SPEC, "official")
    b, Xb, sb = featurized(dataset(TEST_B, [0, 0, 1, 0]), SPEC, "official")
    assert np.array_equal(sa.train, sb.train) and a == b and a.select.kept == b.select.kept
    assert np.array_equal(Xa[sa.train], Xb[sb.train]) and Xa.shape[1] == 6
