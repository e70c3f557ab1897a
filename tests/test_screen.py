"""`molcloak screen` and the HTTP client's batches in flight, against a real `molcloak serve` process.

Two servers for the module: one with a small job queue (`--queue-size 8`: a full queue answers 503
with Retry-After), one with a rate limit (`--rate 12` predictions a minute per key id: 429 with
Retry-After), started side by side. Tiny binary model, exact rounding: decrypted FHE outputs equal the
simulation bit for bit.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import ServerProcess
from typer.testing import CliRunner

from molcloak.evaluation.screen.engine import ScreenConfig, run_screen
from molcloak.pipeline.cli import app
from molcloak.pipeline.errors import DataError, RateLimitedError
from molcloak.pipeline.metrics import to_predictions
from molcloak.pipeline.serving.http_client import RemoteModel

MODEL = "tiny-sol-low"
RATE = 12  # the rated server: predictions a minute per key id (a bucket of 12, then one every 5 s)
QUEUE = 8  # the other: FHE jobs it takes at once; more answer 503 with Retry-After


@dataclass
class Exchange:
    method: str
    path: str
    headers: dict
    body: bytes
    sent: float  # time.monotonic() when the request left
    received: float
    status: int
    answer_headers: dict


class Wire(httpx.BaseTransport):
    """Records every request (from every thread of the client) with its answer's status and timing."""

    def __init__(self):
        self.inner, self.log, self.lock = httpx.HTTPTransport(), [], threading.Lock()

    def handle_request(self, request):
        body, sent = request.read(), time.monotonic()
        response = self.inner.handle_request(request)
        response.read()
        with self.lock:
            self.log.append(
                Exchange(
                    request.method,
                    request.url.path,
                    dict(request.headers),
                    body,
                    sent,
                    time.monotonic(),
                    response.status_code,
                    dict(response.headers),
                )
            )
        return response

    def ciphertexts(self) -> list[bytes]:
        """The ciphertexts of the /predict requests that were answered 200, in the order they left."""
        done = sorted((e for e in self.log if e.path == "/predict" and e.status == 200), key=lambda e: e.sent)
        return [base64.b64decode(c) for e in done for c in json.loads(e.body)["ciphertexts"]]


class Background(threading.Thread):
    """`fn()` in a thread; `get()` waits for its result (or raises its error)."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the thread that waits)
            self.error = exc

    def get(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture(scope="module")
def servers(tiny_binary, tmp_path_factory):
    """(server with --queue-size 8, server with --rate 12, their common root), started side by side."""
    root = tmp_path_factory.mktemp("screen-served")
    shutil.copytree(tiny_binary[2], root / "bundles" / "binary")
    rated = Background(lambda: ServerProcess(root / "bundles", root / "rated", extra_args=["--rate", RATE]))
    try:
        queued = ServerProcess(root / "bundles", root / "queued", extra_args=["--queue-size", QUEUE])
    except BaseException:
        rated.get().stop()
        raise
    try:
        yield queued, rated, root
    finally:
        queued.stop()
        rated.get().stop()


@pytest.fixture(scope="module")
def served(servers):
    return servers[0], servers[2]


@pytest.fixture(scope="module")
def rated(servers):
    return servers[1].get(), servers[2]


def _library(path: Path, smiles: list[str], bad: dict[int, str] | None = None) -> Path:
    """A library CSV (id, smiles, a third column), with `bad` values inserted before the given rows."""
    rows = [[f"c{i}", s, "x"] for i, s in enumerate(smiles)]
    for at, value in sorted((bad or {}).items()):
        rows.insert(at - 1, ["bad", value, "x"])
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([["id", "smiles", "note"], *rows])
    return path


def _long_smiles(ckpt, n: int) -> list[str]:
    """Test molecules whose SMILES are long enough not to turn up in base64 by chance."""
    return [s for s in ckpt.smiles_test if len(s) >= 12][:n]


def _simulated(ckpt, compiled, smiles):
    raw = compiled.q_module.forward(ckpt.featurizer.transform(smiles), fhe="simulate")
    return raw, to_predictions(ckpt.task, raw, ckpt.scaler)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_equals_simulation(rows, ckpt, compiled, smiles):
    valid = [r for r in rows if not r["error"]]
    assert [r["smiles"] for r in valid] == smiles
    _, probs = _simulated(ckpt, compiled, smiles)
    assert [[float(r["p_not low"]), float(r["p_low"])] for r in valid] == probs.tolist()  # bit for bit
    assert [r["prediction"] for r in valid] == [ckpt.task.labels[int(np.argmax(p))] for p in probs]


def test_screen_equals_simulation_lists_invalid_rows_and_sends_only_ciphertexts(
    served, tiny_binary, tmp_path
):
    server, root = served
    ckpt, compiled, _ = tiny_binary
    smiles = _long_smiles(ckpt, 10)
    bad = {3: "not-a-molecule(", 9: ""}
    library = _library(tmp_path / "library.csv", smiles, bad)
    wire = Wire()
    backend = RemoteModel(server.url, MODEL, root / "keys-a", transport=wire)

    # without --skip-invalid nothing is encrypted or sent, and the rows are named
    config = ScreenConfig(library, tmp_path / "strict", batch_size=3, concurrency=2, top=4)
    with pytest.raises(
        DataError, match=r"row 3: SMILES 'not-a-molecule\(' .*1 more invalid rows: 9.*nothing"
    ):
        run_screen(config, backend)
    assert not [e for e in wire.log if e.method == "POST"]

    config = ScreenConfig(library, tmp_path / "out", batch_size=3, concurrency=2, top=4, skip_invalid=True)
    summary = run_screen(config, backend)
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert [int(r["index"]) for r in rows] == list(range(1, 13))  # every library row once, in order
    _assert_equals_simulation(rows, ckpt, compiled, smiles)
    assert _rows(tmp_path / "out" / "invalid.csv") == [
        {"row": "3", "value": "not-a-molecule(", "reason": rows[2]["error"]},
        {"row": "9", "value": "", "reason": rows[8]["error"]},
    ]
    assert "could not be parsed by RDKit" in rows[2]["error"]
    assert (summary["rows"], summary["scored"], summary["invalid"]) == (12, 10, 2)
    _, probs = _simulated(ckpt, compiled, smiles)
    best = sorted(range(10), key=lambda j: (-probs[j, 1], j))[:4]
    assert [(r["smiles"], r["score"]) for r in summary["top"]["p_low"]] == [
        (smiles[j], probs[j, 1]) for j in best
    ]
    assert sum(summary["histograms"]["p_low"]["counts"]) == 10
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Private screen of library.csv" in html
    assert (tmp_path / "out" / "plots" / "histogram.png").stat().st_size > 1000
    try:  # Parquet too, when pyarrow is there
        import pyarrow.parquet as pq
    except ImportError:
        assert "parquet" not in summary["files"]
    else:
        table = pq.read_table(summary["files"]["parquet"]).to_pandas()
        assert table["p_low"].dropna().tolist() == [float(r["p_low"]) for r in rows if not r["error"]]

    # what the server got: evaluation keys and ciphertexts only
    assert {(e.method, e.path) for e in wire.log} <= {
        ("GET", "/models"),
        ("GET", f"/models/{MODEL}/client"),
        ("GET", "/health"),
        ("POST", "/keys"),
        ("POST", "/predict"),
    }
    for e in wire.log:
        if e.path == "/predict":
            assert set(json.loads(e.body)) == {"model", "key_id", "ciphertexts", "client_fingerprint"}
        elif e.path == "/keys":
            assert e.body == backend.client.evaluation_keys()
    assert len(wire.ciphertexts()) == 10
    sent = b"\n".join(json.dumps(e.headers).encode() + e.path.encode() + e.body for e in wire.log)
    secrets = [s.encode() for s in smiles] + [b"not-a-molecule"]
    secrets += [row.tobytes() for row in ckpt.featurizer.transform(smiles)]
    secrets += [repr(float(p)).encode() for p in probs[:, 1]]
    secrets.append(backend.client.key_path.read_bytes())
    assert [s for s in secrets if s in sent] == []
    server_side = b"".join(p.read_bytes() for p in server.state_dir.rglob("*") if p.is_file())
    server_side += server.log.read_bytes()
    assert [s for s in secrets if s in server_side] == []


def test_batches_in_flight_keep_order_and_upload_the_keys_once(served, tiny_binary):
    server, root = served
    ckpt, compiled, _ = tiny_binary
    smiles = ckpt.smiles_test[:14]
    wire = Wire()
    backend = RemoteModel(server.url, MODEL, root / "keys-b", transport=wire)
    stale = backend.key_id()
    assert backend.request("DELETE", f"/keys/{stale}").status_code == 204  # the server forgets our keys
    wire.log.clear()

    report = backend.predict(smiles, batch_size=2, concurrency=3)

    raw, _ = _simulated(ckpt, compiled, smiles)
    assert [p.raw for p in report.predictions] == raw.tolist()  # in input order, bit for bit
    assert [p.index for p in report.predictions] == list(range(1, len(smiles) + 1))
    # the batches in flight were refused with the stale key id; the keys went up once for all of them
    assert [e.status for e in wire.log if e.path == "/keys"] == [201]
    stale_answers = [e for e in wire.log if e.path == "/predict" and json.loads(e.body)["key_id"] == stale]
    assert stale_answers and {e.status for e in stale_answers} == {404}
    answered = wire.ciphertexts()  # every batch answered once: none lost, none decrypted twice
    assert len(answered) == len(set(answered)) == len(smiles) and backend.key_id() != stale

    # a full job queue: 503 with Retry-After, each refused request sent again only after it
    blocker = [backend.client.encrypt(x) for x in ckpt.featurizer.transform(ckpt.smiles_test[20:28])]
    body = {
        "model": MODEL,
        "key_id": backend.key_id(),
        "ciphertexts": [base64.b64encode(c).decode() for c in blocker],
    }
    busy = Background(lambda: httpx.post(f"{server.url}/predict", json=body, timeout=300))
    deadline = time.monotonic() + 120
    while busy.is_alive() and time.monotonic() < deadline:  # until the server holds QUEUE jobs
        if httpx.get(f"{server.url}/health").json()["pending_jobs"] >= QUEUE:
            break
        time.sleep(0.005)
    wire.log.clear()
    report = backend.predict(ckpt.smiles_test[30:36], batch_size=2, concurrency=3)
    assert busy.get().status_code == 200
    raw, _ = _simulated(ckpt, compiled, ckpt.smiles_test[30:36])
    assert [p.raw for p in report.predictions] == raw.tolist()
    _assert_waited(wire, 503)


def test_key_rotation_with_batches_in_flight_never_overuses_a_key_set(served, tiny_binary):
    server, root = served
    ckpt, compiled, _ = tiny_binary
    wire = Wire()
    backend = RemoteModel(server.url, MODEL, root / "keys-rotation", transport=wire)
    backend.set_rotation(after_predictions=5)
    report = backend.predict(ckpt.smiles_test[:11], batch_size=2, concurrency=3)
    raw, _ = _simulated(ckpt, compiled, ckpt.smiles_test[:11])
    assert [p.raw for p in report.predictions] == raw.tolist()
    assert len(report.key_ids) == 3 and [e.status for e in wire.log if e.path == "/keys"] == [201] * 3
    per_key: dict[str, int] = {}
    for e in wire.log:
        if e.path == "/predict" and e.status == 200:
            key_id = json.loads(e.body)["key_id"]
            per_key[key_id] = per_key.get(key_id, 0) + len(json.loads(e.body)["ciphertexts"])
    assert sorted(per_key.values()) == [1, 5, 5]  # no key set decrypted more than its 5 predictions
    # each rotation deletes the old key set's evaluation keys on the server
    deleted = [(e.path, e.status) for e in wire.log if e.method == "DELETE"]
    server_ids = list(dict.fromkeys(json.loads(e.body)["key_id"] for e in wire.log if e.path == "/predict"))
    assert len(server_ids) == 3 and deleted == [(f"/keys/{k}", 204) for k in server_ids[:2]]


def _assert_waited(wire: Wire, status: int) -> None:
    """Answers `status` came, with Retry-After, and each refused request went again only after it."""
    refused = [e for e in wire.log if e.status == status]
    assert refused, f"no {status} answer: {[e.status for e in wire.log]}"
    for e in refused:
        wait = float(e.answer_headers["retry-after"])
        again = min(x.sent for x in wire.log if x.body == e.body and x.sent > e.received)
        assert wait >= 1 and again - e.received >= wait - 0.01, (status, wait, again - e.received)


def test_a_rate_limit_is_waited_out_and_a_batch_that_fails_for_good_names_its_rows(rated, tiny_binary):
    server, root = rated
    ckpt, compiled, _ = tiny_binary
    smiles = ckpt.smiles_test[: RATE + 1]
    wire = Wire()
    backend = RemoteModel(server.url, MODEL, root / "keys-rate", transport=wire)
    # the first batch takes the key id's whole minute; the second, sent while it runs, must wait
    report = backend.predict(smiles, batch_size=RATE, concurrency=2)
    raw, _ = _simulated(ckpt, compiled, smiles)
    assert [p.raw for p in report.predictions] == raw.tolist()
    _assert_waited(wire, 429)
    assert {json.loads(e.body)["key_id"] for e in wire.log if e.path == "/predict"} == {backend.key_id()}
    with pytest.raises(RateLimitedError, match=rf"^rows 1-{RATE + 1}: .*429 RateLimitedError.*send at most"):
        backend.predict(ckpt.smiles_test[: RATE + 1], batch_size=RATE + 1)


def _screen_args(server, library, out, keys) -> list[str]:
    return [
        "screen",
        "--server",
        server.url,
        "--model",
        MODEL,
        "--input",
        str(library),
        "--out",
        str(out),
        "--key-dir",
        str(keys),
        "--batch-size",
        "2",
        "--concurrency",
        "2",
        "--top",
        "3",
    ]


def _keyset_predictions(keys: Path) -> int:
    (keyset,) = keys.glob(f"{MODEL}-*/keyset.json")
    return json.loads(keyset.read_text())["predictions"]


def test_screen_killed_mid_run_resumes_and_scores_every_row_once(rated, tiny_binary, tmp_path):
    server, root = rated
    ckpt, compiled, _ = tiny_binary
    smiles = ckpt.smiles_test[40 : 40 + RATE + 4]  # the rate limit holds the last rows: time to kill
    library = _library(tmp_path / "library.csv", smiles)
    out, keys = tmp_path / "out", tmp_path / "keys"
    args = _screen_args(server, library, out, keys)
    child = subprocess.Popen(
        [sys.executable, "-m", "molcloak.pipeline.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    predictions = out / "predictions.csv"
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline:
        if predictions.is_file() and predictions.read_bytes().count(b"\n") >= 1 + 4:
            break
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # no clean shutdown: the client dies mid-run
    assert child.wait(30) == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    kept = predictions.read_bytes()
    written = kept[: kept.rfind(b"\n") + 1].count(b"\n") - 1  # complete data lines
    assert 4 <= written < len(smiles)
    decrypted = _keyset_predictions(keys)

    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = _rows(predictions)
    assert [int(r["index"]) for r in rows] == list(range(1, len(smiles) + 1))  # each row exactly once
    _assert_equals_simulation(rows, ckpt, compiled, list(smiles))
    assert _keyset_predictions(keys) - decrypted == len(smiles) - written  # only the rest was sent
    assert (summary["scored"], summary["invalid"], len(summary["top"]["p_low"])) == (len(smiles), 0, 3)
    assert summary["timing"]["sessions"][-1]["rows_scored"] == len(smiles) - written

    # the same directory refuses another library, and --restart starts over
    other = _library(tmp_path / "other.csv", smiles[:3])
    result = CliRunner().invoke(app, [*_screen_args(server, other, out, keys)])
    assert result.exit_code == 2 and "library file content" in result.output and "--restart" in result.output


def test_cli_options_are_checked_before_any_work(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "--bundle", str(tmp_path), "--concurrency", "2", "CCO"])
    assert result.exit_code == 2 and "--concurrency" in result.output and "--server only" in result.output
    args = ["screen", "--bundle", str(tmp_path), "--input", str(tmp_path / "l.csv"), "--concurrency", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--concurrency" in result.output and "--server only" in result.output
    result = runner.invoke(app, ["screen", "--help"])
    assert result.exit_code == 0 and "--concurrency" in result.output and "resume" in result.output


def test_a_line_cut_short_by_a_crash_is_dropped_and_its_rows_screened_again(tmp_path):
    from molcloak.evaluation.screen.engine import resume_position

    header = ["index", "smiles", "prediction", "error"]
    path = tmp_path / "predictions.csv"
    assert resume_position(path, header) == 0 and path.read_text() == "index,smiles,prediction,error\n"
    assert resume_position(path, header) == 0  # the header alone: nothing screened yet
    lines = "".join(f'{i},C{"C" * i},"{i}.5",\n' for i in range(1, 2000))
    path.write_text("index,smiles,prediction,error\n" + lines + "2000,CCC")  # killed mid-write
    assert resume_position(path, header) == 1999
    assert path.read_text().endswith("1999," + "C" * 2000 + ',"1999.5",\n')
    path.write_text("index,smiles,prediction,error\nnot a number,x\n")
    with pytest.raises(DataError, match="damaged.*--restart"):
        resume_position(path, header)
