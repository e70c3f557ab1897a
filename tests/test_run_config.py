"""One run configuration (tune writes it, train reads it, deploy compiles with it), the data options
tune shares with train, and the CLI defects of the architecture review (each failed before its fix)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import EXACT_P_ERROR
from helpers import write_csv
from typer.testing import CliRunner

from molcloak.pipeline import bundle, data
from molcloak.pipeline.cli import app
from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.errors import ConfigError
from molcloak.pipeline.runconfig import RunConfig, parse_model_options
from molcloak.pipeline.train import TrainConfig

runner = CliRunner()
TINY = ["--hidden", "3", "--weight-bits", "2", "--act-bits", "2", "--input-bits", "2"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_run_config_round_trip_and_overrides(tmp_path):
    rc = RunConfig(
        "physchem",
        "mlp",
        {"hidden": [3]},
        TrainConfig(epochs=5),
        CompileConfig(4, "exact", 0.01),
        dataset="x",
    )
    path = rc.save(tmp_path / "run.json")
    assert RunConfig.load(path) == rc
    over = rc.override(
        features="morgan:r=2,n=64",
        model_options={"weight_bits": 2},
        train={"seed": 3},
        compile={"p_error": 1e-6},
    )
    assert over.features == "morgan:r=2,n=64" and over.model_options == {"hidden": [3], "weight_bits": 2}
    assert over.train == TrainConfig(epochs=5, seed=3) and over.compile == CompileConfig(4, "exact", 1e-6)
    (tmp_path / "bad.json").write_text('{"features": "physchem"}')
    with pytest.raises(ConfigError, match="not a molcloak configuration .*molcloak tune --write-config"):
        RunConfig.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match=r"rounding bits 1 out of range"):
        CompileConfig(
            rounding_bits=1
        )  # a bad configuration is a configuration error, not a compilation error


def test_set_options_are_parsed_below_the_cli():
    assert parse_model_options(["channels=8,16", "batchnorm=false", "activation=relu", "dropout=0.1"]) == {
        "channels": [8, 16],
        "batchnorm": False,
        "activation": "relu",
        "dropout": 0.1,
    }
    with pytest.raises(ConfigError, match="--set 'channels' is not KEY=VALUE"):
        parse_model_options(["channels"])


def test_deploy_compiles_with_the_settings_recorded_at_training(tmp_path):
    """The config's compile settings (exact rounding to 4 bits) travel in the checkpoint to the bundle;
    a value given to deploy replaces the recorded one. Defect: `--epochs` given with `--config` was ignored
    (the CLI compared click's ParameterSource with Typer's vendored one)."""
    config = RunConfig(
        model_options={"hidden": [3], "weight_bits": 2, "act_bits": 2, "input_bits": 2},
        train=TrainConfig(epochs=3, patience=3),
        compile=CompileConfig(4, "exact", EXACT_P_ERROR),
    )
    config.save(tmp_path / "run.json")
    result = run(
        "train", "--config", tmp_path / "run.json", "--epochs", "2", "--out", tmp_path / "ckpt", "--json"
    )
    assert result.exit_code == 0, result.output
    training = json.loads(result.stdout)["training"]
    assert training["compile"] == config.compile.to_dict()
    assert (
        training["config"]["epochs"] == 2 and training["config"]["patience"] == 3
    )  # the command line wins, key by key
    result = run("deploy", tmp_path / "ckpt", "--out", tmp_path / "b1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["compile"] == config.compile.to_dict()
    result = run("deploy", tmp_path / "ckpt", "--out", tmp_path / "b2", "--rounding-bits", "0", "--json")
    assert json.loads(result.stdout)["compile"]["rounding_bits"] is None
    assert json.loads(result.stdout)["compile"]["rounding_method"] == "exact"  # the rest still recorded
    assert bundle.load_manifest(tmp_path / "b1").data["compile"]["rounding_bits"] == 4


def test_tune_takes_a_csv_with_train_s_data_options(tmp_path):
    """Defect: `tune --dataset my.csv` asked for --target-col, which tune did not have."""
    ds = data.load_bundled("sol-logs")
    rows = [(s, f"{y:.3f}") for s, y in zip(ds.smiles[:160], ds.y[:160])]
    csv = write_csv(tmp_path / "mine.csv", ["mol", "logS"], rows)
    result = run(
        "tune",
        "--dataset",
        csv,
        "--smiles-col",
        "mol",
        "--target-col",
        "logS",
        "--task",
        "regression",
        "--split",
        "scaffold",
        "--widths",
        "3",
        "--weight-bits",
        "2",
        "--act-bits",
        "2",
        "--input-bits",
        "2",
        "--rounding-bits",
        "0",
        "--epochs",
        "3",
        "--execute-front",
        "0",
        "--no-layer-report",
        "--calibration",
        tmp_path / "calib.json",
        "--write-config",
        tmp_path / "best.json",
        "--json",
        tmp_path / "tune.json",
    )
    assert result.exit_code == 0, result.output
    tuned = json.loads((tmp_path / "tune.json").read_text())
    assert tuned["metric"] == "r2" and len(tuned["points"]) == 1
    assert RunConfig.load(tmp_path / "best.json").model_options["hidden"] == [3]


@pytest.fixture(scope="module")
def small_bundle(tiny_binary):
    return tiny_binary[2]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--server", "http://127.0.0.1:9", "--model", "m", "--fhe", "simulate", "CCO"],
            "--fhe simulate needs the owner's weights",
        ),
        (["--fhe", "fast", "CCO"], "--fhe 'fast' is not a mode"),
        (
            ["--batch-size", "4", "CCO"],
            "--batch-size sets how ciphertexts go to the server (per HTTP request, requests in flight) and applies "
            "to --server only",
        ),
        (
            ["--server", "http://127.0.0.1:9", "--model", "m", "--batch-size", "0", "CCO"],
            "--batch-size 0 is out of range",
        ),
        (
            ["--server", "http://127.0.0.1:9", "--model", "m", "--batch-size", "-1", "CCO"],
            "--batch-size -1 is out of range",
        ),
        (["--server", "http://127.0.0.1:9", "--model", "m", "--batch-size", "65", "CCO"], "use 1..64"),
    ],
)
def test_predict_options_are_honoured_or_refused(small_bundle, args, message):
    """Defect: --fhe simulate was ignored with --server, --batch-size ignored with --bundle, and bad batch sizes
    gave tracebacks. Each is now one line and exit 2, before any server is contacted."""
    if "--server" not in args:
        args = ["--bundle", small_bundle, *args]
    result = run("predict", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_tiny_fixtures_compile_at_the_p_error_the_exact_tests_claim(tiny_binary):
    """Defect: tests claimed p_error 2^-40 while the fixture compiled at the default 1e-6."""
    manifest = bundle.load_manifest(tiny_binary[2])
    assert (
        manifest.data["compile"]["p_error"] == EXACT_P_ERROR
        and manifest.data["compile"]["rounding_bits"] is None
    )


def test_audit_names_are_distinct_and_dead_code_is_gone():
    """Defects: the CLI imported `audit` as `run_audit` beside a different `run_audit`; dead code listed by the review."""
    from molcloak.evaluation.audit import engine
    from molcloak.evaluation.audit import metrics as audit_metrics
    from molcloak.pipeline.fhe_client import PrivateClient
    from molcloak.pipeline.tabular import TabularSpec

    assert engine.audit_command is not engine.run_audit and not hasattr(engine, "audit")
    assert not hasattr(PrivateClient, "encrypt_smiles") and not hasattr(audit_metrics, "metric_names")
    assert "directory" not in bundle.Manifest.__dataclass_fields__ and not hasattr(TabularSpec, "kind")


def test_first_screen_has_no_dependency_noise(tmp_path):
    """Defect: every command began with 'No CUDA runtime is found' and a torch 'Named tensors' warning."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "molcloak.pipeline.cli",
            "train",
            *TINY,
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "ckpt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for noise in ("CUDA", "Named tensors", "UserWarning", "DeprecationWarning", "pkg_resources"):
        assert noise not in proc.stderr + proc.stdout, proc.stderr


def test_a_failure_after_compiling_exits_2_from_a_real_process(tmp_path):
    """Defect: once Concrete had compiled, its exit hook turned the CLI's exit status 2 into 0."""
    result = run("train", *TINY, "--epochs", "1", "--out", tmp_path / "ckpt")
    assert result.exit_code == 0, result.output
    (tmp_path / "taken").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "molcloak.pipeline.cli",
            "compile",
            str(tmp_path / "ckpt"),
            "--rounding-bits",
            "0",
            "--bundle",
            str(tmp_path / "taken"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "already exists; pass --force" in proc.stderr and "Traceback" not in proc.stderr
