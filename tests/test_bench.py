"""bench / tune / per-layer errors on tiny settings: real compilation, keys, encryption; no timing asserts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from molcloak.evaluation.bench import ckks
from molcloak.evaluation.bench import peers as bench
from molcloak.evaluation.bench.fhe_timing import latency_summary
from molcloak.evaluation.tune import layer_error
from molcloak.evaluation.tune import sweep as tune
from molcloak.pipeline import data
from molcloak.pipeline.cli import app
from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.train import TrainConfig

TINY_GRID = {
    "hidden": ((3,),),
    "weight_bits": (2,),
    "act_bits": (2,),
    "input_bits": (2,),
    "rounding_bits": (None,),
}


def test_latency_summary_median_and_p90():
    s = latency_summary([0.5, 0.1, 0.2, 0.3, 0.4])
    assert s["median_s"] == 0.3 and s["p90_s"] == 0.5 and s["n_runs"] == 5
    assert latency_summary([])["n_runs"] == 0


@pytest.mark.slow
def test_bench_quick_real_fhe_rows(tmp_path):
    """molcloak, Concrete ML LogisticRegression and RandomForest on 30 test molecules, with real encrypted runs."""
    cfg = bench.BenchConfig(
        tasks=("sol-low",),
        models=("molcloak", "cml-linear", "random-forest"),
        n_runs=2,
        quick=True,
        epochs=3,
        max_test=30,
    )
    result = bench.run_bench(cfg)
    rows = {r["model"]: r for r in result["rows"]}
    ours = rows["molcloak"]
    assert ours["metrics"]["fhe_execute"]["n_molecules"] == 2
    # approximate rounding may move a rounded accumulator by one step, so FHE may differ slightly from simulation
    assert 0 <= ours["fhe_equals_simulation"] <= 2 and ours["max_abs_output_diff_vs_simulation"] < 2.0
    assert ours["pbs"] > 0 and ours["max_bits"] > 0 and ours["evaluation_key_bytes"] > 0
    assert ours["input_ciphertext_bytes"] > 0 and ours["output_ciphertext_bytes"] > 0
    assert len(ours["run_s"]) == 2 and ours["latency"]["n_runs"] == 2
    lr = rows["cml-linear"]
    assert 0.5 < lr["metrics"]["fhe_simulate"]["roc_auc"] <= 1 and lr["latency"]["n_runs"] == 2
    assert lr["fhe_equals_simulation"] >= 1
    assert "molcloak_speedup" in lr
    assert (
        0.5 < rows["random-forest"]["metrics"]["float"]["roc_auc"] <= 1
        and not rows["random-forest"]["latency"]
    )
    table = bench.markdown(result)
    assert "molcloak default" in table and "LogisticRegression" in table and "| PBS |" in table


def test_bench_ckks_skipped_with_reason_when_tenseal_missing(monkeypatch):
    monkeypatch.setattr(
        ckks,
        "available",
        lambda: 'tenseal is not installed (test); install it with pip install -e ".[bench]"',
    )
    cfg = bench.BenchConfig(tasks=("sol-low",), models=("ckks",), n_runs=1, quick=True, max_test=20)
    row = bench.run_bench(cfg)["rows"][0]
    assert "tenseal is not installed" in row["skipped"]
    assert "skipped: tenseal is not installed" in bench.markdown({"rows": [row], "config": {}})


@pytest.mark.slow
@pytest.mark.skipif(ckks.available() is not None, reason="tenseal not installed (pip install -e '.[bench]')")
def test_ckks_recipe_decrypts_to_the_plaintext_network():
    """Real CKKS keys and ciphertexts: the decrypted output matches the plaintext polynomial network."""
    cfg = bench.BenchConfig(
        tasks=("sol-low",), models=("ckks",), n_runs=1, quick=True, max_test=20, ckks_hidden=4
    )
    row = bench.run_bench(cfg)["rows"][0]
    assert row["max_abs_error_vs_plaintext"] < 0.05  # CKKS is approximate (scale 2^30, cubic terms)
    assert row["evaluation_key_bytes"] > 1e6 and row["latency"]["n_runs"] == 1


def test_bench_cli_rejects_unknown_model():
    res = CliRunner().invoke(app, ["bench", "--models", "molcloak,nope"])
    assert res.exit_code == 2 and "unknown bench model" in res.output


@pytest.mark.slow
def test_tune_two_point_grid_front_execution_and_config(tmp_path):
    """Two p_error values of one tiny model: simulation, predicted latency, one real front run, a config train reads."""
    ds = data.load_bundled("sol-low")
    grid = tune.TuneGrid(**TINY_GRID, p_error=(None, 0.05))
    result = tune.run_tune(
        ds,
        "sol-low",
        grid,
        TrainConfig(epochs=3, patience=3),
        n_runs=1,
        execute_front=1,
        calibration=tmp_path / "calib.json",
        plot_path=tmp_path / "front.png",
        config_path=tmp_path / "best.json",
        layer_report=False,
    )
    assert len(result["points"]) == 2 and result["front"]
    for p in result["points"]:
        assert (
            0 <= p["score"] <= 1 and p["pbs"] == 3 and p["predicted_s"] > 0 and p["evaluation_key_bytes"] > 0
        )
    executed = [p for p in result["points"] if p["measured"]]
    assert len(executed) == 1 and executed[0]["measured"]["latency"]["n_runs"] == 1
    calib = json.loads((tmp_path / "calib.json").read_text())["entries"]
    assert {k.split("@")[1] for k in calib} == {"default", "0.05"}
    assert (tmp_path / "front.png").stat().st_size > 1000
    config = json.loads((tmp_path / "best.json").read_text())
    assert config["model_options"]["hidden"] == [3] and config["compile"]["rounding_bits"] is None

    # the written configuration is what `molcloak train --config` takes; compile then uses its compile settings
    ckpt_dir = tmp_path / "ckpt"
    res = CliRunner().invoke(
        app,
        ["train", "--config", str(tmp_path / "best.json"), "--epochs", "2", "--out", str(ckpt_dir), "--json"],
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((ckpt_dir / "checkpoint.json").read_text())
    assert meta["model"]["config"]["hidden"] == [3] and meta["model"]["config"]["input_bits"] == 2
    assert meta["training"]["compile"] == config["compile"]


def test_pareto_front_drops_dominated_points():
    def pt(score, lat, keys):
        p = tune.Point(
            "physchem",
            "mlp",
            {"hidden": [4], "weight_bits": 2, "act_bits": 2, "input_bits": 2},
            CompileConfig(rounding_bits=lat, p_error=0.01),
            "roc_auc",
            scores=[score],
        )
        p.predicted_s, p.evaluation_key_bytes = lat, keys
        return p

    a, b, c = pt(0.9, 5, 10), pt(0.8, 6, 10), pt(0.95, 7, 10)
    assert tune.pareto_front([a, b, c]) == [a, c]
    for p in (a, c):
        p.on_front = True
    assert tune.choose([a, b, c], max_latency_s=6, max_key_mb=1).score == 0.9
    assert tune.choose([a, b, c], max_latency_s=1, max_key_mb=1) is a  # nothing fits: the fastest


def test_layer_errors_float_quantized_fhe(tiny_binary):
    ckpt, _compiled, _ = tiny_binary
    exact = layer_error.layer_errors(ckpt, CompileConfig(rounding_bits=None, p_error=None), n=40)
    assert [r["layer"] for r in exact] == ["hidden 1", "output"]
    for r in exact:
        assert (
            r["quantized_vs_fhe"]["max"] == 0.0 and r["fhe_differs_share"] == 0.0
        )  # p_error 2^-40, no rounding: exact
        assert (
            np.isfinite(r["float_vs_quantized"]["max"])
            and r["float_vs_quantized"]["mean"] <= r["float_vs_quantized"]["max"]
        )
        assert r["values"] == 40 * (4 if r["layer"] == "hidden 1" else 2)
    noisy = layer_error.layer_errors(ckpt, CompileConfig(rounding_bits=None, p_error=0.2), n=40)
    assert noisy[0]["pbs"] == 4
    assert all(r["float_vs_fhe"]["max"] >= 0 for r in noisy)


def test_quantile_scaled_features_roundtrip_and_range():
    """The default features: descriptors mapped to [-1, 1] by training quantiles, stored in the spec."""
    from molcloak.pipeline.featurize import FeaturizerSpec, raw_features
    from molcloak.pipeline.workflow import DEFAULT_FEATURES

    smiles = data.load_bundled("sol-low").smiles[:300]
    spec = FeaturizerSpec.parse(DEFAULT_FEATURES).fit(smiles[:200])
    assert str(spec) == "physchem:scale=quantile" and FeaturizerSpec.parse(str(spec)).parts == spec.parts
    X = spec.transform(smiles)
    assert X.min() >= -1 and X.max() <= 1 and X.shape == (300, 10)
    raw = raw_features(FeaturizerSpec.parse("physchem"), smiles)
    logp = 0  # MolLogP: the transform keeps the order of the training molecules
    order = np.argsort(raw[:200, logp], kind="stable")
    assert np.all(np.diff(X[:200, logp][order]) >= -1e-6)
    again = FeaturizerSpec.from_dict(spec.to_dict())
    np.testing.assert_array_equal(again.transform(smiles[:20]), X[:20])
    with pytest.raises(ValueError, match="scale 'quantile' not possible"):
        FeaturizerSpec.parse("morgan:r=2,n=64,scale=quantile")
