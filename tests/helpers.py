"""Test helpers shared by several test files: a real `molcloak serve` process on loopback
(`molcloak.pipeline.serving.process`, with the tests' defaults) and CSV fixtures."""

from __future__ import annotations

import csv
from pathlib import Path

from molcloak.pipeline.serving import process
from molcloak.pipeline.serving.process import free_port

__all__ = ["ServerProcess", "free_port", "write_csv"]


class ServerProcess(process.ServerProcess):
    """Two FHE workers; the log is `<state>/../server-<port>.log`, appended to by a restart on the same port."""

    def __init__(
        self,
        bundles: Path,
        state: Path,
        token_file: Path | None = None,
        port: int | None = None,
        workers: int = 2,
        **kwargs,
    ):
        port = port or free_port()
        super().__init__(
            bundles,
            state,
            workers=workers,
            token_file=token_file,
            port=port,
            log=Path(state).parent / f"server-{port}.log",
            **kwargs,
        )

    @property
    def proc(self):
        return self.process


def write_csv(path: Path, header: list[str], rows) -> Path:
    """A CSV test fixture: `header`, then one line per row."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path
