"""The `molcloak` command line, in-process through Typer's runner (and once as a real subprocess)."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from molcloak.pipeline.cli import app

runner = CliRunner()
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_every_documented_command_is_registered():
    assert {
        "train",
        "compile",
        "deploy",
        "predict",
        "serve",
        "info",
        "models",
        "demo",
        "app",
        "audit",
    } <= set(COMMANDS)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output and len(result.output) > 200


def test_output_to_a_log_is_wide_enough_for_the_tables(monkeypatch, tmp_path):
    """Piped or redirected output (no terminal) is LOG_COLUMNS wide, not rich's 80 that cut fit's front table into
    slivers; COLUMNS still decides when set."""
    from rich.table import Table

    from molcloak.pipeline.cli.common import LOG_COLUMNS, _console

    SPEC = "rdkit2d:scale=quantile+rff:n=2048+morgan_count:r=2,n=2048,scale=quantile"
    monkeypatch.delenv("COLUMNS", raising=False)
    with (tmp_path / "log.txt").open("w") as log:
        monkeypatch.setattr(sys, "stdout", log)
        console = _console()
        table = Table("features", "network", "compile")  # 105 characters a row: at 80 the spec would wrap
        table.add_row(SPEC, "h=16 w3a3i4", "r5 p=1e-06")
        console.print(table)
        monkeypatch.setenv("COLUMNS", "100")
        assert _console().width == 100
    assert console.width == LOG_COLUMNS and SPEC in (tmp_path / "log.txt").read_text()


def test_top_level_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    ckpt = tmp / "run"
    result = run(
        "train",
        "--dataset",
        "sol-low",
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
        ckpt,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["training"]["n_test"] == 257 and "roc_auc" in summary["metrics"]["float"]
    bundle = tmp / "bundle"
    result = run("deploy", ckpt, "--out", bundle, "--rounding-bits", "0", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["circuit"]["pbs_count"] == 3 and "fhe_simulate" in info["metrics"]
    return tmp, bundle


def test_predict_json_and_csv(cli_bundle):
    tmp, bundle = cli_bundle
    result = run("predict", "--bundle", bundle, "--key-dir", tmp / "keys", "CCO", "c1ccccc1Cl", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "execute" and len(report["predictions"]) == 2
    assert all(p["label"] in ("low", "not low") for p in report["predictions"])
    inp = tmp / "in.csv"
    inp.write_text("name,smi\nethanol,CCO\nbad,C1CC\nphenol,Oc1ccccc1\n")
    result = run(
        "predict",
        "--bundle",
        bundle,
        "--key-dir",
        tmp / "keys",
        "--input",
        inp,
        "--smiles-col",
        "smi",
        "--skip-invalid",
        "--output",
        tmp / "out.csv",
    )
    assert result.exit_code == 0, result.output
    lines = (tmp / "out.csv").read_text().splitlines()
    assert len(lines) == 4 and "could not be parsed" in lines[2] and lines[3].startswith("3,Oc1ccccc1,")


def test_info_shows_manifest(cli_bundle):
    _, bundle = cli_bundle
    result = run("info", bundle)
    assert result.exit_code == 0 and "PBS" in result.output and "physchem" in result.output
    data = json.loads(run("info", bundle, "--json").stdout)
    assert data["name"] == "bundle" and data["task"]["labels"] == ["not low", "low"]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["predict", "--bundle", "{bundle}", "--key-dir", "{tmp}/k", "C1CC"],
            "molecule 1: SMILES 'C1CC' could not be parsed",
        ),
        (["predict", "--bundle", "{tmp}/nope", "CCO"], "does not exist"),
        (["predict", "--bundle", "{bundle}"], "no molecules given"),
        (["train", "--dataset", "{tmp}/missing.csv"], "neither a bundled dataset"),
        (
            ["train", "--dataset", "sol-low", "--hidden", "a,b", "--out", "{tmp}/x"],
            "--hidden 'a,b' is not a comma-separated list",
        ),
        (
            ["train", "--dataset", "sol-low", "--weight-bits", "12", "--out", "{tmp}/x"],
            "weight_bits=12 is out of range",
        ),
        (["deploy", "{tmp}", "--out", "{tmp}/b2"], "is not a molcloak checkpoint"),
        (["deploy", "{tmp}/run", "--out", "{bundle}"], "already exists; pass --force"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli_bundle, args, message):
    tmp, bundle = cli_bundle
    result = run(*[a.format(tmp=tmp, bundle=bundle) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().startswith("error:")


def test_csv_training_reports_bad_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("smiles,y\nCCO,1\nC1CC,0\nCCN,0\nCCC,1\n")
    result = run("train", "--dataset", path, "--target-col", "nope", "--out", tmp_path / "r")
    assert (
        result.exit_code == 2 and "column 'nope' not found; available columns: 'smiles', 'y'" in result.output
    )
    result = run("train", "--dataset", path, "--target-col", "y", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "row 2: SMILES 'C1CC' could not be parsed" in result.output


def test_console_script_runs_as_a_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "molcloak.pipeline.cli", "models", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mlp" in json.loads(proc.stdout)["models"]


@pytest.mark.slow
def test_demo_runs_the_default_model_end_to_end(tmp_path):
    """What `make demo` runs: the default model, real keys, FHE close to the simulation."""
    result = run("demo", "--out", tmp_path / "demo", "--n", "2", "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    # the default's approximate rounding (8-bit accumulators -> 5 bits) may move an accumulator by one step, so FHE
    # can differ a little from the simulation (PERFORMANCE.md); the probabilities stay close
    assert len(d["rows"]) == 2 and all(
        abs(r["fhe"][-1] - r["simulated"][-1]) < 0.4 for r in d["rows"]
    )  # max 0.25 over 257
    assert d["circuit"]["max_bit_width"] <= 8 and d["evaluation_key_bytes"] > 0
    assert d["metrics"]["fhe_simulate"]["roc_auc"] > 0.85
    assert (tmp_path / "demo" / "bundle" / "client" / "client.zip").is_file()
