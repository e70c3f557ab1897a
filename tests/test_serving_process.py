"""The routine that starts `molcloak serve` and waits for it: real processes on loopback, tiny real bundles."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from molcloak.pipeline.errors import RemoteError
from molcloak.pipeline.serving.http_client import RemoteModel
from molcloak.pipeline.serving.process import ServerProcess


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture()
def bundles(tiny_binary, tmp_path):
    root = tmp_path / "bundles"
    root.mkdir()
    shutil.copytree(tiny_binary[2], root / "binary")
    return root


def test_a_server_that_cannot_start_fails_clearly_and_fast(tmp_path):
    """No bundle in --bundles: `molcloak serve` exits with status 2; the routine says so at once, with its log."""
    empty = tmp_path / "empty"
    empty.mkdir()
    before = _children()
    start = time.monotonic()
    with pytest.raises(
        RemoteError, match=r"exited with status 2 before answering .*/health: .*no bundle found in"
    ) as info:
        ServerProcess(empty, tmp_path / "state", timeout=120)
    assert time.monotonic() - start < 60  # the exit is noticed, not the deadline
    assert str(tmp_path / "state.log") in str(info.value) and "\n" not in str(info.value)
    assert _children() <= before


def test_a_server_that_does_not_answer_in_time_is_stopped(bundles, tmp_path):
    before = _children()
    with pytest.raises(
        RemoteError, match=r"did not answer http://127\.0\.0\.1:\d+/health within 0\.5 s and was stopped"
    ):
        ServerProcess(bundles, tmp_path / "state", workers=1, timeout=0.5)
    assert _children() <= before  # nothing left running


def test_start_predict_stop_and_crash(bundles, tiny_binary, tmp_path):
    ckpt, compiled, _ = tiny_binary
    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    with ServerProcess(
        bundles, tmp_path / "state", workers=2, token_file=token_file, log=tmp_path / "s.log"
    ) as server:
        assert server.alive() and server.token == "tok-123" and server.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{server.url}/models").status_code == 401  # the token file is passed on
        workers = psutil.Process(server.pid).children(recursive=True)
        assert len(workers) >= 2
        report = RemoteModel(
            server.url, "tiny-sol-low", key_dir=tmp_path / "keys", token=server.token
        ).predict(ckpt.smiles_test[:1])
        assert [p.raw for p in report.predictions] == compiled.q_module.forward(
            ckpt.X_test[:1], fhe="simulate"
        ).tolist()
    assert not server.alive() and server.process.returncode is not None
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"FHE workers outlived the server: {alive}"
    assert "starting on" in (tmp_path / "s.log").read_text()

    server = ServerProcess(
        bundles,
        tmp_path / "state",
        workers=1,
        token_file=token_file,
        port=server.port,
        log=tmp_path / "s.log",
    )
    workers = psutil.Process(server.pid).children(recursive=True)
    server.kill()  # a crash: the server and its workers, at once
    assert server.process.returncode == -9 and not server.alive()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    server.stop()  # stopping a dead server is a no-op


def test_load_check_fails_with_one_line_when_the_server_does_not_come_up(bundles, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "molcloak.evaluation.load_check",
            "--bundles",
            str(bundles),
            "--model",
            "tiny-sol-low",
            "--clients",
            "1",
            "--per-client",
            "1",
            "--workers",
            "1",
            "--start-timeout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    # one line (the libraries' import chatter, e.g. "No CUDA runtime is found", comes before it); no traceback
    ours = [line for line in r.stderr.splitlines() if line.startswith("load_check")]
    assert len(ours) == 1 and ours[0].startswith("load_check: error: the FHE server did not answer"), r.stderr
    assert r.stderr.strip().endswith(ours[0]) and "Traceback" not in r.stderr and not r.stdout
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "molcloak.evaluation.load_check",
            "--bundles",
            str(bundles),
            "--model",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.strip().endswith(
        f"load_check: error: model 'nope' is not in {bundles}; available: tiny-sol-low; pass one with --model"
    )
