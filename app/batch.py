"""The batch tab: a CSV file of SMILES (or a tabular model's rows) -> a table of private predictions.

The work is `AppBackend.batch`, i.e. `PredictionBackend.predict` of the session's `RemoteModel`: the
same code as `molcloak predict --server URL --model NAME --input file.csv`, with this session's keys.
The predictions CSV is written in the session's folder (deleted with the session) for download.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from molcloak.pipeline.errors import DataError
from molcloak.pipeline.inputs import output_rows, read_inputs, write_csv

from .guard import _guard, _session

MAX_ROWS = 1000  # one browser request; larger screens belong to `molcloak predict --server` or `screen`

HELP = """Upload a CSV file with a column of SMILES (or, for a tabular model, its feature columns).
Each row is featurized and encrypted here, run in FHE on the server and decrypted here, with your
session's keys: the same code as `molcloak predict --server URL --model NAME --input file.csv`.
Rows that cannot be read are reported with their row number; the others are still predicted."""


def run_batch(backend, session_id: str, name: str, path, column: str, on_progress=None):
    """(status markdown, result rows, path of the predictions CSV) for the uploaded file at `path`."""
    if not path:
        raise DataError(
            "no file uploaded; choose a CSV file with a column of SMILES (or the model's columns)"
        )
    inputs = read_inputs(backend.featurizer(name), None, Path(path), (column or "smiles").strip())
    if len(inputs) > MAX_ROWS:
        raise DataError(
            f"{Path(path).name} has {len(inputs)} rows; the app predicts at most {MAX_ROWS} per file: split it, "
            f"or use `molcloak predict --server {backend.server_url} --model {name} --input FILE`"
        )
    done = [0]

    def on_item(pred):
        done[0] += 1
        if on_progress:
            on_progress(done[0], len(inputs))

    had_keys = backend.keys_of(session_id, name) is not None
    report = backend.batch(session_id, name, inputs, on_item=on_item)
    out = backend.session(session_id).directory / f"predictions-{name}.csv"
    write_csv(out, report)
    bad = sum(1 for p in report.predictions if p.error)
    reused = had_keys or report.keys_reused
    keys = "of this session (reused)" if reused else f"generated in {report.keygen_seconds:.2f} s"
    status = (
        f"**{len(inputs) - bad} of {len(inputs)} rows predicted privately** with model **{name}**"
        + (f"; {bad} could not be read (see the error column)" if bad else "")
        + f". Keys {keys}; evaluation keys {report.evaluation_key_bytes / 1e6:.1f} MB; ciphertexts "
        f"{report.input_ciphertext_bytes:,} B in, {report.output_ciphertext_bytes:,} B out per row."
    )
    return status, output_rows(report), out


def batch_tab(backend, model) -> None:
    """The tab's components and its callback (inside a `gr.Tab`)."""
    gr.Markdown(HELP)
    with gr.Row(equal_height=False):
        upload = gr.File(label="CSV file", file_types=[".csv"], elem_id="batch-file", min_width=280)
        with gr.Column(min_width=240):
            column = gr.Textbox("smiles", label="SMILES column (molecule models)", elem_id="batch-col")
            button = gr.Button("Predict the file privately", variant="primary", elem_id="batch-btn")
    status = gr.Markdown(elem_id="batch-status")
    table = gr.Dataframe(
        label="Private predictions", interactive=False, elem_id="batch-table", max_height=420
    )
    download = gr.File(label="Download the predictions (CSV)", interactive=False, elem_id="batch-download")

    @_guard
    def on_batch(name, path, col, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        progress(0, desc="keys")
        text, rows, out = run_batch(
            backend,
            _session(request),
            name,
            path,
            col,
            lambda i, n: progress(i / n, desc=f"{i} of {n} rows predicted privately"),
        )
        import pandas as pd

        return text, pd.DataFrame(rows), str(out)

    button.click(on_batch, [model, upload, column], [status, table, download])
