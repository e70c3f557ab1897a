"""The FHE server as a real uvicorn process on loopback, with tiny real bundles."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import time

import httpx
import numpy as np
import pytest
from helpers import ServerProcess, free_port

from molcloak.pipeline.errors import KeyMismatchError, RemoteError
from molcloak.pipeline.fhe_client import PrivateClient
from molcloak.pipeline.fhe_server import PrivateServer
from molcloak.pipeline.serving.http_api import status_of
from molcloak.pipeline.serving.http_client import RemoteModel
from molcloak.pipeline.serving.keystore import KeyStore

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def served(tiny_binary, tiny_regression, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    bundles = root / "bundles"
    bundles.mkdir()
    shutil.copytree(tiny_binary[2], bundles / "binary")
    shutil.copytree(tiny_regression[2], bundles / "regression")
    (root / "token").write_text(TOKEN + "\n")
    server = ServerProcess(bundles, root / "state", root / "token")
    yield server, root
    server.stop()


def auth(**extra):
    return {"Authorization": f"Bearer {TOKEN}", **extra}


def remote(server, root, model="tiny-sol-low", keys="client-keys"):
    return RemoteModel(server.url, model, key_dir=root / keys, token=TOKEN)


def test_http_predictions_equal_local_simulation(served, tiny_binary):
    server, root = served
    ckpt, compiled, _ = tiny_binary
    report = remote(server, root).predict(ckpt.smiles_test[:5], batch_size=3)
    simulated = compiled.q_module.forward(ckpt.X_test[:5], fhe="simulate")
    assert [p.raw for p in report.predictions] == simulated.tolist()
    assert all(p.seconds["run"] > 0 for p in report.predictions)


def test_models_and_client_download_carry_no_weights(served):
    server, _ = served
    models = httpx.get(f"{server.url}/models", headers=auth()).json()
    assert {m["name"] for m in models} == {"tiny-sol-low", "tiny-sol-logs"}
    m = next(m for m in models if m["name"] == "tiny-sol-low")
    assert (
        m["labels"] == ["not low", "low"]
        and m["circuit"]["pbs_count"] == 4
        and "fhe_simulate" in m["metrics"]
    )
    r = httpx.get(f"{server.url}/models/tiny-sol-low/client", headers=auth())
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert sorted(names) == ["client.zip", "manifest.json"]
    assert httpx.get(f"{server.url}/openapi.json").status_code in (200, 401)


def test_keys_survive_a_restart(tiny_binary, tmp_path):
    ckpt, _, bundle = tiny_binary
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    shutil.copytree(bundle, bundles / "binary")
    server = ServerProcess(bundles, tmp_path / "state")
    try:
        model = RemoteModel(server.url, "tiny-sol-low", key_dir=tmp_path / "keys")
        key_id = model.key_id()
        first = model.predict(ckpt.smiles_test[:2])
    finally:
        server.stop()
    assert (tmp_path / "state" / "keys" / f"{key_id}.keys").is_file()
    server = ServerProcess(bundles, tmp_path / "state", port=server.port)
    try:
        again = RemoteModel(server.url, "tiny-sol-low", key_dir=tmp_path / "keys")
        assert again.key_id() == key_id  # nothing re-uploaded
        r = again.request(
            "POST",
            "/predict",
            json={
                "model": "tiny-sol-low",
                "key_id": key_id,
                "ciphertexts": [base64.b64encode(again.client.encrypt(ckpt.X_test[0])).decode()],
            },
        )
        assert r.status_code == 200
        second = again.predict(ckpt.smiles_test[:2])
        assert [p.raw for p in second.predictions] == [p.raw for p in first.predictions]
        assert httpx.delete(f"{server.url}/keys/{key_id}").status_code == 204
        # the client notices the unknown key id and uploads its keys again
        third = again.predict(ckpt.smiles_test[:1])
        assert third.predictions[0].raw == first.predictions[0].raw and again.key_id() != key_id
    finally:
        server.stop()


def test_client_fingerprint_is_the_clients_and_survives_touch_and_restart(tiny_binary, tmp_path):
    """GET /models gives sha256(client.zip)[:16], the value `PrivateClient.fingerprint` computes, whatever
    the files' modification times; POST /predict accepts it."""
    ckpt, _, bundle = tiny_binary
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    shutil.copytree(bundle, bundles / "binary")
    expected = PrivateClient(bundles / "binary", tmp_path / "local-keys").fingerprint

    def served(server):
        (info,) = httpx.get(f"{server.url}/models").json()
        return info["client_fingerprint"], httpx.get(f"{server.url}/models/tiny-sol-low/client").content

    with ServerProcess(bundles, tmp_path / "state", workers=1) as server:
        first, download = served(server)
        model = RemoteModel(server.url, "tiny-sol-low", key_dir=tmp_path / "keys")
        assert model.client.fingerprint == expected  # the downloaded client part hashes to the same value
        body = {
            "model": "tiny-sol-low",
            "key_id": model.key_id(),
            "client_fingerprint": expected,
            "ciphertexts": [base64.b64encode(model.client.encrypt(ckpt.X_test[0])).decode()],
        }
        assert model.request("POST", "/predict", json=body).status_code == 200
    later = time.time() + 3600
    for f in (bundles / "binary" / "client").iterdir():
        os.utime(f, (later, later))
    with ServerProcess(bundles, tmp_path / "state", workers=1, port=server.port) as server:
        again, download_again = served(server)
    assert first == again == expected
    assert download_again == download  # the same files give the same download


@pytest.fixture(scope="module")
def uploaded(served, tiny_binary, tiny_regression):
    server, root = served
    binary = remote(server, root)
    regression = remote(server, root, "tiny-sol-logs")
    ct_binary = base64.b64encode(binary.client.encrypt(tiny_binary[0].X_test[0])).decode()
    ct_regression = base64.b64encode(regression.client.encrypt(tiny_regression[0].X_test[0])).decode()
    return (
        binary.key_id(),
        regression.key_id(),
        ct_binary,
        ct_regression,
        regression.info["client_fingerprint"],
    )


def _post_predict(url, body, **kw):
    return httpx.post(f"{url}/predict", json=body, headers=auth(), timeout=120, **kw)


BAD = {
    "unknown model": (
        lambda k: {"model": "nope", "key_id": k[0], "ciphertexts": [k[2]]},
        404,
        "UnknownModelError",
    ),
    "unknown key id": (
        lambda k: {"model": "tiny-sol-low", "key_id": "f" * 32, "ciphertexts": [k[2]]},
        404,
        "KeysError",
    ),
    "malformed key id": (
        lambda k: {"model": "tiny-sol-low", "key_id": "../../etc/passwd", "ciphertexts": [k[2]]},
        404,
        "KeysError",
    ),
    "key of another model": (
        lambda k: {"model": "tiny-sol-low", "key_id": k[1], "ciphertexts": [k[2]]},
        409,
        "KeyMismatchError",
    ),
    "truncated ciphertext": (
        lambda k: {
            "model": "tiny-sol-low",
            "key_id": k[0],
            "ciphertexts": [base64.b64encode(base64.b64decode(k[2])[:100]).decode()],
        },
        400,
        "CiphertextError",
    ),
    "random ciphertext bytes": (
        lambda k: {
            "model": "tiny-sol-low",
            "key_id": k[0],
            "ciphertexts": [base64.b64encode(os.urandom(504)).decode()],
        },
        400,
        "CiphertextError",
    ),
    "ciphertext of another model": (
        lambda k: {
            "model": "tiny-sol-low",
            "key_id": k[0],
            "ciphertexts": [k[3]],
            "client_fingerprint": k[4],
        },
        400,
        "CiphertextError",
    ),
    "not base64": (
        lambda k: {"model": "tiny-sol-low", "key_id": k[0], "ciphertexts": ["%%%"]},
        400,
        "CiphertextError",
    ),
    "empty batch": (lambda k: {"model": "tiny-sol-low", "key_id": k[0], "ciphertexts": []}, 422, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_predict_requests_get_4xx_and_server_stays_up(served, uploaded, case):
    server, _ = served
    build, status, kind = BAD[case]
    r = _post_predict(server.url, build(uploaded))
    assert r.status_code == status, r.text[:500]
    if kind:
        assert r.json()["error"]["type"] == kind and r.json()["error"]["message"]
    assert server.alive()


def test_transport_level_bad_input(served, uploaded):
    server, root = served
    url = server.url
    r = httpx.post(f"{url}/predict", content=b"model=x", headers=auth(**{"Content-Type": "text/plain"}))
    assert r.status_code == 415 and r.json()["error"]["type"] == "UnsupportedMediaType"
    r = httpx.get(f"{url}/models")
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    big = b"\0" * (129 * 2**20)
    r = httpx.post(
        f"{url}/keys",
        params={"model": "tiny-sol-low"},
        content=big,
        headers=auth(**{"Content-Type": "application/octet-stream"}),
        timeout=120,
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "BodyTooLarge"
    r = httpx.post(
        f"{url}/predict", content=b"{not json", headers=auth(**{"Content-Type": "application/json"})
    )
    assert r.status_code == 422
    assert server.alive()


def test_bad_key_uploads(served, tiny_binary, tiny_regression):
    server, root = served
    url = server.url
    octet = auth(**{"Content-Type": "application/octet-stream"})
    mine = remote(server, root).client.evaluation_keys()
    for body, message in [
        (b"", "body is empty"),
        (os.urandom(5000), "expects"),
        (mine[: len(mine) // 2], "expects"),
    ]:
        r = httpx.post(
            f"{url}/keys", params={"model": "tiny-sol-low"}, content=body, headers=octet, timeout=120
        )
        assert r.status_code == 400, r.text[:300]
        assert r.json()["error"]["type"] == "CiphertextError" and message in r.json()["error"]["message"]
    r = httpx.post(f"{url}/keys", params={"model": "nope"}, content=mine, headers=octet, timeout=120)
    assert r.status_code == 404
    # same size as valid keys, random content: rejected or stored, never a crash
    r = httpx.post(
        f"{url}/keys",
        params={"model": "tiny-sol-low"},
        content=os.urandom(len(mine)),
        headers=octet,
        timeout=120,
    )
    assert r.status_code in (201, 400, 503)
    assert server.alive()


def test_remote_client_errors_are_clear(served, tmp_path):
    server, root = served
    with pytest.raises(RemoteError, match="model 'nope' is not served"):
        RemoteModel(server.url, "nope", key_dir=tmp_path, token=TOKEN)
    with pytest.raises(RemoteError, match="401 Unauthorized"):
        RemoteModel(server.url, "tiny-sol-low", key_dir=tmp_path)
    with pytest.raises(RemoteError, match="cannot reach the FHE server"):
        import molcloak.pipeline.serving.http_client as rm

        old, rm.RETRIES = rm.RETRIES, 2
        try:
            RemoteModel(f"http://127.0.0.1:{free_port()}", "x", key_dir=tmp_path)
        finally:
            rm.RETRIES = old


def test_server_never_sees_smiles_features_or_secret_keys(served, tiny_binary, tmp_path):
    """Record every byte the client sends and every file the server writes."""
    server, root = served
    ckpt, _, _ = tiny_binary
    sent: list[bytes] = []
    transport = httpx.HTTPTransport()

    class Recorder(httpx.BaseTransport):
        def handle_request(self, request):
            sent.append(
                str(request.url).encode()
                + b"\n"
                + b"".join(f"{k}: {v}\n".encode() for k, v in request.headers.items())
                + request.read()
            )
            return transport.handle_request(request)

    smiles = ["CC(C)Cc1ccc(cc1)C(C)C(=O)O", "c1ccc2ccccc2c1"]
    model = RemoteModel(
        server.url, "tiny-sol-low", key_dir=tmp_path / "keys", token=TOKEN, transport=Recorder()
    )
    report = model.predict(smiles)
    wire = b"\n".join(sent)
    X = model.client.featurize(smiles)
    secret_file = model.client.key_path.read_bytes()
    server_files = b"".join(p.read_bytes() for p in (root / "state").rglob("*") if p.is_file())
    server_files += server.log.read_bytes()
    for blob in (wire, server_files):
        for s in smiles:
            assert s.encode() not in blob
        for row in X:
            assert row.tobytes() not in blob and row.astype(np.float64).tobytes() not in blob
        assert secret_file not in blob
        for p in report.predictions:  # decrypted results never travel back (labels are public names)
            assert repr(p.raw[0]).encode() not in blob and repr(p.value[1]).encode() not in blob
    # what was uploaded is exactly the evaluation keys, which are strictly less than the key file
    assert model.client.evaluation_keys() in wire and len(model.client.evaluation_keys()) < len(secret_file)


def test_fuzz_every_route_of_the_openapi_schema(served):
    """Random paths, bodies and content types on every route of the generated schema: never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    server, _ = served
    schema = httpx.get(f"{server.url}/openapi.json", headers=auth()).json()
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    assert ("POST", "/predict") in routes and ("POST", "/keys") in routes
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=8,
    )
    bodies = st.one_of(
        json_values.map(lambda v: ("application/json", v)),
        st.fixed_dictionaries(
            {
                "model": st.sampled_from(["tiny-sol-low", "x", ""]),
                "key_id": st.text(max_size=40),
                "ciphertexts": st.lists(
                    st.text(max_size=30) | st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()),
                    max_size=3,
                ),
            }
        ).map(lambda v: ("application/json", v)),
        st.binary(max_size=300).map(lambda b: ("application/octet-stream", b)),
        st.binary(max_size=50).map(lambda b: ("text/plain", b)),
    )
    segment = st.sampled_from(["tiny-sol-low", "nope", "0" * 32, "..", "%00", "a" * 300])

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(routes), body=bodies, seg=segment, model=segment)
    def check(route, body, seg, model):
        method, path = route
        path = path.replace("{name}", seg).replace("{key_id}", seg)
        ctype, payload = body
        kwargs = {"json": payload} if ctype == "application/json" else {"content": payload}
        r = httpx.request(
            method,
            f"{server.url}{path}",
            params={"model": model},
            timeout=120,
            headers=auth(**{"Content-Type": ctype}),
            **kwargs,
        )
        assert r.status_code < 500, (method, path, r.status_code, r.text[:300])

    check()
    assert server.alive()


def test_key_store_answers_409_for_keys_of_another_model(served, uploaded, tiny_binary):
    """The worker-side owner check (KeyStore.get) fails like the route's check: KeyMismatchError, 409."""
    server, root = served
    binary_key, regression_key = uploaded[:2]
    fhe = PrivateServer(tiny_binary[2])
    keys_dir = root / "state" / "keys"
    store = KeyStore(keys_dir, 2**30, load=lambda model, data: fhe.load_keys(data), cost=lambda model: 1)
    assert store.get(binary_key, "tiny-sol-low") is not None  # the real uploaded keys, deserialized
    with pytest.raises(
        KeyMismatchError,
        match=f"key id {regression_key} belongs to model 'tiny-sol-logs', "
        "not 'tiny-sol-low'; upload keys generated for 'tiny-sol-low'",
    ) as info:
        store.get(regression_key, "tiny-sol-low")
    assert status_of(info.value) == 409
    # evaluation keys on disk: directory 0700, files 0600, no temporary file left behind
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    files = list(keys_dir.iterdir())
    assert {f.name for f in files} >= {f"{binary_key}.keys", f"{binary_key}.json", f"{regression_key}.keys"}
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files) and not any(
        f.name.endswith(".tmp") for f in files
    )
    assert server.alive()
