"""What every command shares: the Typer app, consoles, error handling, JSON output, progress bars, options."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import ConfigError, MolcloakError

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
LOG_COLUMNS = 160


def _console(stderr: bool = False) -> Console:
    """A console as wide as the terminal; when the output goes to a file or a pipe (a log, `nohup`), LOG_COLUMNS
    wide unless COLUMNS says otherwise: rich's default of 80 cuts `fit`'s front table into slivers of 3 letters."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=LOG_COLUMNS if piped else None)


err = _console(stderr=True)
out = _console()


def cli_errors(fn):
    """Turn molcloak errors into one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MolcloakError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=json_default) + "\n")


def write_json(path: Path, payload: Any) -> None:
    """`--json FILE` of bench/tune: the file, or stdout for '-'."""
    if str(path) == "-":
        return emit_json(payload)
    path.write_text(json.dumps(payload, indent=2, default=json_default))


def json_default(o):
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
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
    )


def given(ctx: typer.Context, name: str) -> bool:
    """Was option `name` given on the command line (not left at its default)? Compared by name: Typer
    0.29 vendors its own click, whose ParameterSource is not click.core's."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {str(path)!r} ({exc.strerror}); check the path") from exc
    if not token:
        raise ConfigError(f"token file {str(path)!r} is empty; put the bearer token in it")
    return token


def fmt_metrics(m: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items())


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def kb(n: float) -> str:
    return f"{n / 1e3:.1f} kB"


# ---------------------------------------------------------------- shared options

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
ForceOpt = typer.Option(False, "--force", help="Replace the output directory if it exists.")
TokenFileOpt = typer.Option(None, "--token-file", help="File holding the server's bearer token.")
KeyDirOpt = typer.Option(
    None,
    "--key-dir",
    help="Where the client keeps its secret keys (default $MOLCLOAK_HOME/keys, ~/.molcloak/keys).",
)


class DataOpts:
    """The data options of every command that reads a training dataset (train, tune, compile --torch-model)."""

    dataset = typer.Option(
        "sol-low",
        "--dataset",
        "-d",
        help="Bundled dataset (sol-low, sol-class, sol-logs, freesolv, sol-freesolv, breast-cancer) or a CSV file.",
    )
    smiles_col = typer.Option("smiles", "--smiles-col", help="CSV column holding SMILES.")
    target_col = typer.Option(
        None,
        "--target-col",
        help="CSV column holding the target (required for CSV files); several joined by ',' train a multi-task model (empty cells = missing labels).",
    )
    feature_cols = typer.Option(
        None,
        "--feature-cols",
        help="Tabular CSV: numeric feature columns 'a,b,c', or 'all' (every column but the targets holding numbers) instead of SMILES.",
    )
    task = typer.Option("classification", "--task", help="CSV target type: classification or regression.")
    threshold = typer.Option(
        None, "--threshold", help="Binarize a numeric CSV target: class 1 when value >= threshold."
    )
    skip_invalid = typer.Option(
        False, "--skip-invalid", help="Drop invalid rows (counted and listed) instead of failing."
    )
    split = typer.Option(None, "--split", help="official (when the data has one), random or scaffold.")
    test_fraction = typer.Option(0.2, "--test-fraction", help="Test share for random/scaffold splits.")


def load_data(
    dataset: str,
    smiles_col: str,
    target_col: str | None,
    task: str,
    threshold: float | None,
    skip_invalid: bool,
    feature_cols: str | None,
):
    """Load a dataset the way every command does, and report ignored columns and skipped rows on stderr."""
    from ..data import DataSource

    ds = DataSource(dataset, smiles_col, target_col, task, threshold, skip_invalid, feature_cols).load()
    if ds.ignored_columns:
        err.print(
            f"[yellow]--feature-cols all: ignored columns without numbers:[/yellow] {', '.join(ds.ignored_columns)}",
            highlight=False,
        )
    if ds.problems:
        err.print(f"[yellow]skipped {len(ds.problems)} invalid rows[/yellow] (--skip-invalid):")
        for p in ds.problems[:20]:
            err.print(f"  {p.skipped()}", highlight=False)
        if len(ds.problems) > 20:
            err.print(f"  ... and {len(ds.problems) - 20} more")
    return ds


class CompileOpts:
    """Compile options; unset ones take the settings recorded in the checkpoint at training time, then the defaults."""

    rounding_bits = typer.Option(
        None,
        "--rounding-bits",
        help="Round accumulators to this many bits before each lookup (0 = off; default: the checkpoint's, else 5).",
    )
    rounding_method = typer.Option(
        None,
        "--rounding-method",
        help="exact or approximate (cheaper; default: the checkpoint's, else approximate).",
    )
    p_error = typer.Option(
        None,
        "--p-error",
        help="Error probability per bootstrap (default: the checkpoint's, else 1e-6: FHE equals the simulation except ~1 molecule in 65,000; 1e-12 ~ Concrete's 2^-40, 2x slower; 0.01 is ~15% faster, FHE then differs now and then).",
    )
    output = typer.Option(
        None,
        "--output",
        help="What the circuit returns: logits (default) or class, the predicted class only (binary and multi-label "
        "models): users then cannot fit a copy of the model on its scores; ranking metrics get worse (README).",
    )
    output_bits = typer.Option(
        None,
        "--output-bits",
        help="Round each logit to this many bits before it is decrypted (0 = exact, the default). Exact outputs "
        "can double the cost of every bootstrap on wide circuits; use the --rounding-bits value (5): another "
        "width adds a second set of crypto parameters (README, `compile`).",
    )


def given_compile(
    rounding_bits: int | None,
    rounding_method: str | None,
    p_error: float | None,
    n_bits: int | None = None,
    output: str | None = None,
    output_bits: int | None = None,
) -> dict:
    """The compile settings given on the command line (0 rounding or output bits = off)."""
    given: dict = {}
    if rounding_bits is not None:
        given["rounding_bits"] = rounding_bits or None
    if rounding_method is not None:
        given["rounding_method"] = rounding_method
    if p_error is not None:
        given["p_error"] = p_error
    if n_bits is not None:
        given["n_bits"] = n_bits
    if output is not None:
        given["output"] = output
    if output_bits is not None:
        given["output_bits"] = output_bits or None
    elif output == "class":  # a class-only circuit replaces rounded logits a checkpoint may have recorded
        given["output_bits"] = None
    return given
