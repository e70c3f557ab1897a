"""Real compilation, keygen, encryption, server-side execution and decryption of tiny models."""

import json
import shutil
import stat
import zipfile

import numpy as np
import pytest

from molcloak.pipeline.bundle import client_fingerprint, load_checkpoint, load_manifest
from molcloak.pipeline.errors import BundleError, CiphertextError
from molcloak.pipeline.fhe_client import PrivateClient
from molcloak.pipeline.fhe_server import PrivateServer
from molcloak.pipeline.metrics import to_predictions
from molcloak.pipeline.predict import LocalBackend, PredictionBackend, predict_local
from molcloak.pipeline.serving.http_client import RemoteModel
from molcloak.pipeline.train import predict_raw


@pytest.fixture(scope="module")
def halves(tiny_binary, tmp_path_factory):
    _, compiled, bundle = tiny_binary
    client = PrivateClient(bundle, tmp_path_factory.mktemp("keys"))
    server = PrivateServer(bundle)
    client.keygen()
    return client, server, server.load_keys(client.evaluation_keys())


def test_compile_reports_circuit_and_simulated_metrics(tiny_binary):
    ckpt, compiled, _ = tiny_binary
    s = compiled.stats
    assert s.pbs_count == 4  # one lookup per hidden neuron
    assert 1 < s.max_bit_width <= 8
    assert s.evaluation_key_bytes > 0 and s.input_ciphertext_bytes > 0
    assert set(compiled.metrics) == {"float", "quantized", "fhe_simulate"}
    assert 0.5 < compiled.metrics["fhe_simulate"]["roc_auc"] <= 1


def test_executed_equals_simulated_and_argmax_equals_quantized(tiny_binary, halves):
    ckpt, compiled, _ = tiny_binary
    client, server, keys = halves
    X = ckpt.X_test[:6]
    simulated = compiled.q_module.forward(X, fhe="simulate")
    quantized = compiled.q_module.forward(X, fhe="disable")
    executed = np.vstack([client.decrypt(server.run(client.encrypt(x), keys)) for x in X])
    assert np.array_equal(executed, simulated)  # default p_error 2^-40
    assert np.array_equal(executed.argmax(axis=1), quantized.argmax(axis=1))


def test_client_featurizes_like_training(tiny_binary, halves):
    ckpt, _, _ = tiny_binary
    client, _, _ = halves
    assert np.array_equal(client.featurize(ckpt.smiles_test[:5]), ckpt.X_test[:5])


def test_quantized_float_model_agrees_with_fhe_on_most_molecules(tiny_binary):
    ckpt, compiled, _ = tiny_binary
    float_cls = predict_raw(ckpt.build_model(), ckpt.X_test).argmax(axis=1)
    sim_cls = compiled.q_module.forward(ckpt.X_test, fhe="simulate").argmax(axis=1)
    assert np.mean(float_cls == sim_cls) > 0.9


def test_secret_key_stays_in_private_key_dir(tiny_binary, halves):
    _, _, bundle = tiny_binary
    client, _, _ = halves
    mode = client.key_path.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600 and stat.S_IMODE(client.key_path.parent.stat().st_mode) == 0o700
    # evaluation keys are not the full key set (which holds the secret key)
    assert len(client.evaluation_keys()) < client.key_path.stat().st_size
    # nothing in the bundle is key material
    assert not [p for p in bundle.rglob("*") if "key" in p.name.lower()]


def test_client_part_carries_no_weights(tiny_binary):
    _, _, bundle = tiny_binary
    with zipfile.ZipFile(bundle / "client" / "client.zip") as z:
        names = set(z.namelist())
        processing = json.loads(z.read("serialized_processing.json"))
    assert "serialized_processing.json" in names and not any(
        n.endswith((".pt", ".onnx", ".mlir")) for n in names
    )
    assert "weight" not in json.dumps(processing).lower()
    assert not (bundle / "client" / "model.pt").exists()


def test_keys_are_reused_from_the_key_dir(tiny_binary, tmp_path):
    ckpt, _, bundle = tiny_binary
    first = predict_local(bundle, ckpt.smiles_test[:2], key_dir=tmp_path)
    second = predict_local(bundle, ckpt.smiles_test[:2], key_dir=tmp_path)
    assert not first.keys_reused and second.keys_reused and second.keygen_seconds == 0
    assert [p.raw for p in first.predictions] == [p.raw for p in second.predictions]
    simulated = predict_local(bundle, ckpt.smiles_test[:2], fhe="simulate")
    assert [p.raw for p in simulated.predictions] == [p.raw for p in first.predictions]


def test_invalid_smiles_in_prediction(tiny_binary, tmp_path):
    _, _, bundle = tiny_binary
    with pytest.raises(ValueError, match=r"molecule 2: SMILES 'C1CC' could not be parsed"):
        predict_local(bundle, ["CCO", "C1CC"], key_dir=tmp_path)
    report = predict_local(bundle, ["CCO", "C1CC"], key_dir=tmp_path, skip_invalid=True)
    assert report.predictions[0].label and "could not be parsed" in report.predictions[1].error


def test_malformed_ciphertext_and_keys_are_rejected(halves):
    client, server, keys = halves
    with pytest.raises(CiphertextError, match="ciphertext is malformed"):
        server.run(b"\x00not a ciphertext", keys)
    with pytest.raises(CiphertextError, match="evaluation keys are malformed"):
        server.load_keys(b"garbage")
    with pytest.raises(CiphertextError, match="ciphertext is empty"):
        server.run(b"", keys)


def test_version_mismatch_fails_clearly(tiny_binary, tmp_path):
    import shutil

    _, _, bundle = tiny_binary
    copy = tmp_path / "old"
    shutil.copytree(bundle, copy)
    for path in (copy / "manifest.json", copy / "client" / "manifest.json"):
        data = json.loads(path.read_text())
        data["versions"]["concrete-ml"] = "1.4.0"
        path.write_text(json.dumps(data))
    with pytest.raises(
        BundleError,
        match=r"built with concrete-ml 1.4.0, this machine has 1.9.0; install concrete-ml==1.4.0 or rebuild",
    ):
        PrivateClient(copy, tmp_path / "k")
    with pytest.raises(BundleError, match="does not exist"):
        load_manifest(tmp_path / "missing")


def test_owner_part_reloads_the_same_model(tiny_binary):
    ckpt, _, bundle = tiny_binary
    again = load_checkpoint(bundle)
    assert np.array_equal(
        predict_raw(again.build_model(), ckpt.X_test), predict_raw(ckpt.build_model(), ckpt.X_test)
    )


def test_regression_prediction_in_task_units(tiny_regression, tmp_path):
    ckpt, compiled, bundle = tiny_regression
    report = predict_local(bundle, ckpt.smiles_test[:3], key_dir=tmp_path)
    simulated = to_predictions(
        ckpt.task, compiled.q_module.forward(ckpt.X_test[:3], fhe="simulate"), ckpt.scaler
    )
    got = np.array([p.value for p in report.predictions])
    assert np.allclose(got, simulated)
    assert -12 < got.min() and got.max() < 3  # logS range, not standardized units
    assert set(compiled.metrics["fhe_simulate"]) == {"rmse", "mae", "r2"}


def test_multiclass_bundle_runs_encrypted(tmp_path):
    from conftest import _tiny

    ckpt, compiled, bundle = _tiny("sol-class", tmp_path)
    report = predict_local(bundle, ckpt.smiles_test[:2], key_dir=tmp_path / "keys")
    simulated = compiled.q_module.forward(ckpt.X_test[:2], fhe="simulate")
    assert [p.raw for p in report.predictions] == simulated.tolist()
    assert all(len(p.value) == 3 and p.label in ("low", "medium", "high") for p in report.predictions)


def test_a_linear_model_on_random_features_runs_encrypted_without_a_bootstrap(tmp_path):
    """--hidden 0 on rff features (a kernel machine, fitted by the convex solver): no PBS, no evaluation key, FHE
    equal to the simulation, locally and through a real `molcloak serve` (its client uploads a key of 64 bytes)."""
    from conftest import EXACT_P_ERROR
    from helpers import ServerProcess

    from molcloak.pipeline import data, workflow
    from molcloak.pipeline.compile import CompileConfig
    from molcloak.pipeline.linear_fit import L2_GRID
    from molcloak.pipeline.train import TrainConfig

    ckpt = workflow.train_checkpoint(
        data.load_bundled("sol-low"),
        "physchem:scale=quantile+rff:n=64",
        model_options={"hidden": [0], "weight_bits": 4, "input_bits": 4},
        train_config=TrainConfig(epochs=10, patience=10),
    )
    compiled = workflow.compile_checkpoint(ckpt, CompileConfig(p_error=EXACT_P_ERROR))
    assert compiled.stats.pbs_count == 0 and compiled.stats.evaluation_key_bytes == 0
    assert compiled.metrics["fhe_simulate"]["roc_auc"] > 0.9
    workflow.deploy(ckpt, compiled, tmp_path / "bundle", "linear")
    assert str(load_manifest(tmp_path / "bundle").featurizer) == "physchem:scale=quantile+rff:n=64"
    assert ckpt.train_info["final"]["l2"] in L2_GRID and ckpt.train_info["epochs_run"] == len(
        L2_GRID
    )  # no epochs
    report = predict_local(tmp_path / "bundle", ckpt.smiles_test[:3], key_dir=tmp_path / "keys")
    simulated = compiled.q_module.forward(ckpt.X_test[:3], fhe="simulate")
    assert [p.raw for p in report.predictions] == simulated.tolist()
    (tmp_path / "served").mkdir()
    shutil.copytree(tmp_path / "bundle", tmp_path / "served" / "linear")
    with ServerProcess(tmp_path / "served", tmp_path / "state", workers=1) as server:
        remote = RemoteModel(server.url, "linear", key_dir=tmp_path / "remote-keys", token=server.token)
        assert [p.raw for p in remote.predict(ckpt.smiles_test[:3]).predictions] == simulated.tolist()


# ---------------------------------------------------------------- one backend interface, local and remote


@pytest.fixture(scope="module")
def server(tiny_binary, tmp_path_factory):
    """A real `molcloak serve` process on loopback serving a copy of the tiny binary bundle."""
    import shutil

    from helpers import ServerProcess

    root = tmp_path_factory.mktemp("fhe-served")
    shutil.copytree(tiny_binary[2], root / "bundles" / "binary")
    proc = ServerProcess(root / "bundles", root / "state")
    yield proc
    proc.stop()


def test_local_and_remote_backends_give_the_simulation_bit_for_bit(tiny_binary, server, tmp_path):
    """Both backends through the one `PredictionBackend.predict` loop, each with its own keys.

    The keys differ, so the ciphertexts differ; but the tiny bundle is compiled with exact rounding at
    p_error 2^-40 per PBS, so decryption yields the exact integer outputs of the circuit, a function of
    the quantized input and the weights only. Both therefore equal the FHE simulation exactly, hence
    each other: a sound bit-for-bit comparison that does not need shared keys.
    """
    ckpt, compiled, bundle = tiny_binary
    smiles = ckpt.smiles_test[:5]
    simulated = compiled.q_module.forward(ckpt.X_test[:5], fhe="simulate").tolist()
    seen = []
    with (
        LocalBackend(bundle, tmp_path / "local-keys") as local,
        RemoteModel(server.url, "tiny-sol-low", key_dir=tmp_path / "remote-keys") as remote,
    ):
        assert isinstance(local, PredictionBackend) and isinstance(remote, PredictionBackend)
        local_report = local.predict(smiles, batch_size=2, on_item=seen.append)
        remote_report = remote.predict(smiles, batch_size=3)
        assert (
            [p.raw for p in local_report.predictions]
            == simulated
            == [p.raw for p in remote_report.predictions]
        )
        assert [p.label for p in local_report.predictions] == [p.label for p in remote_report.predictions]
        assert seen == local_report.predictions  # on_item once per prediction, in order
        assert (local_report.mode, remote_report.mode) == ("execute", "server")
        assert set(remote_report.predictions[0].seconds) == {"encrypt", "run", "decrypt", "round_trip"}
        assert set(local_report.predictions[0].seconds) == {"encrypt", "run", "decrypt"}
        assert local_report.input_ciphertext_bytes == remote_report.input_ciphertext_bytes > 0
        # one identity for resume checks: the same model has the same client fingerprint either way
        fingerprint = client_fingerprint(bundle)
        assert local.identity() == {
            "source": "bundle",
            "name": "tiny-sol-low",
            "client_fingerprint": fingerprint,
        }
        assert remote.identity() == {
            "source": "server",
            "name": "tiny-sol-low",
            "client_fingerprint": fingerprint,
        }
        # the shared encrypt -> run -> decrypt step on features, as the audit uses it
        rows = remote.run_rows(ckpt.X_test[:2])
        assert [r.raw[0].tolist() for r in rows] == simulated[:2]


def test_remote_backend_uploads_keys_regenerated_since_and_maps_server_errors(tiny_binary, server, tmp_path):
    ckpt, compiled, bundle = tiny_binary
    simulated = compiled.q_module.forward(ckpt.X_test[:1], fhe="simulate").tolist()
    with RemoteModel(server.url, "tiny-sol-low", key_dir=tmp_path / "keys") as remote:
        first_id = remote.key_id()
        # refused by the server's size check before any worker deserializes it
        with pytest.raises(CiphertextError, match=r"answered 400 CiphertextError: ciphertext 0 has 17 bytes"):
            remote.run([b"\x00not a ciphertext"])
    # the same key directory, new keys (another process of this user): the stored key id is stale
    with LocalBackend(bundle, tmp_path / "keys") as local:
        assert not local.keygen(force=True).reused
    with RemoteModel(server.url, "tiny-sol-low", key_dir=tmp_path / "keys") as again:
        report = again.predict(ckpt.smiles_test[:1])
        assert report.keys_reused and again.key_id() != first_id  # uploaded again, not run with the old keys
        assert [p.raw for p in report.predictions] == simulated
