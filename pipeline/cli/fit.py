"""The model owner's `molcloak fit`: search the model for this data under a latency and key budget."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.table import Table

from ..compile import DEFAULT_P_ERROR
from ..runconfig import int_list, p_error_list
from ..splits import FOLD_GROUPS
from .common import (
    DataOpts,
    ForceOpt,
    JsonOpt,
    app,
    cli_errors,
    emit_json,
    fmt_metrics,
    load_data,
    out,
    progress,
)


@app.command()
@cli_errors
def fit(
    dataset: str = DataOpts.dataset,
    smiles_col: str = DataOpts.smiles_col,
    target_col: str | None = DataOpts.target_col,
    task: str = DataOpts.task,
    threshold: float | None = DataOpts.threshold,
    skip_invalid: bool = DataOpts.skip_invalid,
    feature_cols: str | None = DataOpts.feature_cols,
    split: str | None = DataOpts.split,
    test_fraction: float = DataOpts.test_fraction,
    budget_ms: float = typer.Option(
        250.0, "--budget-ms", help="Latency budget: median server-side run of one encrypted molecule, in ms."
    ),
    max_key_mb: float = typer.Option(
        60.0, "--max-key-mb", help="Evaluation-key budget (MB a client uploads)."
    ),
    latency_check: str = typer.Option(
        "normalized",
        "--latency-check",
        help="normalized: check --budget-ms on timings divided by the machine's load factor (a fixed reference "
        "circuit timed in the same minute against its quiet time here; 1 when other processes used under 10 % "
        "of the CPU), so other jobs do not change the choice; raw: on the timings as measured now.",
    ),
    max_minutes: float | None = typer.Option(
        None,
        "--max-minutes",
        help="Cap of the search; the best model found so far is kept. The stages stop at the cap in "
        "quiet-machine minutes (with --latency-check normalized, each variant's time divided by the load factor; "
        "with raw, wall-clock minutes) or at 3x the cap in wall-clock minutes, whichever comes first. Past it, "
        "the leader is still distilled from its teacher (--teacher auto) and scored on the inner folds, the best "
        "variant not yet scored on them is also scored, and the choice is refitted (tox21's distillation with its "
        "teacher fits: about 5 minutes).",
    ),
    features: list[str] | None = typer.Option(
        None,
        "--features",
        "-f",
        help="Feature spec(s) to try, repeatable. Default: physchem, rdkit2d with selection, rdkit2d + Morgan counts "
        "with selection, physchem + 256 selected Morgan bits, rdkit2d + 384 selected Morgan bits, a kernel machine on "
        "2,048 random Fourier features of rdkit2d and a linear model on the 2,048 ECFP4 bits. After them, a regression "
        "search also tries a kernel machine on 2,560 random features (2,560 inputs) and a classification search one on "
        "2,048 random features beside 2,048 scaled ECFP4 counts (4,096 inputs), each only when the molecules outside "
        "the test part number at least its inputs. A list given here is searched as given. A spec the molecules "
        "cannot fill, e.g. select:k above the varied columns, is skipped. A spec with an rff:n=N or minhash:n=N map, or ending in linear, e.g. "
        "rdkit2d:scale=quantile+rff:n=1024, morgan:r=2,n=2048+linear (a linear model on the ECFP4 bits) or "
        "rdkit2d:scale=quantile+rff:n=2048+morgan:r=2,n=2048 (parts after the map are not mapped), is tried "
        "as a kernel machine: no hidden layer, no bootstrap, fitted by a convex solver.",
    ),
    widths: str = typer.Option(
        "8;16;24;32;16,16", "--widths", help="Hidden layer settings to try, ';'-separated, e.g. '8;16;16,8'."
    ),
    weight_bits: str = typer.Option("2,3,4", "--weight-bits", help="Weight bit widths to try."),
    act_bits: str = typer.Option(
        "3,4", "--act-bits", help="Activation bit widths to try (4: finer, often doubles the keys)."
    ),
    input_bits: str = typer.Option("3,4", "--input-bits", help="Input bit widths to try."),
    rounding_bits: str = typer.Option(
        "5,4,6", "--rounding-bits", help="Accumulator rounding bits to try (0 = off)."
    ),
    p_error: str = typer.Option(
        f"{DEFAULT_P_ERROR:g}",
        "--p-error",
        help="Error probability per bootstrap (PBS), one or more (the first in stages 1-2, all in the compile "
        "stage); 'default' is Concrete's 2^-40. 0.05 runs 5-41 % faster with smaller keys at the same simulated "
        "metric on panel-sized networks, but a prediction then fails a bootstrap with probability about "
        "1 - 0.95^PBS, and each failure a server learns of leaks information on the secret key: the key-rotation "
        f"default assumes {DEFAULT_P_ERROR:g} (README, 'Keys').",
    ),
    epochs: int = typer.Option(150, "--epochs", help="Maximum training epochs per variant."),
    patience_steps: int | None = typer.Option(
        None,
        "--patience-steps",
        help="Also stop a training after this many optimizer steps without a better validation loss (default: "
        "after 30 epochs only; at least 5 epochs either way). Shortens training on large data, e.g. 1000: about "
        "7 epochs on 4,600 molecules, and no change under 1,000 molecules.",
    ),
    teacher: str = typer.Option(
        "none",
        "--teacher",
        help="Distillation: rf trains every network also on the out-of-bag outputs of a plaintext RandomForest "
        "the owner keeps (physchem + Morgan-2048 features); rf-both: the same on RDKit 2D + Morgan-2048; auto: "
        "the leader after the feature stage and the best networks are also tried with the teacher that sees "
        "their descriptors (rf-both for RDKit 2D students, rf otherwise), and the inner folds decide; none: "
        "labels only.",
    ),
    distill: float = typer.Option(
        0.5, "--distill", help="With --teacher: weight of the teacher's outputs in the loss."
    ),
    inner_folds: int = typer.Option(
        5,
        "--inner-folds",
        help="Choose on the mean metric over this many inner folds of the training molecules (whole scaffold "
        "groups with --split scaffold): each feature set's first network and the 3 best variants are also "
        "trained and scored on each fold. 1: choose on one inner validation part (faster, noisier).",
    ),
    cv_molecules: int = typer.Option(
        2000,
        "--cv-molecules",
        help="Validate on the inner folds, in order, until they hold this many molecules: all of them on small "
        "data, the first 2 of 5 on ames (5,800 training molecules). 0: every fold (slower on large data).",
    ),
    fold_groups: str = typer.Option(
        FOLD_GROUPS[0],
        "--fold-groups",
        help="Scaffold groups the inner folds validate on: balanced (every group, so every training molecule once), "
        "rare (only the smallest groups, half of the molecules, like a scaffold test split's; the big series "
        "always train), or auto: rare when one scaffold group (often the acyclic molecules or the benzenes) "
        "would fill more than half of a balanced fold, balanced otherwise. Measured: rare chose better on "
        "clintox and worse on herg; see the README.",
    ),
    scoring: str = typer.Option(
        "clear",
        "--scoring",
        help="What variants are compared by on the inner validation part and folds: clear (Concrete ML's "
        "integer forward pass, the circuit's arithmetic with exact rounding: deterministic, so a rerun chooses "
        "the same, and faster) or simulate (Concrete's FHE simulation, which adds approximate rounding's and "
        "the bootstraps' errors from a generator seeded by the system: two runs can choose differently). "
        "A --p-error above 1e-4 is simulated either way.",
    ),
    fold_training: str = typer.Option(
        "refit",
        "--fold-training",
        help="How each inner fold's network is trained: refit (as fit trains what it deploys: on the fold's "
        "training part, for the epochs, or a linear network's penalty, its search run chose; the fold's part "
        "only scores it) or stopped (early-stopped on the fold's validation part, which then scores it: "
        "optimistic for networks, by 0.02-0.03 on average on bace, clintox and herg). See the README.",
    ),
    round_outputs: bool = typer.Option(
        False,
        "--round-outputs/--exact-outputs",
        help="Round every variant's outputs to its rounding bits before they are decrypted (`compile "
        "--output-bits`). Exact outputs (the default) can double the cost of every bootstrap on wide circuits; "
        "measured on one lipophilicity network: 298 -> 215 ms, RMSE +0.009 (README).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the training and the search."),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="PBS cost calibration JSON (default $MOLCLOAK_HOME/pbs_calibration.json)."
    ),
    out_dir: Path = typer.Option(Path("runs/fit"), "--out", "-o", help="Checkpoint directory to write."),
    deploy_dir: Path | None = typer.Option(None, "--deploy", help="Also write the deployment bundle here."),
    name: str | None = typer.Option(
        None, "--name", help="Model name in the bundle (default: its directory name)."
    ),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
):
    """Find the most accurate encrypted model for your data within a latency and key budget, and train it.

    Models are trained on the training split and chosen by their metric on an inner validation part
    (never the test split), from the circuit's clear integer pass (or its FHE simulation: --scoring); latency is predicted from each circuit's PBS count and bit
    width with the PBS cost measured on this machine, and timed; with --latency-check normalized (default)
    the budget applies to timings divided by the machine's current load factor. The chosen model is
    compiled, timed for real and written as a checkpoint (with its compile settings, for `deploy`).
    Example: molcloak fit --dataset bace.csv --target-col Class --split scaffold --out runs/bace
    """
    from ..bundle import save_checkpoint
    from ..fit import FIT_TRAIN, FitBudget, SearchSpace, fit
    from ..fit_space import check_fold_training, teachers_for
    from ..pbs_cost import Calibration
    from ..workflow import deploy

    teachers = teachers_for(teacher)  # a bad value: one line before the data is loaded
    check_fold_training(fold_training)
    train = dataclasses.replace(FIT_TRAIN, epochs=epochs, distill=distill, patience_steps=patience_steps)
    ds = load_data(dataset, smiles_col, target_col, task, threshold, skip_invalid, feature_cols)
    space = SearchSpace(
        **(
            {"features": tuple(features), "regression_features": (), "classification_features": ()}
            if features
            else {}
        ),  # as given
        hidden=tuple(tuple(int_list(w, "--widths")) for w in widths.split(";") if w.strip()),
        weight_bits=tuple(int_list(weight_bits, "--weight-bits")),
        act_bits=tuple(int_list(act_bits, "--act-bits")),
        input_bits=tuple(int_list(input_bits, "--input-bits")),
        rounding_bits=tuple(b or None for b in int_list(rounding_bits, "--rounding-bits")),
        p_error=tuple(p_error_list(p_error)),
        teachers=teachers,
        inner_folds=inner_folds,
        cv_molecules=cv_molecules,
        fold_groups=fold_groups,
        round_outputs=round_outputs,
        scoring=scoring,
        fold_training=fold_training,
    )
    budget = FitBudget(budget_ms, max_key_mb, max_minutes, latency_check)
    with progress(transient=False) as bar:
        t = bar.add_task("fit", total=None, status="")
        on_step = lambda msg, done, total: bar.update(t, completed=done, total=total, status=msg[:80])  # noqa: E731
        result = fit(
            ds,
            space,
            budget,
            split,
            test_fraction,
            seed,
            train,
            Calibration(calibration),
            on_step,
        )
    result.checkpoint.train_info["dataset"] = dataset
    save_checkpoint(result.checkpoint, out_dir, force=force)
    summary = {"checkpoint": str(out_dir), **result.to_dict()}
    if deploy_dir is not None:
        deploy(result.checkpoint, result.compiled, deploy_dir, name or deploy_dir.name, force=force)
        summary["bundle"] = str(deploy_dir)
    if as_json:
        return emit_json(summary)
    _print_fit(result, budget, scoring)
    out.print(
        f"checkpoint written to {out_dir}"
        + (
            f", bundle to {deploy_dir}"
            if deploy_dir
            else f"; next: molcloak deploy {out_dir} --out bundles/<name>"
        )
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def _print_fit(result, budget, scoring: str) -> None:
    from ..latency import describe, normalized

    how = "clear integer pass" if scoring == "clear" else "FHE-simulated"
    table = Table(
        title=f"molcloak fit: {len(result.candidates)} variants, validation {result.metric} ({how})"
    )
    cols = (
        "features",
        "network",
        "compile",
        result.metric,
        "float",
        "PBS",
        "bits",
        "MB",
        "ms",
        "load",
        "norm. ms",
        "pred. ms",
        "fits",
    )
    for col in cols:
        table.add_column(col, overflow="fold")
    ranked = sorted(result.candidates, key=lambda c: (c.fits(budget), c.valid), reverse=True)
    for c in ranked:
        mark = " *" if c is result.chosen else ""
        table.add_row(
            (c.features or "columns") + mark,
            c.network,
            c.compile_label,
            f"{c.valid:.3f}",
            f"{c.float_valid:.3f}",
            str(c.pbs),
            str(c.max_bits),
            f"{c.key_bytes / 1e6:.0f}",
            _ms(c.run_s),
            "-" if c.load_factor is None else f"{c.load_factor:.1f}x",
            _ms(normalized(c.run_s, c.load_factor) if c.load_factor else None),
            f"{c.predicted_s * 1e3:.0f}",
            "yes" if c.fits(budget) else "no",
        )
    out.print(table)
    among = (
        f"among the most accurate (within {result.tolerance:g} of the best {result.metric}), the richest features, "
        "then the fewest PBS"
        if result.tolerance
        else f"the best {result.metric}, then the richest features and the fewest PBS"
    )
    out.print(
        f"* chosen: within {budget.latency_ms:g} ms and {budget.key_mb:g} MB, {among} "
        "(ms: median of timed encrypted runs during the search; load: how much slower the reference circuit "
        "ran then than on this machine when quiet; norm. ms: ms / load; pred. ms: from PBS count and bit "
        f"width; budget checked on {result.latency_check} timings; inner validation part: {result.inner_valid})"
    )
    m = result.measured
    if m.get("median_run_s") is not None:
        load = m.get("load_factor") if result.latency_check == "normalized" else None
        out.print(
            f"  measured: {describe(m['median_run_s'], load)} (median over {m['runs']} encrypted runs), "
            f"keygen {m['keygen_s']:.2f} s, evaluation keys {m['evaluation_key_bytes'] / 1e6:.1f} MB"
        )
    if result.over_budget:
        out.print(
            f"[yellow]none of the timed candidates ran within {budget.latency_ms:g} ms "
            f"({result.latency_check}) on this machine now: the fastest was kept; rerun on a quieter machine "
            "or raise --budget-ms[/yellow]"
        )
    for line in result.left_out:
        out.print(
            f"  {line} (to search it anyway, list it with --features beside the other specs)",
            markup=False,
            highlight=False,
        )
    if result.stopped_early:
        out.print("[yellow]--max-minutes reached: the best model found so far was kept[/yellow]")
    for key, metrics in result.compiled.metrics.items():
        out.print(f"  {key:>13} test: {fmt_metrics(metrics)}")
