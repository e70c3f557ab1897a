"""The server's fast path for bootstrap-free linear circuits (`linear_fast_path`): real compiled kernel and linear
machines, real keys, real encryption; its output ciphertexts must equal Concrete's runtime byte for byte, decrypt
to the simulated predictions, and hostile bytes must never be evaluated by it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from molcloak.pipeline import linear_fast_path
from molcloak.pipeline.errors import CiphertextError, NotEligibleError
from molcloak.pipeline.fhe_client import PrivateClient
from molcloak.pipeline.fhe_server import PrivateServer
from molcloak.pipeline.linear_fast_path import LinearFastPath, weights_from_mlir


def _bundle(tmp_path_factory, name: str, features: str):
    from conftest import EXACT_P_ERROR

    from molcloak.pipeline import data, workflow
    from molcloak.pipeline.compile import CompileConfig
    from molcloak.pipeline.train import TrainConfig

    ckpt = workflow.train_checkpoint(
        data.load_bundled("sol-low"),
        features,
        model_options={"hidden": [0], "weight_bits": 4, "input_bits": 4},
        train_config=TrainConfig(epochs=4, patience=4),
    )
    compiled = workflow.compile_checkpoint(ckpt, CompileConfig(p_error=EXACT_P_ERROR))
    assert compiled.stats.pbs_count == 0
    bundle = tmp_path_factory.mktemp(name) / "bundle"
    workflow.deploy(ckpt, compiled, bundle, name)
    return ckpt, compiled, bundle


@pytest.fixture(scope="module", params=["physchem:scale=quantile+rff:n=48", "morgan:r=2,n=256+linear"])
def machine(request, tmp_path_factory):
    """A kernel machine (signed inputs) and a linear machine on bits (unsigned inputs, `to_signed` first), with
    a client that has keys and the server."""
    ckpt, compiled, bundle = _bundle(tmp_path_factory, "fast", request.param)
    client = PrivateClient(bundle, tmp_path_factory.mktemp("keys"))
    client.keygen()
    server = PrivateServer(bundle)
    return ckpt, compiled, client, server, server.load_keys(client.evaluation_keys())


def test_the_fast_path_gives_concretes_ciphertexts_byte_for_byte(machine):
    ckpt, compiled, client, server, keys = machine
    assert server.engine == "linear fast path"
    X = ckpt.X_test[:4]
    for x in X:
        ciphertext = client.encrypt(x)
        ours = server.run(ciphertext, keys)
        theirs = server._fhe.run(ciphertext, client.evaluation_keys())  # Concrete ML's own server, bytes in
        # an honest client's bytes take the fast path
        assert ours == theirs == server.fast_path.run(ciphertext)
        assert server.run(ciphertext, keys, concrete_only=True) == theirs
    executed = np.vstack([client.decrypt(server.run(client.encrypt(x), keys)) for x in X])
    assert np.array_equal(executed, compiled.q_module.forward(X, fhe="simulate"))


def test_the_fast_path_benchmark_compares_both_engines_on_a_bundle(machine):
    """`python -m molcloak.evaluation.bench.fast_path --bundle`: fresh keys, each ciphertext through Concrete's
    runtime and the fast path, byte-identical, with both medians."""
    from molcloak.evaluation.bench import fast_path

    _, _, _, server, _ = machine
    out = fast_path.compare(server.directory.parent, runs=2)
    assert out["engine"] == "linear fast path" and out["byte_identical"] == "2/2"
    assert out["encrypted_inputs"] == server.fast_path.inputs and out["outputs"] == 2
    assert out["concrete_runtime_median_ms"] > 0 and out["fast_path_median_ms"] > 0


def test_fit_times_the_circuit_in_memory_on_the_same_engine(machine):
    """`fit` times a candidate's compiled circuit before any bundle exists (`latency.time_circuit`): the path
    built from the circuit in memory gives Concrete's output bytes too, so its timing is the server's."""
    ckpt, compiled, _, _, _ = machine
    circuit = compiled.q_module.fhe_circuit
    fast, engine = linear_fast_path.load_circuit(circuit)
    assert engine == "linear fast path"
    encrypted = circuit.encrypt(compiled.q_module.quantize_input(ckpt.X_test[:1].astype(np.float32)))
    assert fast.run(encrypted.serialize()) == circuit.run(encrypted).serialize()


def test_bytes_not_in_the_exact_layout_never_reach_the_fast_path(machine):
    """Truncated, padded, re-headed or re-shaped ciphertexts: the fast path declines (None) and Concrete's
    runtime, which validates, answers; garbage is a `CiphertextError`, not a crash."""
    ckpt, _, client, server, keys = machine
    fast = server._fast
    good = client.encrypt(ckpt.X_test[0])
    header = bytearray(good)
    header[3] ^= 0xFF
    trailer = bytearray(good)
    trailer[-1] ^= 0x01
    for bad in (good[:-1], good + b"\0", good[:64], bytes(header), bytes(trailer), b"", b"\0" * len(good)):
        assert fast.run(bad) is None
    for bad in (good[:-1], good[:64], bytes(header), b"\0" * len(good)):
        with pytest.raises(CiphertextError):
            server.run(bad, keys)
    # any payload in the layout is a valid seed and body: garbage in, the product of garbage out, as Concrete
    noise = bytearray(good)
    noise[64 : 64 + 24] = bytes(range(24))
    assert server._fast.run(bytes(noise)) == server._fhe.run(bytes(noise), client.evaluation_keys())
    # without keys the fast path does not answer either: Concrete's runtime says what is missing
    with pytest.raises(CiphertextError):
        server.run(good, None)


def test_a_circuit_with_bootstraps_runs_on_concretes_runtime(tiny_binary):
    server = PrivateServer(tiny_binary[2])
    assert server._fast is None and server.engine.startswith("Concrete runtime (")


def test_the_environment_can_turn_it_off(machine, monkeypatch):
    bundle = machine[3].directory
    monkeypatch.setenv(linear_fast_path.ENV_SWITCH, "0")
    server = PrivateServer(bundle)
    assert server._fast is None and server.engine == "off (MOLCLOAK_FAST_PATH=0)"


def test_the_self_check_refuses_a_path_that_disagrees_with_concrete(machine):
    """The load-time check compares with Concrete's runtime on a throwaway key: weights read wrongly (here one
    changed) switch the path off instead of serving wrong ciphertexts."""
    server = machine[3]
    fast = server._fast
    weights = fast._weights.view(np.int64).T.copy()
    weights[0, 0] += 1
    fhe_server = server._fhe.server
    inputs = json.loads(fhe_server.client_specs.serialize())["circuits"][0]["inputs"][0]
    encoding = inputs["typeInfo"]["lweCiphertext"]["encoding"]["integer"]
    signed, width = encoding["isSigned"], encoding["width"]
    assert signed == ("rff" in str(server.manifest.featurizer))  # descriptors' features signed, bits not
    with pytest.raises(NotEligibleError, match="self-check failed"):
        LinearFastPath._self_checked(weights, fast.lwe_dimension, fhe_server, signed, width)
    right = fast._weights.view(np.int64).T.copy()
    assert LinearFastPath._self_checked(right, fast.lwe_dimension, fhe_server, signed, width).inputs == len(
        right
    )


def test_the_product_of_several_outputs_in_float_halves_is_exact_mod_2_64():
    """Several outputs take two float64 BLAS products of the masks' 32-bit halves: the same uint64 values as the
    wrapping integer product, for any mask (0 and 2^64 - 1 included) while a row's sum of |w| is under 2^21; past
    that bound, or for one output, the integer product."""
    from molcloak.pipeline.linear_fast_path import Layout

    rng = np.random.default_rng(0)
    layout = Layout(b"", 0, b"")
    full = rng.integers(0, 2**64 - 1, size=(512, 33), dtype=np.uint64, endpoint=True)
    full[0], full[1] = 0, np.uint64(2**64 - 1)
    for outputs, low, high, floats in ((12, -4096, 4096, True), (1, -8, 8, False), (3, 2**12, 2**13, False)):
        weights = rng.integers(low, high, size=(512, outputs))
        weights[0] = high - 1 if low > 0 else low  # the most negative weight
        path = LinearFastPath(weights, 32, layout, layout)
        assert path.halves == floats
        expected = weights.T.astype(np.int64).view(np.uint64) @ full  # numpy wraps uint64 mod 2^64
        assert np.array_equal(path.product(full), expected)
        assert np.array_equal(path.product(full, halves=False), expected)
        if path.halves_exact:  # one output in halves: exact too, only not the faster way
            assert np.array_equal(path.product(full, halves=True), expected)
        else:
            with pytest.raises(ValueError, match="2\\^21"):
                path.product(full, halves=True)


MLIR = """module {
  func.func @_clear_forward_proxy(%arg0: tensor<1x3x!FHE.eint<6>>) -> tensor<1x2x!FHE.esint<6>> {
    %cst = arith.constant CONSTANT : tensor<3x2xi5>
    %0 = "FHELinalg.to_signed"(%arg0) : (tensor<1x3x!FHE.eint<6>>) -> tensor<1x3x!FHE.esint<6>>
    %1 = "FHELinalg.matmul_eint_int"(%0, %cst) : (tensor<1x3x!FHE.esint<6>>, tensor<3x2xi5>) -> tensor<1x2x!FHE.esint<6>>
    EXTRA
    return %1 : tensor<1x2x!FHE.esint<6>>
  }
}"""


def test_weights_are_read_from_the_circuit_and_anything_else_is_refused():
    expected = np.array([[1, -2], [3, -1], [0, 15 - 16]])
    hex_form = MLIR.replace("CONSTANT", 'dense<"0x011E031F001F">').replace("EXTRA", "")
    assert np.array_equal(weights_from_mlir(hex_form), expected)
    list_form = MLIR.replace("CONSTANT", "dense<[[1, -2], [3, -1], [0, -1]]>").replace("EXTRA", "")
    assert np.array_equal(weights_from_mlir(list_form), expected)
    splat = MLIR.replace("CONSTANT", "dense<2>").replace("EXTRA", "")
    assert np.array_equal(weights_from_mlir(splat), np.full((3, 2), 2))
    added = MLIR.replace("CONSTANT", "dense<2>").replace(
        "EXTRA",
        '%2 = "FHELinalg.add_eint_int"(%1, %cst) : (tensor<1x2x!FHE.esint<6>>) -> tensor<1x2x!FHE.esint<6>>',
    )
    with pytest.raises(NotEligibleError, match="add_eint_int"):
        weights_from_mlir(added)
    lookup = (
        MLIR.replace("CONSTANT", "dense<2>")
        .replace('"FHELinalg.matmul_eint_int"(%0, %cst)', '"FHELinalg.apply_lookup_table"(%0, %cst)')
        .replace("EXTRA", "")
    )
    with pytest.raises(NotEligibleError):
        weights_from_mlir(lookup)
    with pytest.raises(NotEligibleError, match="3 values for shape"):
        weights_from_mlir(MLIR.replace("CONSTANT", "dense<[1, 2, 3]>").replace("EXTRA", ""))
    with pytest.raises(NotEligibleError):
        weights_from_mlir("module {\n}\n")
    after_return = (
        MLIR.replace("CONSTANT", "dense<2>")
        .replace("EXTRA", "")
        .replace(
            "    return %1 : tensor<1x2x!FHE.esint<6>>",
            "    return %1 : tensor<1x2x!FHE.esint<6>>\n    return %0 : x",
        )
    )
    with pytest.raises(NotEligibleError):
        weights_from_mlir(after_return)
    with pytest.raises(NotEligibleError, match="out of i5"):
        weights_from_mlir(MLIR.replace("CONSTANT", "dense<[[1, 2], [3, 4], [5, 99]]>").replace("EXTRA", ""))
