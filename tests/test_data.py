from collections import Counter

import numpy as np
import pytest

from molcloak.pipeline.data import load_bundled, load_csv
from molcloak.pipeline.errors import ConfigError, DataError, MolcloakError
from molcloak.pipeline.splits import RARE_POOL, fold_groups_for, inner_folds, murcko_scaffold, split_dataset


def test_sol_low_is_the_documented_benchmark():
    ds = load_bundled("sol-low")
    assert len(ds) == 1282
    assert ds.task.kind == "binary" and ds.task.labels == ("not low", "low")
    assert int(ds.y.sum()) == 519  # "(A) low"
    sp = split_dataset(ds)
    assert sp.method == "official"
    assert len(sp.test) == 257 and len(sp.train) + len(sp.valid) == 1025
    assert not set(sp.test) & set(sp.train) and not set(sp.valid) & set(sp.train)


@pytest.mark.parametrize(
    "name,kind,n_out",
    [("sol-class", "multiclass", 3), ("sol-logs", "regression", 1), ("freesolv", "regression", 1)],
)
def test_other_bundled_tasks(name, kind, n_out):
    ds = load_bundled(name)
    assert ds.task.kind == kind and ds.task.n_outputs == n_out
    assert len(ds) > 600 and np.all(np.isfinite(ds.y))


def test_unknown_bundled_dataset():
    with pytest.raises(DataError, match="unknown dataset 'tox21'; expected one of sol-low"):
        load_bundled("tox21")


BAD_CSV = {
    "invalid SMILES": (
        "smiles,y\nCCO,1\nC1CC,0\nCCN,0\n",
        "y",
        "classification",
        r"row 2: SMILES 'C1CC' could not be parsed by RDKit; fix it or pass --skip-invalid",
    ),
    "empty target": ("smiles,y\nCCO,1\nCCN,\nCCC,0\n", "y", "classification", r"row 2: target 'y' is empty"),
    "non-numeric regression target": (
        "smiles,y\nCCO,1.5\nCCN,high\nCCC,0.2\n",
        "y",
        "regression",
        r"row 2: target 'high' in column 'y' is not a number",
    ),
    "missing column": (
        "smiles,y\nCCO,1\n",
        "logS",
        "classification",
        r"column 'logS' not found; available columns: 'smiles', 'y'",
    ),
    "duplicate molecule": (
        "smiles,y\nCCO,1\nCCN,0\nOCC,0\n",
        "y",
        "classification",  # OCC is ethanol again
        r"row 3: SMILES 'OCC' is the same molecule as row 1",
    ),
    "several problems": (
        "smiles,y\nxx,1\nCCN,\nCCO,1\nyy,0\nCCC,0\n",
        "y",
        "classification",
        r"row 1: .*\(and 2 more invalid rows: 2, 4\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CSV))
def test_bad_csv_names_row_value_and_fix(csv_file, case):
    text, target, task, message = BAD_CSV[case]
    with pytest.raises(DataError, match=message):
        load_csv(csv_file(text), "smiles", target, task=task)


def test_skip_invalid_keeps_report_of_dropped_rows(csv_file):
    path = csv_file("smiles,y\nxx,1\nCCN,0\nCCO,1\nCCC,0\nOCC,1\n")
    ds = load_csv(path, "smiles", "y", skip_invalid=True)
    assert len(ds) == 3 and list(ds.rows) == [2, 3, 4]
    assert [p.row for p in ds.problems] == [1, 5]
    assert "could not be parsed" in ds.problems[0].reason
    # the report of skipped rows does not advise passing the flag that skipped them
    assert [p.skipped() for p in ds.problems] == [
        "row 1: SMILES 'xx' could not be parsed by RDKit; fix it",
        "row 5: SMILES 'OCC' is the same molecule as row 3; remove the duplicate",
    ]


def test_threshold_binarizes(csv_file):
    path = csv_file("smiles,logS\nCCO,0.5\nc1ccccc1,-2\nCCCCCCCC,-5\n")
    ds = load_csv(path, "smiles", "logS", threshold=-1.0)
    assert ds.task.kind == "binary" and list(ds.y) == [1, 0, 0]


def test_missing_file_and_single_class(csv_file, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_csv(tmp_path / "nope.csv", "smiles", "y")
    with pytest.raises(DataError, match="only one class"):
        load_csv(csv_file("smiles,y\nCCO,a\nCCN,a\n"), "smiles", "y")


def test_errors_inherit_builtins():
    assert issubclass(DataError, MolcloakError) and issubclass(DataError, ValueError)


def test_random_split_is_seeded():
    ds = load_bundled("freesolv")
    a, b, c = (split_dataset(ds, "random", seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.test, b.test) and not np.array_equal(a.test, c.test)
    with pytest.raises(DataError, match="has no official split"):
        split_dataset(ds, "official")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"test_fraction": 0.0}, "test fraction 0.0 must be strictly between 0 and 1"),
        (
            {"test_fraction": 1},
            "test fraction 1 must be strictly between 0 and 1 .*; use e.g. --test-fraction 0.2",
        ),
        ({"test_fraction": float("nan")}, "test fraction nan must be strictly between 0 and 1"),
        ({"valid_fraction": 0}, "validation fraction 0 must be strictly between 0 and 1 .*; use e.g. 0.1"),
        ({"valid_fraction": 1.0}, "validation fraction 1.0 must be strictly between 0 and 1"),
    ],
)
def test_split_fractions_of_0_or_1_are_refused(csv_file, kwargs, message):
    ds = load_csv(csv_file("smiles,y\nCCO,1\nCCN,0\nCCC,1\nCCCC,0\nCCCCC,1\n"), "smiles", "y")
    for method in ("random", "scaffold"):
        with pytest.raises(DataError, match=message):
            split_dataset(ds, method, **kwargs)
    sp = split_dataset(ds, "random", test_fraction=0.4, valid_fraction=0.34)
    assert (len(sp.train), len(sp.valid), len(sp.test)) == (2, 1, 2)


def test_scaffold_split_keeps_scaffolds_on_one_side():
    ds = load_bundled("freesolv")
    sp = split_dataset(ds, "scaffold", seed=0)
    train = {murcko_scaffold(ds.smiles[i]) for i in np.concatenate([sp.train, sp.valid])}
    test = {murcko_scaffold(ds.smiles[i]) for i in sp.test}
    assert not train & test
    assert abs(len(sp.test) / len(ds) - 0.2) < 0.05


def test_scaffold_validation_part_keeps_scaffolds_apart_from_train_and_the_test_is_unchanged():
    """`fit` chooses on whole scaffold groups of the training molecules; the test part stays the same."""
    ds = load_bundled("freesolv")
    plain = split_dataset(ds, "scaffold", valid_fraction=0.2, seed=1)
    sp = split_dataset(ds, "scaffold", valid_fraction=0.2, seed=1, valid_method="scaffold")
    assert list(sp.test) == list(plain.test)
    assert sorted(np.concatenate([sp.train, sp.valid])) == sorted(np.concatenate([plain.train, plain.valid]))
    train = {murcko_scaffold(ds.smiles[i]) for i in sp.train}
    valid = {murcko_scaffold(ds.smiles[i]) for i in sp.valid}
    # whole groups: a big group that does not fit in train goes to the validation part entirely
    assert not train & valid and 0.15 < len(sp.valid) / (len(sp.train) + len(sp.valid)) < 0.35
    with pytest.raises(DataError, match="unknown validation split 'kfold'"):
        split_dataset(ds, "scaffold", valid_method="kfold")


@pytest.mark.parametrize("method", ["scaffold", "random"])
def test_inner_folds_partition_the_rows_and_keep_scaffolds_together(method):
    """fit's cross-validation: every training row is validated on exactly once; scaffold folds hold whole
    scaffold groups, of balanced sizes; the same seed gives the same folds."""
    ds = load_bundled("freesolv")
    rows = split_dataset(ds, "scaffold", seed=0).train
    folds = inner_folds(ds, rows, 4, method, seed=3)
    assert len(folds) == 4
    valid = np.concatenate([f.valid for f in folds])
    assert sorted(valid) == sorted(rows) and len(set(valid)) == len(rows)
    sizes = [len(f.valid) for f in folds]
    groups = Counter(murcko_scaffold(ds.smiles[i]) for i in rows) if method == "scaffold" else {0: 1}
    assert max(sizes) - min(sizes) <= max(groups.values())  # as balanced as whole groups allow
    for f in folds:
        assert sorted(np.concatenate([f.train, f.valid])) == sorted(rows) and len(f.test) == 0
        if method == "scaffold":
            inside = {murcko_scaffold(ds.smiles[i]) for i in f.valid}
            assert not inside & {murcko_scaffold(ds.smiles[i]) for i in f.train}
    again = inner_folds(ds, rows, 4, method, seed=3)
    assert all(list(a.valid) == list(b.valid) for a, b in zip(folds, again))
    with pytest.raises(DataError, match="1 inner folds for"):
        inner_folds(ds, rows, 1, method, seed=3)


def test_rare_inner_folds_validate_on_the_smallest_scaffold_groups():
    """`fold_groups="rare"`: the folds validate on the smallest scaffold groups only (whole groups, each row at
    most once), as a scaffold test split holds the data's smallest groups; the larger series always train, and so
    does a group too big for one rare fold even when it does not fit beside the larger ones (sol-low's training
    part: 302 acyclic molecules and 293 benzenes of 923, as on tox21; it made a rare fold by itself before).
    Balanced folds are unchanged by the option, and a bad value is one clear error."""
    ds = load_bundled("sol-low")
    rows = split_dataset(ds, "scaffold", seed=0).train
    size = Counter(murcko_scaffold(ds.smiles[i]) for i in rows)
    folds = inner_folds(ds, rows, 4, "scaffold", seed=3, groups="rare")
    valid = np.concatenate([f.valid for f in folds])
    giants = {g for g, n in size.items() if n > RARE_POOL * len(rows) / 4}
    assert giants == {"", "c1ccccc1"}  # the data this test is about: two series, each over a rare fold's size
    assert len(set(valid)) == len(valid) and 0.3 * len(rows) <= len(valid) < len(rows)
    group_of = lambda rows: [size[murcko_scaffold(ds.smiles[i])] for i in rows]  # noqa: E731
    trains = sorted(set(rows) - set(valid))
    assert np.median(group_of(valid)) < np.median(group_of(trains))
    assert max(group_of(valid)) <= RARE_POOL * len(rows) / 4
    assert {i for i in rows if murcko_scaffold(ds.smiles[i]) in giants} <= set(trains)
    assert {i for i in rows if size[murcko_scaffold(ds.smiles[i])] == 1} <= set(valid)  # every singleton
    for f in folds:
        assert sorted(np.concatenate([f.train, f.valid])) == sorted(rows) and len(f.valid) > 0
        inside = {murcko_scaffold(ds.smiles[i]) for i in f.valid}
        assert not inside & {murcko_scaffold(ds.smiles[i]) for i in f.train}
    default, balanced = (
        inner_folds(ds, rows, 4, "scaffold", 3),
        inner_folds(ds, rows, 4, "scaffold", 3, "balanced"),
    )
    assert all(list(a.valid) == list(b.valid) for a, b in zip(default, balanced))
    with pytest.raises(ConfigError, match="inner fold groups tail: choose auto, balanced or rare"):
        inner_folds(ds, rows, 4, "scaffold", seed=3, groups="tail")


def test_auto_fold_groups_are_rare_when_one_scaffold_group_would_fill_half_a_balanced_fold():
    """`fold_groups="auto"` (fit's default): rare folds when the largest scaffold group holds more than half of a
    balanced fold (it would make that fold nearly by itself: a series the scaffold test never holds), balanced
    ones otherwise; the folds are then exactly those of the kind chosen. Tabular rows: balanced."""
    ds = load_bundled("sol-low")
    rows = split_dataset(ds, "scaffold", seed=0).train
    scaffold = np.array([murcko_scaffold(ds.smiles[i]) for i in rows])
    balanced = inner_folds(ds, rows, 4, "scaffold", 3, "balanced")
    assert {murcko_scaffold(ds.smiles[i]) for i in balanced[0].valid} == {
        ""
    }  # what auto avoids: 302 acyclics
    no_series = rows[(scaffold != "") & (scaffold != "c1ccccc1")]  # largest group left: 57 biphenyls of 328
    for part, k, kind in [(rows, 4, "rare"), (no_series, 2, "balanced"), (no_series, 4, "rare")]:
        largest = max(Counter(murcko_scaffold(ds.smiles[i]) for i in part).values())
        assert (largest > len(part) / k / 2) == (kind == "rare")
        assert fold_groups_for(ds, part, k) == kind and fold_groups_for(ds, part, k, "balanced") == "balanced"
        auto, same = (
            inner_folds(ds, part, k, "scaffold", 3, "auto"),
            inner_folds(ds, part, k, "scaffold", 3, kind),
        )
        assert all(list(a.valid) == list(b.valid) for a, b in zip(auto, same))
    assert fold_groups_for(load_bundled("breast-cancer"), np.arange(100), 4) == "balanced"
