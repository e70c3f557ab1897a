"""`molcloak` command line: parsing and printing only; the work is in the layers below.

One module per command group registers its commands on the shared Typer `app`:
owner (train, compile, deploy), predict (predict, screen, info, models), keys (keys list/rotate/delete),
serve (serve, app), audit (audit, explain), bench (bench, tune), demo, fit. Nothing outside this package
imports it.
"""

from __future__ import annotations

import os
import sys

# isort: off
from .. import quiet  # noqa: F401  (first: silences dependency noise before torch or concrete load)
from . import demo, fit, owner, predict, keys, serve, audit, bench  # noqa: F401  (registration order = --help order)

# isort: on
from .common import app


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code:  # Concrete's exit hook ends a process that compiled or simulated with status 0: exit now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise


__all__ = ["app", "main"]
