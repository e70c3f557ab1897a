"""Issue 15, part 1: `molcloak serve --executor ray`. A real local Ray with 2 CPUs started here, a real
server process on loopback that joins it with --ray-address, real keys and ciphertexts of the tiny pinned
model: predictions equal the simulation bit for bit, an actor killed mid-batch loses nothing, poisoned
keys are still refused, and without Ray the option says how to install it."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import ServerProcess, upload_poisoned_keys
from typer.testing import CliRunner

from molcloak.pipeline.cli import app as cli
from molcloak.pipeline.serving.executor_ray import ACTOR_PREFIX, NAMESPACE
from molcloak.pipeline.serving.http_client import RemoteModel

ray = pytest.importorskip("ray")

MODEL = "tiny-sol-low"
OCTET = {"Content-Type": "application/octet-stream"}
LIMITS = ["--max-body-mb", 60, "--queue-size", 256]  # the tiny keys are ~54 MiB; two 24-row batches queued


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray of 2 CPUs for this module (the server joins it as a cluster), shut down after."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        namespace=NAMESPACE,
    )
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def bundles(tiny_binary, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray") / "bundles"
    root.mkdir()
    shutil.copytree(tiny_binary[2], root / "binary")
    return root


@pytest.fixture(scope="module")
def server(bundles, ray_address):
    server = ServerProcess(
        bundles,
        bundles.parent / "state",
        extra_args=["--executor", "ray", "--ray-address", ray_address, *LIMITS],
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server, bundles):
    return RemoteModel(server.url, MODEL, key_dir=bundles.parent / "client-keys")


def _health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=30).json()


def _predict(server, key_id: str, cts: list[bytes], timeout: float = 300) -> httpx.Response:
    body = {"model": MODEL, "key_id": key_id, "ciphertexts": [base64.b64encode(c).decode() for c in cts]}
    return httpx.post(f"{server.url}/predict", json=body, timeout=timeout)


def _decrypt(client, r: httpx.Response) -> list:
    assert r.status_code == 200, r.text[:500]
    return [client.client.decrypt(base64.b64decode(o)).reshape(-1).tolist() for o in r.json()["outputs"]]


def _simulated(tiny_binary, X) -> list:
    return [tiny_binary[1].q_module.forward(x[None], fhe="simulate")[0].tolist() for x in X]


def test_predictions_through_ray_equal_the_simulation(server, client, tiny_binary):
    """Through HTTP and the Ray actors, decrypted outputs are the simulated ones bit for bit; each actor
    fetched the key set at most once for the whole batch."""
    ckpt = tiny_binary[0]
    report = client.predict(ckpt.smiles_test[:8])
    assert [p.raw for p in report.predictions] == _simulated(tiny_binary, ckpt.X_test[:8])
    health = _health(server)
    assert health["executor"] == "ray" and health["actors"] == 2, health
    assert 1 <= health["key_loads"] <= 2 and health["worker_restarts"] == 0, health


def test_an_actor_killed_mid_batch_loses_nothing(server, client, tiny_binary):
    """ray.kill of a busy actor while a batch runs: its job is retried on the other actor, the actor is
    replaced, and every output is the right one."""
    X = tiny_binary[0].X_test[:24]
    cts = [client.client.encrypt(x) for x in X]
    before = _health(server)["worker_restarts"]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_predict, server, client.key_id(), cts) for _ in range(2)]
        while _health(server)["pending_jobs"] < 8:  # both requests are in, jobs run on both actors
            assert not all(f.done() for f in futures), [f.result().text[:300] for f in futures]
            time.sleep(0.02)
        victim = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
        victim = [name for name in victim if name.startswith(ACTOR_PREFIX)][0]
        ray.kill(ray.get_actor(victim, namespace=NAMESPACE), no_restart=True)
        outputs = [_decrypt(client, f.result()) for f in futures]
    expected = _simulated(tiny_binary, X)
    assert outputs == [expected, expected]
    health = _health(server)
    assert health["worker_restarts"] == before + 1 and health["pending_jobs"] == 0, health
    assert _decrypt(client, _predict(server, client.key_id(), cts[:2])) == expected[:2]  # the new actor works


def test_poisoned_keys_are_refused_and_honest_clients_unaffected(server, client, tiny_binary):
    """Keys with bytes 100-200 zeroed deserialize but crash Concrete: tried on an actor before a key id is
    issued, they kill it and the one they are retried on, and the upload gets a 400; nothing is stored."""
    upload_poisoned_keys(server, client, MODEL)
    X = tiny_binary[0].X_test[:4]
    r = _predict(server, client.key_id(), [client.client.encrypt(x) for x in X])
    assert _decrypt(client, r) == _simulated(tiny_binary, X) and server.alive()


def test_without_ray_the_option_says_how_to_install_it(bundles, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    result = CliRunner().invoke(cli, ["serve", "--bundles", str(bundles), "--executor", "ray"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and 'pip install "molcloak[ray]"' in lines[0], result.output


def test_ray_options_need_the_ray_executor(bundles):
    result = CliRunner().invoke(cli, ["serve", "--bundles", str(bundles), "--ray-address", "auto"])
    assert result.exit_code == 2 and "apply to --executor ray only" in result.output, result.output
