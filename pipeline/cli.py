"""`molcloak` command line: parsing and printing only; the work is in the pipeline modules."""

from __future__ import annotations

import csv
import functools
import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import DataError, MolcloakError

app = typer.Typer(
    name="molcloak",
    help=(
        "Private molecular property prediction with TFHE.\n\n"
        "A model owner trains a quantization-aware network (train), compiles it to a TFHE circuit "
        "and writes a deployment bundle (compile / deploy). A user encrypts molecules with a secret "
        "key that never leaves their machine and gets encrypted predictions back (predict). "
        "Start with `molcloak demo`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


def main() -> None:
    app()


def cli_errors(fn):
    """Turn molcloak errors into one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MolcloakError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)

    return wrapper


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def progress(transient: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=transient,
    )


# ---------------------------------------------------------------- shared options

DatasetOpt = typer.Option("sol-low", "--dataset", "-d", help="Bundled dataset (sol-low, sol-class, sol-logs, freesolv) or a CSV file.")
SmilesColOpt = typer.Option("smiles", "--smiles-col", help="CSV column holding SMILES.")
TargetColOpt = typer.Option(None, "--target-col", help="CSV column holding the target (required for CSV files).")
TaskOpt = typer.Option("classification", "--task", help="CSV target type: classification or regression.")
ThresholdOpt = typer.Option(None, "--threshold", help="Binarize a numeric CSV target: class 1 when value >= threshold.")
SkipOpt = typer.Option(False, "--skip-invalid", help="Drop invalid rows (counted and listed) instead of failing.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
ForceOpt = typer.Option(False, "--force", help="Replace the output directory if it exists.")


def load_dataset(dataset: str, smiles_col: str, target_col: Optional[str], task: str, threshold: Optional[float], skip_invalid: bool):
    from .data import BUNDLED_TASKS, load_bundled, load_csv

    if dataset in BUNDLED_TASKS:
        return load_bundled(dataset)
    if not Path(dataset).exists():
        raise DataError(f"dataset {dataset!r} is neither a bundled dataset ({', '.join(BUNDLED_TASKS)}) nor an existing CSV file")
    if not target_col:
        raise DataError(f"{dataset}: --target-col is required for a CSV file (and --smiles-col if not 'smiles')")
    ds = load_csv(dataset, smiles_col, target_col, task, threshold, skip_invalid)
    if ds.problems:
        err.print(f"[yellow]skipped {len(ds.problems)} invalid rows[/yellow] (--skip-invalid):")
        for p in ds.problems[:20]:
            err.print(f"  {p}", highlight=False)
        if len(ds.problems) > 20:
            err.print(f"  ... and {len(ds.problems) - 20} more")
    return ds


def compile_config(rounding_bits: int, rounding_method: str, p_error: Optional[float]):
    from .compile import CompileConfig

    return CompileConfig(rounding_bits or None, rounding_method, p_error)


RoundingOpt = typer.Option(5, "--rounding-bits", help="Round accumulators to this many bits before each lookup (0 = off).")
RoundingMethodOpt = typer.Option("approximate", "--rounding-method", help="exact or approximate (cheaper).")
PErrorOpt = typer.Option(None, "--p-error", help="Error probability per bootstrap (default 2^-40: FHE equals simulation; 0.01 is faster).")


# ---------------------------------------------------------------- train


@app.command()
@cli_errors
def train(
    dataset: str = DatasetOpt,
    smiles_col: str = SmilesColOpt,
    target_col: Optional[str] = TargetColOpt,
    task: str = TaskOpt,
    threshold: Optional[float] = ThresholdOpt,
    skip_invalid: bool = SkipOpt,
    split: Optional[str] = typer.Option(None, "--split", help="official (when the data has one), random or scaffold."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Test share for random/scaffold splits."),
    features: str = typer.Option("physchem", "--features", "-f", help="Feature spec: physchem, morgan:r=2,n=1024, morgan_count:r=2,n=256, or parts joined by '+'."),
    model: str = typer.Option("mlp", "--model", "-m", help="Model family from the registry (see `molcloak models`)."),
    hidden: str = typer.Option("16", "--hidden", help="Hidden layer widths, comma-separated (e.g. 32,16)."),
    weight_bits: int = typer.Option(2, "--weight-bits", help="Weight bit width."),
    act_bits: int = typer.Option(3, "--act-bits", help="Activation bit width."),
    input_bits: int = typer.Option(3, "--input-bits", help="Input quantizer bit width."),
    epochs: int = typer.Option(150, "--epochs", help="Maximum epochs."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(3e-3, "--lr", help="AdamW learning rate."),
    patience: int = typer.Option(50, "--patience", help="Early stopping: epochs without validation improvement."),
    seed: int = typer.Option(0, "--seed", help="Seed for split, initialization and batches."),
    out_dir: Path = typer.Option(Path("runs/model"), "--out", "-o", help="Checkpoint directory to write."),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
):
    """Train a quantization-aware model and write a checkpoint (weights stay with the owner).

    Example: molcloak train --dataset sol-low --features physchem --out runs/sol-low
    """
    from .bundle import save_checkpoint
    from .train import TrainConfig

    ds = load_dataset(dataset, smiles_col, target_col, task, threshold, skip_invalid)
    options = dict(hidden=_int_list(hidden, "--hidden"), weight_bits=weight_bits, act_bits=act_bits, input_bits=input_bits)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed)
    ckpt = _train_with_progress(ds, features, model, options, tcfg, split, test_fraction)
    ckpt.train_info["dataset"] = dataset
    save_checkpoint(ckpt, out_dir, force=force)
    summary = {"checkpoint": str(out_dir), "task": ckpt.task.to_dict(), "features": str(ckpt.featurizer),
               "n_features": ckpt.n_inputs, "training": ckpt.train_info, "metrics": ckpt.metrics}
    if as_json:
        return emit_json(summary)
    out.print(f"trained [bold]{model}[/bold] on {dataset} ({ckpt.task.kind}, {ckpt.n_inputs} features "
              f"'{ckpt.featurizer}'): best epoch {ckpt.train_info['best_epoch']}/{ckpt.train_info['epochs_run']}")
    out.print(f"float test metrics: {_fmt_metrics(ckpt.metrics['float'])}")
    out.print(f"checkpoint written to {out_dir}; next: molcloak deploy {out_dir} --out bundles/<name>")


def _train_with_progress(ds, features, model, options, tcfg, split, test_fraction):
    from .workflow import train_checkpoint

    with progress() as bar:
        t = bar.add_task("training", total=tcfg.epochs, status="")

        def on_epoch(epoch, total, row):
            status = f"loss {row.get('valid_loss', row['train_loss']):.3f}"
            bar.update(t, completed=epoch, status=status)

        return train_checkpoint(ds, features, model, options, tcfg, split, test_fraction, on_epoch=on_epoch)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise DataError(f"{flag} {text!r} is not a comma-separated list of integers; write e.g. 32,16")
    return values


def _fmt_metrics(m: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items())


# ---------------------------------------------------------------- compile / deploy


def _compile_and_report(checkpoint: Path, cfg):
    from .bundle import load_checkpoint
    from .workflow import compile_checkpoint

    ckpt = load_checkpoint(checkpoint)
    with err.status("compiling to a TFHE circuit and simulating the test split..."):
        compiled = compile_checkpoint(ckpt, cfg)
    return ckpt, compiled


def _print_compiled(compiled) -> None:
    s = compiled.stats
    out.print(f"circuit: {s.pbs_count} PBS, max bit width {s.max_bit_width}, evaluation keys ~{_mb(s.evaluation_key_bytes)} "
              f"(in memory), input {_kb(s.input_ciphertext_bytes)}, output {_kb(s.output_ciphertext_bytes)}, "
              f"p_error {s.p_error:.2g} per PBS, compiled in {compiled.seconds:.1f} s")
    for key, m in compiled.metrics.items():
        out.print(f"  {key:>13} test: {_fmt_metrics(m)}")


@app.command("compile")
@cli_errors
def compile_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory written by `molcloak train`."),
    rounding_bits: int = RoundingOpt,
    rounding_method: str = RoundingMethodOpt,
    p_error: Optional[float] = PErrorOpt,
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Also write the deployment bundle here (same as `deploy`)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the bundle (default: bundle directory name)."),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
):
    """Compile a checkpoint to a TFHE circuit; report PBS count, bit width, key sizes and FHE-simulated metrics.

    Example: molcloak compile runs/sol-low --rounding-bits 5 --bundle bundles/sol-low
    """
    cfg = compile_config(rounding_bits, rounding_method, p_error)
    ckpt, compiled = _compile_and_report(checkpoint, cfg)
    result = {**compiled.info(), "metrics": compiled.metrics}
    if bundle is not None:
        from .workflow import deploy as deploy_fn

        deploy_fn(ckpt, compiled, bundle, name or bundle.name, force=force)
        result["bundle"] = str(bundle)
    if as_json:
        return emit_json(result)
    _print_compiled(compiled)
    if bundle is not None:
        out.print(f"bundle written to {bundle}")


@app.command()
@cli_errors
def deploy(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory written by `molcloak train`."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Bundle directory to write (manifest.json, client/, server/, owner/)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the --out directory name)."),
    rounding_bits: int = RoundingOpt,
    rounding_method: str = RoundingMethodOpt,
    p_error: Optional[float] = PErrorOpt,
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
):
    """Compile a checkpoint and write the deployment bundle.

    Ship client/ to users and server/ to the FHE server; keep owner/ (the weights) to yourself.
    Example: molcloak deploy runs/sol-low --out bundles/sol-low
    """
    compile_cmd(checkpoint, rounding_bits, rounding_method, p_error, out_dir, name, force, as_json)


# ---------------------------------------------------------------- predict


@app.command()
@cli_errors
def predict(
    smiles: Optional[List[str]] = typer.Argument(None, help="SMILES to predict (or use --input)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Bundle directory (from `molcloak deploy`): both halves in this process."),
    server: Optional[str] = typer.Option(None, "--server", "-s", help="URL of a `molcloak serve` server (e.g. http://127.0.0.1:8000)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name on the server (see GET /models)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the server's bearer token."),
    batch_size: int = typer.Option(8, "--batch-size", help="Ciphertexts per HTTP request (with --server)."),
    input_csv: Optional[Path] = typer.Option(None, "--input", "-i", help="CSV file with a SMILES column."),
    smiles_col: str = SmilesColOpt,
    output: Optional[Path] = typer.Option(None, "--output", help="Write predictions to this CSV file."),
    fhe: str = typer.Option("execute", "--fhe", help="execute: real encryption with the key split; simulate: owner-side FHE simulation (needs owner/)."),
    key_dir: Optional[Path] = typer.Option(None, "--key-dir", help="Where the client keeps its secret keys (default ~/.molcloak/keys)."),
    skip_invalid: bool = SkipOpt,
    as_json: bool = JsonOpt,
):
    """Predict molecules privately: encrypt, run the circuit on ciphertexts, decrypt.

    With --bundle both halves run in this process (the server half receives only evaluation keys
    and ciphertexts). With --server the circuit runs on a `molcloak serve` server; the secret key
    stays in --key-dir. Examples: molcloak predict --bundle bundles/sol-low "CCO";
    molcloak predict --server http://127.0.0.1:8000 --model sol-low "CCO"
    """
    from .workflow import predict_local

    molecules = _read_smiles(smiles, input_csv, smiles_col)
    if (bundle is None) == (server is None):
        raise DataError("pass either --bundle DIR (local) or --server URL --model NAME (remote)")
    if server is not None and not model:
        raise DataError("--server needs --model NAME; list the served models with GET /models")
    with progress() as bar:
        t = bar.add_task("keys + encrypted prediction", total=len(molecules), status="")
        on_item = lambda p: bar.update(t, advance=1, status=p.label or "")  # noqa: E731
        if server is not None:
            from .remote import RemoteModel

            remote = RemoteModel(server, model, key_dir, _read_token(token_file))
            report = remote.predict(molecules, batch_size, skip_invalid, on_item=on_item)
        else:
            report = predict_local(bundle, molecules, fhe, key_dir, skip_invalid, on_item=on_item)
    if output:
        _write_predictions_csv(output, report)
    if as_json:
        return emit_json(report.to_dict())
    _print_predictions(report)
    if output:
        out.print(f"predictions written to {output}")


def _read_smiles(smiles, input_csv, smiles_col) -> list[str]:
    if input_csv is None:
        if not smiles:
            raise DataError("no molecules given; pass SMILES arguments or --input file.csv")
        return list(smiles)
    if smiles:
        raise DataError("give SMILES arguments or --input, not both")
    if not input_csv.is_file():
        raise DataError(f"input file {str(input_csv)!r} does not exist; check the path")
    with input_csv.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if smiles_col not in (reader.fieldnames or []):
            raise DataError(f"{input_csv}: column {smiles_col!r} not found; available columns: {', '.join(reader.fieldnames or [])}; pass --smiles-col")
        rows = [row[smiles_col] for row in reader]
    if not rows:
        raise DataError(f"{input_csv} has no data rows")
    return rows


def _write_predictions_csv(path: Path, report) -> None:
    rows = report.to_dict()["predictions"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "smiles", "prediction", "value", "error"])
        for r in rows:
            value = r["value"]
            w.writerow([r["index"], r["smiles"], r["label"] or (value if value is not None else ""),
                        json.dumps(value) if isinstance(value, list) else ("" if value is None else value), r["error"]])


def _print_predictions(report) -> None:
    table = Table(title=f"private predictions ({report.mode})")
    for col in ("#", "SMILES", "prediction", "encrypt", "FHE run", "decrypt" if report.mode != "server" else "round trip"):
        table.add_column(col)
    for p in report.predictions:
        if p.error:
            table.add_row(str(p.index), p.smiles, f"[red]{p.error}[/red]", "", "", "")
            continue
        pred = f"{p.label} (p={max(p.value):.2f})" if p.label else f"{p.value:.3f}"
        s = p.seconds
        table.add_row(str(p.index), p.smiles, pred, *(f"{s[k]*1000:.0f} ms" if k in s else "-" for k in ("encrypt", "run", "decrypt" if report.mode != "server" else "round_trip")))
    out.print(table)
    if report.mode in ("execute", "server"):
        kg = "reused from key dir" if report.keys_reused else f"generated in {report.keygen_seconds:.2f} s"
        out.print(f"keys: {kg}; evaluation keys {_mb(report.evaluation_key_bytes)}; ciphertexts: input "
                  f"{_kb(report.input_ciphertext_bytes)}, output {_kb(report.output_ciphertext_bytes)}")


def _read_token(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise DataError(f"cannot read token file {str(path)!r} ({exc.strerror}); check the path") from exc
    if not token:
        raise DataError(f"token file {str(path)!r} is empty; put the bearer token in it")
    return token


# ---------------------------------------------------------------- serve


@app.command()
@cli_errors
def serve(
    bundles: Path = typer.Option(..., "--bundles", help="Folder with one bundle directory per model (each with server/server.zip)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    workers: int = typer.Option(0, "--workers", help="FHE worker processes (0 = one per core)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Require 'Authorization: Bearer <token>' with the token in this file."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Where uploaded evaluation keys are kept (default <bundles>/.molcloak-server)."),
    max_body_mb: int = typer.Option(128, "--max-body-mb", help="Largest accepted request body."),
    key_cache_mb: int = typer.Option(2048, "--key-cache-mb", help="Memory for loaded evaluation keys, shared by the workers (LRU)."),
    queue_size: int = typer.Option(64, "--queue-size", help="FHE jobs waiting or running before the server answers 503."),
):
    """Serve every bundle in --bundles over HTTP: the server holds evaluation keys and ciphertexts only.

    Example: molcloak serve --bundles demo --port 8000, then in another terminal
    molcloak predict --server http://127.0.0.1:8000 --model sol-low "CCO"
    """
    import os

    from .service import ServeConfig, serve as run_server

    config = ServeConfig(bundles=bundles, state_dir=state_dir, workers=workers or max(1, os.cpu_count() or 1),
                         queue_size=queue_size, max_body_bytes=max_body_mb * 2**20, key_cache_bytes=key_cache_mb * 2**20,
                         token=_read_token(token_file))
    err.print(f"molcloak serve: bundles from {bundles}, {config.workers} FHE workers, keys in {config.keys_dir}; "
              f"starting on http://{host}:{port}")
    run_server(config, host, port)


# ---------------------------------------------------------------- info / models


@app.command()
@cli_errors
def info(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = JsonOpt,
):
    """Show a bundle's manifest: task, features, metrics, circuit statistics, versions."""
    from .bundle import load_manifest

    m = load_manifest(bundle, check=False)
    if as_json:
        return emit_json(m.data)
    d = m.data
    task = m.task
    out.print(f"[bold]{m.name}[/bold]  ({task.kind}; target {task.target!r}" + (f"; labels {list(task.labels)}" if task.labels else "") + ")")
    out.print(f"features: {d['featurizer']['spec']} ({m.featurizer.width} values)")
    out.print(f"model: {d['model']['name']} {json.dumps(d['model']['config'])}")
    out.print(f"compile: {json.dumps(d.get('compile'))}")
    c = d.get("circuit", {})
    if c:
        out.print(f"circuit: {c['pbs_count']} PBS, max bit width {c['max_bit_width']}, evaluation keys ~{_mb(c['evaluation_key_bytes'])}, "
                  f"input {_kb(c['input_ciphertext_bytes'])}, output {_kb(c['output_ciphertext_bytes'])}, p_error {c['p_error']:.2g}")
    for key, met in m.metrics.items():
        out.print(f"  {key:>13} test: {_fmt_metrics(met)}")
    out.print(f"versions: {json.dumps(d.get('versions'))}; created {d.get('created')}")


@app.command()
@cli_errors
def models(as_json: bool = JsonOpt):
    """List the model families of the registry and the bundled datasets."""
    from molcloak.models.registry import MODELS

    from .data import BUNDLED_TASKS

    if as_json:
        return emit_json({"models": {k: v.description for k, v in MODELS.items()}, "datasets": BUNDLED_TASKS})
    for k, v in MODELS.items():
        out.print(f"model [bold]{k}[/bold]: {v.description}")
    for k, v in BUNDLED_TASKS.items():
        out.print(f"dataset [bold]{k}[/bold]: {v}")


# ---------------------------------------------------------------- demo


@app.command()
@cli_errors
def demo(
    out_dir: Path = typer.Option(Path("demo"), "--out", "-o", help="Where the demo writes its checkpoint, bundle and keys."),
    n: int = typer.Option(5, "--n", help="Number of test molecules to predict in FHE."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonOpt,
):
    """The whole story on sol-low: train, compile, deploy, keygen, encrypt, run, decrypt, compare.

    Writes demo/checkpoint, demo/bundle (the deployment bundle) and demo/keys (the client's keys).
    """
    from .demo import run_demo

    result = run_demo(out_dir, n, seed, progress=progress, console=err)
    if as_json:
        return emit_json(result)
    from .demo import print_demo

    print_demo(result, out)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _kb(n: float) -> str:
    return f"{n / 1e3:.1f} kB"


if __name__ == "__main__":
    main()
