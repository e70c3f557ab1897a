"""Audit metrics (no FHE): each equals scikit-learn's or SciPy's on the same rows, per task and for missing
labels; bootstrap intervals, subgroups, claims and property bins."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn import metrics as skm

from molcloak.evaluation.audit import metrics as am
from molcloak.pipeline.tasks import TaskSpec


def _random_case(rng, k):
    n = int(rng.integers(8, 60))
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present
    logits = np.round(
        rng.normal(size=(n, k)), int(rng.integers(0, 3))
    )  # rounding makes ties, as quantized outputs do
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


@pytest.mark.parametrize("k", [2, 3])
def test_classification_metrics_equal_sklearn(k):
    rng = np.random.default_rng(k)
    warnings.simplefilter("ignore")  # sklearn warns on zero-division cases it sets to 0, as we do
    for _ in range(40):
        y, p = _random_case(rng, k)
        yhat = p.argmax(1)
        got = am.Sample("binary" if k == 2 else "multiclass", y, p).point()
        if k == 2:
            ref = {
                "roc_auc": skm.roc_auc_score(y, p[:, 1]),
                "pr_auc": skm.average_precision_score(y, p[:, 1]),
                "f1": skm.f1_score(y, yhat),
                "brier": skm.brier_score_loss(y, p[:, 1]),
            }
        else:
            ref = {
                "roc_auc": skm.roc_auc_score(y, p, multi_class="ovr"),
                "pr_auc": skm.average_precision_score(np.eye(k)[y], p, average="macro"),
                "f1": skm.f1_score(y, yhat, average="macro"),
                "brier": np.mean(((p - np.eye(k)[y]) ** 2).sum(1)),
            }
        ref.update(
            accuracy=skm.accuracy_score(y, yhat),
            balanced_accuracy=skm.balanced_accuracy_score(y, yhat),
            mcc=skm.matthews_corrcoef(y, yhat),
        )
        assert got == pytest.approx(ref, abs=1e-12)


def test_regression_metrics_equal_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    for _ in range(40):
        y = rng.normal(size=int(rng.integers(5, 80)))
        v = np.round(y + rng.normal(size=len(y)), 1)  # ties in the predictions
        got = am.Sample("regression", y, v).point()
        assert got == pytest.approx(
            {
                "rmse": np.sqrt(skm.mean_squared_error(y, v)),
                "mae": skm.mean_absolute_error(y, v),
                "r2": skm.r2_score(y, v),
                "spearman": spearmanr(y, v).statistic,
            },
            abs=1e-12,
        )


def _masked(rng, y):
    """y with about a third of the labels missing (NaN), each task keeping at least 4 of them."""
    y = y.astype(np.float64)
    missing = rng.uniform(size=y.shape) < 0.35
    missing[:4] = False
    return np.where(missing, np.nan, y)


@pytest.mark.parametrize("kind", ["multilabel", "multitarget"])
def test_multitask_metrics_equal_sklearn_per_task_and_their_mean(kind):
    rng = np.random.default_rng(7)
    warnings.simplefilter("ignore")
    tasks = ["t1", "t2", "t3"]
    for _ in range(15):
        n = int(rng.integers(12, 50))
        if kind == "multilabel":
            y = rng.integers(0, 2, (n, 3))
            y[:2] = [[0, 0, 0], [1, 1, 1]]  # both classes in every task
            p = np.round(rng.uniform(size=(n, 3)), 1)
        else:
            y = rng.normal(size=(n, 3))
            p = np.round(y + rng.normal(size=(n, 3)), 1)
        y = _masked(rng, y)
        got = am.make_sample(TaskSpec("m", kind, "t1,t2,t3", tasks=tuple(tasks)), y, p).point()
        per_task = {}
        for j, t in enumerate(tasks):
            have = ~np.isnan(y[:, j])
            yt, pt = y[have, j], p[have, j]
            if kind == "multilabel":
                yt = yt.astype(int)
                per_task[t] = {
                    "roc_auc": skm.roc_auc_score(yt, pt),
                    "pr_auc": skm.average_precision_score(yt, pt),
                    "accuracy": skm.accuracy_score(yt, pt > 0.5),
                    "f1": skm.f1_score(yt, pt > 0.5),
                    "mcc": skm.matthews_corrcoef(yt, pt > 0.5),
                    "brier": skm.brier_score_loss(yt, pt),
                }
            else:
                per_task[t] = {
                    "rmse": np.sqrt(skm.mean_squared_error(yt, pt)),
                    "mae": skm.mean_absolute_error(yt, pt),
                    "r2": skm.r2_score(yt, pt),
                    "spearman": spearmanr(yt, pt).statistic,
                }
        for metric in per_task["t1"]:
            for t in tasks:
                assert got[f"{metric}[{t}]"] == pytest.approx(per_task[t][metric], abs=1e-12)
            assert got[metric] == pytest.approx(np.mean([per_task[t][metric] for t in tasks]), abs=1e-12)


def test_multitask_bootstrap_masks_missing_labels_per_replicate():
    rng = np.random.default_rng(1)
    y = _masked(rng, rng.normal(size=(30, 2)))
    p = y + rng.normal(size=y.shape)
    p = np.where(np.isnan(p), 0.0, p)
    sample = am.make_sample(TaskSpec("m", "multitarget", "a,b", tasks=("a", "b")), y, p)
    table = am.with_ci(sample, 200, 3)
    idx = np.random.default_rng(3).integers(0, 30, (200, 30))  # the same replicates, one by one with sklearn
    rmse_b = []
    for i in idx:
        have = ~np.isnan(y[i, 1])
        rmse_b.append(np.sqrt(skm.mean_squared_error(y[i, 1][have], p[i, 1][have])))
    assert (table["rmse[b]"]["low"], table["rmse[b]"]["high"]) == pytest.approx(
        tuple(np.percentile(rmse_b, [2.5, 97.5]))
    )
    assert table["rmse"]["low"] <= table["rmse"]["value"] <= table["rmse"]["high"]


def test_group_column_of_many_numbers_is_cut_into_quartiles():
    from molcloak.evaluation.audit.testset import group_labels

    labels, order = group_labels([str(v) for v in range(1, 21)])
    assert len(order) == 4 and [list(labels).count(o) for o in order] == [5, 5, 5, 5]
    labels, order = group_labels(["a", "b", "a"])
    assert order is None and list(labels) == ["a", "b", "a"]


def test_undefined_metrics_are_none():
    got = am.Sample("binary", np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])).point()
    assert got["roc_auc"] is None and got["pr_auc"] == 1.0 and got["accuracy"] == pytest.approx(2 / 3)


def test_bootstrap_interval_equals_sklearn_on_the_same_resamples():
    rng = np.random.default_rng(3)
    y, p = _random_case(rng, 2)
    n_boot, seed = 300, 11
    table = am.with_ci(am.Sample("binary", y, p), n_boot, seed)
    idx = np.random.default_rng(seed).integers(0, len(y), (n_boot, len(y)))  # the same replicates
    aucs = [skm.roc_auc_score(y[i], p[i, 1]) for i in idx if len(set(y[i])) == 2]
    accs = [skm.accuracy_score(y[i], p[i].argmax(1)) for i in idx]
    assert table["roc_auc"]["low"] == pytest.approx(np.percentile(aucs, 2.5))
    assert table["roc_auc"]["high"] == pytest.approx(np.percentile(aucs, 97.5))
    assert table["roc_auc"]["n_boot"] == len(aucs)
    assert (table["accuracy"]["low"], table["accuracy"]["high"]) == pytest.approx(
        tuple(np.percentile(accs, [2.5, 97.5]))
    )
    assert table["roc_auc"]["low"] <= table["roc_auc"]["value"] <= table["roc_auc"]["high"]
    assert am.with_ci(am.Sample("binary", y, p), n_boot, seed) == table  # seeded


def test_subgroup_that_differs_is_flagged():
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    good = np.where(y == 1, 0.9, 0.1)
    noisy = rng.uniform(size=n)
    group = np.array(["bad"] * 60 + ["good"] * 134 + ["tiny"] * 6, dtype=object)
    s = np.where(group == "bad", noisy, good)
    table = am.subgroup_table(am.Sample("binary", y, np.c_[1 - s, s]), group, 300, 0)
    rows = {r["group"]: r for r in table}
    assert rows["bad"]["significant"] and rows["bad"]["difference"]["roc_auc"]["high"] < 0
    assert not rows["good"]["significant"] or rows["good"]["difference"]["roc_auc"]["low"] > 0
    assert rows["tiny"]["too_small"] and not rows["tiny"]["significant"]
    assert sum(r["n"] for r in table) == n


def test_claims_check_flags_claims_outside_the_interval():
    audited = {
        "roc_auc": {"value": 0.80, "low": 0.75, "high": 0.85},
        "rmse": {"value": 1.0, "low": 0.9, "high": 1.1},
    }
    claims = am.claims_check(
        {"fhe_simulate": {"roc_auc": 0.95, "accuracy": 0.9}, "float": {"roc_auc": 0.82, "rmse": 0.5}}, audited
    )
    by = {(c["source"], c["metric"]): c for c in claims}
    assert set(by) == {
        ("fhe_simulate", "roc_auc"),
        ("fhe_simulate", "accuracy"),
        ("float", "roc_auc"),
        ("float", "rmse"),
    }
    # every stated metric is listed: one the audit did not compute is marked unchecked, never dropped
    assert not by["fhe_simulate", "accuracy"]["checked"] and not by["fhe_simulate", "accuracy"]["flagged"]
    assert by["fhe_simulate", "accuracy"]["verdict"].startswith("not checked")
    assert (
        by["fhe_simulate", "roc_auc"]["flagged"]
        and by["fhe_simulate", "roc_auc"]["verdict"] == "claim better than audited"
    )
    assert not by["float", "roc_auc"]["flagged"]
    assert by["float", "rmse"]["flagged"] and by["float", "rmse"]["verdict"] == "claim better than audited"


def test_property_bins():
    bins = am.property_bins(["CCO", "c1ccccc1O", "Cc1ccccc1O", "CCCCCCCCCCCCCCCCCCCCCCCC"])
    labels, order = bins["molecular weight"]
    assert list(labels) == ["MW < 200", "MW < 200", "MW < 200", "MW 300-400"] and order[0] == "MW < 200"
    assert list(bins["logP"][0])[-1] == "logP >= 5"
    assert list(bins["scaffold frequency"][0]) == [
        "acyclic",
        "scaffold shared by 2-4",
        "scaffold shared by 2-4",
        "acyclic",
    ]
