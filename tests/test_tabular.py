"""Tabular inputs: numeric feature columns, the scaler in the bundle, real FHE on breast-cancer rows."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from helpers import write_csv
from typer.testing import CliRunner

from molcloak.pipeline import data, inputs, predict, workflow
from molcloak.pipeline.bundle import load_manifest
from molcloak.pipeline.cli import app
from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.errors import DataError, FeaturizerError
from molcloak.pipeline.featurize import FeaturizerSpec, featurizer_from_dict
from molcloak.pipeline.fhe_client import PrivateClient
from molcloak.pipeline.fhe_server import PrivateServer
from molcloak.pipeline.splits import split_dataset
from molcloak.pipeline.tabular import TabularSpec
from molcloak.pipeline.train import TrainConfig

TINY = {"hidden": [4], "weight_bits": 2, "act_bits": 2, "input_bits": 2}
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def breast_cancer():
    return data.load_bundled("breast-cancer")


@pytest.fixture(scope="module")
def tiny_tabular(breast_cancer, tmp_path_factory):
    """breast-cancer, MLP 30 -> 4 -> 2 with sigmoid activations (2 bits), compiled and deployed."""
    ckpt = workflow.train_checkpoint(
        breast_cancer,
        model_name="mlp-sigmoid",
        model_options=TINY,
        train_config=TrainConfig(epochs=4, patience=4, seed=0),
    )
    compiled = workflow.compile_checkpoint(ckpt, CompileConfig(rounding_bits=None))
    bundle = tmp_path_factory.mktemp("tabular") / "bundle"
    workflow.deploy(ckpt, compiled, bundle, "tiny-breast-cancer")
    return ckpt, compiled, bundle


def test_breast_cancer_uses_the_notebooks_80_20_split_with_seed_42(breast_cancer):
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    raw = load_breast_cancer()
    assert breast_cancer.is_tabular and breast_cancer.table.shape == (569, 30) and breast_cancer.smiles == []
    assert breast_cancer.columns == tuple(raw.feature_names) and breast_cancer.task.labels == (
        "malignant",
        "benign",
    )
    _, test_idx = train_test_split(np.arange(569), test_size=0.2, random_state=42)
    sp = split_dataset(breast_cancer, seed=0)
    assert sp.method == "official" and np.array_equal(sp.test, np.sort(test_idx))
    assert len(sp.train) + len(sp.valid) == 455
    assert np.array_equal(breast_cancer.table, raw.data) and np.array_equal(breast_cancer.y, raw.target)
    with pytest.raises(DataError, match="no molecules to take scaffolds of; use --split random"):
        split_dataset(breast_cancer, "scaffold")


def test_scaler_fitted_on_train_travels_in_the_bundle(tiny_tabular, breast_cancer):
    ckpt, _, bundle = tiny_tabular
    spec = ckpt.featurizer
    assert isinstance(spec, TabularSpec) and spec.columns == breast_cancer.columns
    sp = split_dataset(breast_cancer, seed=0)
    assert np.allclose(spec.mean, breast_cancer.table[sp.train].mean(axis=0))
    assert np.allclose(spec.std, breast_cancer.table[sp.train].std(axis=0))
    assert np.array_equal(spec.medians, np.median(breast_cancer.table[sp.train], axis=0))
    assert np.array_equal(spec.neutral_raw(), spec.medians)
    stored = json.loads((bundle / "client" / "manifest.json").read_text())["featurizer"]
    assert stored["kind"] == "tabular" and stored["columns"] == list(spec.columns)
    again = featurizer_from_dict(json.loads(json.dumps(stored)))
    assert again == spec
    # records as text (a CSV row) and the numeric matrix featurize identically
    records = [{c: repr(v) for c, v in zip(spec.columns, row)} for row in breast_cancer.table[sp.test[:4]]]
    assert np.array_equal(again.transform(records), spec.transform(breast_cancer.table[sp.test[:4]]))
    assert np.array_equal(again.transform(records), ckpt.X_test[:4])


def test_sigmoid_model_runs_encrypted_and_equals_simulation(tiny_tabular, breast_cancer, tmp_path):
    ckpt, compiled, bundle = tiny_tabular
    assert ckpt.model_config["activation"] == "sigmoid"
    assert compiled.stats.pbs_count > 0  # the sigmoid and requantization are lookup tables
    client = PrivateClient(bundle, tmp_path / "keys")
    server = PrivateServer(bundle)
    client.keygen()
    keys = server.load_keys(client.evaluation_keys())
    rows = [dict(zip(breast_cancer.columns, map(str, r))) for r in breast_cancer.table[:3]]
    X = client.featurize(rows)
    simulated = compiled.q_module.forward(X, fhe="simulate")
    for x, sim in zip(X, simulated):
        raw, ct, _, _ = predict.run_encrypted(client, server, keys, x)
        assert np.array_equal(raw[0], sim) and len(ct) > 0
    report = predict.predict_local(bundle, rows, key_dir=tmp_path / "keys")
    assert [p.raw for p in report.predictions] == simulated.tolist()
    p = report.predictions[0].to_dict()
    assert "smiles" not in p and p["features"]["mean radius"] == float(rows[0]["mean radius"])
    assert p["label"] in ("malignant", "benign") and abs(sum(p["value"]) - 1) < 1e-9


def test_bad_prediction_rows_name_row_column_value_and_fix(tiny_tabular, breast_cancer, tmp_path):
    _, _, bundle = tiny_tabular
    good = dict(zip(breast_cancer.columns, map(str, breast_cancer.table[0])))
    bad_value = {**good, "mean area": "12,5"}
    missing = {k: v for k, v in good.items() if k != "worst symmetry"}
    with pytest.raises(
        DataError,
        match=r"row 2: column 'mean area' value '12,5' is not a number; fix it or pass --skip-invalid",
    ):
        predict.predict_local(bundle, [good, bad_value], fhe="simulate")
    with pytest.raises(
        DataError, match=r"row 1: column 'worst symmetry' is missing; the model needs the columns"
    ):
        predict.predict_local(bundle, [missing], fhe="simulate")
    with pytest.raises(DataError, match=r"row 1: 'CCO' is text, but this model reads numeric rows"):
        predict.predict_local(bundle, ["CCO"], fhe="simulate")
    with pytest.raises(DataError, match=r"row 1: column 'mean radius' value '' is empty"):
        predict.predict_local(bundle, [{**good, "mean radius": ""}], fhe="simulate")
    report = predict.predict_local(bundle, [bad_value, good], fhe="simulate", skip_invalid=True)
    assert "value '12,5' is not a number" in report.predictions[0].error and report.predictions[1].raw


def test_load_csv_feature_cols_all_and_explicit(csv_file):
    path = csv_file("id,a,b,y,notes\nx1,1.5,2,0,ok\nx2,2.5,-1e-3,1,\nx3,0,4,1,fine\n")
    ds = data.load_csv(path, None, "y", feature_cols="all")
    assert ds.columns == ("a", "b") and ds.ignored_columns == ("id", "notes")
    assert ds.table.tolist() == [[1.5, 2.0], [2.5, -1e-3], [0.0, 4.0]] and ds.y.tolist() == [0, 1, 1]
    ds = data.load_csv(path, None, "y", feature_cols="b,a", task="regression")
    assert ds.columns == ("b", "a") and ds.table[0].tolist() == [2.0, 1.5] and ds.task.kind == "regression"


@pytest.mark.parametrize(
    "text,cols,message",
    [
        (
            "a,b,y\n1,2,0\n3,x,1\n",
            "all",
            r"row 2: column 'b' value 'x' is not a number; fix it or pass --skip-invalid",
        ),
        ("a,b,y\n1,,0\n3,4,1\n", "a,b", r"row 1: column 'b' value '' is empty"),
        ("a,b,y\n1,2,0\n3,inf,1\n", "a,b", r"row 2: column 'b' value 'inf' is not finite"),
        ("a,b,y\n1,2,0\n3,4,1\n", "a,c", r"feature column 'c' not found; available columns: 'a', 'b', 'y'"),
        ("a,b,y\n1,2,0\n3,4,1\n", "a,y", r"column 'y' is a target and a feature"),
        ("name,y\nfoo,0\nbar,1\n", "all", r"no numeric column besides \['y'\]"),
    ],
)
def test_bad_tabular_training_data(csv_file, text, cols, message):
    with pytest.raises(DataError, match=message):
        data.load_csv(csv_file(text), None, "y", feature_cols=cols)


def test_skip_invalid_drops_and_lists_bad_rows(csv_file):
    ds = data.load_csv(
        csv_file("a,b,y\n1,2,0\n3,x,1\n5,6,1\n7,8,0\n"), None, "y", feature_cols="all", skip_invalid=True
    )
    assert ds.rows.tolist() == [1, 3, 4] and [str(p) for p in ds.problems] == [
        "row 2: column 'b' value 'x' is not a number; fix it or pass --skip-invalid"
    ]


def test_a_tabular_spec_saved_before_the_medians_loads_and_falls_back_to_the_mean():
    rows = np.array([[1.0, 10.0], [2.0, 20.0], [9.0, 30.0], [4.0, 400.0]])
    fitted = TabularSpec(("a", "b")).fit(rows)
    assert fitted.medians == (3.0, 25.0) and np.array_equal(fitted.neutral_raw(), [3.0, 25.0])
    old = fitted.to_dict()
    del old["medians"]
    spec = featurizer_from_dict(json.loads(json.dumps(old)))
    assert spec.medians is None and spec.to_dict() == old
    assert np.array_equal(spec.transform(rows), fitted.transform(rows))
    assert np.array_equal(spec.neutral_raw(), [4.0, 115.0])  # the training means
    with pytest.raises(FeaturizerError, match="medians for 1 of 2 columns; rebuild the bundle"):
        featurizer_from_dict({**fitted.to_dict(), "medians": [3.0]})
    with pytest.raises(FeaturizerError, match="is not fitted; fit it on the training rows first"):
        TabularSpec(("a", "b")).neutral_raw()


def test_tabular_spec_rejects_bad_specs():
    with pytest.raises(FeaturizerError, match="listed twice"):
        TabularSpec(("a", "a"))
    with pytest.raises(FeaturizerError, match="not fitted"):
        TabularSpec(("a",)).transform(np.zeros((1, 1)))
    with pytest.raises(FeaturizerError, match="malformed"):
        featurizer_from_dict({"kind": "tabular"})
    with pytest.raises(FeaturizerError, match="cannot be fitted on 0 rows"):
        TabularSpec(("a",)).fit(np.zeros((0, 1)))
    with pytest.raises(FeaturizerError, match="--features 'physchem'.*does not apply"):
        workflow.train_checkpoint(data.load_bundled("breast-cancer"), features="physchem")


def test_read_inputs_by_input_kind(csv_file, tmp_path):
    """`predict --input`: rows for a tabular featurizer, a SMILES column for a molecular one, one CSV reader."""
    rows_csv = csv_file("id,b,a\nm1,2,1\nm2,,3\n", "rows.csv")
    tabular = TabularSpec(("a", "b"))
    assert inputs.read_inputs(tabular, None, rows_csv, "smiles") == [
        {"id": "m1", "b": "2", "a": "1"},
        {"id": "m2", "b": "", "a": "3"},
    ]
    molecular = FeaturizerSpec.parse("physchem")
    assert inputs.read_inputs(molecular, None, csv_file("smiles,y\nCCO,1\nc1ccccc1,0\n"), "smiles") == [
        "CCO",
        "c1ccccc1",
    ]
    assert inputs.read_inputs(molecular, ["CCO"], None, "smiles") == ["CCO"]
    bad = [
        (
            tabular,
            ["CCO"],
            None,
            "this model reads numeric rows, not SMILES; pass --input rows.csv with the columns a, b",
        ),
        (
            TabularSpec(("a", "c")),
            None,
            rows_csv,
            r"column 'c' not found \(1 of the model's 2 feature columns missing\)",
        ),
        (
            molecular,
            None,
            rows_csv,
            "column 'smiles' not found; available columns: id, b, a; pass --smiles-col",
        ),
        (
            molecular,
            None,
            tmp_path / "nope.csv",
            "CSV file '.*nope.csv' does not exist; check the --input path",
        ),
        (molecular, None, csv_file("smiles,y\n", "empty.csv"), "empty.csv has no data rows"),
        (molecular, None, csv_file("", "blank.csv"), "blank.csv: not a readable CSV file"),
        (molecular, None, None, "no molecules given"),
        (molecular, ["CCO"], rows_csv, "not both"),
    ]
    for featurizer, args, path, message in bad:
        with pytest.raises(DataError, match=message):
            inputs.read_inputs(featurizer, args, path, "smiles")


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_tabular(breast_cancer, tmp_path_factory):
    """`molcloak train --feature-cols all` + `deploy` on a CSV of 6 breast-cancer columns plus an id column."""
    tmp = tmp_path_factory.mktemp("cli-tabular")
    cols = list(breast_cancer.columns[:6])
    rows = [
        [f"p{i}", *map(repr, breast_cancer.table[i, :6]), breast_cancer.task.labels[breast_cancer.y[i]]]
        for i in range(300)
    ]
    train_csv = write_csv(tmp / "train.csv", ["patient", *cols, "diagnosis"], rows)
    result = cli(
        "train",
        "--dataset",
        train_csv,
        "--feature-cols",
        "all",
        "--target-col",
        "diagnosis",
        "--model",
        "mlp-sigmoid",
        "--hidden",
        "3",
        "--weight-bits",
        "2",
        "--act-bits",
        "2",
        "--input-bits",
        "2",
        "--epochs",
        "3",
        "--out",
        tmp / "run",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (
        summary["n_features"] == 6
        and summary["features"] == "tabular:6 columns"
        and "f1" in summary["metrics"]["float"]
    )
    result = cli("deploy", tmp / "run", "--out", tmp / "bundles" / "bc6", "--rounding-bits", "0", "--json")
    assert result.exit_code == 0, result.output
    rows_csv = write_csv(
        tmp / "rows.csv",
        ["patient", *reversed(cols)],  # any column order, extra columns ignored
        [[f"q{i}", *map(repr, breast_cancer.table[i, :6][::-1])] for i in range(400, 403)],
    )
    return tmp, tmp / "bundles" / "bc6", cols, rows_csv


def test_cli_train_deploy_predict_tabular(cli_tabular):
    tmp, bundle, cols, rows_csv = cli_tabular
    result = cli(
        "predict",
        "--bundle",
        bundle,
        "--key-dir",
        tmp / "keys",
        "--input",
        rows_csv,
        "--json",
        "--output",
        tmp / "out.csv",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    simulated = predict.predict_local(bundle, list(csv.DictReader(rows_csv.open())), fhe="simulate")
    assert [p["raw"] for p in report["predictions"]] == [p.raw for p in simulated.predictions]
    assert [p["index"] for p in report["predictions"]] == [1, 2, 3]
    out = list(csv.DictReader((tmp / "out.csv").open()))
    assert list(out[0]) == ["index", "prediction", "value", "error"] and out[0]["prediction"] in (
        "malignant",
        "benign",
    )
    table = cli("predict", "--bundle", bundle, "--key-dir", tmp / "keys", "--input", rows_csv)
    assert (
        table.exit_code == 0
        and "SMILES" not in table.output
        and ("benign" in table.output or "malignant" in table.output)
    )
    assert load_manifest(bundle).featurizer.columns == tuple(cols)


@pytest.mark.parametrize(
    "rows,args,message",
    [
        (
            "mean radius,mean texture\n1,2\n",
            [],
            "column 'mean perimeter' not found (4 of the model's 6 feature columns missing)",
        ),
        (
            None,
            ["CCO"],
            "this model reads numeric rows, not SMILES; pass --input rows.csv with the columns mean radius",
        ),
        (
            "{header}\n{good}\n{good_but_x}\n",
            [],
            "row 2: column 'mean area' value 'x' is not a number; fix it or pass --skip-invalid",
        ),
    ],
)
def test_cli_bad_rows_are_one_line_and_exit_2(cli_tabular, rows, args, message):
    tmp, bundle, cols, _ = cli_tabular
    extra = []
    if rows is not None:
        good = ["1.0"] * len(cols)
        bad = [("x" if c == "mean area" else "1.0") for c in cols]
        path = tmp / "bad.csv"
        path.write_text(rows.format(header=",".join(cols), good=",".join(good), good_but_x=",".join(bad)))
        extra = ["--input", path]
    result = cli("predict", "--bundle", bundle, "--key-dir", tmp / "keys", *extra, *args)
    assert result.exit_code == 2, result.output
    assert (
        message in result.output
        and result.output.strip().startswith("error:")
        and "Traceback" not in result.output
    )


def test_cli_skip_invalid_keeps_the_bad_row_with_its_error(cli_tabular):
    tmp, bundle, cols, _ = cli_tabular
    path = tmp / "mixed.csv"
    path.write_text(
        ",".join(cols) + "\n" + ",".join(["1.0"] * 6) + "\n" + ",".join(["?"] + ["1.0"] * 5) + "\n"
    )
    result = cli(
        "predict",
        "--bundle",
        bundle,
        "--fhe",
        "simulate",
        "--input",
        path,
        "--skip-invalid",
        "--output",
        tmp / "m.csv",
    )
    assert result.exit_code == 0, result.output
    out = list(csv.DictReader((tmp / "m.csv").open()))
    assert (
        out[0]["error"] == ""
        and out[1]["error"]
        == "row 2: column 'mean radius' value '?' is not a number; fix it or pass --skip-invalid"
    )


@pytest.mark.slow
def test_cli_predict_through_the_server(cli_tabular):
    """--server: the client part (with the tabular scaler) is downloaded; rows are featurized and encrypted locally."""
    from helpers import ServerProcess

    tmp, bundle, _, rows_csv = cli_tabular
    bundles = tmp / "served"
    shutil.copytree(bundle.parent, bundles, dirs_exist_ok=True)
    server = ServerProcess(bundles, tmp / "state")
    try:
        result = cli(
            "predict",
            "--server",
            server.url,
            "--model",
            "bc6",
            "--key-dir",
            tmp / "remote-keys",
            "--input",
            rows_csv,
            "--json",
        )
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    simulated = predict.predict_local(bundle, list(csv.DictReader(rows_csv.open())), fhe="simulate")
    assert [p["raw"] for p in json.loads(result.stdout)["predictions"]] == [
        p.raw for p in simulated.predictions
    ]


def test_encrypted_test_set_evaluation(tiny_tabular, monkeypatch):
    """evaluation/testset_fhe: fresh keys, encrypted rows of the owner's test split, scored like the simulation."""
    from molcloak.evaluation.bench.testset_fhe import evaluate
    from molcloak.pipeline.linear_fast_path import ENV_SWITCH

    # the engine named below is the one the server chooses, not one switched off by the environment
    monkeypatch.delenv(ENV_SWITCH, raising=False)

    _, compiled, bundle = tiny_tabular
    result = evaluate(bundle, n=3)
    assert result["n_executed"] == 3 and result["fhe_equals_simulation"] == 3  # no rounding: FHE is exact
    assert set(result["metrics"]) == {"float", "quantized", "fhe_simulate", "fhe_execute"}
    assert result["evaluation_key_bytes"] > 0 and result["seconds"]["run"]["median"] > 0
    assert result["circuit"]["pbs_count"] == compiled.stats.pbs_count
    # a network's bootstraps: Concrete's runtime serves it, and the JSON says so, with when and at what load
    assert result["server_engine"].startswith("Concrete runtime") and result["date"].endswith(" UTC")
    assert set(result["load_avg_1min"]) == {"before", "after"}
