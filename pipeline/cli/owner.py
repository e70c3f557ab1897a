"""The model owner's commands: train, compile, deploy."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from ..errors import ConfigError
from ..runconfig import int_list
from .common import (
    CompileOpts,
    DataOpts,
    ForceOpt,
    JsonOpt,
    app,
    cli_errors,
    emit_json,
    err,
    fmt_metrics,
    given,
    given_compile,
    kb,
    load_data,
    mb,
    out,
    progress,
)

TRAIN_SETTINGS = ("epochs", "batch_size", "lr", "patience", "seed")


@app.command()
@cli_errors
def train(
    ctx: typer.Context,
    dataset: str = DataOpts.dataset,
    smiles_col: str = DataOpts.smiles_col,
    target_col: str | None = DataOpts.target_col,
    task: str = DataOpts.task,
    threshold: float | None = DataOpts.threshold,
    skip_invalid: bool = DataOpts.skip_invalid,
    feature_cols: str | None = DataOpts.feature_cols,
    split: str | None = DataOpts.split,
    test_fraction: float = DataOpts.test_fraction,
    features: str | None = typer.Option(
        None,
        "--features",
        "-f",
        help="Feature spec: physchem, morgan:r=2,n=1024, morgan_count:r=2,n=256, or parts joined by '+' (default: the model's; physchem:scale=quantile for mlp, the image grid:r=2,size=32 for cnn1/cnn2; tabular data uses its columns).",
    ),
    model: str = typer.Option(
        "mlp", "--model", "-m", help="Model family from the registry (see `molcloak models`)."
    ),
    hidden: str | None = typer.Option(
        None,
        "--hidden",
        help="Hidden layer widths, comma-separated (e.g. 32,16; default: the model's, mlp 16, CNN head none); "
        "0: no hidden layer (a linear model: no bootstrap in its circuit, fitted by L-BFGS with an L2 penalty "
        "chosen on validation; pair it with --features ...+rff:n=2048 or ...+minhash:n=1024).",
    ),
    model_set: List[str] | None = typer.Option(
        None,
        "--set",
        help="Other model option KEY=VALUE, repeatable (see `molcloak models`), e.g. --set channels=8,16 --set pool=2.",
    ),
    weight_bits: int | None = typer.Option(
        None, "--weight-bits", help="Weight bit width (default: the model's; mlp 3, cnn1/cnn2 2)."
    ),
    act_bits: int | None = typer.Option(
        None, "--act-bits", help="Activation bit width (default: the model's; 3)."
    ),
    input_bits: int | None = typer.Option(
        None, "--input-bits", help="Input quantizer bit width (default: the model's; mlp 4, cnn1/cnn2 3)."
    ),
    activation: str | None = typer.Option(
        None,
        "--activation",
        help="MLP hidden activation: relu or sigmoid (either is exact: one lookup per neuron; default: the model's).",
    ),
    epochs: int = typer.Option(150, "--epochs", help="Maximum epochs."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(3e-3, "--lr", help="AdamW learning rate."),
    patience: int = typer.Option(
        50, "--patience", help="Early stopping: epochs without validation improvement."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for split, initialization and batches."),
    out_dir: Path = typer.Option(Path("runs/model"), "--out", "-o", help="Checkpoint directory to write."),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    config_file: Path | None = typer.Option(
        None,
        "--config",
        help="JSON configuration from `molcloak tune --write-config` (features, model options, training and compile settings); options given on the command line override it.",
    ),
):
    """Train a quantization-aware model and write a checkpoint (weights stay with the owner).

    The checkpoint records the compile settings (--config's, else the defaults) that `compile` and
    `deploy` use. Example: molcloak train --dataset sol-low --features physchem --out runs/sol-low
    """
    from ..bundle import save_checkpoint
    from ..runconfig import RunConfig, parse_model_options
    from ..workflow import train_run

    ds = load_data(dataset, smiles_col, target_col, task, threshold, skip_invalid, feature_cols)
    options = {
        k: v
        for k, v in {
            "weight_bits": weight_bits,
            "act_bits": act_bits,
            "input_bits": input_bits,
            "activation": activation,
        }.items()
        if v is not None
    }  # unset: the model's
    options.update(parse_model_options(model_set or []))
    if hidden is not None:
        options["hidden"] = int_list(hidden, "--hidden")
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience, "seed": seed}
    if config_file is None:
        run = RunConfig().override(features, model, options, settings)
    else:
        run = RunConfig.load(config_file).override(
            features,
            model if given(ctx, "model") else None,
            options,
            {k: v for k, v in settings.items() if given(ctx, k)},
        )
    with progress() as bar:
        t = bar.add_task("training", total=run.train.epochs, status="")
        on_epoch = lambda epoch, total, row: bar.update(  # noqa: E731
            t, completed=epoch, total=total, status=f"loss {row.get('valid_loss', row['train_loss']):.3f}"
        )
        ckpt = train_run(ds, run, split, test_fraction, on_epoch=on_epoch)
    ckpt.train_info["dataset"] = dataset
    save_checkpoint(ckpt, out_dir, force=force)
    summary = {
        "checkpoint": str(out_dir),
        "task": ckpt.task.to_dict(),
        "features": str(ckpt.featurizer),
        "n_features": ckpt.n_inputs,
        "training": ckpt.train_info,
        "metrics": ckpt.metrics,
    }
    if as_json:
        return emit_json(summary)
    info = ckpt.train_info
    l2 = info["final"].get("l2")  # a linear network, fitted by the convex solver (`linear_fit`)
    how = (
        f"best epoch {info['best_epoch']}/{info['epochs_run']}"
        if l2 is None
        else f"linear, fitted by L-BFGS, L2 penalty {l2:g} chosen on validation ({info['epochs_run']} tried)"
    )
    out.print(
        f"trained [bold]{run.model}[/bold] on {dataset} ({ckpt.task.kind}, {ckpt.n_inputs} features "
        f"'{ckpt.featurizer}'): {how}"
    )
    out.print(f"float test metrics: {fmt_metrics(ckpt.metrics['float'])}")
    out.print(f"checkpoint written to {out_dir}; next: molcloak deploy {out_dir} --out bundles/<name>")


def _print_compiled(compiled) -> None:
    s = compiled.stats
    out.print(
        f"circuit: {s.pbs_count} PBS, max bit width {s.max_bit_width}, evaluation keys ~{mb(s.evaluation_key_bytes)} "
        f"(in memory), input {kb(s.input_ciphertext_bytes)}, output {kb(s.output_ciphertext_bytes)}, "
        f"p_error {s.p_error:.2g} per PBS, compiled in {compiled.seconds:.1f} s"
    )
    if compiled.config.output == "class":
        out.print(
            "output: the predicted class only (0/1 per task); test metrics below are computed from classes"
        )
    elif compiled.config.output_bits:
        out.print(f"output: each logit rounded to {compiled.config.output_bits} bits before it is decrypted")
    for key, m in compiled.metrics.items():
        out.print(f"  {key:>13} test: {fmt_metrics(m)}")


@app.command("compile")
@cli_errors
def compile_cmd(
    checkpoint: Path | None = typer.Argument(
        None, help="Checkpoint directory written by `molcloak train` (omit with --torch-model)."
    ),
    rounding_bits: int | None = CompileOpts.rounding_bits,
    rounding_method: str | None = CompileOpts.rounding_method,
    p_error: float | None = CompileOpts.p_error,
    output: str | None = CompileOpts.output,
    bundle: Path | None = typer.Option(
        None, "--bundle", help="Also write the deployment bundle here (same as `deploy`)."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Model name in the bundle (default: bundle directory name)."
    ),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    torch_model: Path | None = typer.Option(
        None,
        "--torch-model",
        help="Instead of a checkpoint: a float PyTorch nn.Sequential (Linear, Conv2d, ReLU, Sigmoid, AvgPool2d, Flatten) saved with torch.save, quantized after training (--n-bits) and calibrated on --dataset's training split.",
    ),
    dataset: str = DataOpts.dataset,
    smiles_col: str = DataOpts.smiles_col,
    target_col: str | None = DataOpts.target_col,
    task: str = DataOpts.task,
    threshold: float | None = DataOpts.threshold,
    feature_cols: str | None = DataOpts.feature_cols,
    skip_invalid: bool = DataOpts.skip_invalid,
    split: str | None = typer.Option(
        None, "--split", help="With --torch-model: official (when the data has one), random or scaffold."
    ),
    features: str | None = typer.Option(
        None,
        "--features",
        "-f",
        help="With --torch-model: the features the model takes (default physchem; grid:r=2,size=32 for Conv2d models).",
    ),
    n_bits: int | None = typer.Option(
        None,
        "--n-bits",
        help="Post-training quantization bits of a float model (default 4 with --torch-model).",
    ),
    calib_size: int | None = typer.Option(
        None,
        "--calib-size",
        help="With --torch-model: calibration rows, a seeded sample of the training split (default: all of it).",
    ),
    seed: int = typer.Option(
        0, "--seed", help="With --torch-model: seed of the split and the calibration sample."
    ),
    output_bits: int | None = CompileOpts.output_bits,
):
    """Compile a checkpoint to a TFHE circuit; report PBS count, bit width, key sizes and FHE-simulated metrics.

    Compile settings not given here are the ones the checkpoint recorded at training time.
    Example: molcloak compile runs/sol-low --rounding-bits 5 --bundle bundles/sol-low.
    Imported float model: molcloak compile --torch-model model.pt --dataset sol-low --features physchem --bundle bundles/mine
    """
    from ..bundle import load_checkpoint
    from ..workflow import compile_checkpoint, deploy, import_checkpoint, recorded_compile_config

    if torch_model is not None:
        from ..torch_import import DEFAULT_PTQ_BITS

        if checkpoint is not None:
            raise ConfigError("give a checkpoint directory or --torch-model, not both")
        ds = load_data(dataset, smiles_col, target_col, task, threshold, skip_invalid, feature_cols)
        with err.status("featurizing the dataset and checking the model..."):
            ckpt = import_checkpoint(ds, torch_model, features, calib_size, seed, split)
        n_bits = DEFAULT_PTQ_BITS if n_bits is None else n_bits
    elif checkpoint is None:
        raise ConfigError(
            "no model given; pass a checkpoint directory (from `molcloak train`) or --torch-model model.pt"
        )
    else:
        ckpt = load_checkpoint(checkpoint)
    cfg = recorded_compile_config(
        ckpt, **given_compile(rounding_bits, rounding_method, p_error, n_bits, output, output_bits)
    )
    with err.status("compiling to a TFHE circuit and simulating the test split..."):
        compiled = compile_checkpoint(ckpt, cfg)
    result = {**compiled.info(), "metrics": compiled.metrics}
    if bundle is not None:
        deploy(ckpt, compiled, bundle, name or bundle.name, force=force)
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
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Bundle directory to write (manifest.json, client/, server/, owner/)."
    ),
    name: str | None = typer.Option(None, "--name", help="Model name (default: the --out directory name)."),
    rounding_bits: int | None = CompileOpts.rounding_bits,
    rounding_method: str | None = CompileOpts.rounding_method,
    p_error: float | None = CompileOpts.p_error,
    output: str | None = CompileOpts.output,
    output_bits: int | None = CompileOpts.output_bits,
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
):
    """Compile a checkpoint and write the deployment bundle.

    Ship client/ to users and server/ to the FHE server; keep owner/ (the weights) to yourself.
    Example: molcloak deploy runs/sol-low --out bundles/sol-low
    Class-only answers (users learn the decision, not the score): molcloak deploy runs/sol-low --out bundles/sol-low-class --output class
    """
    compile_cmd(
        checkpoint,
        rounding_bits,
        rounding_method,
        p_error,
        output,
        out_dir,
        name,
        force,
        as_json,
        torch_model=None,
        n_bits=None,
        output_bits=output_bits,
    )


@app.command()
@cli_errors
def aggregate(
    bundle: Path = typer.Argument(
        ..., help="Bundle directory written by `molcloak deploy` (with its owner/ part)."
    ),
    rows: int = typer.Option(
        128,
        "--rows",
        help="Molecules per chunk: an audit's molecules are sent in chunks padded to this size.",
    ),
    thresholds: int = typer.Option(
        8, "--thresholds", help="Score thresholds of the histogram (more: AUC closer to exact, more PBS)."
    ),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
):
    """Add the aggregate-only audit program to a binary classifier's bundle (writes BUNDLE/aggregate/).

    With it, `molcloak audit --aggregate-only` scores the model on an auditor's secret test set while the
    auditor decrypts only a histogram of scores per label, never a per-molecule prediction. Serve the
    bundle again afterwards; give auditors tokens from --audit-token-file so they can do nothing else.
    Example: molcloak aggregate demo/bundle
    """
    import time

    from ..aggregate import add_aggregate

    start = time.perf_counter()
    with out.status("compiling the aggregate program and measuring its keys"):
        spec = add_aggregate(bundle, rows, thresholds, force)
    info = {
        "bundle": str(bundle),
        "program": spec.program,
        "rows_per_chunk": spec.rows,
        "buckets": spec.buckets,
        "pbs_per_chunk": spec.circuit.get("pbs_count"),
        "max_bit_width": spec.circuit.get("max_bit_width"),
        "evaluation_key_bytes": spec.circuit.get("serialized_evaluation_key_bytes"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if as_json:
        return emit_json(info)
    out.print(
        f"wrote {bundle / 'aggregate'}: {spec.program}, {spec.rows} molecules per chunk, {spec.buckets} score "
        f"buckets, {info['pbs_per_chunk']} PBS per chunk, {info['max_bit_width']}-bit circuit, "
        f"{info['evaluation_key_bytes'] / 1e6:.1f} MB of evaluation keys ({info['seconds']} s)",
        highlight=False,
    )
