"""The engineer's commands: bench (molcloak against its peers) and tune (the accuracy/latency front)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

import typer

from ..compile import DEFAULT_P_ERROR
from ..errors import ConfigError
from ..runconfig import int_list, p_error_list
from ..splits import FOLD_GROUPS
from .common import DataOpts, app, cli_errors, err, given, load_data, out, progress, write_json

PANEL_ONLY = (
    "datasets",
    "seeds",
    "sample",
    "trees",
    "budget_ms",
    "fit_minutes",
    "latency_check",
    "teacher",
    "p_error",
    "fold_groups",
    "scoring",
    "fold_training",
    "round_outputs",
    "fit_features",
    "patience_steps",
)
NOT_PANEL = ("task", "features", "n_runs", "execute_all", "seed")


@app.command()
@cli_errors
def bench(
    ctx: typer.Context,
    panel_dir: Path | None = typer.Argument(
        None,
        metavar="DIR",
        help="With --panel: the folder of panel CSV files (default ../shared/data/panel).",
    ),
    panel: bool = typer.Option(
        False,
        "--panel",
        help="Panel mode: molcloak vs plaintext references on every described CSV of DIR "
        "(bace, clintox, ames, herg, tox21, lipophilicity; panel.json in DIR adds or overrides files).",
    ),
    datasets: str | None = typer.Option(
        None, "--datasets", help="Panel: comma-separated subset of the panel's datasets, e.g. herg,bace."
    ),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Panel: scaffold-split seeds, e.g. 0,1,2."),
    sample: int | None = typer.Option(
        None,
        "--sample",
        help="Panel: FHE-execute a fixed seeded random sample of N >= 200 test molecules (default all; 0 = none).",
    ),
    trees: int | None = typer.Option(
        None, "--trees", help="Panel: RandomForest trees of the references (default 500; --quick 100)."
    ),
    budget_ms: float = typer.Option(
        250.0, "--budget-ms", help="Panel: latency budget of `molcloak fit` (median server-side run, ms)."
    ),
    fit_minutes: float = typer.Option(
        15.0,
        "--fit-minutes",
        help="Panel: cap of each fit's search per dataset and seed (fit's --max-minutes: quiet-machine minutes).",
    ),
    latency_check: str = typer.Option(
        "normalized",
        "--latency-check",
        help="Panel: fit's budget check on timings divided by the machine's load factor (normalized) or "
        "as measured (raw); see `molcloak fit --help`.",
    ),
    teacher: str = typer.Option(
        "none",
        "--teacher",
        help="Panel: fit's --teacher (rf, rf-both: distillation from a plaintext RandomForest; auto: fit tries "
        "its leader and best networks with the teacher matching their descriptors; none).",
    ),
    p_error: float = typer.Option(
        DEFAULT_P_ERROR,
        "--p-error",
        help="Panel: fit's --p-error, one error probability per bootstrap for every variant (see `molcloak fit "
        "--help` for what a larger one costs the keys' safety).",
    ),
    fold_groups: str = typer.Option(
        FOLD_GROUPS[0],
        "--fold-groups",
        help="Panel: fit's --fold-groups (auto, balanced or rare; see `molcloak fit --help`).",
    ),
    scoring: str = typer.Option(
        "clear",
        "--scoring",
        help="Panel: fit's --scoring (clear: the circuit's deterministic clear integer pass; simulate: the FHE "
        "simulation; see `molcloak fit --help`).",
    ),
    fold_training: str = typer.Option(
        "refit",
        "--fold-training",
        help="Panel: fit's --fold-training (refit or stopped; see `molcloak fit --help`).",
    ),
    round_outputs: bool = typer.Option(
        False,
        "--round-outputs",
        help="Panel: fit's --round-outputs (outputs rounded before they are decrypted; see `molcloak fit --help`).",
    ),
    fit_features: List[str] | None = typer.Option(
        None,
        "--fit-features",
        help="Panel: a feature spec fit tries besides its defaults, repeatable (e.g. "
        "rdkit2d:scale=quantile+rff:n=1024, a kernel machine; see `molcloak fit --help`).",
    ),
    patience_steps: int | None = typer.Option(
        None,
        "--patience-steps",
        help="Panel: fit's --patience-steps (stop training after this many optimizer steps without improvement; "
        "see `molcloak fit --help`).",
    ),
    task: List[str] | None = typer.Option(
        None,
        "--task",
        help="Bundled task(s) to benchmark (default: sol-low and its regression twin sol-logs).",
    ),
    features: str | None = typer.Option(
        None, "--features", "-f", help="Feature spec every model uses (default: the molcloak default's)."
    ),
    only: str | None = typer.Option(
        None,
        "--models",
        help="Comma-separated subset of: molcloak, cml-linear, cml-xgb, ckks, random-forest. "
        "Panel: of molcloak, references, cml-xgb (default molcloak,references).",
    ),
    n_runs: int = typer.Option(
        5, "--n-runs", help="Encrypted single-molecule runs per model for the latency figures."
    ),
    execute_all: bool = typer.Option(
        True,
        "--execute-all/--no-execute-all",
        help="Run every test molecule through the molcloak circuit in FHE (executed metrics).",
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Smoke run: 2 encrypted runs per model, no full FHE test set, fewer trees. "
        "Panel: herg and bace (or the 2 smallest files), one seed, 8 encrypted molecules, 100 trees.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for splits, training and models."),
    json_path: Path | None = typer.Option(
        None,
        "--json",
        help="Write the full results (per-run times included) to this JSON file ('-' = stdout).",
    ),
    markdown_path: Path | None = typer.Option(
        None, "--markdown", help="Also write the markdown table to this file."
    ),
):
    """Benchmark molcloak's default model against Concrete ML built-ins, the TenSEAL CKKS recipe and a plaintext RandomForest.

    Same features and split for every model; ROC-AUC (RMSE/R² for sol-logs), median and p90 server-side
    latency per encrypted molecule, keygen time, evaluation-key size, ciphertext sizes, PBS count and bit width.
    The CKKS row needs `pip install -e ".\\[bench]"` (tenseal); without it the row says so.
    Example: molcloak bench --json bench.json --markdown bench.md

    With --panel [DIR]: per dataset and scaffold seed, the model `molcloak fit` chooses under
    --budget-ms within --fit-minutes (float / FHE-simulated /
    FHE-executed, latency, keygen, key size, PBS, bits) next to RandomForests on ECFP4, RDKit 2D and
    both, and logistic/ridge regression, trained on the same molecules; one row per dataset (means over
    seeds). --json FILE is rewritten after each dataset and seed, and a rerun with the same settings
    resumes from it. Example: molcloak bench --panel --seeds 0 --json panel.json --markdown panel.md
    """
    if panel:
        from ..fit import FitBudget

        FitBudget(budget_ms, latency_check=latency_check)  # bad values: one line before anything runs
        limits = {"budget_ms": budget_ms, "fit_minutes": fit_minutes, "latency_check": latency_check}
        limits["teacher"] = None if teacher == "none" else teacher
        limits["p_error"], limits["fold_groups"] = p_error, fold_groups
        limits["round_outputs"], limits["scoring"] = round_outputs, scoring
        limits["fold_training"] = fold_training
        limits["fit_features"] = tuple(fit_features or ())
        limits["patience_steps"] = patience_steps
        return _bench_panel(
            ctx, panel_dir, datasets, seeds, sample, trees, only, quick, json_path, markdown_path, limits
        )
    wrong = ["--" + n.replace("_", "-") for n in PANEL_ONLY if given(ctx, n)] + (["DIR"] if panel_dir else [])
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} only apply to --panel; add --panel or drop them")
    from molcloak.evaluation.bench.peers import MODELS, BenchConfig, markdown, run_bench

    models = tuple(m.strip() for m in only.split(",")) if only else MODELS
    kwargs = {"features": features} if features else {}
    cfg = BenchConfig(
        tasks=tuple(task or ("sol-low", "sol-logs")),
        models=models,
        n_runs=n_runs,
        execute_all=execute_all,
        quick=quick,
        seed=seed,
        **kwargs,
    )
    with progress(transient=False) as bar:
        t = bar.add_task("bench", total=len(cfg.tasks) * len(cfg.models), status="")
        result = run_bench(cfg, on_progress=lambda msg, n: bar.update(t, advance=n, status=msg))
    table = markdown(result)
    if markdown_path:
        markdown_path.write_text(table)
    if json_path:
        write_json(json_path, result)
        if str(json_path) == "-":
            return
    sys.stdout.write(table + "\n")  # raw markdown, not wrapped to the terminal width


def _bench_panel(
    ctx, panel_dir, datasets, seeds, sample, trees, only, quick, json_path, markdown_path, limits
):
    from molcloak.evaluation.bench import panel, panel_report

    wrong = [n for n in NOT_PANEL if given(ctx, n)]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} do not apply with --panel; drop them")
    folder = panel_dir or panel.default_panel_dir()
    cfg = panel.PanelConfig(
        folder=str(folder),
        datasets=tuple(d.strip() for d in datasets.split(",") if d.strip()) if datasets else None,
        seeds=tuple(int_list(seeds, "--seeds")),
        sample=sample,
        quick=quick,
        models=tuple(m.strip() for m in only.split(",") if m.strip()) if only else panel.DEFAULT_MODELS,
        trees=trees,
        **limits,
    )
    saving = json_path is not None and str(json_path) != "-"
    previous = None
    if saving and json_path.is_file():
        try:
            previous = json.loads(json_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None  # not an earlier result: it is overwritten
        if previous:
            err.print(f"resuming from {json_path}: finished runs with the same settings are reused")
    with progress(transient=False) as bar:
        t = bar.add_task("panel", total=None, status="")
        result = panel.run_panel(
            cfg,
            on_progress=lambda msg, done, total: bar.update(t, completed=done, total=total, status=msg[:60]),
            previous=previous,
            on_run=(lambda r: write_json(json_path, r)) if saving else None,
            command=panel.command_line(cfg, json_path, markdown_path),
        )
    for name, d in result["datasets"].items():
        if d["n_skipped_rows"]:
            first = d["skipped_rows"][0]
            err.print(
                f"[yellow]{name}: skipped {d['n_skipped_rows']} invalid rows[/yellow] ({first}; all in the JSON)"
            )
    table = panel_report.markdown(result)
    if markdown_path:  # the table, then the front each fit explored
        markdown_path.write_text(table + panel_report.frontier_markdown(result))
    if json_path:
        write_json(json_path, result)
        if str(json_path) == "-":
            return
    sys.stdout.write(table)


@app.command()
@cli_errors
def tune(
    dataset: str = DataOpts.dataset,
    smiles_col: str = DataOpts.smiles_col,
    target_col: str | None = DataOpts.target_col,
    task: str = DataOpts.task,
    threshold: float | None = DataOpts.threshold,
    skip_invalid: bool = DataOpts.skip_invalid,
    feature_cols: str | None = DataOpts.feature_cols,
    split: str | None = DataOpts.split,
    test_fraction: float = DataOpts.test_fraction,
    features: List[str] | None = typer.Option(
        None, "--features", "-f", help="Feature spec(s) to sweep, repeatable (default: the default features)."
    ),
    widths: str = typer.Option(
        "8;16",
        "--widths",
        help="Hidden layer settings separated by ';', each comma-separated, e.g. '8;16;16,8'.",
    ),
    weight_bits: str = typer.Option("3", "--weight-bits", help="Weight bit widths to sweep, e.g. 2,3."),
    act_bits: str = typer.Option("3", "--act-bits", help="Activation bit widths to sweep."),
    input_bits: str = typer.Option("4", "--input-bits", help="Input bit widths to sweep."),
    rounding_bits: str = typer.Option(
        "5", "--rounding-bits", help="Accumulator rounding bits to sweep (0 = off), e.g. 4,5,6."
    ),
    p_errors: str = typer.Option(
        f"{DEFAULT_P_ERROR:g}",
        "--p-error",
        help="Error probabilities per PBS to sweep, e.g. default,1e-6,0.01 (default = Concrete's 2^-40).",
    ),
    seeds: str = typer.Option(
        "0", "--seeds", help="Training seeds; accuracy is the mean over them, e.g. 0,1,2."
    ),
    epochs: int = typer.Option(150, "--epochs", help="Maximum training epochs per variant."),
    n_runs: int = typer.Option(5, "--n-runs", help="Encrypted runs per executed front point."),
    execute_front: int = typer.Option(
        3, "--execute-front", help="Run this many of the most accurate front points for real (0 = none)."
    ),
    max_latency: float = typer.Option(
        0.25, "--max-latency", help="Latency budget (s) for the chosen configuration."
    ),
    max_key_mb: float = typer.Option(
        30.0, "--max-key-mb", help="Evaluation-key budget (MB) for the chosen configuration."
    ),
    calibration: Path | None = typer.Option(
        None,
        "--calibration",
        help="PBS cost calibration JSON (default $MOLCLOAK_HOME/pbs_calibration.json; measured when missing).",
    ),
    plot_path: Path | None = typer.Option(None, "--plot", help="Write the accuracy/latency plot (PNG) here."),
    write_config: Path | None = typer.Option(
        None, "--write-config", help="Write the chosen configuration here for `molcloak train --config FILE`."
    ),
    layer_report: bool = typer.Option(
        True,
        "--layer-report/--no-layer-report",
        help="Per-layer float / quantized / FHE error of the chosen configuration.",
    ),
    json_path: Path | None = typer.Option(
        None, "--json", help="Write all results to this JSON file ('-' = stdout)."
    ),
):
    """Sweep bit widths, rounding bits, p_error and width; print the Pareto front (accuracy vs latency vs key size).

    Takes the same data options as `train`. Accuracy: FHE simulation on the test split. Latency: PBS
    count x a per-PBS cost measured on this machine, plus real encrypted runs of the front's most
    accurate points. Example:
    molcloak tune --widths "8;16" --weight-bits 2,3 --p-error default,0.01 --plot tune.png --write-config best.json
    """
    from molcloak.evaluation.tune.sweep import TuneGrid, print_tune, run_tune

    from ..train import TrainConfig

    ds = load_data(dataset, smiles_col, target_col, task, threshold, skip_invalid, feature_cols)
    grid = TuneGrid(
        features=tuple(features or ()) or TuneGrid.features,
        hidden=tuple(tuple(int_list(w, "--widths")) for w in widths.split(";") if w.strip()),
        weight_bits=tuple(int_list(weight_bits, "--weight-bits")),
        act_bits=tuple(int_list(act_bits, "--act-bits")),
        input_bits=tuple(int_list(input_bits, "--input-bits")),
        rounding_bits=tuple(b or None for b in int_list(rounding_bits, "--rounding-bits")),
        p_error=tuple(p_error_list(p_errors)),
        seeds=tuple(int_list(seeds, "--seeds")),
    )
    with progress(transient=False) as bar:
        t = bar.add_task("tune", total=grid.size() * len(grid.seeds) + execute_front + 1, status="")
        result = run_tune(
            ds,
            dataset,
            grid,
            TrainConfig(epochs=epochs),
            n_runs=n_runs,
            execute_front=execute_front,
            max_latency_s=max_latency,
            max_key_mb=max_key_mb,
            calibration=calibration,
            plot_path=plot_path,
            config_path=write_config,
            layer_report=layer_report,
            say=lambda msg: bar.update(t, advance=1, status=msg[:70]),
            split=split,
            test_fraction=test_fraction,
        )
    if json_path:
        write_json(json_path, result)
        if str(json_path) == "-":
            return
    print_tune(result, out)
