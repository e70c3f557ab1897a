"""`molcloak demo`: the main job on bundled data, printed as a table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from ..metrics import describe
from ..tasks import TaskSpec
from .common import JsonOpt, app, cli_errors, emit_json, err, out, progress


@app.command()
@cli_errors
def demo(
    out_dir: Path = typer.Option(
        Path("demo"), "--out", "-o", help="Where the demo writes its checkpoint, bundle and keys."
    ),
    n: int = typer.Option(5, "--n", help="Number of test molecules to predict in FHE."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonOpt,
):
    """The whole story on sol-low: train, compile, deploy, keygen, encrypt, run, decrypt, compare.

    Writes demo/checkpoint, demo/bundle (the deployment bundle) and demo/keys (the client's keys).
    """
    from ..demo import run_demo

    result = run_demo(out_dir, n, seed, progress=progress, console=err)
    if as_json:
        return emit_json(result)
    print_demo(result, out)


def _short(task: dict, value) -> str:
    if task["kind"] == "binary":
        return f"{value[-1]:.3f}"
    return describe(TaskSpec.from_dict(task), np.asarray(value) if isinstance(value, list) else value)


def print_demo(result: dict, console) -> None:
    from rich.table import Table

    task = result["task"]
    head = f"p({task['labels'][-1]})" if task["kind"] == "binary" else "prediction"
    table = Table(
        title=f"molcloak demo: {task['name']}, {len(result['rows'])} test molecules, bundle {result['bundle']}"
    )
    for col in (
        "SMILES",
        "true",
        f"{head} float",
        f"{head} FHE-sim",
        f"{head} FHE",
        "FHE = sim",
        "enc ms",
        "run ms",
        "dec ms",
    ):
        table.add_column(col, overflow="fold")
    for r in result["rows"]:
        cells = [_short(task, r[k]) for k in ("float", "simulated", "fhe")]
        table.add_row(
            r["smiles"],
            r["true"],
            *cells,
            "yes" if r["fhe_equals_simulation"] else "NO",
            f"{r['encrypt_s'] * 1e3:.0f}",
            f"{r['run_s'] * 1e3:.0f}",
            f"{r['decrypt_s'] * 1e3:.0f}",
        )
    console.print(table)
    c, rows = result["circuit"], result["rows"]
    runs = sorted(r["run_s"] for r in rows)
    console.print(
        f"keygen {result['keygen_s']:.2f} s | evaluation keys {result['evaluation_key_bytes'] / 1e6:.1f} MB | "
        f"ciphertext in {rows[0]['input_ciphertext_bytes'] / 1e3:.1f} kB, out {rows[0]['output_ciphertext_bytes'] / 1e3:.1f} kB | "
        f"median FHE run {runs[len(runs) // 2] * 1e3:.0f} ms"
    )
    console.print(
        f"circuit: {c['pbs_count']} PBS, max bit width {c['max_bit_width']}, p_error {c['p_error']:.2g} per PBS; "
        f"features '{result['features']}', model {result['model']['config']}"
    )
    for key, m in result["metrics"].items():
        console.print(f"  {key:>13} on the {result['n_test']} test molecules: {_metrics_line(m)}")
    ex = dict(result["fhe_execute_metrics"])
    console.print(
        f"  {'fhe_execute':>13} on the {ex.pop('n_molecules')} molecules above: {_metrics_line(ex)}"
    )


def _metrics_line(m: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items())
