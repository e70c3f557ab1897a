"""Issue 13, defects 1-8: the FHE server against poisoned keys, endless bodies, crafted ciphertexts, a
crash of the server, a full disk, non-JSON numbers, bad batch sizes and dead workers. Real server
processes on loopback, real keys and ciphertexts of the tiny pinned model."""

from __future__ import annotations

import base64
import json
import os
import resource
import shutil
import signal
import time

import httpx
import psutil
import pytest
from helpers import ServerProcess, upload_poisoned_keys
from typer.testing import CliRunner

from molcloak.evaluation.attack.context import chunked_post
from molcloak.pipeline.cli import app as cli
from molcloak.pipeline.serving.http_client import RemoteModel

MODEL = "tiny-sol-low"
BODY_MB = 60  # the tiny model's evaluation keys are ~54 MiB
OCTET = {"Content-Type": "application/octet-stream"}


def _workers(server) -> list[psutil.Process]:
    """The server's FHE worker processes (not multiprocessing's resource tracker)."""
    return [p for p in psutil.Process(server.pid).children() if "spawn_main" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def bundles(tiny_binary, tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening") / "bundles"
    root.mkdir()
    shutil.copytree(tiny_binary[2], root / "binary")
    return root


@pytest.fixture(scope="module")
def server(bundles):
    server = ServerProcess(
        bundles,
        bundles.parent / "state",
        extra_args=["--max-body-mb", BODY_MB, "--max-batch", 2],
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server, bundles):
    return RemoteModel(server.url, MODEL, key_dir=bundles.parent / "client-keys")


def _ct(client, x) -> str:
    return base64.b64encode(client.client.encrypt(x)).decode()


def _predict(server, key_id, cts, timeout=120):
    body = {"model": MODEL, "key_id": key_id, "ciphertexts": cts}
    return httpx.post(f"{server.url}/predict", json=body, timeout=timeout)


def _restarts(server) -> int:
    return httpx.get(f"{server.url}/health").json()["worker_restarts"]


# ---------------------------------------------------------------- 1. poisoned keys


def test_poisoned_keys_are_refused_at_upload(server, client, tiny_binary):
    """Valid keys with bytes 100-200 zeroed pass the size check and deserialize, but crash the circuit:
    the server tries them once in a worker before issuing a key id, and answers 400."""
    upload_poisoned_keys(server, client, MODEL)
    r = _predict(server, client.key_id(), [_ct(client, tiny_binary[0].X_test[0])])
    assert r.status_code == 200 and server.alive()  # honest clients are unaffected


def test_a_key_id_whose_job_crashes_a_worker_is_revoked(server, client, tiny_binary):
    """Keys that crash a worker although stored (here: written into the key store on disk, as a key
    store damaged after upload would be) get their key id revoked after the first crash: 400 then and
    afterwards, with a message that says so; other key ids keep working."""
    poisoned = bytearray(client.client.evaluation_keys())
    poisoned[100:200] = bytes(100)
    key_id = "ab" * 16
    keys_dir = server.state_dir / "keys"
    (keys_dir / f"{key_id}.keys").write_bytes(bytes(poisoned))
    (keys_dir / f"{key_id}.json").write_text(f'{{"model": "{MODEL}", "bytes": {len(poisoned)}}}')
    ct = _ct(client, tiny_binary[0].X_test[0])
    restarts = _restarts(server)
    for _attempt in range(2):
        r = _predict(server, key_id, [ct])
        assert r.status_code == 400, r.text[:500]
        error = r.json()["error"]
        assert error["type"] == "KeysRevokedError" and "revoked" in error["message"]
        assert key_id in error["message"] and "generate new keys" in error["message"]
    assert _restarts(server) == restarts + 1  # one crash, then refused without touching a worker
    assert not (keys_dir / f"{key_id}.keys").exists()
    assert _predict(server, client.key_id(), [ct]).status_code == 200


# ---------------------------------------------------------------- 2. chunked bodies


def _chunked_post(server, path: str, total: int) -> tuple[int, bytes]:
    """POST `total` bytes with chunked transfer encoding on a raw socket (the attack suite's sender),
    stopping as soon as the server answers; returns (bytes sent when it answered, the answer)."""
    ctype = "application/json" if path == "/predict" else "application/octet-stream"
    sent, answer, _ = chunked_post(server.url, path, total, ctype)
    return sent, answer


@pytest.mark.parametrize("path", ["/predict", "/keys?model=tiny-sol-low"])
def test_chunked_bodies_are_cut_at_the_limit(server, path):
    limit = BODY_MB * 2**20
    sent, answer = _chunked_post(server, path, total=4 * limit)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "BodyTooLarge" and "over the limit" in error["message"]
    assert sent < 2 * limit  # the server stopped reading at the limit, it did not read the whole body
    assert server.alive()


# ---------------------------------------------------------------- 3. crafted ciphertexts, job timeout


def test_a_flipped_header_byte_is_refused_before_any_worker_sees_it(server, client, tiny_binary):
    """A 504-byte ciphertext with byte 10 flipped stalled a worker for 33-57 s; it is refused at once."""
    ct = bytearray(client.client.encrypt(tiny_binary[0].X_test[0]))
    ct[10] ^= 0xFF
    start = time.monotonic()
    r = _predict(server, client.key_id(), [base64.b64encode(bytes(ct)).decode()] * 2)
    assert r.status_code == 400 and time.monotonic() - start < 10
    error = r.json()["error"]
    assert error["type"] == "CiphertextError" and "byte 10 differs" in error["message"]
    start = time.monotonic()
    assert _predict(server, client.key_id(), [_ct(client, tiny_binary[0].X_test[0])]).status_code == 200
    assert time.monotonic() - start < 30


def test_a_job_over_the_time_limit_gets_its_worker_replaced(bundles, tiny_binary, tmp_path):
    with ServerProcess(
        bundles, tmp_path / "state", workers=1, extra_args=["--job-timeout", "0.001"]
    ) as server:
        model = RemoteModel(server.url, MODEL, key_dir=tmp_path / "keys")
        workers = _workers(server)
        r = _predict(server, model.key_id(), [_ct(model, tiny_binary[0].X_test[0])])
        assert r.status_code == 503, r.text[:500]
        error = r.json()["error"]
        assert error["type"] == "JobTimeoutError" and "limit of 0.001 s" in error["message"]
        assert _restarts(server) == 1 and server.alive()
        psutil.wait_procs(workers, timeout=10)
        assert not any(p.is_running() for p in workers)  # the stuck worker was killed


# ---------------------------------------------------------------- 4. orphaned workers


def test_workers_exit_when_the_server_is_killed(bundles, tmp_path):
    server = ServerProcess(bundles, tmp_path / "state", workers=2)
    workers = _workers(server)
    try:
        assert len(workers) == 2
        os.kill(server.pid, signal.SIGKILL)  # the server alone, not its process group
        server.process.wait(30)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"FHE workers outlived the server: {alive}"
    finally:
        for p in workers:
            if p.is_running():
                p.kill()


# ---------------------------------------------------------------- 5. full disk, leftovers


def _small_files() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, 8 * 2**20))  # no file over 8 MiB


def test_a_full_disk_answers_507_and_leaves_nothing(server, bundles, client, tmp_path):
    """The server process may not write files over 8 MiB (RLIMIT_FSIZE), so storing ~54 MiB of keys fails
    as on a full disk. Leftovers of earlier failures are swept at start."""
    state = tmp_path / "state"
    keys = state / "keys"
    keys.mkdir(parents=True)
    # the ciphertext shapes measured by another server (its workers wrote keys over 8 MiB to measure them)
    shutil.copytree(server.state_dir / "ciphertexts", state / "ciphertexts")
    orphan = "cd" * 16
    (keys / f"{orphan}.json").write_text(f'{{"model": "{MODEL}", "bytes": 1}}')
    (keys / f".{'ef' * 16}.keys.0a1b2c3d.tmp").write_bytes(b"partial")
    (keys / f"{'ef' * 16}.keys").write_bytes(b"no metadata")
    with ServerProcess(bundles, state, workers=1, preexec_fn=_small_files) as small:
        assert os.listdir(keys) == []  # swept at start
        r = _predict(small, orphan, ["AAAA"])
        assert r.status_code == 404 and r.json()["error"]["type"] == "KeysError"
        r = httpx.post(
            f"{small.url}/keys",
            params={"model": MODEL},
            content=client.client.evaluation_keys(),
            headers=OCTET,
            timeout=300,
        )
        assert r.status_code == 507, r.text[:500]
        error = r.json()["error"]
        assert error["type"] == "KeyStorageError" and "disk is full" in error["message"]
        assert os.listdir(keys) == [] and small.alive()


# ---------------------------------------------------------------- 6. NaN and Infinity


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": NaN, "key_id": "x", "ciphertexts": ["AAAA"]}',
        b'{"model": "tiny-sol-low", "key_id": Infinity, "ciphertexts": [-Infinity]}',
        b"NaN",
    ],
)
def test_nan_and_infinity_in_json_answer_422(server, body):
    r = httpx.post(f"{server.url}/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text[:300]
    assert r.json()["error"]["type"] == "RequestValidationError" and server.alive()


# ---------------------------------------------------------------- 7. batch sizes


@pytest.mark.parametrize(
    "size, expected",
    [("0", "out of range; use 1..64"), ("-1", "out of range; use 1..64"), ("3", "takes 1..2 ciphertexts")],
)
def test_predict_refuses_a_batch_size_out_of_range_in_one_line(server, bundles, tmp_path, size, expected):
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(
        cli,
        ["predict", "--server", server.url, "--model", MODEL, "--key-dir", str(bundles.parent / "cli-keys")]
        + ["--batch-size", size, "--output", str(out), "CCO", "c1ccccc1", "CCN"],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.output
    assert "Traceback" not in result.output and not out.exists()


# ---------------------------------------------------------------- 8. a worker that died while idle


def test_a_worker_that_died_idle_is_replaced_before_the_next_job(server, client, tiny_binary):
    x = tiny_binary[0].X_test[0]
    first = _predict(server, client.key_id(), [_ct(client, x)])
    assert first.status_code == 200
    restarts = _restarts(server)
    workers = _workers(server)
    for p in workers:
        p.kill()
    psutil.wait_procs(workers, timeout=10)
    r = _predict(server, client.key_id(), [_ct(client, x), _ct(client, x)])
    assert r.status_code == 200, r.text[:500]  # the first request after the deaths succeeds
    assert [client.client.decrypt(base64.b64decode(o)).tolist() for o in r.json()["outputs"]] == [
        client.client.decrypt(base64.b64decode(first.json()["outputs"][0])).tolist()
    ] * 2
    assert _restarts(server) == restarts + len(workers)
