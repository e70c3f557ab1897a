"""Where an audit or explanation runs: a bundle in this process or a `molcloak serve` server."""

from __future__ import annotations

from pathlib import Path

from molcloak.pipeline.errors import DataError
from molcloak.pipeline.predict import LocalBackend, PredictionBackend


def open_backend(bundle=None, server=None, model=None, key_dir=None, token=None) -> PredictionBackend:
    """The model to audit: a bundle in this process (`LocalBackend`) or a served model (`RemoteModel`)."""
    if (bundle is None) == (server is None):
        raise DataError("pass either --bundle DIR (local audit) or --server URL --model NAME (remote audit)")
    if bundle is not None:
        return LocalBackend(bundle, key_dir)
    if not model:
        raise DataError("--server needs --model NAME; list the served models with GET /models")
    from molcloak.pipeline.serving.http_client import RemoteModel

    return RemoteModel(server, model, key_dir, token)


def with_model(run, write, out, bundle=None, server=None, model=None, key_dir=None, token=None) -> dict:
    """Open the model (`open_backend`), `run(backend)` -> result dict, then `write(result, out)` -> its files."""
    with open_backend(bundle, server, model, key_dir, token) as backend:
        result = run(backend)
    result["files"] = write(result, Path(out))
    return result
