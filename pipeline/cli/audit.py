"""The auditor's command: audit a model privately on a secret test set."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    DataOpts,
    JsonOpt,
    KeyDirOpt,
    TokenFileOpt,
    app,
    cli_errors,
    emit_json,
    err,
    out,
    progress,
    read_token,
)


@app.command()
@cli_errors
def audit(
    test_set: Path = typer.Option(
        ..., "--test-set", "-t", help="CSV file of the secret test set, one molecule per row."
    ),
    target_col: str = typer.Option(
        ..., "--target-col", help="Column with the true class (name, or id 0..k-1) or value."
    ),
    smiles_col: str = DataOpts.smiles_col,
    server: str | None = typer.Option(
        None, "--server", "-s", help="URL of the owner's `molcloak serve` server."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model name on the server (see GET /models)."
    ),
    bundle: Path | None = typer.Option(
        None, "--bundle", "-b", help="Audit a local bundle instead of a server (both halves in this process)."
    ),
    task: str | None = typer.Option(
        None,
        "--task",
        help="classification or regression; checked against the model (default: the model's task).",
    ),
    out_dir: Path = typer.Option(
        Path("audit"),
        "--out",
        "-o",
        help="Directory for progress and reports; rerun the same command to resume.",
    ),
    group_col: str | None = typer.Option(
        None,
        "--group-col",
        help="Also compare subgroups defined by this column (besides MW, logP, scaffold bins).",
    ),
    bootstrap: int = typer.Option(
        1000, "--bootstrap", help="Bootstrap replicates for the 95% confidence intervals (0 = none)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    batch_size: int = typer.Option(8, "--batch-size", help="Molecules per request and per checkpoint write."),
    key_dir: Path | None = KeyDirOpt,
    token_file: Path | None = TokenFileOpt,
    skip_invalid: bool = typer.Option(
        False,
        "--skip-invalid",
        help="Score the valid rows and list the invalid ones in the report instead of failing.",
    ),
    restart: bool = typer.Option(
        False, "--restart", help="Discard the progress saved in --out and start over."
    ),
    as_json: bool = JsonOpt,
):
    """Audit a model privately on a secret test set: metrics with 95% CIs, subgroups, claims check, reports.

    The test molecules are featurized and encrypted here; the server computes on ciphertexts and only
    this machine decrypts. Progress is saved in --out after every batch: after Ctrl-C, a lost
    connection or a server restart, rerun the same command to continue. Writes report.json (every
    number and per-row predictions: keep it private), report.md and report.html with plots.
    Example: molcloak audit --server http://127.0.0.1:8000 --model sol-low --test-set test.csv
    --target-col sol_low --out audits/sol-low
    """
    from molcloak.evaluation.audit.engine import AuditConfig, audit_command
    from molcloak.evaluation.audit.report import print_summary

    config = AuditConfig(
        test_set,
        out_dir,
        target_col,
        smiles_col,
        task,
        group_col,
        bootstrap,
        seed,
        batch_size,
        skip_invalid,
        restart,
    )
    with progress() as bar:
        bar_task: list = []

        def on_progress(done: int, total: int, status: str) -> None:
            if not bar_task:
                bar_task.append(bar.add_task("encrypted audit", total=total, completed=done, status=status))
            bar.update(bar_task[0], completed=done, status=status)

        try:
            report = audit_command(
                config, bundle, server, model, key_dir, read_token(token_file), on_progress
            )
        except KeyboardInterrupt as exc:
            err.print(f"[yellow]{exc or 'interrupted'}[/yellow]", highlight=False)
            raise typer.Exit(130) from None
    if as_json:
        return emit_json({k: v for k, v in report.items() if k != "rows"})
    print_summary(report, out)
