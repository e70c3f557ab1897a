"""Test helpers shared by several test files: a real `molcloak serve` process on loopback."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, bundles: Path, state: Path, token_file: Path | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "molcloak.pipeline.cli", "serve", "--bundles", str(bundles), "--port", str(self.port),
                "--state-dir", str(state), "--workers", "2"]
        if token_file:
            args += ["--token-file", str(token_file)]
        self.log = state.parent / f"server-{self.port}.log"
        self.proc = subprocess.Popen(args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError("server did not start: " + self.log.read_text()[-2000:])

    def alive(self) -> bool:
        return self.proc.poll() is None and httpx.get(f"{self.url}/health", timeout=10).status_code == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        """A crash: SIGKILL to the server and its FHE workers, no clean shutdown."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def write_csv(path: Path, header: list[str], rows) -> Path:
    """A CSV test fixture: `header`, then one line per row."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path
