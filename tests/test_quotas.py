"""Issue 13, weaknesses 9 and 10: key storage quotas, expiry and garbage collection, /health behind the
token, prediction budgets per key id and per token, and the rate limit per key id. Real server processes
on loopback, real keys and ciphertexts of the tiny pinned model."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time

import httpx
import pytest
from helpers import ServerProcess

from molcloak.pipeline.errors import BudgetExhaustedError
from molcloak.pipeline.serving.http_client import RemoteModel

MODEL = "tiny-sol-low"
OCTET = {"Content-Type": "application/octet-stream"}
TOKENS = ["tok-a", "tok-b", "tok-c"]
TTL_SECONDS = 60
# long enough for a loaded machine to upload keys and predict before they expire
EXPIRY_TTL_SECONDS = 20


def auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _upload(server, keys: bytes, token: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{server.url}/keys",
        params={"model": MODEL},
        content=keys,
        headers={**OCTET, **auth(token)},
        timeout=300,
    )


def _predict(server, key_id: str, cts: list[str], token: str | None = None) -> httpx.Response:
    body = {"model": MODEL, "key_id": key_id, "ciphertexts": cts}
    return httpx.post(f"{server.url}/predict", json=body, headers=auth(token), timeout=300)


def _cts(model: RemoteModel, X, n: int) -> list[str]:
    return [base64.b64encode(model.client.encrypt(X[i % len(X)])).decode() for i in range(n)]


def _error(r: httpx.Response) -> dict:
    return r.json()["error"]


def _stored(server) -> set[str]:
    return {p.stem for p in (server.state_dir / "keys").glob("*.keys")}


@pytest.fixture(scope="module")
def bundles(tiny_binary, tmp_path_factory):
    root = tmp_path_factory.mktemp("quotas") / "bundles"
    root.mkdir()
    shutil.copytree(tiny_binary[2], root / "binary")
    return root


# ---------------------------------------------------------------- tokens: quotas, budgets, /health


@pytest.fixture(scope="module")
def keys_size(bundles, tiny_binary):
    from molcloak.pipeline.fhe_client import PrivateClient

    # in client_a's key directory: client_a (below) finds these keys and uploads them instead of making its own
    client = PrivateClient(bundles / "binary", bundles.parent / "keys-a")
    client.keygen()
    return len(client.evaluation_keys())


@pytest.fixture(scope="module")
def guarded(bundles, keys_size):
    """Three tokens; one key set per token and model; room for two and a half key sets in all; a budget
    of 3 predictions per key id and 4 per token."""
    token_file = bundles.parent / "tokens"
    token_file.write_text("\n".join(TOKENS) + "\n")
    args = [
        "--max-keys-per-model",
        1,
        "--max-key-storage-mb",
        f"{2.5 * keys_size / 2**20:.3f}",
        "--max-predictions-per-key",
        3,
        "--max-predictions-per-token",
        4,
    ]
    server = ServerProcess(bundles, bundles.parent / "guarded", token_file=token_file, extra_args=args)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client_a(guarded, bundles):
    return RemoteModel(guarded.url, MODEL, key_dir=bundles.parent / "keys-a", token="tok-a")


def test_key_sets_per_token_and_total_storage_answer_429_and_507(guarded, client_a):
    keys = client_a.client.evaluation_keys()
    a, b, c = TOKENS
    first = _upload(guarded, keys, a)
    assert first.status_code == 201, first.text[:500]
    key_a = first.json()["key_id"]
    r = _upload(guarded, keys, a)  # a second key set for the same token and model
    assert r.status_code == 429, r.text[:500]
    assert _error(r)["type"] == "QuotaError"
    message = _error(r)["message"]
    assert "your token holds 1 key sets for model 'tiny-sol-low'" in message
    assert "--max-keys-per-model" in message and "DELETE /keys/" in message
    r = _upload(guarded, keys, b)  # another token has its own quota
    assert r.status_code == 201, r.text[:500]
    key_b = r.json()["key_id"]
    r = _upload(guarded, keys, c)  # a third key set would not fit in 2.5 key sets of storage
    assert r.status_code == 507, r.text[:500]
    assert _error(r)["type"] == "KeyStorageFullError" and "--max-key-storage-mb" in _error(r)["message"]
    assert _stored(guarded) == {key_a, key_b}  # nothing written for the refused uploads
    # a key id is unknown to the other tokens: they can neither use nor delete it
    assert _predict(guarded, key_a, ["AAAA"], b).status_code == 404
    assert httpx.delete(f"{guarded.url}/keys/{key_a}", headers=auth(b)).status_code == 404
    # deleting a key set makes room
    assert httpx.delete(f"{guarded.url}/keys/{key_b}", headers=auth(b)).status_code == 204
    r = _upload(guarded, keys, c)
    assert r.status_code == 201, r.text[:500]
    for token, key_id in ((a, key_a), (c, r.json()["key_id"])):
        assert httpx.delete(f"{guarded.url}/keys/{key_id}", headers=auth(token)).status_code == 204
    assert _stored(guarded) == set() and guarded.alive()


def test_health_figures_only_behind_the_token(guarded, client_a, keys_size):
    r = httpx.get(f"{guarded.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert httpx.get(f"{guarded.url}/health", headers=auth("wrong")).json() == {"status": "ok"}
    key_id = client_a.key_id()
    figures = httpx.get(f"{guarded.url}/health", headers=auth("tok-b")).json()
    keys = figures["keys"]
    assert keys["key_sets"] == 1 and keys["key_bytes"] == keys_size
    assert keys["key_sets_per_model"] == {MODEL: 1}
    assert keys["limits"]["max_keys_per_model"] == 1 and keys["limits"]["max_predictions_per_key"] == 3
    assert figures["worker_restarts"] == 0 and figures["models"] == [MODEL]
    assert key_id not in r.text


def test_prediction_budgets_per_key_and_per_token_survive_a_restart(guarded, client_a, tiny_binary):
    X = tiny_binary[0].X_test
    key_id = client_a.key_id()
    r = _predict(guarded, key_id, _cts(client_a, X, 2), "tok-a")
    assert r.status_code == 200, r.text[:500]
    assert r.headers["X-Molcloak-Predictions-Remaining"] == "1"
    assert r.headers["X-Molcloak-Predictions-Budget"] == "3"
    r = _predict(guarded, key_id, ["%%%"], "tok-a")  # refused before any work: costs nothing
    assert r.status_code == 400
    r = _predict(guarded, key_id, _cts(client_a, X, 2), "tok-a")
    assert r.status_code == 429, r.text[:500]
    error = _error(r)
    assert error["type"] == "BudgetExhaustedError"
    assert "key id" in error["message"] and "made 2 of its 3 predictions" in error["message"]
    assert "--max-predictions-per-key" in error["message"] and "send at most 1" in error["message"]
    assert r.headers["X-Molcloak-Predictions-Remaining"] == "1" and "Retry-After" not in r.headers
    # the HTTP client: the last prediction, then a clear error
    smiles = tiny_binary[0].smiles_test[:1]
    assert len(client_a.predict(smiles).predictions) == 1
    assert client_a.predictions_remaining == 0
    with pytest.raises(BudgetExhaustedError, match=r"answered 429 .*prediction budget spent.*3 predictions"):
        client_a.predict(smiles)
    # new keys start a new budget per key id, but the token has made 3 of its 4 predictions
    assert httpx.delete(f"{guarded.url}/keys/{key_id}", headers=auth("tok-a")).status_code == 204
    r = _upload(guarded, client_a.client.evaluation_keys(), "tok-a")
    assert r.status_code == 201, r.text[:500]
    new_key = r.json()["key_id"]
    r = _predict(guarded, new_key, _cts(client_a, X, 2), "tok-a")
    assert r.status_code == 429 and "--max-predictions-per-token" in _error(r)["message"]
    assert "made 3 of its 4" in _error(r)["message"]
    # the counts are on disk: a restart does not reset them
    guarded.stop()
    restarted = ServerProcess(
        guarded.bundles,
        guarded.state_dir,
        token_file=guarded.token_file,
        port=guarded.port,
        extra_args=guarded.command[guarded.command.index("--max-keys-per-model") :],
    )
    try:
        r = _predict(restarted, new_key, _cts(client_a, X, 1), "tok-a")
        assert r.status_code == 200 and r.headers["X-Molcloak-Predictions-Remaining"] == "0"
        r = _predict(restarted, new_key, _cts(client_a, X, 1), "tok-a")
        assert r.status_code == 429 and _error(r)["type"] == "BudgetExhaustedError"
        # other tokens keep their budgets
        other = RemoteModel(restarted.url, MODEL, key_dir=client_a.key_dir, token="tok-b")
        assert len(other.predict(smiles).predictions) == 1 and other.predictions_remaining == 2
    finally:
        restarted.stop()


# ---------------------------------------------------------------- no token: expiry, rate limit


@pytest.fixture(scope="module")
def open_server(bundles):
    """No token; key sets expire TTL_SECONDS after their last use; 30 predictions a minute per key id."""
    args = ["--key-ttl-hours", f"{TTL_SECONDS / 3600:.6f}", "--rate", 30, "--max-batch", 32]
    server = ServerProcess(bundles, bundles.parent / "open", extra_args=args)
    yield server
    server.stop()


@pytest.fixture
def expiring_server(bundles):
    """No token; key sets expire EXPIRY_TTL_SECONDS after their last use (collected every half of it), so that the
    expiry test waits seconds, not minutes. An expired key set (last used in 1970) lies in the state directory
    before the start."""
    state = bundles.parent / "expiring"
    keys = state / "keys"
    keys.mkdir(parents=True)
    old = "0a" * 16
    (keys / f"{old}.keys").write_bytes(b"old keys")
    (keys / f"{old}.json").write_text(json.dumps({"model": MODEL, "bytes": 8, "created": 0, "last_used": 0}))
    os.chmod(keys, 0o700)
    args = ["--key-ttl-hours", f"{EXPIRY_TTL_SECONDS / 3600:.6f}"]
    server = ServerProcess(bundles, state, workers=1, extra_args=args)
    yield server
    server.stop()


def test_rate_limit_per_key_id_answers_429_with_retry_after(open_server, bundles, tiny_binary):
    X = tiny_binary[0].X_test
    model = RemoteModel(open_server.url, MODEL, key_dir=bundles.parent / "keys-open")
    key_id = model.key_id()
    cts = _cts(model, X, 31)  # encrypted first: the bucket refills while the client works
    r = _predict(open_server, key_id, cts[:16])
    assert r.status_code == 200, r.text[:500]
    assert r.headers["X-Molcloak-Rate-Limit"] == "30" and int(r.headers["X-Molcloak-Rate-Remaining"]) <= 14
    assert "X-Molcloak-Predictions-Remaining" not in r.headers  # no budget on this server
    r = _predict(open_server, key_id, cts)
    assert r.status_code == 429 and "send at most 30 ciphertexts" in _error(r)["message"]
    r = _predict(open_server, key_id, cts[:30])  # 30 predictions need 30 tokens, 14 are left (+0.5/s)
    assert r.status_code == 429, r.text[:500]
    assert _error(r)["type"] == "RateLimitedError" and "30 predictions per minute" in _error(r)["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 32
    # another key id has its own bucket
    other = _upload(open_server, model.client.evaluation_keys())
    assert other.status_code == 201
    assert _predict(open_server, other.json()["key_id"], cts[:16]).status_code == 200
    # the HTTP client waits as the server says (Retry-After), then gets its predictions
    report = model.predict(tiny_binary[0].smiles_test[:20], batch_size=20)
    assert len(report.predictions) == 20 and all(p.raw is not None for p in report.predictions)
    assert model.key_id() == key_id  # the same key id, waited for (its keys did not expire meanwhile)
    assert open_server.alive()


def test_unused_key_sets_expire_at_start_and_periodically(expiring_server, bundles, tiny_binary):
    assert "0a" * 16 not in _stored(expiring_server)  # collected at start
    assert not (expiring_server.state_dir / "keys" / f"{'0a' * 16}.json").exists()
    health = httpx.get(f"{expiring_server.url}/health").json()  # no token: the figures are public
    start_expired = health["keys"]["expired_since_start"]
    assert start_expired >= 1 and health["keys"]["limits"]["key_ttl_seconds"] == pytest.approx(
        EXPIRY_TTL_SECONDS, 0.01
    )
    model = RemoteModel(expiring_server.url, MODEL, key_dir=bundles.parent / "keys-expiry")
    key_id = model.key_id()
    assert _predict(expiring_server, key_id, _cts(model, tiny_binary[0].X_test, 1)).status_code == 200
    deadline = (
        time.monotonic() + EXPIRY_TTL_SECONDS + 120
    )  # expiry time, collection interval, a loaded machine
    while key_id in _stored(expiring_server) and time.monotonic() < deadline:
        time.sleep(2)
    assert key_id not in _stored(expiring_server), "the unused key set was not collected"
    r = _predict(expiring_server, key_id, _cts(model, tiny_binary[0].X_test, 1))
    assert r.status_code == 404 and _error(r)["type"] == "KeysError"
    assert httpx.get(f"{expiring_server.url}/health").json()["keys"]["expired_since_start"] > start_expired
    # the HTTP client uploads its keys again by itself
    assert len(model.predict(tiny_binary[0].smiles_test[:1]).predictions) == 1
    assert model.key_id() != key_id
