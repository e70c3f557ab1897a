"""Molecule-image CNNs: the grid featurizer, the cnn1/cnn2 models, and real FHE on tiny instances.

Tiny instances: an 8x8 grid (64 Morgan-count bins), 2 channels, 2-bit weights and activations.
They are compiled, deployed, keyed, encrypted, run by the server half and decrypted for real.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from molcloak.models.registry import model_names
from molcloak.pipeline import data, predict, workflow
from molcloak.pipeline.cli import app
from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.errors import FeaturizerError, ModelConfigError
from molcloak.pipeline.feature_kinds import GRID_CAP
from molcloak.pipeline.featurize import FeaturizerSpec
from molcloak.pipeline.networks import build_model, check_features, make_config
from molcloak.pipeline.train import TrainConfig

TINY_GRID = "grid:r=2,size=8"
TINY = {
    "cnn1": {
        "channels": [2],
        "kernels": [4],
        "strides": [4],
        "weight_bits": 2,
        "act_bits": 2,
        "input_bits": 2,
    },
    "cnn2": {
        "channels": [2, 2],
        "kernels": [2, 2],
        "strides": [2, 2],
        "weight_bits": 2,
        "act_bits": 2,
        "input_bits": 2,
    },
}
SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CCCCCCCCCCCCCCCC(=O)O"]


# ---------------------------------------------------------------- grid featurizer


def test_grid_layout_is_row_major_capped_morgan_counts():
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    spec = FeaturizerSpec.parse(TINY_GRID).fit(SMILES)
    X = spec.transform(SMILES)
    assert X.shape == (4, 1, 8, 8) and X.dtype == np.float32
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=64)
    for smi, img in zip(SMILES, X):
        counts = gen.GetCountFingerprintAsNumPy(Chem.MolFromSmiles(smi)).astype(np.float64)
        expected = np.minimum(counts, GRID_CAP) / GRID_CAP
        for i in np.flatnonzero(counts):  # bin i sits at row i // 8, column i % 8
            assert img[0, i // 8, i % 8] == pytest.approx(expected[i])
        assert np.allclose(img.ravel(), expected)
    assert X.min() >= 0 and X.max() <= 1 and X[3].max() == 1  # the C16 acid has > 7 CH2 environments


def test_grid_spec_parses_round_trips_and_defaults_to_32x32():
    spec = FeaturizerSpec.parse("grid")
    assert str(spec) == "grid:r=2,size=32" and spec.shape == (1, 32, 32) and spec.width == 1024
    fitted = FeaturizerSpec.parse(TINY_GRID).fit(SMILES)
    again = FeaturizerSpec.from_dict(fitted.to_dict())
    assert again == fitted and str(again) == TINY_GRID
    assert FeaturizerSpec.parse("physchem").shape == (10,)


@pytest.mark.parametrize(
    "text, message",
    [
        ("grid:r=2,size=3", "do not form a square image of side 4..64"),
        ("grid:n=100", "do not form a square image"),  # 100 bins are 10x10: fine
        ("physchem+grid", "cannot be joined with other parts"),
    ],
)
def test_bad_grid_specs(text, message):
    if text == "grid:n=100":
        assert FeaturizerSpec.parse(text).shape == (1, 10, 10)
        return
    with pytest.raises(FeaturizerError, match=message):
        FeaturizerSpec.parse(text)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("name, pbs_map", [("cnn1", 4 * 8 * 8), ("cnn2", 8 * 4 * 4)])
def test_default_cnns_on_32x32_images(name, pbs_map):
    assert name in model_names()
    model = build_model(name, 1024, 2, make_config(name, {}))
    model.eval()
    assert model(torch.rand(3, 1, 32, 32)).shape == (3, 2)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == (1 if name == "cnn1" else 2)
    # activations of the last feature map (each one PBS in the circuit)
    x = torch.rand(1, 1, 32, 32)
    for layer in model.net:
        if isinstance(layer, torch.nn.Flatten):
            break
        x = layer(x)
    assert int(torch.as_tensor(x.value if hasattr(x, "value") else x).numel()) == pbs_map


def test_cnn_options_are_validated():
    with pytest.raises(ModelConfigError, match="one entry per convolution"):
        make_config("cnn2", {"channels": [4]})
    with pytest.raises(ModelConfigError, match="needs a square molecule image, got 10 input features"):
        build_model("cnn1", 10, 2)
    with pytest.raises(ModelConfigError, match="kernel 4 does not fit the 2x2 feature map"):
        build_model("cnn2", 16, 2, make_config("cnn2", {"kernels": [2, 4], "strides": [2, 4]}))
    with pytest.raises(
        ModelConfigError, match="model 'cnn1' takes molecule images, not 'physchem'; use --features grid"
    ):
        check_features("cnn1", FeaturizerSpec.parse("physchem"))
    with pytest.raises(ModelConfigError, match="are images for the CNN models"):
        check_features("mlp", FeaturizerSpec.parse("grid"))


def test_cli_rejects_mismatched_features_with_exit_2(tmp_path):
    runner = CliRunner()
    for args, message in [
        (["--model", "cnn1", "--features", "physchem"], "takes molecule images"),
        (["--model", "mlp", "--features", "grid"], "are images for the CNN models"),
        (["--model", "cnn1", "--set", "channels"], "is not KEY=VALUE"),
        (["--model", "cnn1", "--set", "colour=3"], "has no option 'colour'"),
    ]:
        result = runner.invoke(app, ["train", *args, "--epochs", "1", "--out", str(tmp_path / "x")])
        assert result.exit_code == 2, result.output
        assert result.output.strip().startswith("error:") and message in result.output


# ---------------------------------------------------------------- real FHE


@pytest.fixture(scope="module", params=["cnn1", pytest.param("cnn2", marks=pytest.mark.slow)])
def tiny_cnn(request, tmp_path_factory):
    name = request.param
    ds = data.load_bundled("sol-low")
    ckpt = workflow.train_checkpoint(
        ds, TINY_GRID, name, TINY[name], TrainConfig(epochs=3, patience=3, seed=0)
    )
    # FHE == simulation needs p_error 2^-40 and no approximate rounding (Concrete simulates that with randomness);
    # no throwaway keygen for the key-size record (the test generates keys itself)
    compiled = workflow.compile_checkpoint(
        ckpt, CompileConfig(rounding_bits=None, p_error=None), measure_keys=False
    )
    bundle = tmp_path_factory.mktemp(name) / "bundle"
    workflow.deploy(ckpt, compiled, bundle, f"tiny-{name}")
    return name, ckpt, compiled, bundle


def test_cnn_compiles_to_one_small_circuit(tiny_cnn):
    name, ckpt, compiled, _ = tiny_cnn
    assert ckpt.X_calib.shape[1:] == (1, 8, 8) and ckpt.X_test.shape == (257, 1, 8, 8)
    expected_pbs = 2 * 2 * 2 if name == "cnn1" else 2 * 4 * 4 + 2 * 2 * 2  # one lookup per activation
    assert compiled.stats.pbs_count == expected_pbs
    assert compiled.stats.max_bit_width <= 7
    assert 0.5 <= compiled.metrics["fhe_simulate"]["roc_auc"] <= 1


def test_cnn_encrypted_prediction_equals_simulation(tiny_cnn, tmp_path):
    _, ckpt, compiled, bundle = tiny_cnn
    smiles = ckpt.smiles_test[:3]
    report = predict.predict_local(bundle, smiles, key_dir=tmp_path / "keys")
    executed = np.array([p.raw for p in report.predictions])
    simulated = compiled.q_module.forward(ckpt.X_test[:3], fhe="simulate")
    assert np.array_equal(executed, simulated)  # p_error 2^-40: bit-exact
    assert report.input_ciphertext_bytes > 0 and all(p.label in ckpt.task.labels for p in report.predictions)
