"""Private test-set audits: metrics against sklearn/SciPy, resumable scoring in both modes, privacy of the wire."""

from __future__ import annotations

import base64
import json
import shutil
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import ServerProcess
from scipy.stats import spearmanr
from sklearn import metrics as skm
from typer.testing import CliRunner

from molcloak.evaluation.audit import metrics as am
from molcloak.evaluation.audit.engine import AuditConfig, AuditState, read_test_set, run_audit
from molcloak.evaluation.audit.report import write_reports
from molcloak.pipeline.bundle import client_fingerprint
from molcloak.pipeline.cli import app
from molcloak.pipeline.errors import AuditError, DataError, RemoteError
from molcloak.pipeline.metrics import to_predictions
from molcloak.pipeline.predict import LocalBackend
from molcloak.pipeline.serving.http_client import RemoteModel
from molcloak.pipeline.tasks import TaskSpec

BINARY = TaskSpec("t", "binary", "y", labels=("not low", "low"))
TOKEN = "audit-token"


# ---------------------------------------------------------------- metrics (no FHE)


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


# ---------------------------------------------------------------- test set and checkpoint (no FHE)


def test_invalid_rows_are_reported_with_their_row(csv_file, tmp_path):
    path = csv_file("smiles,y,site\nCCO,low,a\nC1CC,low,a\nc1ccccc1,maybe,b\nCCN,1,b\nCCC,,a\n")
    config = AuditConfig(path, tmp_path / "out", "y", group_col="site")
    with pytest.raises(
        DataError,
        match=r"row 2: SMILES 'C1CC' could not be parsed.*--skip-invalid.*and 2 more invalid rows: 3, 5",
    ):
        read_test_set(config, BINARY)
    test = read_test_set(
        AuditConfig(path, tmp_path / "out", "y", group_col="site", skip_invalid=True), BINARY
    )
    assert (
        test.rows == [1, 4] and test.y.tolist() == [1, 1] and test.groups == {"site": ["a", "b"]}
    )  # '1' is the class id of 'low'
    assert [(p.row, p.reason.split(";")[0]) for p in test.invalid] == [
        (2, "SMILES 'C1CC' could not be parsed by RDKit"),
        (3, "label 'maybe' is not one of ['not low', 'low']"),
        (5, "target 'y' is empty"),
    ]
    with pytest.raises(
        DataError, match=r"--group-col column 'nope' not found; available columns: 'smiles', 'y', 'site'"
    ):
        read_test_set(AuditConfig(path, tmp_path / "out", "y", group_col="nope"), BINARY)


def test_checkpoint_refuses_other_inputs_and_survives_a_torn_line(tmp_path):
    identity = {
        "test_set_sha256": "aa",
        "smiles_col": "smiles",
        "target_col": "y",
        "task": "binary",
        "skip_invalid": False,
        "model": {"name": "m", "client_fingerprint": "f1"},
    }
    state = AuditState(tmp_path, identity)
    state.append([1, 2], [np.array([[0.5, -0.5]]), np.array([[1.0, 2.0]])])
    with state.progress_path.open("a") as fh:
        fh.write('{"row": 3, "raw": [0.1')  # killed while writing
    again = AuditState(tmp_path, identity)
    assert again.done == {1: [0.5, -0.5], 2: [1.0, 2.0]}
    assert state.progress_path.read_text().endswith("]}\n")
    other = {**identity, "test_set_sha256": "bb", "model": {"name": "m", "client_fingerprint": "f2"}}
    with pytest.raises(
        AuditError, match=r"test file content \(was 'aa', now 'bb'\); model .*--restart to start over"
    ):
        AuditState(tmp_path, other)
    assert AuditState(tmp_path, other, restart=True).done == {}
    (tmp_path / "progress.jsonl").write_text('{"row": 1, "raw": [1]}\nnot json\n{"row": 2, "raw": [1]}\n')
    with pytest.raises(AuditError, match="line 2 is damaged"):
        AuditState(tmp_path, other)


def test_checkpoint_of_another_format_or_damaged_is_refused_naming_restart(tmp_path):
    """The audit directory is the screen's `RunState`: its audit.json is checked before any row is reused."""
    identity = {"test_set_sha256": "aa", "model": {"name": "m"}}
    state = AuditState(tmp_path, identity)
    state.append([4], [np.array([0.25])])
    meta = json.loads((tmp_path / "audit.json").read_text())
    assert meta == {"format": 1, "identity": identity, "sessions": []}
    (tmp_path / "audit.json").write_text(json.dumps({**meta, "format": 2}))
    with pytest.raises(
        AuditError,
        match=r"audit.json is a checkpoint of format 2, this molcloak reads format 1; pass --restart",
    ):
        AuditState(tmp_path, identity)
    (tmp_path / "audit.json").write_text('{"format": 1, "ident')
    with pytest.raises(AuditError, match=r"audit.json is damaged \(.*\); pass --restart to start over"):
        AuditState(tmp_path, identity)
    fresh = AuditState(tmp_path, identity, restart=True)
    assert fresh.done == {} and not fresh.progress_path.exists() and not fresh.resumed


# ---------------------------------------------------------------- local audits with real FHE


def _test_csv(tmp_path, ckpt, n, name="test.csv", extra_rows=""):
    """The first n test molecules of a tiny fixture, a group column, plus optional bad rows."""
    task = ckpt.task
    lines = ["compound,smiles,truth,site"]
    for i, (smi, y) in enumerate(zip(ckpt.smiles_test[:n], ckpt.y_test[:n])):
        target = task.labels[int(y)] if task.is_classification else repr(float(y))
        lines.append(f"c{i},{smi},{target},{'north' if i % 3 else 'south'}")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n" + extra_rows)
    return path


def _simulated(compiled, ckpt, smiles):
    raw = compiled.q_module.forward(ckpt.featurizer.transform(smiles), fhe="simulate")
    return raw, to_predictions(ckpt.task, raw, ckpt.scaler)


class Counting:
    """Wraps a backend: counts the rows it scores; raises `fail` on batch number `fail_at`."""

    def __init__(self, inner, fail_at=None, fail=KeyboardInterrupt):
        self.inner, self.fail_at, self.fail, self.batches, self.rows = inner, fail_at, fail, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run_rows(self, X):
        self.batches += 1
        if self.batches == self.fail_at:
            raise self.fail()
        self.rows += len(X)
        return self.inner.run_rows(X)


def test_local_audit_resumes_after_ctrl_c_and_scores_every_row_once(tiny_binary, tmp_path):
    ckpt, compiled, bundle = tiny_binary
    path = _test_csv(tmp_path, ckpt, 14, extra_rows="x,C1CC,low,north\n")
    config = AuditConfig(
        path, tmp_path / "audit", "truth", group_col="site", bootstrap=200, batch_size=4, skip_invalid=True
    )
    first = Counting(LocalBackend(bundle, tmp_path / "keys"), fail_at=3)
    with pytest.raises(
        KeyboardInterrupt, match="8 of 14 rows are scored and saved .* rerun the same command to resume"
    ):
        run_audit(config, first)
    assert first.rows == 8
    second = Counting(LocalBackend(bundle, tmp_path / "keys"))
    report = run_audit(config, second)
    assert second.rows == 14 - 8  # nothing scored twice
    lines = (tmp_path / "audit" / "progress.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["row"] for x in lines) == list(range(1, 15))
    assert [r["row"] for r in report["rows"]] == list(range(1, 15))
    assert report["invalid_rows"] == [
        {
            "row": 15,
            "value": "C1CC",
            "reason": "SMILES 'C1CC' could not be parsed by RDKit; fix it or pass --skip-invalid",
        }
    ]
    assert report["test_set"]["rows"] == report["test_set"]["scored"] + report["test_set"]["invalid"] == 15
    raw, probs = _simulated(compiled, ckpt, ckpt.smiles_test[:14])
    assert [r["raw"] for r in report["rows"]] == raw.tolist()  # FHE execution equals the simulation
    expected = am.with_ci(am.Sample("binary", ckpt.y_test[:14], probs), 200, 0)
    assert report["metrics"] == expected
    assert set(report["subgroups"]) == {"column site", "molecular weight", "logP", "scaffold frequency"}
    assert {r["group"] for r in report["subgroups"]["column site"]} == {"north", "south"}
    assert [c["source"] for c in report["claims"]][:2] == ["fhe_simulate", "fhe_simulate"]
    assert np.sum(report["confusion_matrix"]["counts"]) == 14 and len(report["timing"]["sessions"]) == 2
    # the resume check's model identity: the client fingerprint the server also reports (sha256 of client.zip)
    assert (
        report["model"]["client_fingerprint"] == client_fingerprint(bundle)
        and report["model"]["source"] == "bundle"
    )
    files = write_reports(report, tmp_path / "audit")
    for key in ("json", "markdown", "html", "roc_pr", "calibration", "subgroups"):
        assert Path(files[key]).stat().st_size > 500
    md = (tmp_path / "audit" / "report.md").read_text()
    assert "| roc_auc |" in md and "![roc_pr](plots/roc_pr.png)" in md and "| 15 | C1CC |" in md
    assert "data:image/png;base64," in (tmp_path / "audit" / "report.html").read_text()

    path.write_text(path.read_text().replace("north", "west", 1))  # the file changed: refuse to mix
    with pytest.raises(AuditError, match="test file content"):
        run_audit(config, LocalBackend(bundle, tmp_path / "keys"))


def test_cli_audit_regression_json_and_errors(tiny_regression, tmp_path):
    ckpt, compiled, bundle = tiny_regression
    path = _test_csv(tmp_path, ckpt, 10)
    runner = CliRunner()
    args = [
        "audit",
        "--bundle",
        bundle,
        "--test-set",
        path,
        "--target-col",
        "truth",
        "--out",
        tmp_path / "out",
        "--key-dir",
        tmp_path / "keys",
        "--bootstrap",
        "100",
        "--batch-size",
        "3",
    ]
    result = runner.invoke(app, [str(a) for a in args + ["--json"]])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    _, values = _simulated(compiled, ckpt, ckpt.smiles_test[:10])
    assert summary["metrics"] == am.with_ci(am.Sample("regression", ckpt.y_test[:10], values), 100, 0)
    assert "rows" not in summary and summary["files"]["scatter"].endswith("scatter.png")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["prediction"] for r in report["rows"]] == pytest.approx(values.tolist())
    result = runner.invoke(
        app, [str(a) for a in args]
    )  # rerun: nothing left to score, same numbers, human output
    assert result.exit_code == 0 and "rmse (logS)" in result.output and "claims check" in result.output
    assert report["units"] == {"rmse": "logS", "mae": "logS"}  # regression metrics in the target's units
    result = runner.invoke(app, [str(a) for a in args[:-4] + ["--task", "classification"]])
    assert (
        result.exit_code == 2 and "does not match model 'tiny-sol-logs', a regression model" in result.output
    )
    result = runner.invoke(
        app, [str(a) for a in args[:5] + ["--target-col", "compound", "--out", tmp_path / "out"]]
    )
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["audit", "--help"])
    assert result.exit_code == 0 and "--group-col" in result.output and "resume" in result.output


# ---------------------------------------------------------------- through a real server process


class Recorder(httpx.BaseTransport):
    """Records every request the audit sends; can kill the server when the n-th /predict goes out."""

    def __init__(self, kill=None, kill_at=None):
        self.inner, self.sent, self.predicts, self.kill, self.kill_at = (
            httpx.HTTPTransport(),
            [],
            0,
            kill,
            kill_at,
        )

    def handle_request(self, request):
        body = request.read()
        self.sent.append((request.method, request.url.path, dict(request.headers), body))
        if request.url.path == "/predict":
            self.predicts += 1
            if self.predicts == self.kill_at:
                self.kill()
        return self.inner.handle_request(request)

    def ciphertexts(self) -> int:
        return sum(len(json.loads(b)["ciphertexts"]) for m, p, _, b in self.sent if p == "/predict")


@pytest.fixture(scope="module")
def served(tiny_binary, tiny_regression, tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-served")
    (root / "bundles").mkdir()
    shutil.copytree(tiny_binary[2], root / "bundles" / "binary")
    shutil.copytree(tiny_regression[2], root / "bundles" / "regression")
    (root / "token").write_text(TOKEN)
    holder = {"server": ServerProcess(root / "bundles", root / "state", root / "token"), "root": root}
    yield holder
    holder["server"].stop()


def _remote(served, model, keys, transport):
    return RemoteModel(served["server"].url, model, served["root"] / keys, TOKEN, transport=transport)


@pytest.mark.slow
def test_server_audit_survives_a_server_crash_and_restart(served, tiny_binary, tmp_path, monkeypatch):
    import molcloak.pipeline.serving.http_client as remote_module

    monkeypatch.setattr(remote_module, "RETRIES", 2)
    ckpt, compiled, _ = tiny_binary
    n = 12
    path = _test_csv(tmp_path, ckpt, n)
    config = AuditConfig(path, tmp_path / "audit", "truth", group_col="site", bootstrap=200, batch_size=3)
    server = served["server"]
    first = Recorder(kill=server.kill, kill_at=3)  # the server crashes while the third batch is on its way
    with pytest.raises(
        RemoteError, match=f"cannot reach the FHE server.*6 of {n} rows are scored and saved.*resume"
    ):
        run_audit(config, _remote(served, "tiny-sol-low", "keys", first))
    assert server.proc.poll() is not None  # the server is really gone
    served["server"] = ServerProcess(
        served["root"] / "bundles", served["root"] / "state", served["root"] / "token", port=server.port
    )
    second = Recorder()
    report = run_audit(config, _remote(served, "tiny-sol-low", "keys", second))
    assert second.ciphertexts() == n - 6  # the lost batch is sent again, the 6 scored rows are not
    assert not any(
        p == "/keys" for _, p, _, _ in second.sent
    )  # the restarted server kept the evaluation keys
    rows = [json.loads(x)["row"] for x in (tmp_path / "audit" / "progress.jsonl").read_text().splitlines()]
    assert sorted(rows) == list(range(1, n + 1)) == [r["row"] for r in report["rows"]]
    raw, probs = _simulated(compiled, ckpt, ckpt.smiles_test[:n])
    assert [r["raw"] for r in report["rows"]] == raw.tolist()
    assert report["metrics"] == am.with_ci(am.Sample("binary", ckpt.y_test[:n], probs), 200, 0)
    assert report["model"]["source"] == "server" and [
        s["rows_scored"] for s in report["timing"]["sessions"]
    ] == [6, n - 6]
    assert report["model"]["client_fingerprint"] == client_fingerprint(
        tiny_binary[2]
    )  # the same as a local audit's


@pytest.mark.slow
def test_audit_sends_no_smiles_features_labels_or_plaintext(served, tiny_regression, tmp_path):
    ckpt, _, _ = tiny_regression
    path = _test_csv(tmp_path, ckpt, 6)
    recorder = Recorder()
    backend = _remote(served, "tiny-sol-logs", "privacy-keys", recorder)
    report = run_audit(
        AuditConfig(path, tmp_path / "audit", "truth", group_col="site", bootstrap=50, batch_size=4), backend
    )
    wire = b"\n".join(f"{m} {p}".encode() + json.dumps(h).encode() + b for m, p, h, b in recorder.sent)
    assert {(m, p) for m, p, _, _ in recorder.sent} <= {
        ("GET", "/models"),
        ("GET", "/models/tiny-sol-logs/client"),
        ("POST", "/keys"),
        ("POST", "/predict"),
    }
    for _m, p, _, body in recorder.sent:
        if p == "/predict":
            payload = json.loads(body)
            assert set(payload) == {"model", "key_id", "ciphertexts", "client_fingerprint"}
            assert all(len(base64.b64decode(c)) > 0 for c in payload["ciphertexts"])
        elif p == "/keys":
            assert body == backend.client.evaluation_keys()
    X = ckpt.featurizer.transform(ckpt.smiles_test[:6])
    secrets = [s.encode() for s in ckpt.smiles_test[:6]] + [b"north", b"south", b"compound", b"truth"]
    for r in report["rows"]:
        secrets += [
            r["target"].encode(),
            repr(r["prediction"]).encode(),
            np.float64(r["y"]).tobytes(),
            np.float64(r["prediction"]).tobytes(),
            json.dumps(r["raw"]).encode(),
            repr(r["raw"][0]).encode(),
        ]
    for row in X:
        secrets += [row.tobytes(), row.astype(np.float64).tobytes()]
    secrets.append(backend.client.key_path.read_bytes())  # the secret key file
    assert [s for s in secrets if s in wire] == []
    server_side = b"".join(p.read_bytes() for p in (served["root"] / "state").rglob("*") if p.is_file())
    server_side += served["server"].log.read_bytes()
    assert [s for s in secrets if s in server_side] == []


# ---------------------------------------------------------------- every model kind (real FHE)


_SYNTHETIC: list = []


def synthetic_tabular(tmp_path_factory):
    """A tabular binary model (3 -> 4 -> 2, 3 bits, exact rounding) on 3 synthetic columns; the label is
    'b > 0', so the model depends on column b only. Built once per session: test_explain shares it."""
    if not _SYNTHETIC:
        _SYNTHETIC.append(_build_synthetic(tmp_path_factory))
    return _SYNTHETIC[0]


def _build_synthetic(tmp_path_factory):
    from conftest import EXACT_P_ERROR

    from molcloak.pipeline import data, workflow
    from molcloak.pipeline.compile import CompileConfig
    from molcloak.pipeline.train import TrainConfig

    X, y = synthetic_rows(400, 0)
    task = TaskSpec("syn", "binary", "y", labels=("neg", "pos"))
    ds = data.Dataset([], y, task, np.arange(1, 401), table=X, columns=("a", "b", "c"))
    options = dict(hidden=[4], weight_bits=3, act_bits=3, input_bits=3)  # 2 bits: b's signal drowns
    ckpt = workflow.train_checkpoint(
        ds, model_options=options, train_config=TrainConfig(epochs=20, patience=20, seed=0)
    )
    compiled = workflow.compile_checkpoint(ckpt, CompileConfig(rounding_bits=None, p_error=EXACT_P_ERROR))
    bundle = tmp_path_factory.mktemp("synthetic") / "bundle"
    workflow.deploy(ckpt, compiled, bundle, "tiny-syn")
    return ckpt, compiled, bundle


def synthetic_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the synthetic tabular task: 3 standard normal columns (2 decimals), label b > 0."""
    X = np.round(np.random.default_rng(seed).normal(size=(n, 3)), 2)
    return X, (X[:, 1] > 0).astype(np.int64)


def tabular_csv(path, X, y, extra=""):
    """Synthetic rows as CSV: id, a, b, c, label (neg/pos), site."""
    lines = ["id,a,b,c,y,site"]
    for i, (x, label) in enumerate(zip(X, y)):
        lines.append(f"r{i},{x[0]!r},{x[1]!r},{x[2]!r},{('neg', 'pos')[int(label)]},{'n' if i % 2 else 's'}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture(scope="module")
def tiny_multitask(tmp_path_factory):
    """sol-freesolv, two regression tasks (logS and hydration free energy), labels missing per task."""
    from conftest import _tiny

    return _tiny("sol-freesolv", tmp_path_factory.mktemp("multitask"))


def test_multitask_audit_masks_missing_labels_and_matches_sklearn(tiny_multitask, tmp_path):
    ckpt, compiled, bundle = tiny_multitask
    tasks = ckpt.task.tasks
    have = ~np.isnan(ckpt.y_test)
    pick = list(np.flatnonzero(have[:, 0] & ~have[:, 1])[:4]) + list(np.flatnonzero(have[:, 1])[:4])
    lines = ["smiles,logs,dg"] + [
        ",".join([ckpt.smiles_test[i]] + ["" if np.isnan(v) else repr(float(v)) for v in ckpt.y_test[i]])
        for i in pick
    ]
    (tmp_path / "mt.csv").write_text("\n".join(lines) + "\n")
    config = AuditConfig(tmp_path / "mt.csv", tmp_path / "audit", "logs,dg", bootstrap=100, batch_size=4)
    report = run_audit(config, LocalBackend(bundle, tmp_path / "keys"))
    smiles = [ckpt.smiles_test[i] for i in pick]
    _, values = _simulated(compiled, ckpt, smiles)
    y = ckpt.y_test[pick]
    for j, t in enumerate(tasks):
        m = ~np.isnan(y[:, j])  # missing labels are masked, as in training
        assert report["metrics"][f"rmse[{t}]"]["value"] == pytest.approx(
            np.sqrt(skm.mean_squared_error(y[m, j], values[m, j])), abs=1e-12
        )
        assert report["metrics"][f"r2[{t}]"]["value"] == pytest.approx(skm.r2_score(y[m, j], values[m, j]))
    assert report["metrics"]["rmse"]["value"] == pytest.approx(
        np.mean([report["metrics"][f"rmse[{t}]"]["value"] for t in tasks])
    )
    assert report["metrics"]["rmse"]["low"] is not None
    assert report["rows"][0]["y"][tasks[1]] is None and set(report["rows"][0]["prediction"]) == set(tasks)
    claimed = {(c["source"], c["metric"]) for c in report["claims"]}
    stated = {(s, k) for s in am.CLAIM_SOURCES for k in (ckpt_manifest_metrics(bundle).get(s) or {})}
    assert claimed == stated and any(c["metric"] == f"rmse[{tasks[0]}]" for c in report["claims"])
    files = write_reports(report, tmp_path / "audit")
    assert "rmse[" in Path(files["markdown"]).read_text()
    with pytest.raises(DataError, match=r"names 1 column\(s\); model .* predicts 2 tasks"):
        run_audit(
            AuditConfig(tmp_path / "mt.csv", tmp_path / "a2", "logs"), LocalBackend(bundle, tmp_path / "keys")
        )


def ckpt_manifest_metrics(bundle) -> dict:
    return json.loads((Path(bundle) / "manifest.json").read_text())["metrics"]


def test_tabular_audit_reads_rows_and_groups_by_any_column(tmp_path_factory, tmp_path):
    ckpt, compiled, bundle = synthetic_tabular(tmp_path_factory)
    X, y = synthetic_rows(12, 1)
    path = tabular_csv(tmp_path / "rows.csv", X, y, extra="bad,x,1,2,pos,s\n")
    config = AuditConfig(path, tmp_path / "audit", "y", group_col="site,c", bootstrap=100, skip_invalid=True)
    report = run_audit(config, LocalBackend(bundle, tmp_path / "keys"))
    raw = compiled.q_module.forward(ckpt.featurizer.transform(X), fhe="simulate")
    p = to_predictions(ckpt.task, raw)
    assert [r["raw"] for r in report["rows"]] == raw.tolist()  # FHE execution equals the simulation
    m = report["metrics"]
    assert m["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
    assert m["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    assert m["brier"]["value"] == pytest.approx(skm.brier_score_loss(y, p[:, 1]))
    assert set(report["subgroups"]) == {"column site", "column c"}  # no SMILES: no MW/logP/scaffold bins
    assert len(report["subgroups"]["column c"]) == 4  # 12 distinct numbers: quartiles
    assert (
        report["invalid_rows"][0]["row"] == 13
        and "column 'a' value 'x'" in report["invalid_rows"][0]["reason"]
    )
    assert report["rows"][0]["features"] == pytest.approx(dict(zip("abc", X[0])))
    files = write_reports(report, tmp_path / "audit")
    assert Path(files["roc_pr"]).is_file() and "| column c |" not in Path(files["markdown"]).read_text()
