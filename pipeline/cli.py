"""`molcloak` command line: parsing and printing only; the work is in the pipeline modules."""

from __future__ import annotations

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

DatasetOpt = typer.Option("sol-low", "--dataset", "-d", help="Bundled dataset (sol-low, sol-class, sol-logs, freesolv, sol-freesolv, breast-cancer) or a CSV file.")
SmilesColOpt = typer.Option("smiles", "--smiles-col", help="CSV column holding SMILES.")
TargetColOpt = typer.Option(None, "--target-col", help="CSV column holding the target (required for CSV files); several joined by ',' train a multi-task model (empty cells = missing labels).")
FeatureColsOpt = typer.Option(None, "--feature-cols", help="Tabular CSV: numeric feature columns 'a,b,c', or 'all' (every column but the targets holding numbers) instead of SMILES.")
TaskOpt = typer.Option("classification", "--task", help="CSV target type: classification or regression.")
ThresholdOpt = typer.Option(None, "--threshold", help="Binarize a numeric CSV target: class 1 when value >= threshold.")
SkipOpt = typer.Option(False, "--skip-invalid", help="Drop invalid rows (counted and listed) instead of failing.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
ForceOpt = typer.Option(False, "--force", help="Replace the output directory if it exists.")


def load_dataset(dataset: str, smiles_col: str, target_col: Optional[str], task: str, threshold: Optional[float], skip_invalid: bool,
                 feature_cols: Optional[str] = None):
    from .data import BUNDLED_TASKS, load_bundled, load_csv

    if dataset in BUNDLED_TASKS:
        if feature_cols:
            raise DataError(f"--feature-cols applies to CSV files; the bundled dataset {dataset!r} defines its own inputs")
        return load_bundled(dataset)
    if not Path(dataset).exists():
        raise DataError(f"dataset {dataset!r} is neither a bundled dataset ({', '.join(BUNDLED_TASKS)}) nor an existing CSV file")
    if not target_col:
        raise DataError(f"{dataset}: --target-col is required for a CSV file (and --smiles-col if not 'smiles')")
    ds = load_csv(dataset, smiles_col, target_col, task, threshold, skip_invalid, feature_cols=feature_cols)
    if ds.ignored_columns:
        err.print(f"[yellow]--feature-cols all: ignored columns without numbers:[/yellow] {', '.join(ds.ignored_columns)}", highlight=False)
    if ds.problems:
        err.print(f"[yellow]skipped {len(ds.problems)} invalid rows[/yellow] (--skip-invalid):")
        for p in ds.problems[:20]:
            err.print(f"  {p}", highlight=False)
        if len(ds.problems) > 20:
            err.print(f"  ... and {len(ds.problems) - 20} more")
    return ds


def compile_config(rounding_bits: int, rounding_method: str, p_error: Optional[float], n_bits: Optional[int] = None):
    from .compile import CompileConfig

    return CompileConfig(rounding_bits or None, rounding_method, p_error, n_bits)


RoundingOpt = typer.Option(5, "--rounding-bits", help="Round accumulators to this many bits before each lookup (0 = off).")
RoundingMethodOpt = typer.Option("approximate", "--rounding-method", help="exact or approximate (cheaper).")
PErrorOpt = typer.Option(1e-6, "--p-error", help="Error probability per bootstrap (default 1e-6 = CompileConfig's: FHE equals the simulation except ~1 molecule in 65,000; 1e-12 ~ Concrete's 2^-40, 2x slower; 0.01 is ~15% faster, FHE then differs now and then).")


# ---------------------------------------------------------------- train


@app.command()
@cli_errors
def train(
    ctx: typer.Context,
    dataset: str = DatasetOpt,
    smiles_col: str = SmilesColOpt,
    target_col: Optional[str] = TargetColOpt,
    task: str = TaskOpt,
    threshold: Optional[float] = ThresholdOpt,
    skip_invalid: bool = SkipOpt,
    feature_cols: Optional[str] = FeatureColsOpt,
    split: Optional[str] = typer.Option(None, "--split", help="official (when the data has one), random or scaffold."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Test share for random/scaffold splits."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Feature spec: physchem, morgan:r=2,n=1024, morgan_count:r=2,n=256, or parts joined by '+' (default: the model's; physchem:scale=quantile for mlp, the image grid:r=2,size=32 for cnn1/cnn2; tabular data uses its columns)."),
    model: str = typer.Option("mlp", "--model", "-m", help="Model family from the registry (see `molcloak models`)."),
    hidden: Optional[str] = typer.Option(None, "--hidden", help="Hidden layer widths, comma-separated (e.g. 32,16; default: the model's, mlp 16, CNN head none)."),
    model_set: Optional[List[str]] = typer.Option(None, "--set", help="Other model option KEY=VALUE, repeatable (see `molcloak models`), e.g. --set channels=8,16 --set pool=2."),
    weight_bits: Optional[int] = typer.Option(None, "--weight-bits", help="Weight bit width (default: the model's; mlp 3, cnn1/cnn2 2)."),
    act_bits: Optional[int] = typer.Option(None, "--act-bits", help="Activation bit width (default: the model's; 3)."),
    input_bits: Optional[int] = typer.Option(None, "--input-bits", help="Input quantizer bit width (default: the model's; mlp 4, cnn1/cnn2 3)."),
    activation: Optional[str] = typer.Option(None, "--activation", help="MLP hidden activation: relu or sigmoid (either is exact: one lookup per neuron; default: the model's)."),
    epochs: int = typer.Option(150, "--epochs", help="Maximum epochs."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(3e-3, "--lr", help="AdamW learning rate."),
    patience: int = typer.Option(50, "--patience", help="Early stopping: epochs without validation improvement."),
    seed: int = typer.Option(0, "--seed", help="Seed for split, initialization and batches."),
    out_dir: Path = typer.Option(Path("runs/model"), "--out", "-o", help="Checkpoint directory to write."),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    config_file: Optional[Path] = typer.Option(None, "--config", help="JSON configuration from `molcloak tune --write-config` (features, model options, training and compile settings); options given on the command line override it."),
):
    """Train a quantization-aware model and write a checkpoint (weights stay with the owner).

    Example: molcloak train --dataset sol-low --features physchem --out runs/sol-low
    """
    from .bundle import save_checkpoint
    from .train import TrainConfig

    ds = load_dataset(dataset, smiles_col, target_col, task, threshold, skip_invalid, feature_cols=feature_cols)
    bits = {"weight_bits": weight_bits, "act_bits": act_bits, "input_bits": input_bits}
    options = {**{k: v for k, v in bits.items() if v is not None}, **_model_options(model_set or [])}  # unset: the model's
    if hidden is not None:
        options["hidden"] = _int_list(hidden, "--hidden")
    if activation:
        options["activation"] = activation
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed)
    tuned = {}
    if config_file is not None:
        features, model, options, tcfg, tuned = _apply_train_config(ctx, config_file, features, model, options, tcfg)
    ckpt = _train_with_progress(ds, features, model, options, tcfg, split, test_fraction)
    ckpt.train_info["dataset"] = dataset
    if tuned:
        ckpt.train_info["compile"] = tuned  # the tuned compile settings, for `molcloak deploy`
    save_checkpoint(ckpt, out_dir, force=force)
    summary = {"checkpoint": str(out_dir), "task": ckpt.task.to_dict(), "features": str(ckpt.featurizer),
               "n_features": ckpt.n_inputs, "training": ckpt.train_info, "metrics": ckpt.metrics}
    if as_json:
        return emit_json(summary)
    out.print(f"trained [bold]{model}[/bold] on {dataset} ({ckpt.task.kind}, {ckpt.n_inputs} features "
              f"'{ckpt.featurizer}'): best epoch {ckpt.train_info['best_epoch']}/{ckpt.train_info['epochs_run']}")
    out.print(f"float test metrics: {_fmt_metrics(ckpt.metrics['float'])}")
    out.print(f"checkpoint written to {out_dir}; next: molcloak deploy {out_dir} --out bundles/<name>{_compile_flags(tuned)}")


def _apply_train_config(ctx, path: Path, features, model, options: dict, tcfg):
    """`train --config FILE`: the file's features, model, options and training settings, except where
    an option was given on the command line. Returns them and the file's compile settings."""
    from click.core import ParameterSource

    from .train import TrainConfig

    try:
        data = json.loads(path.read_text())
        assert isinstance(data, dict) and "model_options" in data
    except (OSError, ValueError, AssertionError):
        raise DataError(f"--config {str(path)!r} is not a molcloak configuration (JSON with 'model_options'); "
                        "write one with `molcloak tune --write-config FILE`") from None
    given = lambda name: ctx is not None and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE  # noqa: E731
    fixed = ("weight_bits", "act_bits", "input_bits")  # bit flags: only a value given on the command line overrides the file
    options = {**data["model_options"], **{k: v for k, v in options.items() if k not in fixed or given(k)}}
    train_fields = set(TrainConfig.__dataclass_fields__)
    cli_train = {k: getattr(tcfg, k) for k in ("epochs", "batch_size", "lr", "patience", "seed") if given(k)}
    tcfg = TrainConfig(**{**{k: v for k, v in data.get("train", {}).items() if k in train_fields}, **cli_train})
    return (features if given("features") else data.get("features", features), model if given("model") else data.get("model", model),
            options, tcfg, data.get("compile") or {})


def _compile_flags(c: dict) -> str:
    if not c:
        return ""
    flags = f" --rounding-bits {c.get('rounding_bits') or 0} --rounding-method {c.get('rounding_method', 'approximate')}"
    return flags + (f" --p-error {c['p_error']:g}" if c.get("p_error") else "")


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


def _model_options(items: list[str]) -> dict:
    """`--set channels=8,16 --set batchnorm=false` -> {"channels": [8, 16], "batchnorm": False}."""
    options: dict = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise DataError(f"--set {item!r} is not KEY=VALUE; write e.g. --set channels=8,16")
        values = [_scalar(w.strip()) for w in val.split(",")]
        options[key.strip()] = values if "," in val else values[0]
    return options


def _scalar(text: str):
    """'3' -> 3, '0.1' -> 0.1, 'true' -> True, anything else stays text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _fmt_metrics(m: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items())


# ---------------------------------------------------------------- compile / deploy


def _compile_and_report(checkpoint, cfg):
    from .bundle import load_checkpoint
    from .workflow import compile_checkpoint

    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, Path) else checkpoint  # or an imported model
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
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint directory written by `molcloak train` (omit with --torch-model)."),
    rounding_bits: int = RoundingOpt,
    rounding_method: str = RoundingMethodOpt,
    p_error: Optional[float] = PErrorOpt,
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Also write the deployment bundle here (same as `deploy`)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the bundle (default: bundle directory name)."),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    torch_model: Optional[Path] = typer.Option(None, "--torch-model", help="Instead of a checkpoint: a float PyTorch nn.Sequential (Linear, Conv2d, ReLU, Sigmoid, AvgPool2d, Flatten) saved with torch.save, quantized after training (--n-bits) and calibrated on --dataset's training split."),
    dataset: str = DatasetOpt,
    smiles_col: str = SmilesColOpt,
    target_col: Optional[str] = TargetColOpt,
    task: str = TaskOpt,
    threshold: Optional[float] = ThresholdOpt,
    feature_cols: Optional[str] = FeatureColsOpt,
    skip_invalid: bool = SkipOpt,
    split: Optional[str] = typer.Option(None, "--split", help="With --torch-model: official (when the data has one), random or scaffold."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="With --torch-model: the features the model takes (default physchem; grid:r=2,size=32 for Conv2d models)."),
    n_bits: Optional[int] = typer.Option(None, "--n-bits", help="Post-training quantization bits of a float model (default 4 with --torch-model)."),
    calib_size: Optional[int] = typer.Option(None, "--calib-size", help="With --torch-model: calibration rows, a seeded sample of the training split (default: all of it)."),
    seed: int = typer.Option(0, "--seed", help="With --torch-model: seed of the split and the calibration sample."),
):
    """Compile a checkpoint to a TFHE circuit; report PBS count, bit width, key sizes and FHE-simulated metrics.

    Example: molcloak compile runs/sol-low --rounding-bits 5 --bundle bundles/sol-low.
    Imported float model: molcloak compile --torch-model model.pt --dataset sol-low --features physchem --bundle bundles/mine
    """
    if torch_model is not None:
        from .torch_import import DEFAULT_PTQ_BITS, import_checkpoint

        if checkpoint is not None:
            raise DataError("give a checkpoint directory or --torch-model, not both")
        ds = load_dataset(dataset, smiles_col, target_col, task, threshold, skip_invalid, feature_cols=feature_cols)
        with err.status("featurizing the dataset and checking the model..."):
            checkpoint = import_checkpoint(ds, torch_model, features, calib_size, seed, split)
        n_bits = DEFAULT_PTQ_BITS if n_bits is None else n_bits
    elif checkpoint is None:
        raise DataError("no model given; pass a checkpoint directory (from `molcloak train`) or --torch-model model.pt")
    cfg = compile_config(rounding_bits, rounding_method, p_error, n_bits)
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
    compile_cmd(checkpoint, rounding_bits, rounding_method, p_error, out_dir, name, force, as_json, torch_model=None, n_bits=None)


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
    from .bundle import load_manifest
    from .inputs import read_inputs, write_csv
    from .workflow import predict_local

    if (bundle is None) == (server is None):
        raise DataError("pass either --bundle DIR (local) or --server URL --model NAME (remote)")
    if server is not None and not model:
        raise DataError("--server needs --model NAME; list the served models with GET /models")
    remote = None
    if server is not None:
        from .remote import RemoteModel

        remote = RemoteModel(server, model, key_dir, _read_token(token_file))
    manifest = remote.client.manifest if remote else load_manifest(bundle, check=False)
    inputs = read_inputs(manifest.featurizer, smiles, input_csv, smiles_col)  # SMILES, or rows of a tabular model
    with progress() as bar:
        t = bar.add_task("keys + encrypted prediction", total=len(inputs), status="")
        on_item = lambda p: bar.update(t, advance=1, status=p.label or "")  # noqa: E731
        if remote is not None:
            report = remote.predict(inputs, batch_size, skip_invalid, on_item=on_item)
        else:
            report = predict_local(bundle, inputs, fhe, key_dir, skip_invalid, on_item=on_item)
    if output:
        write_csv(output, report)
    if as_json:
        return emit_json(report.to_dict())
    _print_predictions(report, manifest.task)
    if output:
        out.print(f"predictions written to {output}")


def _print_predictions(report, task) -> None:
    from .metrics import describe

    table = Table(title=f"private predictions ({report.mode})")
    tabular = any(p.features is not None for p in report.predictions)
    outputs = [f"{name} ({unit})" if unit else name for name, unit in ((n, task.unit_of(j)) for j, n in enumerate(task.tasks))]
    timing = ("encrypt", "run", "decrypt" if report.mode != "server" else "round_trip")
    headers = ["#"] + ([] if tabular else ["SMILES"]) + (outputs or ["prediction"])
    for col in headers + ["encrypt", "FHE run", "decrypt" if report.mode != "server" else "round trip"]:
        table.add_column(col)
    for p in report.predictions:
        first = [str(p.index)] + ([] if tabular else [p.smiles])
        if p.error:
            table.add_row(*first, f"[red]{p.error}[/red]", *[""] * (len(headers) - len(first) - 1 + len(timing)))
            continue
        if isinstance(p.value, dict):
            cells = [f"{v:.3f}" for v in p.value.values()]
        else:
            cells = [describe(task, p.value) if p.label else f"{p.value:.3f}"]
        s = p.seconds
        table.add_row(*first, *cells, *(f"{s[k]*1000:.0f} ms" if k in s else "-" for k in timing))
    out.print(table)
    if task.kind == "multilabel":
        out.print("values: probability of label 1 per task")
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


# ---------------------------------------------------------------- audit


@app.command()
@cli_errors
def audit(
    test_set: Path = typer.Option(..., "--test-set", "-t", help="CSV file of the secret test set, one molecule per row."),
    target_col: str = typer.Option(..., "--target-col", help="Column with the true class (name, or id 0..k-1) or value."),
    smiles_col: str = SmilesColOpt,
    server: Optional[str] = typer.Option(None, "--server", "-s", help="URL of the owner's `molcloak serve` server."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name on the server (see GET /models)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Audit a local bundle instead of a server (both halves in this process)."),
    task: Optional[str] = typer.Option(None, "--task", help="classification or regression; checked against the model (default: the model's task)."),
    out_dir: Path = typer.Option(Path("audit"), "--out", "-o", help="Directory for progress and reports; rerun the same command to resume."),
    group_col: Optional[str] = typer.Option(None, "--group-col", help="Also compare subgroups defined by this column (besides MW, logP, scaffold bins)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap replicates for the 95% confidence intervals (0 = none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    batch_size: int = typer.Option(8, "--batch-size", help="Molecules per request and per checkpoint write."),
    key_dir: Optional[Path] = typer.Option(None, "--key-dir", help="Where the auditor's secret keys stay (default ~/.molcloak/keys)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the server's bearer token."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Score the valid rows and list the invalid ones in the report instead of failing."),
    restart: bool = typer.Option(False, "--restart", help="Discard the progress saved in --out and start over."),
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
    from molcloak.evaluation.audit import AuditConfig
    from molcloak.evaluation.audit import audit as run_audit
    from molcloak.evaluation.audit_report import print_summary

    config = AuditConfig(test_set, out_dir, target_col, smiles_col, task, group_col, bootstrap, seed, batch_size, skip_invalid, restart)
    with progress() as bar:
        bar_task: list = []

        def on_progress(done: int, total: int, status: str) -> None:
            if not bar_task:
                bar_task.append(bar.add_task("encrypted audit", total=total, completed=done, status=status))
            bar.update(bar_task[0], completed=done, status=status)

        try:
            report = run_audit(config, bundle, server, model, key_dir, _read_token(token_file), on_progress)
        except KeyboardInterrupt as exc:
            err.print(f"[yellow]{exc or 'interrupted'}[/yellow]", highlight=False)
            raise typer.Exit(130)
    if as_json:
        return emit_json({k: v for k, v in report.items() if k != "rows"})
    print_summary(report, out)


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
    tasks = [f"{n} ({task.unit_of(j)})" if task.unit_of(j) else n for j, n in enumerate(task.tasks)]
    out.print(f"[bold]{m.name}[/bold]  ({task.kind}; target {task.target!r}" + (f"; labels {list(task.labels)}" if task.labels else "")
              + (f"; tasks {', '.join(tasks)}" if tasks else "") + ")")
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
    """List the model families of the registry, their default options, and the bundled datasets."""
    import dataclasses

    from molcloak.models.registry import MODELS

    from .data import BUNDLED_TASKS

    options = {k: dataclasses.asdict(v.config_cls()) for k, v in MODELS.items()}  # defaults; change with --set / --hidden
    if as_json:
        return emit_json({"models": {k: v.description for k, v in MODELS.items()}, "options": options, "datasets": BUNDLED_TASKS})
    for k, v in MODELS.items():
        out.print(f"model [bold]{k}[/bold]: {v.description}")
        out.print(f"  options: {json.dumps(options[k])}" + (f"; features {v.features}" if v.features else ""), highlight=False)
    for k, v in BUNDLED_TASKS.items():
        out.print(f"dataset [bold]{k}[/bold]: {v}")


# ---------------------------------------------------------------- demo


@app.command("app")
@cli_errors
def app_cmd(
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="A bundle, or a folder of bundles, to serve (default demo/bundle)."),
    server: Optional[str] = typer.Option(None, "--server", help="Use a running FHE server (molcloak serve) instead of starting one."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Bearer token for --server, in a file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface the web page listens on."),
    port: int = typer.Option(7860, "--port", help="TCP port of the web page."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Session keys and the server's state (default ~/.molcloak/app)."),
    workers: int = typer.Option(0, "--workers", help="FHE workers of the server it starts (0 = one per core)."),
    max_sessions: int = typer.Option(16, "--max-sessions", help="Browser sessions whose keys are kept; older ones are deleted."),
    session_hours: float = typer.Option(24.0, "--session-hours", help="Delete a session's keys after this long unused."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Offer the owner's plaintext prediction next to the private one (needs the bundle's owner/ part)."),
):
    """The browser demo: watch a private prediction step by step (keys, encrypt, FHE run, decrypt).

    Without --server it starts `molcloak serve` on loopback as a separate process; the app is the
    client (it keeps each browser session's secret key), the server only sees evaluation keys and
    ciphertexts. Example: molcloak app --bundle demo/bundle, then open http://127.0.0.1:7860
    """
    if bundle is not None and server is not None:
        raise DataError("pass either --bundle (start a server for it) or --server URL (use a running one), not both")
    from molcloak.app.launcher import DEFAULT_STATE, run_app

    run_app(bundle=bundle, server_url=server, token=_read_token(token_file), host=host, port=port,
            state_dir=state_dir or DEFAULT_STATE, workers=workers or None, max_sessions=max_sessions,
            session_ttl_hours=session_hours, compare=compare, say=lambda m: err.print(m, highlight=False, soft_wrap=True))


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


# ---------------------------------------------------------------- bench / tune (code in evaluation/)


@app.command()
@cli_errors
def bench(
    task: Optional[List[str]] = typer.Option(None, "--task", help="Bundled task(s) to benchmark (default: sol-low and its regression twin sol-logs)."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Feature spec every model uses (default: the molcloak default's)."),
    only: Optional[str] = typer.Option(None, "--models", help="Comma-separated subset of: molcloak, cml-linear, cml-xgb, ckks, random-forest."),
    n_runs: int = typer.Option(5, "--n-runs", help="Encrypted single-molecule runs per model for the latency figures."),
    execute_all: bool = typer.Option(True, "--execute-all/--no-execute-all", help="Run every test molecule through the molcloak circuit in FHE (executed metrics)."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run: 2 encrypted runs per model, no full FHE test set, fewer trees."),
    seed: int = typer.Option(0, "--seed", help="Seed for splits, training and models."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full results (per-run times included) to this JSON file ('-' = stdout)."),
    markdown_path: Optional[Path] = typer.Option(None, "--markdown", help="Also write the markdown table to this file."),
):
    """Benchmark molcloak's default model against Concrete ML built-ins, the TenSEAL CKKS recipe and a plaintext RandomForest.

    Same features and split for every model; ROC-AUC (RMSE/R² for sol-logs), median and p90 server-side
    latency per encrypted molecule, keygen time, evaluation-key size, ciphertext sizes, PBS count and bit width.
    The CKKS row needs `pip install -e ".[bench]"` (tenseal); without it the row says so.
    Example: molcloak bench --json bench.json --markdown bench.md
    """
    from molcloak.evaluation.bench import MODELS, BenchConfig, markdown, run_bench

    models = tuple(m.strip() for m in only.split(",")) if only else MODELS
    try:
        kwargs = {"features": features} if features else {}
        cfg = BenchConfig(tasks=tuple(task or ("sol-low", "sol-logs")), models=models, n_runs=n_runs,
                          execute_all=execute_all, quick=quick, seed=seed, **kwargs)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    with progress(transient=False) as bar:
        t = bar.add_task("bench", total=len(cfg.tasks) * len(cfg.models), status="")
        result = run_bench(cfg, on_progress=lambda msg, n: bar.update(t, advance=n, status=msg))
    table = markdown(result)
    if markdown_path:
        markdown_path.write_text(table)
    if json_path:
        if str(json_path) == "-":
            return emit_json(result)
        json_path.write_text(json.dumps(result, indent=2, default=_json_default))
    sys.stdout.write(table + "\n")  # raw markdown, not wrapped to the terminal width


@app.command()
@cli_errors
def tune(
    dataset: str = DatasetOpt,
    features: Optional[List[str]] = typer.Option(None, "--features", "-f", help="Feature spec(s) to sweep, repeatable (default: the default features)."),
    widths: str = typer.Option("8;16", "--widths", help="Hidden layer settings separated by ';', each comma-separated, e.g. '8;16;16,8'."),
    weight_bits: str = typer.Option("3", "--weight-bits", help="Weight bit widths to sweep, e.g. 2,3."),
    act_bits: str = typer.Option("3", "--act-bits", help="Activation bit widths to sweep."),
    input_bits: str = typer.Option("4", "--input-bits", help="Input bit widths to sweep."),
    rounding_bits: str = typer.Option("5", "--rounding-bits", help="Accumulator rounding bits to sweep (0 = off), e.g. 4,5,6."),
    p_errors: str = typer.Option("1e-6", "--p-error", help="Error probabilities per PBS to sweep, e.g. default,1e-6,0.01 (default = Concrete's 2^-40)."),
    seeds: str = typer.Option("0", "--seeds", help="Training seeds; accuracy is the mean over them, e.g. 0,1,2."),
    epochs: int = typer.Option(150, "--epochs", help="Maximum training epochs per variant."),
    n_runs: int = typer.Option(5, "--n-runs", help="Encrypted runs per executed front point."),
    execute_front: int = typer.Option(3, "--execute-front", help="Run this many of the most accurate front points for real (0 = none)."),
    max_latency: float = typer.Option(0.25, "--max-latency", help="Latency budget (s) for the chosen configuration."),
    max_key_mb: float = typer.Option(30.0, "--max-key-mb", help="Evaluation-key budget (MB) for the chosen configuration."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="PBS cost calibration JSON (default ~/.molcloak/pbs_calibration.json; measured when missing)."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write the accuracy/latency plot (PNG) here."),
    write_config: Optional[Path] = typer.Option(None, "--write-config", help="Write the chosen configuration here for `molcloak train --config FILE`."),
    layer_report: bool = typer.Option(True, "--layer-report/--no-layer-report", help="Per-layer float / quantized / FHE error of the chosen configuration."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write all results to this JSON file ('-' = stdout)."),
):
    """Sweep bit widths, rounding bits, p_error and width; print the Pareto front (accuracy vs latency vs key size).

    Accuracy: FHE simulation on the test split. Latency: PBS count x a per-PBS cost measured on this machine,
    plus real encrypted runs of the front's most accurate points. Example:
    molcloak tune --widths "8;16" --weight-bits 2,3 --p-error default,0.01 --plot tune.png --write-config best.json
    """
    from molcloak.evaluation.tune import TuneGrid, print_tune, run_tune

    from .train import TrainConfig

    ds = load_dataset(dataset, "smiles", None, "classification", None, False)
    grid = TuneGrid(
        features=tuple(features or ()) or TuneGrid.features,
        hidden=tuple(tuple(_int_list(w, "--widths")) for w in widths.split(";") if w.strip()),
        weight_bits=tuple(_int_list(weight_bits, "--weight-bits")), act_bits=tuple(_int_list(act_bits, "--act-bits")),
        input_bits=tuple(_int_list(input_bits, "--input-bits")),
        rounding_bits=tuple(b or None for b in _int_list(rounding_bits, "--rounding-bits")),
        p_error=tuple(_p_errors(p_errors)), seeds=tuple(_int_list(seeds, "--seeds")),
    )
    with progress(transient=False) as bar:
        t = bar.add_task("tune", total=grid.size() * len(grid.seeds) + execute_front + 1, status="")
        result = run_tune(ds, dataset, grid, TrainConfig(epochs=epochs), n_runs=n_runs, execute_front=execute_front,
                          max_latency_s=max_latency, max_key_mb=max_key_mb, calibration=calibration, plot_path=plot_path,
                          config_path=write_config, layer_report=layer_report,
                          say=lambda msg: bar.update(t, advance=1, status=msg[:70]))
    if json_path:
        if str(json_path) == "-":
            return emit_json(result)
        json_path.write_text(json.dumps(result, indent=2, default=_json_default))
    print_tune(result, out)


def _p_errors(text: str) -> list:
    values = []
    for word in (w.strip() for w in text.split(",") if w.strip()):
        try:
            values.append(None if word == "default" else float(word))
        except ValueError:
            raise DataError(f"--p-error {word!r} is neither a probability nor 'default'; write e.g. default,0.01") from None
    if not values:
        raise DataError("--p-error needs at least one value, e.g. 0.01")
    return values


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _kb(n: float) -> str:
    return f"{n / 1e3:.1f} kB"


if __name__ == "__main__":
    main()
