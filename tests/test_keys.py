"""The client's keys: what the client part reveals (issue #13, weakness 11), key sets, their counts and
their rotation (weakness 12). Real Concrete ML, real keys and ciphertexts."""

from __future__ import annotations

import json
import re
import shutil
import stat
import time
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

from molcloak.pipeline.cli import app
from molcloak.pipeline.errors import ConfigError
from molcloak.pipeline.fhe_client import KEYSET_FILE, KeySet, PrivateClient, key_sets
from molcloak.pipeline.predict import LocalBackend
from molcloak.pipeline.train import predict_raw

runner = CliRunner()
MODEL = "tiny-sol-low"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def one_red_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture(scope="module")
def simulated(tiny_binary):
    ckpt, compiled, _ = tiny_binary
    smiles = ckpt.smiles_test[:5]
    return smiles, compiled.q_module.forward(ckpt.featurizer.transform(smiles), fhe="simulate").tolist()


# ---------------------------------------------------------------- weakness 11: the client part


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]


def test_client_part_reveals_the_final_bias_output_scale_and_ranges_and_no_weight_matrix(tiny_binary):
    """The README's statement of what client.zip holds: the quantizers and the crypto parameters; the
    output quantizer gives away the final layer's biases (-zero_point * scale), its scale is the final
    layer's input-activation scale times its weight scale, its range the float model's extreme outputs on
    the calibration (training) split; the input quantizer is the first quantizer's learned threshold.
    No weight matrix, hidden bias or BatchNorm value is in it."""
    ckpt, _, bundle = tiny_binary
    with zipfile.ZipFile(bundle / "client" / "client.zip") as z:
        assert sorted(z.namelist()) == ["client.specs.json", "serialized_processing.json", "versions.json"]
        processing = json.loads(z.read("serialized_processing.json"))
        text = "".join(z.read(n).decode() for n in z.namelist())
    sd = {k: v.detach().numpy().astype(np.float64) for k, v in ckpt.state_dict.items()}
    last_weight = [k for k in sd if k.endswith(".weight") and sd[k].ndim == 2][-1]
    last_bias = last_weight.replace(".weight", ".bias")
    thresholds = [k for k in sd if k.endswith("scaling_impl.value")]
    cfg = ckpt.model_config

    (oq,) = processing["output_quantizers"]
    oq = oq["serialized_value"]
    scale = oq["scale"]["serialized_value"]
    zero_point = np.ravel(oq["zero_point"]["serialized_value"])
    np.testing.assert_allclose(-zero_point * scale, sd[last_bias], rtol=0, atol=1e-6)  # the biases
    act_scale = float(sd[thresholds[-1]]) / 2 ** (cfg["act_bits"] - 1)
    weight_scale = np.abs(sd[last_weight]).max() / (2 ** (cfg["weight_bits"] - 1) - 1)
    assert scale == pytest.approx(act_scale * weight_scale, rel=1e-5)
    outputs = predict_raw(ckpt.build_model(), ckpt.X_calib)
    assert oq["rmin"]["serialized_value"] == pytest.approx(outputs.min(), abs=1e-5)
    assert oq["rmax"]["serialized_value"] == pytest.approx(outputs.max(), abs=1e-5)

    (iq,) = processing["input_quantizers"]
    assert iq["serialized_value"]["rmin"]["serialized_value"] == pytest.approx(-float(sd[thresholds[0]]))

    numbers = np.array(_numbers(text))
    hidden = {
        k: v for k, v in sd.items() if k != last_bias and k not in thresholds and "num_batches" not in k
    }
    assert last_weight in hidden and any(".running_mean" in k for k in hidden)
    for name, values in hidden.items():
        for v in np.ravel(values):
            if abs(v) > 1e-3:
                assert not np.any(np.isclose(numbers, v, rtol=1e-6, atol=0)), (name, v)


# ---------------------------------------------------------------- weakness 12: key sets and rotation


def test_key_set_is_recorded_counted_listed_and_rotated_on_request(tiny_binary, simulated, tmp_path):
    _, _, bundle = tiny_binary
    smiles, expected = simulated
    keys = tmp_path / "keys"
    with LocalBackend(bundle, keys) as backend:
        report = backend.predict(smiles[:2])
        first = backend.client.key_set
        evaluation = backend.client.evaluation_keys()
    assert [p.raw for p in report.predictions] == expected[:2]
    assert report.key_ids == [first.key_id] and len(first.key_id) == 16
    meta = first.directory / KEYSET_FILE
    assert stat.S_IMODE(meta.stat().st_mode) == 0o600
    stored = json.loads(meta.read_text())
    assert stored["predictions"] == 2 and stored["key_id"] == first.key_id
    assert (stored["rotate_after_predictions"], stored["rotate_after_days"]) == (10_000, 30.0)
    assert abs(stored["created"] - time.time()) < 600

    listed = json.loads(cli("keys", "list", "--key-dir", keys, "--json").stdout)
    assert [(k["model"], k["key_id"], k["predictions"], k["due"]) for k in listed] == [
        (MODEL, first.key_id, 2, "")
    ]
    table = cli("keys", "list", "--key-dir", keys)
    assert table.exit_code == 0 and MODEL in table.output and first.key_id in table.output

    secret_before = first.keys_path.read_bytes()
    result = cli("keys", "rotate", MODEL, "--key-dir", keys, "--json")
    assert result.exit_code == 0, result.output
    (rotated,) = json.loads(result.stdout)
    assert rotated["old_key_id"] == first.key_id and rotated["key_id"] != first.key_id
    assert first.keys_path.read_bytes() != secret_before  # the old secret key file is replaced
    (after,) = key_sets(keys)
    assert (after.key_id, after.predictions) == (rotated["key_id"], 0)

    with LocalBackend(bundle, keys) as backend:
        info = backend.keygen()
        assert info.reused and info.key_id == rotated["key_id"]
        assert backend.client.evaluation_keys() != evaluation
        report = backend.predict(smiles[2:4])
    assert [p.raw for p in report.predictions] == expected[2:4]  # decrypts correctly with the new keys
    assert KeySet.load(after.directory).predictions == 2


def test_automatic_rotation_at_the_prediction_threshold(tiny_binary, simulated, tmp_path):
    _, _, bundle = tiny_binary
    smiles, expected = simulated
    keys = tmp_path / "keys"
    with LocalBackend(bundle, keys, rotation={"after_predictions": 2}) as backend:
        report = backend.predict(smiles, batch_size=8)
    # 5 predictions, at most 2 per key set: 2 + 2 + 1, each with fresh keys, all correct
    assert len(report.key_ids) == 3 and len(set(report.key_ids)) == 3
    assert [p.raw for p in report.predictions] == expected
    (current,) = key_sets(keys)
    assert (current.key_id, current.predictions, current.policy.after_predictions) == (
        report.key_ids[-1],
        1,
        2,
    )

    # keys loaded from disk (1 of 2 predictions used) are rotated in the middle of the next run
    with LocalBackend(bundle, keys) as backend:
        report = backend.predict(smiles[:3], batch_size=8)
    assert report.keys_reused and report.key_ids[0] == current.key_id and len(set(report.key_ids)) == 2
    assert [p.raw for p in report.predictions] == expected[:3]
    current = key_sets(keys)[0]
    assert (current.key_id, current.predictions) == (report.key_ids[-1], 2)

    # the stored policy applies to the next run; a given one replaces it, and a key set over it rotates
    result = cli(
        "predict", "--bundle", bundle, "--key-dir", keys, "--rotate-after-predictions", 1, "--json", smiles[0]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["key_ids"][0] != current.key_id and not out["keys_reused"]
    assert out["predictions"][0]["raw"] == expected[0]
    assert key_sets(keys)[0].policy.after_predictions == 1


def test_automatic_rotation_by_age(tiny_binary, simulated, tmp_path):
    _, _, bundle = tiny_binary
    smiles, expected = simulated
    keys = tmp_path / "keys"
    with LocalBackend(bundle, keys, rotation={"after_days": 1}) as backend:
        old = backend.keygen().key_id
    meta = key_sets(keys)[0].directory / KEYSET_FILE
    stored = json.loads(meta.read_text())
    meta.write_text(json.dumps({**stored, "created": time.time() - 1.5 * 86400}))  # 1.5 days old
    assert key_sets(keys)[0].due().startswith("it is 1.5 days old")
    with LocalBackend(bundle, keys) as backend:  # the policy stored with the keys: 1 day
        info = backend.keygen()
        assert not info.reused and info.key_id != old and "days old" in info.rotated
        assert [p.raw for p in backend.predict(smiles[:1]).predictions] == expected[:1]


def test_key_sets_without_a_history_are_rotated_at_first_use(tiny_binary, tmp_path):
    _, _, bundle = tiny_binary
    client = PrivateClient(bundle, tmp_path / "keys")
    old = client.keygen().key_id
    (client.key_path.parent / KEYSET_FILE).unlink()  # keys made before molcloak counted predictions
    assert key_sets(tmp_path / "keys")[0].predictions is None
    info = PrivateClient(bundle, tmp_path / "keys").keygen()
    assert not info.reused and info.key_id != old and "counted" in info.rotated


def test_keys_delete_removes_the_files(tiny_binary, tmp_path):
    _, _, bundle = tiny_binary
    client = PrivateClient(bundle, tmp_path / "keys")
    client.keygen()
    directory = client.key_path.parent
    (directory / "server-0123456789ab.json").write_text("{}")  # a key id a server gave these keys
    assert sorted(p.name for p in directory.iterdir()) == [
        "keys.bin",
        "keyset.json",
        "server-0123456789ab.json",
    ]
    result = cli("keys", "delete", MODEL, "--key-dir", tmp_path / "keys")
    assert result.exit_code == 0, result.output
    assert not directory.exists() and key_sets(tmp_path / "keys") == []


def test_rotate_finds_the_client_part_or_says_what_to_pass(tiny_binary, tmp_path):
    _, _, bundle = tiny_binary
    moved = tmp_path / "bundle"
    shutil.copytree(bundle, moved)
    PrivateClient(moved, tmp_path / "keys").keygen()
    shutil.rmtree(moved)  # the bundle the keys were made from is gone
    line = one_red_line(cli("keys", "rotate", MODEL, "--key-dir", tmp_path / "keys"))
    assert "cannot find the client part" in line and "--bundle" in line
    result = cli("keys", "rotate", MODEL, "--key-dir", tmp_path / "keys", "--bundle", bundle)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["list", "rotate", "delete"])
def test_unknown_model_is_one_line_and_exit_2(tmp_path, command):
    line = one_red_line(cli("keys", command, "no-such-model", "--key-dir", tmp_path / "keys"))
    assert "no key sets of model 'no-such-model'" in line and "molcloak keys list" in line


def test_unknown_fingerprint_is_one_line_and_exit_2(tiny_binary, tmp_path):
    PrivateClient(tiny_binary[2], tmp_path / "keys").keygen()
    result = cli("keys", "delete", MODEL, "--key-dir", tmp_path / "keys", "--fingerprint", "0" * 16)
    line = one_red_line(result)
    assert f"no key sets of model '{MODEL}' with client fingerprint '{'0' * 16}'" in line
    assert f"key sets there: {MODEL} (" in line and len(key_sets(tmp_path / "keys")) == 1  # nothing deleted


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--rotate-after-predictions", "-1", "--rotate-after-predictions -1 is not allowed"),
        ("--rotate-after-predictions", "0", "--rotate-after-predictions 0 is not allowed"),
        ("--rotate-after-days", "-2", "--rotate-after-days -2.0 is not allowed"),
        ("--rotate-after-days", "0", "--rotate-after-days 0.0 is not allowed"),
    ],
)
def test_bad_rotation_thresholds_are_one_line_and_exit_2(tiny_binary, tmp_path, option, value, message):
    keys = tmp_path / "keys"
    result = cli("predict", "--bundle", tiny_binary[2], "--key-dir", keys, option, value, "CCO")
    assert message in one_red_line(result)
    assert not keys.exists()  # refused before any key was made


def test_rotation_policy_is_checked_where_it_is_given(tiny_binary, tmp_path):
    _, _, bundle = tiny_binary
    with pytest.raises(ConfigError, match="rotate-after-predictions 2.5"):
        LocalBackend(bundle, tmp_path / "keys", rotation={"after_predictions": 2.5}).keygen()


def test_rotation_with_a_server_is_just_a_new_key_upload(tiny_binary, simulated, tmp_path):
    """Remote predictions with a rotation every 2 predictions: the server sees a second POST /keys, the
    batches after it use the new key id, and every result decrypts to the simulation."""
    from helpers import ServerProcess

    from molcloak.pipeline.serving.http_client import RemoteModel

    smiles, expected = simulated
    root = tmp_path / "served"
    shutil.copytree(tiny_binary[2], root / "bundles" / "binary")
    server = ServerProcess(root / "bundles", root / "state", workers=1)
    sent = []
    try:
        with RemoteModel(server.url, MODEL, key_dir=tmp_path / "keys") as remote:
            remote.http.event_hooks["request"] = [
                lambda r: sent.append(
                    (
                        r.method,
                        r.url.path,
                        json.loads(r.content).get("key_id") if r.url.path == "/predict" else None,
                    )
                )
            ]
            remote.set_rotation(after_predictions=2)
            report = remote.predict(smiles[:3], batch_size=8)
    finally:
        server.stop()
    assert [p.raw for p in report.predictions] == expected[:3]
    assert len(set(report.key_ids)) == 2
    uploads = [s for s in sent if s[:2] == ("POST", "/keys")]
    server_ids = [s[2] for s in sent if s[:2] == ("POST", "/predict")]
    assert len(uploads) == 2 and len(server_ids) == 2 and server_ids[0] != server_ids[1]
