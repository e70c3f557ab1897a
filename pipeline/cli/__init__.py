"""`molcloak` command line: parsing and printing only; the work is in the layers below.

One module per command group registers its commands on the shared Typer `app`:
owner (train, compile, deploy), predict (predict, info, models), serve (serve, app),
audit, bench (bench, tune), demo. Nothing outside this package imports it.
"""

from __future__ import annotations

from . import (  # noqa: F401  (each registers its commands)
    audit,
    bench,
    demo,
    owner,
    predict,
    quiet,  # noqa: F401  (first: silences dependency noise before torch or concrete load)
    serve,
)
from .common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
