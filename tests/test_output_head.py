"""Class-only circuits (`--output class`): real compilation, keys, encryption and decryption."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import EXACT_P_ERROR, TINY, TINY_TRAIN
from helpers import write_csv
from typer.testing import CliRunner

from molcloak.pipeline import data, workflow
from molcloak.pipeline.bundle import load_manifest, save_checkpoint
from molcloak.pipeline.cli import app
from molcloak.pipeline.cli.common import given_compile
from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.errors import ConfigError
from molcloak.pipeline.fhe_client import PrivateClient
from molcloak.pipeline.fhe_server import PrivateServer
from molcloak.pipeline.output_head import check_output, lsbs_to_fit

# exact rounding keeps FHE equal to the simulation bit for bit
EXACT = CompileConfig(rounding_bits=4, rounding_method="exact", p_error=EXACT_P_ERROR)
EXACT_CLASS = dataclasses.replace(EXACT, output="class")
# 3 bits: with 2-bit activations Concrete 2.10 fails to compile the comparison ("boolean ops")
SMALL = dict(TINY, weight_bits=3, act_bits=3, input_bits=3)


@pytest.fixture(scope="module")
def class_bundle(tmp_path_factory):
    ckpt = workflow.train_checkpoint(
        data.load_bundled("sol-low"), model_options=SMALL, train_config=TINY_TRAIN
    )
    logits = workflow.compile_checkpoint(ckpt, EXACT, measure_keys=False)
    compiled = workflow.compile_checkpoint(ckpt, EXACT_CLASS)
    bundle = tmp_path_factory.mktemp("class") / "bundle"
    workflow.deploy(ckpt, compiled, bundle, "tiny-class")
    return ckpt, logits, compiled, bundle


def test_class_circuit_returns_the_logit_models_class(class_bundle):
    ckpt, logits, compiled, _ = class_bundle
    classes = compiled.q_module.forward(ckpt.X_test, fhe="simulate")
    assert classes.shape == (len(ckpt.X_test), 2)
    assert set(np.unique(classes)) == {-1.0, 1.0}  # two fixed logits, no score left
    logit_class = logits.q_module.forward(ckpt.X_test, fhe="simulate").argmax(axis=1)
    # the score is rounded to the logits circuit's bit width before the comparison: near-ties may flip
    assert np.mean(classes.argmax(axis=1) == logit_class) > 0.95
    # one comparison (plus exact rounding's own lookups; approximate rounding adds none: demo model 16 -> 17)
    assert logits.stats.pbs_count < compiled.stats.pbs_count <= logits.stats.pbs_count + 3
    assert compiled.stats.max_bit_width <= logits.stats.max_bit_width
    assert 0.5 < compiled.metrics["fhe_simulate"]["roc_auc"] <= 1
    # "quantized" is the class circuit without FHE noise: with exact rounding at 2^-40, the simulation's decisions
    assert np.array_equal(compiled.test_predictions["quantized"], compiled.test_predictions["fhe_simulate"])


def test_client_decrypts_only_the_class(class_bundle, tmp_path):
    ckpt, _, compiled, bundle = class_bundle
    assert load_manifest(bundle).output == "class"
    client, server = PrivateClient(bundle, tmp_path / "keys"), PrivateServer(bundle)
    client.keygen()
    # the client part's output quantizer is the identity: the final layer's biases are not in it
    out_q = client._fhe.model.output_quantizers[0]
    assert float(out_q.scale) == 1.0 and not np.any(out_q.zero_point)
    keys = server.load_keys(client.evaluation_keys())
    X = ckpt.X_test[:5]
    executed = np.vstack([client.decrypt(server.run(client.encrypt(x), keys)) for x in X])
    assert np.array_equal(executed, compiled.q_module.forward(X, fhe="simulate"))  # exact rounding, 2^-40
    probs = client.predictions(executed)
    assert probs.shape == (5, 2) and set(np.unique(probs)) <= {0.0, 1.0}
    assert np.array_equal(probs.argmax(axis=1), executed.argmax(axis=1))


def test_multilabel_model_gets_one_class_per_task(tmp_path):
    sol = data.load_bundled("sol-low")
    rows = [
        [smi, "" if i % 9 == 1 else int(y), "" if i % 9 == 2 else int(len(smi) > 25)]
        for i, (smi, y) in enumerate(zip(sol.smiles[:240], sol.y[:240]))
    ]
    ds = data.load_csv(write_csv(tmp_path / "ml.csv", ["smiles", "low", "long"], rows), "smiles", "low,long")
    assert ds.task.kind == "multilabel"
    ckpt = workflow.train_checkpoint(ds, model_options=SMALL, train_config=TINY_TRAIN)
    compiled = workflow.compile_checkpoint(ckpt, EXACT_CLASS, measure_keys=False)
    outputs = compiled.q_module.forward(ckpt.X_test, fhe="simulate")
    assert outputs.shape == (len(ckpt.X_test), 2) and set(np.unique(outputs)) <= {-1.0, 1.0}
    assert {"roc_auc[low]", "roc_auc[long]"} <= set(compiled.metrics["fhe_simulate"])


def test_regression_is_refused_with_the_fix(tiny_regression, tmp_path):
    ckpt, _, _ = tiny_regression
    with pytest.raises(ConfigError, match="binary or multi-label.*--output logits"):
        check_output("class", ckpt.task)
    save_checkpoint(ckpt, tmp_path / "ckpt")
    result = CliRunner().invoke(
        app, ["deploy", str(tmp_path / "ckpt"), "--out", str(tmp_path / "b"), "--output", "class"]
    )
    assert result.exit_code == 2 and "--output class needs a binary or multi-label" in result.output
    assert not (tmp_path / "b").exists()


def test_unknown_output_is_one_line(tiny_binary, tmp_path):
    save_checkpoint(tiny_binary[0], tmp_path / "ckpt")
    result = CliRunner().invoke(
        app, ["deploy", str(tmp_path / "ckpt"), "--out", str(tmp_path / "b"), "--output", "scores", "--json"]
    )
    assert result.exit_code == 2 and "output 'scores'" in result.output
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.output)


def test_rounded_logits_decrypt_as_simulated_and_stay_within_half_a_step(tiny_regression, tmp_path):
    """`--output-bits N` rounds each output before it is decrypted (exact rounding here, so FHE equals the
    simulation bit for bit); the bundle records it, and the client part dequantizes the rounded integers
    unchanged."""
    ckpt, _, _ = tiny_regression
    save_checkpoint(ckpt, tmp_path / "ckpt")
    flags = ["--rounding-bits", "0", "--rounding-method", "exact", "--p-error", str(EXACT_P_ERROR)]
    bundle = tmp_path / "b"
    result = CliRunner().invoke(
        app, ["deploy", str(tmp_path / "ckpt"), "--out", str(bundle), "--output-bits", "2", *flags]
    )
    assert result.exit_code == 0, result.output
    assert "each logit rounded to 2 bits" in result.output
    assert load_manifest(bundle).data["compile"]["output_bits"] == 2
    exact_cfg = CompileConfig(rounding_bits=None, rounding_method="exact", p_error=EXACT_P_ERROR)
    exact = workflow.compile_checkpoint(ckpt, exact_cfg, measure_keys=False)
    rounded = workflow.compile_checkpoint(
        ckpt, dataclasses.replace(exact_cfg, output_bits=2), measure_keys=False
    )
    qm = exact.q_module
    lsbs = lsbs_to_fit(qm._clear_forward(qm.quantize_input(ckpt.X_calib.astype(np.float32))), 2)
    assert lsbs >= 1  # the test model's outputs are wider than 2 bits: something is rounded
    client, server = PrivateClient(bundle, tmp_path / "keys"), PrivateServer(bundle)
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    X = ckpt.X_test[:4]
    executed = np.vstack([client.decrypt(server.run(client.encrypt(x), keys)) for x in X])
    assert np.array_equal(executed, rounded.q_module.forward(X, fhe="simulate"))
    # every output is a multiple of 2^lsbs in the output quantizer's integers, within half a step of the exact one
    out_q = rounded.q_module.output_quantizers[0]
    q_x = rounded.q_module.quantize_input(ckpt.X_test[:32])
    ints = np.vstack([rounded.q_module.fhe_circuit.simulate(q_x[i : i + 1]) for i in range(len(q_x))])
    assert not np.any(ints % (1 << lsbs)) and len(np.unique(ints)) > 1
    step = float(out_q.scale) * (1 << lsbs)
    diff = rounded.q_module.forward(ckpt.X_test[:32], fhe="simulate") - qm.forward(
        ckpt.X_test[:32], fhe="simulate"
    )
    assert np.abs(diff).max() <= step / 2 + 1e-9
    assert rounded.metrics["fhe_simulate"]["rmse"] < 2 * exact.metrics["fhe_simulate"]["rmse"]
    # "quantized" includes the output rounding (the circuit in the clear): exact rounding at 2^-40 simulates the same
    assert np.allclose(rounded.test_predictions["quantized"], rounded.test_predictions["fhe_simulate"])
    assert not np.allclose(rounded.test_predictions["quantized"], exact.test_predictions["quantized"])


def test_output_bits_are_checked():
    with pytest.raises(ConfigError, match="output bits 1 out of range"):
        CompileConfig(output_bits=1)
    with pytest.raises(ConfigError, match="class-only circuit.*leave --output-bits unset"):
        CompileConfig(output="class", output_bits=6)
    # bundles written before the option
    assert CompileConfig.from_dict({"rounding_bits": 5}).output_bits is None
    # `--output class` on a checkpoint that recorded rounded logits (fit --round-outputs) replaces them
    assert given_compile(None, None, None, output="class") == {"output": "class", "output_bits": None}
    assert given_compile(None, None, None, output_bits=0) == {"output_bits": None}  # 0: exact


@pytest.mark.parametrize("low, high", [(-18, 12), (-3, 31)])
def test_rounding_in_the_circuit_is_the_rounding_of_its_clear_pass(low, high):
    """Concrete 2.10 protects a rounding against overflow whenever the rounded values' width differs from the
    values', also when it is narrower ([-18, 12] -> [-16, 12]: 6 -> 5 bits), and then removes one bit fewer in
    the circuit; `needs_overflow_protection` asks for it only when the largest value rounds up past its width."""
    from concrete import fhe

    from molcloak.pipeline.output_head import needs_overflow_protection

    values = np.arange(low, high + 1)
    protect = needs_overflow_protection(values, 2)
    assert protect == (high == 31)  # 31 -> 32 needs a 7th bit

    def forward(x):
        r = fhe.round_bit_pattern(
            x, lsbs_to_remove=2, exactness=fhe.Exactness.EXACT, overflow_protection=protect
        )
        return fhe.univariate(lambda v: v)(r)  # a lookup on the rounded value, as the class circuit's sign

    circuit = fhe.Compiler(forward, {"x": "encrypted"}).compile(list(values), p_error=EXACT_P_ERROR)
    assert [circuit.simulate(int(v)) for v in values] == [circuit.graph(int(v)) for v in values]
    assert [circuit.graph(int(v)) for v in values] == list(fhe.round_bit_pattern(values, lsbs_to_remove=2))
