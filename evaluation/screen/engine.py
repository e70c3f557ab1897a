"""Private screening of a compound library of any size, resumably, in constant memory.

The library is read, validated, featurized and encrypted here in chunks; the model runs on
ciphertexts (a `PredictionBackend`: a `molcloak serve` server through `RemoteModel`, with several
batches in flight, or a bundle's server half in this process through `LocalBackend`); only this
machine decrypts. The run directory holds::

    DIR/screen.json      what this screen is (library file hash, SMILES column, model), sessions
    DIR/predictions.csv  one line per library row, in library order, appended and fsynced after every
                         batch: index, smiles, prediction, class probabilities or task values, error
    DIR/invalid.csv      the rows that could not be screened: row, value, reason
    DIR/report.html, report.md, summary.json, plots/   (and predictions.parquet with pyarrow)

predictions.csv is the checkpoint: a rerun with the same library, column and model
(`backend.identity()`) continues after its last complete line, so every row is screened exactly
once even after Ctrl-C or a kill mid-run (a line cut short is dropped and screened again).
Options that change only how the work is done or summarized (--batch-size, --concurrency, --top)
may differ between runs.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molcloak.evaluation.resume import RunState, append_durably, drop_torn_line, sha256_file
from molcloak.pipeline.errors import ConfigError, DataError
from molcloak.pipeline.predict import Prediction, PredictionBackend, fill_prediction, rows_label

from .report import columns, finish

STATE_FORMAT = 1
CHUNK_ROWS = 4096  # library rows read at once
ProgressCallback = Callable[[int, int, str], None]  # (rows done, rows in the library, status)
IDENTITY_NAMES = {"library_sha256": "library file content", "smiles_col": "--smiles-col", "model": "model"}


@dataclass(frozen=True)
class ScreenConfig:
    library: Path
    out: Path
    smiles_col: str = "smiles"
    batch_size: int = 8
    concurrency: int | None = None  # batches in flight; None: the backend's default
    top: int = 10
    skip_invalid: bool = False
    restart: bool = False


# ---------------------------------------------------------------- the library, in chunks


def library_chunks(path: Path, smiles_col: str, start: int = 0) -> Iterator[tuple[int, list[str]]]:
    """(number of the first row, SMILES) per chunk of `CHUNK_ROWS` data rows after row `start`."""
    import pandas as pd

    try:
        header = pd.read_csv(path, dtype=str, nrows=0).columns
        if smiles_col not in header:
            raise DataError(
                f"{path}: column {smiles_col!r} not found; available columns: "
                f"{', '.join(map(repr, header))}; pass --smiles-col"
            )
        reader = pd.read_csv(
            path, dtype=str, keep_default_na=False, usecols=[smiles_col], chunksize=CHUNK_ROWS
        )
        first = 1
        for chunk in reader:
            values = [s.strip() for s in chunk[smiles_col]]
            if first + len(values) - 1 > start:
                yield max(first, start + 1), values[max(0, start + 1 - first) :]
            first += len(values)
    except FileNotFoundError as exc:
        raise DataError(f"library file {str(path)!r} does not exist; check the --input path") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc}); save it as UTF-8 CSV") from exc


def scan(config: ScreenConfig, featurizer, start: int) -> tuple[int, list[tuple[int, str, str]], int]:
    """One pass over the library: (data rows, the first invalid rows after `start` as (row, value,
    reason), how many there are). Validates only without --skip-invalid (screening does it then)."""
    total, shown, count = start, [], 0
    for first, values in library_chunks(config.library, config.smiles_col, start):
        total = first + len(values) - 1
        for i, smiles in enumerate([] if config.skip_invalid else values, start=first):
            value, reason = featurizer.check_input(smiles)
            if value is None:
                count += 1
                if len(shown) < 6:
                    shown.append((i, smiles, reason))
    return total, shown, count


def _invalid_message(config: ScreenConfig, shown, count: int) -> str:
    row, _, reason = shown[0]
    more = ""
    if count > 1:
        rows = ", ".join(str(r) for r, _, _ in shown[1:]) + (", ..." if count > len(shown) else "")
        more = f" (and {count - 1} more invalid rows: {rows})"
    return (
        f"{config.library}: row {row}: {reason}{more}; nothing was encrypted (with --skip-invalid the "
        f"valid rows are screened and the others listed in {config.out / 'invalid.csv'})"
    )


# ---------------------------------------------------------------- batches and lines


def batches(config: ScreenConfig, client, start: int) -> Iterator[tuple[list[Prediction], np.ndarray]]:
    """(span, features): consecutive library rows after `start` holding `batch_size` valid molecules (the
    invalid rows among them carry their error), and the features of the valid ones."""
    span: list[Prediction] = []
    valid: list[Prediction] = []
    for first, values in library_chunks(config.library, config.smiles_col, start):
        for index, smiles in enumerate(values, start=first):
            value, reason = client.featurizer.check_input(smiles)
            span.append(Prediction(index, smiles, error=reason if value is None else ""))
            if value is not None:
                valid.append(span[-1])
            if len(valid) == config.batch_size:
                yield span, _features(client, valid, config)
                span, valid = [], []
    if span:
        yield span, _features(client, valid, config)


def _features(client, valid: list[Prediction], config: ScreenConfig) -> np.ndarray:
    """Features of the valid molecules; rows RDKit gives non-finite features become invalid."""
    if not valid:
        return np.zeros((0, *client.featurizer.shape), dtype=np.float32)
    X = client.featurize([p.smiles for p in valid])
    good = np.isfinite(X.reshape(len(X), -1)).all(1)
    for p in (p for p, ok in zip(valid, good) if not ok):
        p.error = "RDKit computed non-finite features; remove the row or pass --skip-invalid"
        if not config.skip_invalid:
            raise DataError(f"{config.library}: row {p.index} ({p.smiles!r}): {p.error}")
    return X[good]


def csv_lines(span: list[Prediction], task) -> str:
    """The lines of predictions.csv for a span of rows (see `columns`)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    width = len(columns(task)) - 3
    for p in span:
        smiles = " ".join(p.smiles.splitlines())  # one line per row, whatever the input held
        if p.error:
            cells = [""] * width
        elif task.is_multitask:
            cells = list(p.value.values())
        elif task.is_classification:
            cells = [p.label, *p.value]
        else:
            cells = [p.value]
        writer.writerow([p.index, smiles, *cells, " ".join(p.error.splitlines())])
    return buf.getvalue()


def resume_position(path: Path, header: list[str]) -> int:
    """The last library row in predictions.csv (0: none yet; the header is written if missing)."""
    last = drop_torn_line(path)
    if not last:
        append_durably(path, ",".join(header) + "\n")
        return 0
    if last.decode() == ",".join(header):
        return 0
    try:
        return int(next(csv.reader([last.decode()]))[0])
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: its last line is damaged ({last[:80]!r}); delete the directory or pass --restart"
        ) from exc


# ---------------------------------------------------------------- the screen


def run_screen(
    config: ScreenConfig, backend: PredictionBackend, on_progress: ProgressCallback | None = None
) -> dict:
    """Screen every library row once (resuming from DIR), then summarize and write the reports."""
    on_progress = on_progress or (lambda done, total, status: None)
    client = backend.client
    _check(config, backend)
    identity = {
        "library_sha256": sha256_file(config.library) if Path(config.library).is_file() else None,
        "smiles_col": config.smiles_col,
        "model": backend.identity(),
    }
    if identity["library_sha256"] is None:
        raise DataError(f"library file {str(config.library)!r} does not exist; check the --input path")
    state = RunState(
        Path(config.out),
        "screen.json",
        identity,
        ("predictions.csv", "invalid.csv"),
        config.restart,
        IDENTITY_NAMES,
        "a screen",
        ConfigError,
        STATE_FORMAT,
    )
    path = state.out / "predictions.csv"
    done = resume_position(path, columns(client.task))
    total, shown, count = scan(config, client.featurizer, done)
    if count:
        raise DataError(_invalid_message(config, shown, count))
    _score(state, backend, config, done, total, on_progress)
    return finish(state, backend, config, total)


def _check(config: ScreenConfig, backend: PredictionBackend) -> None:
    featurizer = backend.client.featurizer
    if featurizer.input_kind != "smiles":
        raise DataError(
            f"model {backend.name!r} reads {featurizer.input_kind} ({featurizer}), not SMILES; screen a "
            "SMILES model, or score tabular rows with `molcloak predict --input FILE.csv`"
        )
    if config.batch_size < 1:
        raise ConfigError(f"--batch-size {config.batch_size} must be at least 1")
    if hasattr(backend, "check_batch_size"):
        backend.check_batch_size(config.batch_size)
    if config.concurrency is not None and config.concurrency < 1:
        raise ConfigError(f"--concurrency {config.concurrency} must be at least 1 batch in flight")
    if config.top < 0:
        raise ConfigError(f"--top {config.top} must be 0 or more molecules")


def _score(state, backend, config: ScreenConfig, done: int, total: int, on_progress) -> None:
    client, path = backend.client, state.out / "predictions.csv"
    position = [done]
    on_progress(done, total, "")
    with state.session(lambda: f"{position[0]} of {total} library rows are screened") as session:
        if done >= total:
            return
        on_progress(done, total, "keys")
        keyinfo = backend.keygen()
        session.update(keygen_seconds=keyinfo.seconds, keys_reused=keyinfo.reused, invalid=0)
        concurrency = config.concurrency or backend.default_concurrency(config.batch_size)
        session["concurrency"], t0 = concurrency, time.perf_counter()
        label = lambda span: rows_label([p.index for p in span if not p.error])  # noqa: E731
        for span, runs in backend.run_batches(batches(config, client, done), concurrency, label):
            for p, r in zip([p for p in span if not p.error], runs):
                fill_prediction(p, client.task, client.predictions(r.raw)[0], r.raw)
            append_durably(path, csv_lines(span, client.task))
            position[0] = span[-1].index
            session["rows_scored"] += len(runs)
            session["invalid"] += len(span) - len(runs)
            rate = session["rows_scored"] / max(time.perf_counter() - t0, 1e-9)
            on_progress(position[0], total, f"{rate:.2f} mol/s")
