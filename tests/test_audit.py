"""Private test-set audits: resumable scoring in both modes, privacy of the wire (the metrics: test_audit_metrics.py)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import ServerProcess
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
            "reason": "SMILES 'C1CC' could not be parsed by RDKit; fix it",
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
