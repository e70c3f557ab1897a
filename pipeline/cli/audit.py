"""The auditor's commands: audit a model privately on a secret test set; explain its predictions privately."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import ConfigError
from .common import (
    DataOpts,
    JsonOpt,
    KeyDirOpt,
    TokenFileOpt,
    app,
    cli_errors,
    emit_json,
    err,
    given,
    out,
    progress,
    read_token,
)

ServerOpt = typer.Option(None, "--server", "-s", help="URL of the owner's `molcloak serve` server.")
ImportanceOpt = typer.Option(
    True,
    "--importance/--no-importance",
    help="With labels (--target-col; audit: --explain): permutation importance of every input group, "
    "groups x rows encrypted runs.",
)
ModelOpt = typer.Option(None, "--model", "-m", help="Model name on the server (see GET /models).")
BundleOpt = typer.Option(
    None, "--bundle", "-b", help="Use a local bundle instead of a server (both halves in this process)."
)
RestartOpt = typer.Option(False, "--restart", help="Discard the progress saved in --out and start over.")


def _where(bundle, server, model, key_dir, token_file) -> dict:
    """Where the model runs, as `audit_command` / `explain_command` take it."""
    return {
        "bundle": bundle,
        "server": server,
        "model": model,
        "key_dir": key_dir,
        "token": read_token(token_file),
    }


# options of the per-molecule audit that an aggregate-only audit has no use for
AGGREGATE_IGNORES = ("explain", "group_col", "restart", "batch_size", "importance", "task")


@app.command()
@cli_errors
def audit(
    ctx: typer.Context,
    test_set: Path = typer.Option(
        ..., "--test-set", "-t", help="CSV file of the secret test set, one molecule per row."
    ),
    target_col: str | None = typer.Option(
        None,
        "--target-col",
        help="Column with the true class (name, or id 0..k-1) or value; a multi-task model: one column per "
        "task, comma-separated, in the model's task order (empty cell = missing label). Default: the model's "
        "target name(s).",
    ),
    smiles_col: str = DataOpts.smiles_col,
    server: str | None = ServerOpt,
    model: str | None = ModelOpt,
    bundle: Path | None = BundleOpt,
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
        help="Also compare subgroups defined by this column, or several (a,b); a column of many numbers is cut "
        "into quartiles (besides MW, logP, scaffold bins for SMILES models).",
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
    restart: bool = RestartOpt,
    explain: int = typer.Option(
        0,
        "--explain",
        help="Also explain privately: attributions of the first N molecules and permutation importance of "
        "every input group on the test set (costs (groups + 1) encrypted runs per molecule plus groups x rows).",
    ),
    importance: bool = ImportanceOpt,
    aggregate_only: bool = typer.Option(
        False,
        "--aggregate-only",
        help="Decrypt only score histograms, never a per-molecule prediction (binary models whose owner ran "
        "`molcloak aggregate`): ROC-AUC, confusion matrix and metrics with CIs; writes aggregate.json/md.",
    ),
    as_json: bool = JsonOpt,
):
    """Audit a model privately on a secret test set: metrics with 95% CIs, subgroups, claims check, reports.

    Works for every model `molcloak train` makes: binary, multi-class, regression (metrics in the target's
    units), multi-task (per-task metrics and their mean; missing labels masked) and tabular models (rows of
    the model's feature columns instead of SMILES). The test molecules are featurized and encrypted here; the server computes on ciphertexts and only
    this machine decrypts. Progress is saved in --out after every batch: after Ctrl-C, a lost
    connection or a server restart, rerun the same command to continue. Writes report.json (every
    number and per-row predictions: keep it private), report.md and report.html with plots.
    Example: molcloak audit --server http://127.0.0.1:8000 --model sol-low --test-set test.csv
    --target-col sol_low --out audits/sol-low
    """
    if aggregate_only:
        wrong = ["--" + n.replace("_", "-") for n in AGGREGATE_IGNORES if given(ctx, n)]
        if wrong:  # each would be silently ignored: chunks of the program's rows, no per-molecule state
            raise ConfigError(f"--aggregate-only cannot be combined with {', '.join(wrong)}; drop them")
        return _aggregate(
            test_set,
            out_dir,
            target_col,
            smiles_col,
            bootstrap,
            seed,
            skip_invalid,
            as_json,
            _where(bundle, server, model, key_dir, token_file),
        )
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
        explain,
        importance,
    )
    with progress() as bar:
        on_progress = _phases(bar, "encrypted audit")
        where = _where(bundle, server, model, key_dir, token_file)
        report = _resumable(lambda: audit_command(config, on_progress, **where))
    if as_json:
        return emit_json({k: v for k, v in report.items() if k != "rows"})
    print_summary(report, out)
    if "explain" in report:
        from molcloak.evaluation.audit.explain_report import summary_lines

        for line in summary_lines(report["explain"]):
            out.print(line, highlight=False, soft_wrap=True)


def _aggregate(test_set, out_dir, target_col, smiles_col, bootstrap, seed, skip_invalid, as_json, where):
    from molcloak.evaluation.audit.aggregate import (
        AggregateAuditConfig,
        aggregate_audit_command,
        summary_lines,
    )

    config = AggregateAuditConfig(test_set, out_dir, target_col, smiles_col, bootstrap, seed, skip_invalid)
    with progress() as bar:
        task = bar.add_task("aggregate-only audit", total=None, status="")

        def on_progress(done: int, total: int, status: str) -> None:
            bar.update(task, completed=done, total=total, status=status)

        report = aggregate_audit_command(config, on_progress, **where)
    if as_json:
        return emit_json(report)
    for line in summary_lines(report):
        out.print(line, highlight=False, soft_wrap=True)
    out.print(f"reports: {report['files']['markdown']}, {report['files']['json']}", highlight=False)


def _resumable(run):
    """`run()`; an interruption ends with one yellow line saying what is saved and how to resume (exit 130)."""
    try:
        return run()
    except KeyboardInterrupt as exc:
        err.print(f"[yellow]{exc or 'interrupted'}[/yellow]", highlight=False)
        raise typer.Exit(130) from None


PHASES = {
    "attributions": "per-molecule attributions: {total} encrypted runs (groups + 1 per molecule, less the "
    "perturbations that leave the model's input unchanged)",
    "predictions": "predictions of the labelled rows: {total} encrypted runs",
    "importance": "permutation importance: {total} encrypted runs (groups x repeats x rows)",
}


def _phases(bar, first: str):
    """A progress callback that opens one bar per phase and prints each explanation phase's cost first."""
    tasks: dict[str, object] = {}

    def on_progress(done: int, total: int, status: str) -> None:
        phase = next((p for p in PHASES if status.startswith(p)), first)
        if phase not in tasks:
            if phase in PHASES:
                err.print(PHASES[phase].format(total=total), highlight=False)
            tasks[phase] = bar.add_task(
                phase if phase in PHASES else first, total=total, completed=done, status=""
            )
        bar.update(tasks[phase], completed=done, status=status.removeprefix(phase).strip())

    return on_progress


@app.command()
@cli_errors
def explain(
    input_file: Path | None = typer.Option(
        None, "--input", "-i", help="CSV of molecules (or of rows of the model's feature columns) to explain."
    ),
    smiles: list[str] = typer.Option(
        [], "--smiles", help="A molecule to explain (repeatable), instead of --input."
    ),
    smiles_col: str = DataOpts.smiles_col,
    target_col: str | None = typer.Option(
        None,
        "--target-col",
        help="Labels (as for audit): also compute the permutation importance of every input group on all rows.",
    ),
    server: str | None = ServerOpt,
    model: str | None = ModelOpt,
    bundle: Path | None = BundleOpt,
    molecules: int = typer.Option(
        10, "--molecules", "-n", help="Attributions of the first N molecules (0 = none)."
    ),
    output: str | None = typer.Option(
        None,
        "--output",
        help="Output to explain: a class or task name (default: positive/predicted class, value, first task).",
    ),
    repeats: int = typer.Option(1, "--repeats", help="Permutations per group for the importance."),
    bootstrap: int = typer.Option(
        1000, "--bootstrap", help="Bootstrap replicates of the importance CIs (0 = none)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the permutations and the bootstrap."),
    batch_size: int = typer.Option(
        8, "--batch-size", help="Encrypted runs per request and per checkpoint write."
    ),
    out_dir: Path = typer.Option(
        Path("explain"),
        "--out",
        "-o",
        help="Directory for progress, explain.json/md/html and figures; rerun the same command to resume.",
    ),
    key_dir: Path | None = KeyDirOpt,
    token_file: Path | None = TokenFileOpt,
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="Explain the valid rows, list the invalid ones."
    ),
    importance: bool = ImportanceOpt,
    restart: bool = RestartOpt,
    as_json: bool = JsonOpt,
):
    """Explain an encrypted model's predictions privately, for molecules you keep secret.

    For each molecule: one encrypted run as is, then one per input group (a descriptor, a tabular column,
    an atom of a fingerprint model) with that group set to a neutral value from the client bundle; the
    drop of the prediction is the group's contribution. Fingerprint models get atom-contribution maps
    drawn on the molecule. With --target-col, the permutation importance of every input group on all
    rows, with 95% CIs. Everything runs on ciphertexts through the same server (or local bundle) as
    predict; only this machine decrypts. The encrypted runs are saved in --out after every batch: after
    Ctrl-C, a lost connection or a server restart, rerun the same command to continue (--restart: start
    over). Writes explain.json, explain.md and explain.html in --out.
    Example: molcloak explain --bundle bundles/sol-low --smiles 'CCOc1ccccc1' --out explain/
    """
    from molcloak.evaluation.audit.explain import ExplainConfig, ExplainOptions, explain_command
    from molcloak.evaluation.audit.explain_report import summary_lines

    config = ExplainConfig(out_dir, input_file, tuple(smiles), smiles_col, target_col, skip_invalid, restart)
    options = ExplainOptions(molecules, importance, repeats, bootstrap, seed, batch_size, output)
    with progress() as bar:
        where = _where(bundle, server, model, key_dir, token_file)
        result = _resumable(lambda: explain_command(config, options, _phases(bar, "explain"), **where))
    if as_json:
        return emit_json(result)
    for line in summary_lines(result):
        out.print(line, highlight=False, soft_wrap=True)
    out.print(
        f"reports: {result['files']['markdown']}, {result['files']['html']}, {result['files']['json']}",
        highlight=False,
    )
