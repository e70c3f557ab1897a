"""`molcloak keys list | rotate | delete`: the client's key sets (secret and evaluation keys) per model."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from ..errors import KeysError
from .common import JsonOpt, KeyDirOpt, app, cli_errors, emit_json, mb, out

keys_app = typer.Typer(
    help=(
        "The client's key sets: one per model (and client part) in the key directory, each with its secret "
        "key, its evaluation keys, when it was made and how many predictions it has decrypted. A key set is "
        "replaced automatically after `molcloak predict --rotate-after-predictions` predictions (default "
        "10000) or `--rotate-after-days` days (default 30); `rotate` replaces it now."
    ),
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


def _age(created: float) -> str:
    days = (time.time() - created) / 86400
    return f"{days:.1f} d" if days >= 1 else f"{days * 24:.1f} h"


def _select(key_dir: Path | None, model: str, fingerprint: str | None = None):
    from ..fhe_client import DEFAULT_KEY_DIR, key_sets

    root = Path(key_dir or DEFAULT_KEY_DIR)
    every = key_sets(root)
    found = [k for k in every if k.model == model and (fingerprint is None or k.fingerprint == fingerprint)]
    if not found:
        known = sorted({f"{k.model} ({k.fingerprint})" if fingerprint else k.model for k in every})
        what = f"model {model!r}" + (f" with client fingerprint {fingerprint!r}" if fingerprint else "")
        raise KeysError(
            f"no key sets of {what} in {root}; "
            + (f"key sets there: {', '.join(known)}" if known else "it holds none")
            + " (see `molcloak keys list`; pass --key-dir for another key directory)"
        )
    return found


@keys_app.command("list")
@cli_errors
def list_keys(
    model: str | None = typer.Argument(None, help="Only this model's key sets."),
    key_dir: Path | None = KeyDirOpt,
    as_json: bool = JsonOpt,
):
    """List the key sets per model: key id, creation time, predictions decrypted, rotation limits."""
    from ..fhe_client import DEFAULT_KEY_DIR, key_sets

    sets = _select(key_dir, model) if model else key_sets(key_dir)
    if as_json:
        return emit_json([{**k.to_dict(), "directory": str(k.directory), "due": k.due()} for k in sets])
    if not sets:
        out.print(f"no key sets in {Path(key_dir or DEFAULT_KEY_DIR)}")
        return
    table = Table(title=f"key sets in {Path(key_dir or DEFAULT_KEY_DIR)}")
    # the model and key id stay whole on a narrow terminal (other columns wrap): they are what a user copies
    widest = {"model": max(len(k.model) for k in sets), "key id": max(len(k.key_id or "-") for k in sets)}
    for col in (
        "model",
        "client part",
        "key id",
        "created (UTC)",
        "age",
        "predictions",
        "rotate after",
        "keys",
    ):
        table.add_column(col, no_wrap=col in widest, min_width=widest.get(col))
    for k in sets:
        d = k.to_dict()
        count = "unknown" if k.predictions is None else str(k.predictions)
        limits = f"{k.policy.after_predictions} predictions / {k.policy.after_days:g} d"
        size = mb(k.evaluation_key_bytes) if k.evaluation_key_bytes else "-"
        due = k.due()
        table.add_row(
            k.model,
            k.fingerprint,
            k.key_id or "-",
            d["created_utc"],
            _age(k.created),
            count,
            limits + (" [yellow](due: rotated at next use)[/yellow]" if due else ""),
            size,
        )
    out.print(table)


@keys_app.command()
@cli_errors
def rotate(
    model: str = typer.Argument(..., help="Model whose key sets get a new secret key and evaluation keys."),
    key_dir: Path | None = KeyDirOpt,
    bundle: Path | None = typer.Option(
        None,
        "--bundle",
        "-b",
        help="Bundle (or client part) to make the keys from, when the one recorded with the keys is gone.",
    ),
    as_json: bool = JsonOpt,
):
    """Replace a model's keys now: a new secret key and new evaluation keys; the old ones are deleted.

    A server gets the new evaluation keys as a new key upload at the next prediction."""
    from ..fhe_client import PrivateClient

    done = []
    for k in _select(key_dir, model):
        source = _client_part(k, bundle)
        if source is None:
            raise KeysError(
                f"cannot find the client part of {k.model}'s key set {k.directory.name} (recorded: "
                f"{k.client_dir or 'none'}); pass --bundle with the bundle it was made for, or delete the "
                f"keys with `molcloak keys delete {k.model}`"
            )
        client = PrivateClient(source, k.directory.parent)
        old = k.key_id
        info = client.rotate()
        done.append({"model": k.model, "client_fingerprint": k.fingerprint, "old_key_id": old, **_info(info)})
    if as_json:
        return emit_json(done)
    for d in done:
        out.print(
            f"{d['model']} ({d['client_fingerprint']}): key set {d['old_key_id'] or '-'} replaced by "
            f"{d['key_id']} (keygen {d['seconds']:.2f} s, evaluation keys {mb(d['evaluation_key_bytes'])})"
        )


def _client_part(k, bundle: Path | None) -> Path | None:
    """The client part key set `k` was made for: --bundle, the directory recorded with the keys, or the
    client part `molcloak predict --server` downloaded next to the key directory; the first whose
    client.zip has the key set's fingerprint."""
    from ..bundle import client_fingerprint, part_dir

    for candidate in (bundle, k.client_dir, k.directory.parent.parent / "clients" / k.directory.name):
        if candidate is None:
            continue
        where = part_dir(candidate, "client")
        if (where / "client.zip").is_file() and client_fingerprint(where) == k.fingerprint:
            return where
    return None


def _info(info) -> dict:
    return {
        "key_id": info.key_id,
        "seconds": info.seconds,
        "evaluation_key_bytes": info.evaluation_key_bytes,
    }


@keys_app.command()
@cli_errors
def delete(
    model: str = typer.Argument(..., help="Model whose key sets are deleted."),
    key_dir: Path | None = KeyDirOpt,
    fingerprint: str | None = typer.Option(
        None, "--fingerprint", help="Only the key set of this client part (see `molcloak keys list`)."
    ),
    as_json: bool = JsonOpt,
):
    """Delete a model's key sets: secret key, evaluation keys, counts and the key ids servers gave them.

    The next prediction makes new keys. Evaluation keys a server holds stay there until it expires them."""
    from ..fhe_client import delete_key_set

    removed = []
    for k in _select(key_dir, model, fingerprint):
        delete_key_set(k)
        removed.append({"model": k.model, "client_fingerprint": k.fingerprint, "key_id": k.key_id})
    if as_json:
        return emit_json(removed)
    for d in removed:
        out.print(
            f"deleted {d['model']}'s key set {d['key_id'] or '-'} (client part {d['client_fingerprint']})"
        )
