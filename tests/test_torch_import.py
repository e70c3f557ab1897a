"""Imported float PyTorch models: layer checks, file formats, and real FHE through `compile --torch-model`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from molcloak.pipeline import data, predict, workflow
from molcloak.pipeline.bundle import load_checkpoint
from molcloak.pipeline.cli import app
from molcloak.pipeline.compile import CompileConfig, compile_model
from molcloak.pipeline.errors import CompilationError, ModelConfigError, TorchImportError
from molcloak.pipeline.torch_import import (
    IMPORTED_MODEL,
    SUPPORTED_LAYERS,
    build_sequential,
    layer_specs,
    load_torch_model,
)
from molcloak.pipeline.workflow import featurized, import_checkpoint

runner = CliRunner()


def _image_net() -> nn.Sequential:
    """Every supported layer once, on 8x8 molecule images."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 4, stride=4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(2, 3),
        nn.Sigmoid(),
        nn.Linear(3, 2),
    )


def _vector_net(n_in: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.fixture(scope="module")
def sol_low():
    return data.load_bundled("sol-low")


# ---------------------------------------------------------------- layers and files


def test_layer_spec_round_trip_keeps_the_function():
    model = _image_net().eval()
    specs = layer_specs(model)
    assert [s["type"] for s in specs] == [
        "Conv2d",
        "ReLU",
        "AvgPool2d",
        "Flatten",
        "Dropout",
        "Linear",
        "Sigmoid",
        "Linear",
    ]
    assert {s["type"] for s in specs} == set(SUPPORTED_LAYERS)
    rebuilt = build_sequential(json.loads(json.dumps(specs)))  # the spec is plain JSON
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(rebuilt.eval()(x), model(x))


@pytest.mark.parametrize(
    "model, message",
    [
        (
            nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.LSTM(4, 2)),
            r"layer 2 \(LSTM\) is not supported; supported: Linear, Conv2d, ReLU, Sigmoid, AvgPool2d, Flatten",
        ),
        (nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4)), r"layer 1 \(BatchNorm1d\) is not supported"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), r"layer 0 \(Conv2d\) sets groups"),
        (nn.Sequential(nn.AvgPool2d(2, ceil_mode=True)), r"layer 0 \(AvgPool2d\) sets ceil_mode"),
        (nn.Sequential(nn.Flatten(0)), r"layer 0 \(Flatten\) flattens dims 0..-1"),
        (nn.Linear(10, 2), "expected an nn.Sequential, got Linear"),
    ],
)
def test_unsupported_layers_are_named(model, message):
    with pytest.raises(TorchImportError, match=message):
        layer_specs(model)


def test_both_file_formats_load(tmp_path):
    model = _vector_net()
    torch.save(model, tmp_path / "whole.pt")
    torch.save({"layers": layer_specs(model), "state_dict": model.state_dict()}, tmp_path / "spec.pt")
    x = torch.rand(3, 10)
    for name in ("whole.pt", "spec.pt"):
        assert torch.equal(load_torch_model(tmp_path / name)(x), model(x))


@pytest.mark.parametrize(
    "payload, message",
    [
        (lambda: _vector_net().state_dict(), "holds a OrderedDict, not a model"),
        (
            lambda: {"layers": layer_specs(_vector_net(12)), "state_dict": _vector_net().state_dict()},
            "the weights do not match the layers",
        ),
        (lambda: {"layers": [{"type": "GRU"}], "state_dict": {}}, r"layer 0 \(GRU\) is not supported"),
        (None, "does not exist"),
    ],
)
def test_bad_model_files(tmp_path, payload, message):
    path = tmp_path / "m.pt"
    if payload is not None:
        torch.save(payload(), path)
    with pytest.raises(TorchImportError, match=message):
        load_torch_model(path)
    assert issubclass(TorchImportError, ModelConfigError) and issubclass(TorchImportError, ValueError)


def test_input_and_output_sizes_are_checked(sol_low, tmp_path):
    torch.save(_vector_net(12), tmp_path / "in12.pt")
    with pytest.raises(
        TorchImportError,
        match=r"does not take the features 'physchem' \(per molecule: shape \[10\], "
        r"10 values\); its first Linear layer takes 12 values",
    ):
        import_checkpoint(sol_low, tmp_path / "in12.pt", "physchem")
    torch.save(_image_net(), tmp_path / "conv.pt")
    with pytest.raises(TorchImportError, match="first Conv2d takes images with 1 channel"):
        import_checkpoint(sol_low, tmp_path / "conv.pt", "physchem")
    torch.save(nn.Sequential(nn.Linear(10, 3)), tmp_path / "out3.pt")
    with pytest.raises(
        TorchImportError, match=r"outputs shape \[3\] per molecule; task 'sol-low' \(binary\) needs 2"
    ):
        import_checkpoint(sol_low, tmp_path / "out3.pt", "physchem")


def test_featurized_is_what_the_import_uses(sol_low, tmp_path):
    spec, X, split = featurized(sol_low, "physchem")
    torch.save(_vector_net(), tmp_path / "m.pt")
    ckpt = import_checkpoint(sol_low, tmp_path / "m.pt", "physchem", calib_size=50, seed=0)
    assert ckpt.featurizer == spec and np.array_equal(ckpt.X_test, X[split.test])
    train_rows = {r.tobytes() for r in X[split.train]}
    assert len(ckpt.X_calib) == 50 and all(r.tobytes() in train_rows for r in ckpt.X_calib)
    assert ckpt.metrics["float"]["accuracy"] >= 0


def test_float_model_needs_n_bits(sol_low):
    with pytest.raises(CompilationError, match="float model .* needs --n-bits"):
        compile_model(_vector_net(), np.zeros((4, 10), dtype=np.float32), CompileConfig())


# ---------------------------------------------------------------- real FHE


@pytest.fixture(scope="module")
def imported_bundle(tmp_path_factory):
    """`molcloak compile --torch-model` of a float 10 -> 3 -> 2 MLP with 3-bit PTQ, through the CLI (p_error 1e-12, no approximate rounding: FHE == simulation)."""
    tmp = tmp_path_factory.mktemp("torch")
    torch.save(_vector_net(), tmp / "model.pt")
    bundle = tmp / "bundle"
    result = runner.invoke(
        app,
        [
            "compile",
            "--torch-model",
            str(tmp / "model.pt"),
            "--dataset",
            "sol-low",
            "--features",
            "physchem",
            "--n-bits",
            "3",
            "--calib-size",
            "100",
            "--p-error",
            "1e-12",
            "--rounding-bits",
            "0",
            "--bundle",
            str(bundle),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return bundle, json.loads(result.stdout)


def test_imported_model_becomes_a_normal_bundle(imported_bundle):
    bundle, report = imported_bundle
    assert (
        report["compile"]["n_bits"] == 3 and report["circuit"]["pbs_count"] == 3
    )  # one lookup per hidden ReLU
    assert set(report["metrics"]) == {"float", "quantized", "fhe_simulate"}
    ckpt = load_checkpoint(bundle)
    assert ckpt.model_name == IMPORTED_MODEL and ckpt.X_calib.shape == (100, 10)
    assert [s["type"] for s in ckpt.model_config["layers"]] == ["Linear", "ReLU", "Linear"]
    assert not (bundle / "client" / "model.pt").exists() and not (bundle / "server" / "model.pt").exists()


def test_imported_model_encrypted_equals_simulation(imported_bundle, tmp_path):
    bundle, _ = imported_bundle
    smiles = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1"]
    executed = np.array(
        [p.raw for p in predict.predict_local(bundle, smiles, key_dir=tmp_path / "keys").predictions]
    )
    simulated = np.array([p.raw for p in predict.predict_local(bundle, smiles, fhe="simulate").predictions])
    assert executed.shape == (3, 2) and np.array_equal(executed, simulated)


@pytest.mark.slow
def test_imported_cnn_on_images_runs_encrypted(sol_low, tmp_path):
    torch.save(_image_net(), tmp_path / "cnn.pt")
    ckpt = import_checkpoint(sol_low, tmp_path / "cnn.pt", "grid:r=2,size=8", calib_size=100)
    assert ckpt.X_calib.shape == (100, 1, 8, 8)
    compiled = workflow.compile_checkpoint(
        ckpt, CompileConfig(n_bits=2, rounding_bits=None, p_error=None), measure_keys=False
    )
    assert compiled.stats.pbs_count <= 16 and compiled.stats.max_bit_width <= 7
    bundle = tmp_path / "bundle"
    workflow.deploy(ckpt, compiled, bundle, "imported-cnn")
    report = predict.predict_local(bundle, ckpt.smiles_test[:2], key_dir=tmp_path / "keys")
    executed = np.array([p.raw for p in report.predictions])
    assert np.array_equal(executed, compiled.q_module.forward(ckpt.X_test[:2], fhe="simulate"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--torch-model", "{tmp}/lstm.pt"], "layer 2 (LSTM) is not supported"),
        (["{tmp}", "--torch-model", "{tmp}/lstm.pt"], "not both"),
        ([], "no model given"),
        (["--torch-model", "{tmp}/ok.pt", "--n-bits", "12"], "n_bits 12 out of range"),
    ],
)
def test_cli_bad_torch_model_exit_2(tmp_path, args, message):
    torch.save(nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.LSTM(4, 2)), tmp_path / "lstm.pt")
    torch.save(_vector_net(), tmp_path / "ok.pt")
    result = runner.invoke(app, ["compile", *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip().startswith("error:")
        and message in result.output
        and "Traceback" not in result.output
    )
