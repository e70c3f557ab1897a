"""The user's commands: predict, screen, and the read-only info and models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer
from rich.table import Table

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
    fmt_metrics,
    given,
    kb,
    mb,
    out,
    progress,
    read_token,
)

ConcurrencyOpt = typer.Option(
    None,
    "--concurrency",
    help="Batches in flight at once (with --server; default: enough to keep the server's FHE workers "
    "busy, from its GET /health, else 2). Results keep the input order.",
)


@app.command()
@cli_errors
def predict(
    ctx: typer.Context,
    smiles: List[str] | None = typer.Argument(None, help="SMILES to predict (or use --input)."),
    bundle: Path | None = typer.Option(
        None, "--bundle", "-b", help="Bundle directory (from `molcloak deploy`): both halves in this process."
    ),
    server: str | None = typer.Option(
        None, "--server", "-s", help="URL of a `molcloak serve` server (e.g. http://127.0.0.1:8000)."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model name on the server (see GET /models)."
    ),
    token_file: Path | None = TokenFileOpt,
    batch_size: int = typer.Option(
        8,
        "--batch-size",
        help="Ciphertexts per HTTP request, 1-64 and at most the server's limit (with --server).",
    ),
    concurrency: int | None = ConcurrencyOpt,
    input_csv: Path | None = typer.Option(
        None,
        "--input",
        "-i",
        help="CSV file with a SMILES column (or the feature columns of a tabular model).",
    ),
    smiles_col: str = DataOpts.smiles_col,
    output: Path | None = typer.Option(None, "--output", help="Write predictions to this CSV file."),
    fhe: str = typer.Option(
        "execute",
        "--fhe",
        help="execute: real encryption with the key split; simulate: owner-side FHE simulation (with --bundle; needs owner/).",
    ),
    key_dir: Path | None = KeyDirOpt,
    rotate_after_predictions: int | None = typer.Option(
        None,
        "--rotate-after-predictions",
        help="Replace this model's keys (new secret key, new evaluation keys) after this many decrypted "
        "predictions; stored with the keys (default: what is stored, else 10000). See `molcloak keys`.",
    ),
    rotate_after_days: float | None = typer.Option(
        None,
        "--rotate-after-days",
        help="Replace this model's keys once they are this many days old; stored with the keys "
        "(default: what is stored, else 30).",
    ),
    skip_invalid: bool = DataOpts.skip_invalid,
    as_json: bool = JsonOpt,
):
    """Predict molecules privately: encrypt, run the circuit on ciphertexts, decrypt.

    With --bundle both halves run in this process (the server half receives only evaluation keys
    and ciphertexts). With --server the circuit runs on a `molcloak serve` server; the secret key
    stays in --key-dir. Examples: molcloak predict --bundle bundles/sol-low "CCO";
    molcloak predict --server http://127.0.0.1:8000 --model sol-low "CCO"
    """
    from ..bundle import load_manifest
    from ..fhe_client import rotation_override
    from ..inputs import read_inputs, write_csv
    from ..predict import LocalBackend, predict_local

    rotation = rotation_override(rotate_after_predictions, rotate_after_days)

    if (bundle is None) == (server is None):
        raise ConfigError("pass either --bundle DIR (local) or --server URL --model NAME (remote)")
    if fhe not in ("execute", "simulate"):
        raise ConfigError(f"--fhe {fhe!r} is not a mode; use execute or simulate")
    if server is not None and not model:
        raise ConfigError("--server needs --model NAME; list the served models with GET /models")
    if server is not None and fhe != "execute":
        raise ConfigError(
            "--fhe simulate needs the owner's weights: use it with --bundle DIR (a bundle with its owner/ part), "
            "not with --server"
        )
    for flag in ("batch_size", "concurrency"):
        if bundle is not None and given(ctx, flag):
            raise ConfigError(
                f"--{flag.replace('_', '-')} sets how ciphertexts go to the server (per HTTP request, "
                "requests in flight) and applies to --server only; leave it out with --bundle"
            )
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"--concurrency {concurrency} must be at least 1 batch in flight")
    from ..serving.http_api import MAX_BATCH

    if not 1 <= batch_size <= MAX_BATCH:
        raise ConfigError(
            f"--batch-size {batch_size} is out of range; use 1..{MAX_BATCH} ciphertexts per request"
        )
    if rotation and fhe != "execute":
        raise ConfigError(
            "--rotate-after-predictions/--rotate-after-days rotate keys, and --fhe simulate uses none; "
            "leave them out with --fhe simulate"
        )
    if server is not None:
        from ..serving.http_client import RemoteModel

        backend = RemoteModel(server, model, key_dir, read_token(token_file))
        backend.set_rotation(**rotation)
    else:
        backend = (
            LocalBackend(bundle, key_dir, rotation) if fhe == "execute" else None
        )  # simulate: the owner's weights, no keys
    manifest = backend.client.manifest if backend else load_manifest(bundle, check=False)
    inputs = read_inputs(
        manifest.featurizer, smiles, input_csv, smiles_col
    )  # SMILES, or rows of a tabular model
    with progress() as bar:
        t = bar.add_task("keys + encrypted prediction", total=len(inputs), status="")
        on_item = lambda p: bar.update(t, advance=1, status=p.label or "")  # noqa: E731
        if backend is None:
            report = predict_local(bundle, inputs, "simulate", skip_invalid=skip_invalid, on_item=on_item)
        else:
            report = backend.predict(inputs, batch_size, skip_invalid, on_item, concurrency)
    if output:
        write_csv(output, report)
    if as_json:
        return emit_json(report.to_dict())
    _print_predictions(report, manifest.task)
    if output:
        out.print(f"predictions written to {output}")


def _print_predictions(report, task) -> None:
    from ..metrics import describe

    table = Table(title=f"private predictions ({report.mode})")
    tabular = any(p.features is not None for p in report.predictions)
    outputs = [
        f"{name} ({unit})" if unit else name
        for name, unit in ((n, task.unit_of(j)) for j, n in enumerate(task.tasks))
    ]
    timing = ("encrypt", "run", "decrypt" if report.mode != "server" else "round_trip")
    headers = ["#"] + ([] if tabular else ["SMILES"]) + (outputs or ["prediction"])
    for col in headers + ["encrypt", "FHE run", "decrypt" if report.mode != "server" else "round trip"]:
        table.add_column(col)
    for p in report.predictions:
        first = [str(p.index)] + ([] if tabular else [p.smiles])
        if p.error:
            table.add_row(
                *first, f"[red]{p.error}[/red]", *[""] * (len(headers) - len(first) - 1 + len(timing))
            )
            continue
        if isinstance(p.value, dict):
            cells = [f"{v:.3f}" for v in p.value.values()]
        else:
            cells = [describe(task, p.value) if p.label else f"{p.value:.3f}"]
        s = p.seconds
        table.add_row(*first, *cells, *(f"{s[k] * 1000:.0f} ms" if k in s else "-" for k in timing))
    out.print(table)
    if task.kind == "multilabel":
        out.print("values: probability of label 1 per task")
    if report.mode in ("execute", "server"):
        kg = "reused from key dir" if report.keys_reused else f"generated in {report.keygen_seconds:.2f} s"
        out.print(
            f"keys: {kg}; evaluation keys {mb(report.evaluation_key_bytes)}; ciphertexts: input "
            f"{kb(report.input_ciphertext_bytes)}, output {kb(report.output_ciphertext_bytes)}"
        )


@app.command()
@cli_errors
def screen(
    server: str | None = typer.Option(
        None, "--server", "-s", help="URL of a `molcloak serve` server (e.g. http://127.0.0.1:8000)."
    ),
    model: str | None = typer.Option(None, "--model", "-m", help="Model name on the server (GET /models)."),
    bundle: Path | None = typer.Option(
        None, "--bundle", "-b", help="Screen with a local bundle instead (both halves in this process)."
    ),
    input_csv: Path = typer.Option(..., "--input", "-i", help="Library CSV file, one molecule per row."),
    out_dir: Path = typer.Option(
        Path("screen"), "--out", "-o", help="Directory for predictions and reports; rerun to resume."
    ),
    smiles_col: str = DataOpts.smiles_col,
    batch_size: int = typer.Option(
        8, "--batch-size", help="Molecules per HTTP request, 1-64 and at most the server's limit."
    ),
    concurrency: int | None = ConcurrencyOpt,
    top: int = typer.Option(10, "--top", help="Show the K molecules with the highest predictions."),
    key_dir: Path | None = KeyDirOpt,
    token_file: Path | None = TokenFileOpt,
    skip_invalid: bool = typer.Option(
        False,
        "--skip-invalid",
        help="Screen the valid rows and list the invalid ones in invalid.csv instead of failing.",
    ),
    restart: bool = typer.Option(False, "--restart", help="Discard the progress saved in --out, start over."),
    as_json: bool = JsonOpt,
):
    """Screen a compound library privately, streamed in constant memory, resumable.

    Molecules are featurized and encrypted here, batch by batch, with several batches in flight; the
    server computes on ciphertexts and only this machine decrypts. Each batch is appended to
    --out/predictions.csv (one line per library row, in order) before the next counts as done: after
    Ctrl-C, a kill or a lost connection, rerun the same command to continue. Ends with the top --top
    molecules, invalid.csv and report.html (histogram of predictions). Example: molcloak screen
    --server http://127.0.0.1:8000 --model sol-low --input library.csv --out screens/lib1
    """
    from molcloak.evaluation.audit.engine import open_backend
    from molcloak.evaluation.screen.engine import ScreenConfig, run_screen
    from molcloak.evaluation.screen.report import print_summary

    if (bundle is None) == (server is None) or (server is not None and not model):
        raise ConfigError("pass either --server URL --model NAME (see GET /models) or --bundle DIR")
    if bundle is not None and concurrency is not None:
        raise ConfigError(
            "--concurrency sets the requests in flight to a server and applies to --server only; leave it "
            "out with --bundle"
        )
    config = ScreenConfig(input_csv, out_dir, smiles_col, batch_size, concurrency, top, skip_invalid, restart)
    with open_backend(bundle, server, model, key_dir, read_token(token_file)) as backend:
        with progress() as bar:
            task = bar.add_task("encrypted screen", total=None, status="")
            on_progress = lambda done, total, status: bar.update(  # noqa: E731
                task, completed=done, total=total, status=status
            )
            try:
                summary = run_screen(config, backend, on_progress)
            except KeyboardInterrupt as exc:
                err.print(f"[yellow]{exc or 'interrupted'}[/yellow]", highlight=False)
                raise typer.Exit(130) from None
    if as_json:
        return emit_json(summary)
    print_summary(summary, out)


@app.command()
@cli_errors
def info(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = JsonOpt,
):
    """Show a bundle's manifest: task, features, metrics, circuit statistics, versions."""
    from ..bundle import load_manifest

    m = load_manifest(bundle, check=False)
    if as_json:
        return emit_json(m.data)
    d = m.data
    task = m.task
    tasks = [f"{n} ({task.unit_of(j)})" if task.unit_of(j) else n for j, n in enumerate(task.tasks)]
    out.print(
        f"[bold]{m.name}[/bold]  ({task.kind}; target {task.target!r}"
        + (f"; labels {list(task.labels)}" if task.labels else "")
        + (f"; tasks {', '.join(tasks)}" if tasks else "")
        + ")"
    )
    out.print(f"features: {d['featurizer']['spec']} ({m.featurizer.width} values)")
    out.print(f"model: {d['model']['name']} {json.dumps(d['model']['config'])}")
    out.print(f"compile: {json.dumps(d.get('compile'))}")
    c = d.get("circuit", {})
    if c:
        out.print(
            f"circuit: {c['pbs_count']} PBS, max bit width {c['max_bit_width']}, evaluation keys ~{mb(c['evaluation_key_bytes'])}, "
            f"input {kb(c['input_ciphertext_bytes'])}, output {kb(c['output_ciphertext_bytes'])}, p_error {c['p_error']:.2g}"
        )
    for key, met in m.metrics.items():
        out.print(f"  {key:>13} test: {fmt_metrics(met)}")
    if (Path(bundle) / "aggregate" / "aggregate.json").is_file():
        from ..aggregate import AggregateSpec

        a = AggregateSpec.load(Path(bundle) / "aggregate")
        out.print(
            f"aggregate-only audit program: {a.rows} molecules per chunk, {a.buckets} score buckets, "
            f"{a.circuit.get('pbs_count')} PBS per chunk, evaluation keys "
            f"{mb(a.circuit.get('serialized_evaluation_key_bytes') or 0)}"
        )
    out.print(f"versions: {json.dumps(d.get('versions'))}; created {d.get('created')}")


@app.command()
@cli_errors
def models(as_json: bool = JsonOpt):
    """List the model families of the registry, their default options, and the bundled datasets."""
    import dataclasses

    from molcloak.models.registry import MODELS

    from ..data import BUNDLED_TASKS

    options = {
        k: dataclasses.asdict(v.config_cls()) for k, v in MODELS.items()
    }  # defaults; change with --set / --hidden
    if as_json:
        return emit_json(
            {
                "models": {k: v.description for k, v in MODELS.items()},
                "options": options,
                "datasets": BUNDLED_TASKS,
            }
        )
    for k, v in MODELS.items():
        out.print(f"model [bold]{k}[/bold]: {v.description}")
        out.print(
            f"  options: {json.dumps(options[k])}" + (f"; features {v.features}" if v.features else ""),
            highlight=False,
        )
    for k, v in BUNDLED_TASKS.items():
        out.print(f"dataset [bold]{k}[/bold]: {v}")
