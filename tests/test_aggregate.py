"""Aggregate-only audits (issue #16, section 3): real compilation, real keys, a real server process."""

from __future__ import annotations

import base64
import json
import shutil

import httpx
import numpy as np
import pytest
from conftest import EXACT_P_ERROR, TINY, TINY_TRAIN
from helpers import ServerProcess, write_csv
from sklearn.metrics import accuracy_score, roc_auc_score
from typer.testing import CliRunner

from molcloak.evaluation.audit.aggregate import (
    AggregateAuditConfig,
    confusion,
    count_metrics,
    run_aggregate_audit,
)
from molcloak.pipeline import data, workflow
from molcloak.pipeline.aggregate import (
    NOISE_OFFSET,
    add_aggregate,
    draw_noise,
    expected_counts,
    pack_job,
    unpack_job,
)
from molcloak.pipeline.aggregate_client import chunks
from molcloak.pipeline.cli import app
from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.errors import CiphertextError, ConfigError
from molcloak.pipeline.serving.aggregate_remote import RemoteAggregate
from molcloak.pipeline.serving.http_client import RemoteModel

SMALL = dict(TINY, weight_bits=3, act_bits=3, input_bits=3)  # 2-bit comparisons do not compile in Concrete
OWNER, AUDITOR = "owner-token-0123456789", "auditor-token-0123456789"
ROWS = 8


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    """A 3-bit sol-low classifier with exact rounding, deployed with an aggregate program of 8 rows."""
    root = tmp_path_factory.mktemp("aggregate")
    ckpt = workflow.train_checkpoint(
        data.load_bundled("sol-low"), model_options=SMALL, train_config=TINY_TRAIN
    )
    compiled = workflow.compile_checkpoint(
        ckpt, CompileConfig(rounding_method="exact", p_error=EXACT_P_ERROR)
    )
    bundle = root / "bundles" / "agg"
    workflow.deploy(ckpt, compiled, bundle, "agg")
    spec = add_aggregate(bundle, rows=ROWS, thresholds=4)
    return ckpt, compiled, bundle, spec


def _csv(path, ckpt, n):
    y = ckpt.y_test.reshape(-1)[:n].astype(int)
    return write_csv(path, ["smiles", "truth"], zip(ckpt.smiles_test[:n], y)), y


def _clear_counts(program, X, y):
    """What the program should count, from the owner's thresholds, in the clear."""
    _, compiled, bundle, _ = program
    owner = json.loads((bundle / "owner" / "aggregate.json").read_text())
    qx = compiled.q_module.quantize_input(np.asarray(X, dtype=np.float32))
    return expected_counts(compiled.q_module, owner, qx, y)


# ---------------------------------------------------------------- pure functions


def test_metrics_from_counts_equal_sklearn_on_bucket_scores():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 9, size=(2, 6))
    decision = 3
    y = np.repeat([0, 1], counts.sum(1))
    bucket = np.concatenate([np.repeat(np.arange(6), counts[k]) for k in (0, 1)])
    got = count_metrics(counts, decision, n_boot=0, seed=0)
    assert got["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, bucket))  # ties count one half
    assert got["accuracy"]["value"] == pytest.approx(accuracy_score(y, bucket >= decision))
    c = confusion(counts, decision)
    assert c["tp"] == int(((bucket >= decision) & (y == 1)).sum()) and sum(c.values()) == counts.sum()
    noisy = counts - 3  # noise can drive counts below 0: they count as 0, never as negative rows
    assert count_metrics(np.clip(noisy, 0, None), decision, 0, 0) == count_metrics(noisy, decision, 0, 0)
    with_ci = count_metrics(counts, decision, n_boot=200, seed=1)
    assert with_ci["roc_auc"]["low"] < with_ci["roc_auc"]["value"] < with_ci["roc_auc"]["high"]


def test_noise_is_offset_two_sided_and_clipped():
    assert (draw_noise(10, 0.0) == NOISE_OFFSET).all()  # epsilon 0: no noise
    noise = draw_noise(200_000, 1.0, np.random.default_rng(0)) - NOISE_OFFSET
    alpha = np.exp(-0.5)
    assert abs(noise.mean()) < 0.05 and noise.var() == pytest.approx(2 * alpha / (1 - alpha) ** 2, rel=0.05)
    assert noise.min() >= -NOISE_OFFSET and noise.max() <= NOISE_OFFSET
    for bad in (0.1, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="--aggregate-epsilon"):
            draw_noise(4, bad)


def test_jobs_round_trip_and_malformed_jobs_are_refused():
    noise = np.arange(10)
    rows, labels, got = unpack_job(pack_job(b"rows", b"labels!", noise))
    assert (rows, labels) == (b"rows", b"labels!") and got.tolist() == noise.tolist()
    for bad in (b"", b"MCAG1", pack_job(b"r", b"l", noise)[:-1], b"XXXXX" + pack_job(b"r", b"l", noise)[5:]):
        with pytest.raises(CiphertextError, match="malformed"):
            unpack_job(bad)
    assert [(s.start, s.stop) for s in chunks(17, 8)] == [(0, 6), (6, 11), (11, 17)]  # balanced, none tiny


# ---------------------------------------------------------------- both halves in this process


def test_cli_local_audit_decrypts_the_clear_programs_counts_bit_for_bit(program, tmp_path):
    ckpt, compiled, bundle, _ = program
    n = 21  # three chunks of 7 molecules, each padded to 8 rows under the padding label
    path, y = _csv(tmp_path / "test.csv", ckpt, n)
    args = ["audit", "--aggregate-only", "--bundle", bundle, "--test-set", path, "--target-col", "truth"]
    args += ["--out", tmp_path / "out", "--key-dir", tmp_path / "keys", "--json"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    counts = np.array([report["counts"]["negative"], report["counts"]["positive"]])
    assert counts.tolist() == _clear_counts(program, ckpt.X_test[:n], y).tolist()  # exact rounding, 2^-40
    assert (
        counts.sum() == n and counts[1].sum() == y.sum() and report["chunks"] == 3
    )  # padding counts nowhere
    assert not (tmp_path / "keys").exists()  # the audit's keys never touch the disk
    exact = count_metrics(counts, report["decision_bucket"], 1000, 0)
    assert report["metrics"] == exact and report["n"] == n and "roc_auc" in report["metrics"]
    raw = compiled.q_module.forward(ckpt.X_test[:n], fhe="disable")  # the model's own scores
    assert abs(report["metrics"]["roc_auc"]["value"] - roc_auc_score(y, raw[:, 1] - raw[:, 0])) < 0.1
    assert (tmp_path / "out" / "aggregate.md").read_text().startswith("# Aggregate-only audit of agg")
    assert {c["metric"] for c in report["claims"] if c["checked"]} >= {"roc_auc", "accuracy"}


def test_bad_input_is_one_line(program, tiny_binary, tiny_regression, tmp_path):
    runner = CliRunner()
    cases = [
        (["aggregate", tiny_regression[2]], "needs a binary classifier"),
        (["aggregate", program[2]], "already exists; pass --force"),
        (
            ["audit", "--aggregate-only", "--bundle", tiny_binary[2], "--test-set", tmp_path / "none.csv"],
            "molcloak aggregate BUNDLE",
        ),
        (["audit", "--aggregate-only", "--bundle", program[2], "-t", "x.csv", "--explain", "2"], "--explain"),
        (
            ["audit", "--aggregate-only", "--bundle", program[2], "-t", "x.csv", "--batch-size", "4"],
            "cannot be combined with --batch-size",
        ),
        (["serve", "--bundles", program[2].parent, "--aggregate-epsilon", "0.1"], "--aggregate-epsilon 0.1"),
    ]
    info = runner.invoke(app, ["info", str(program[2])])
    assert info.exit_code == 0 and "aggregate-only audit program: 8 molecules per chunk" in info.output
    write_csv(tmp_path / "none.csv", ["smiles", "sol_low"], [("CCO", 1)])
    for args, expected in cases:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output, (
            args,
            result.output,
        )


# ---------------------------------------------------------------- through a real server process


class Recorder(httpx.BaseTransport):
    def __init__(self):
        self.inner, self.sent = httpx.HTTPTransport(), []

    def handle_request(self, request):
        self.sent.append((request.method, request.url.path, request.read()))
        return self.inner.handle_request(request)


@pytest.fixture(scope="module")
def served(program, tmp_path_factory):
    root = tmp_path_factory.mktemp("aggregate-served")
    shutil.copytree(program[2].parent, root / "bundles")
    (root / "tokens").write_text(OWNER)
    (root / "audit-tokens").write_text(AUDITOR)
    server = ServerProcess(
        root / "bundles",
        root / "state",
        root / "tokens",
        extra_args=["--audit-token-file", root / "audit-tokens"],
    )
    yield server, root
    server.stop()


@pytest.mark.slow
def test_server_audit_reveals_only_counts_and_forgets_its_keys(program, served, tmp_path):
    ckpt, _, _, spec = program
    server, root = served
    n = 12
    path, y = _csv(tmp_path / "test.csv", ckpt, n)
    recorder = Recorder()
    remote = RemoteModel(server.url, "agg", tmp_path / "keys", AUDITOR, transport=recorder)
    runner = RemoteAggregate(remote)
    config = AggregateAuditConfig(path, tmp_path / "out", "truth", bootstrap=100)
    report = run_aggregate_audit(config, runner, remote.client, lambda *_: None)
    counts = np.array([report["counts"]["negative"], report["counts"]["positive"]])
    assert counts.tolist() == _clear_counts(program, ckpt.X_test[:n], y).tolist()
    assert report["epsilon"] == 0.0 and report["chunks"] == 2
    paths = {(m, p) for m, p, _ in recorder.sent}
    allowed = {("GET", "/models"), ("GET", "/models/agg/client"), ("GET", "/models/agg/aggregate")}
    allowed |= {("GET", "/health"), ("POST", "/keys"), ("POST", "/aggregate")}
    assert {x for x in paths if x[0] != "DELETE"} <= allowed
    assert ("POST", "/predict") not in paths and sum(m == "DELETE" for m, _, _ in recorder.sent) == 1
    wire = b"\n".join(body for _, _, body in recorder.sent)
    features = remote.client.featurize(ckpt.smiles_test[:n])
    secrets = [s.encode() for s in ckpt.smiles_test[:n]] + [b"truth"]
    secrets += [row.tobytes() for row in features] + [remote.client.quantize(features).tobytes()]
    secrets += [json.dumps(y.tolist()).encode(), y.astype(np.int64).tobytes()]
    assert [s for s in secrets if s in wire] == []
    for _, p, body in recorder.sent:
        if p == "/aggregate":
            payload = json.loads(body)
            assert set(payload) == {"model", "key_id", "chunks"} and len(payload["chunks"]) == 1
            assert all(set(c) == {"rows", "labels"} for c in payload["chunks"])
    assert not list((root / "state" / "keys").glob("*.keys"))  # the audit deleted its keys on the server


@pytest.mark.slow
def test_audit_token_gets_no_predictions_and_aggregate_keys_serve_no_predictions(program, served, tmp_path):
    server, _ = served
    http = lambda token: httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=300
    )  # noqa: E731
    auditor, owner = http(AUDITOR), http(OWNER)
    remote = RemoteModel(server.url, "agg", tmp_path / "keys", AUDITOR)
    runner = RemoteAggregate(remote)
    runner.start()  # aggregate keys, uploaded with the audit token
    try:
        r = auditor.post("/predict", json={"model": "agg", "key_id": runner.key_id, "ciphertexts": ["AAAA"]})
        assert r.status_code == 403 and "aggregate-only" in r.json()["error"]["message"]
        r = auditor.post(
            "/keys",
            params={"model": "agg"},
            content=b"x" * 10,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 403  # no normal keys for an auditor: it cannot switch to per-molecule answers
        r = owner.post("/predict", json={"model": "agg", "key_id": runner.key_id, "ciphertexts": ["AAAA"]})
        assert r.status_code in (404, 409)  # the key id is bound to agg:aggregate (and to the auditor)
        # real ciphertexts of this program in the wrong places: the labels as rows, the rows twice
        spec = runner.client.spec
        rows, labels = runner.client.encrypt(np.zeros((2, *spec.input_shape)), np.array([0, 1]))
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        swapped = [{"rows": b64(labels), "labels": b64(rows)}, {"rows": b64(rows), "labels": b64(rows)}]
        for chunk in (
            {"rows": "not base64!", "labels": "AAAA"},
            {"rows": "AAAA", "labels": "AAAA"},
            *swapped,
        ):
            r = auditor.post("/aggregate", json={"model": "agg", "key_id": runner.key_id, "chunks": [chunk]})
            assert r.status_code == 400 and r.json()["error"]["type"] == "CiphertextError", r.text
        r = auditor.post("/aggregate", json={"model": "nope", "key_id": runner.key_id, "chunks": [chunk]})
        assert r.status_code == 404 and "no aggregate program" in r.json()["error"]["message"]
        assert auditor.get("/health").json()["aggregate_programs"] == ["agg:aggregate"]
    finally:
        runner.finish()
    assert owner.get("/health").json()["status"] == "ok"  # every refusal left the server up
