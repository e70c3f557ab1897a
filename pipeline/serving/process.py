"""The one routine that starts a `molcloak serve` process on loopback and waits until it answers.

Used by the app (`molcloak app` starts its FHE server as a child), the load check and the tests:

    with ServerProcess(bundles, state_dir, workers=2, token_file=token) as server:
        RemoteModel(server.url, "sol-low", token=server.token).predict(["CCO"])

The server runs in its own session (process group), logs to a file, and is waited for with a
deadline: if it exits or does not answer GET /health in time, `RemoteError` says so with the tail of
its log, and nothing is left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import httpx

from ..errors import RemoteError

HOST = "127.0.0.1"
START_TIMEOUT = 180.0
LOG_TAIL_LINES = 4


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`molcloak serve` as a child process on loopback, started and waited for on construction.

    `bundles`, `state_dir` (evaluation keys), `workers` (None: the server's default, one per core),
    `token_file` (bearer token the server requires; its content is `token`), `port` (None: a free one),
    `log` (stdout and stderr, appended; default `<state_dir>.log`), `extra_args` (more `serve` options),
    `timeout` (seconds to wait for GET /health), `preexec_fn` (run in the child before `serve` starts,
    e.g. to set resource limits).
    """

    def __init__(
        self,
        bundles: str | Path,
        state_dir: str | Path,
        *,
        workers: int | None = None,
        token_file: str | Path | None = None,
        port: int | None = None,
        log: str | Path | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = START_TIMEOUT,
        preexec_fn: Callable[[], None] | None = None,
    ):
        self.bundles, self.state_dir = Path(bundles), Path(state_dir)
        self.token_file = Path(token_file) if token_file else None
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = Path(log) if log else self.state_dir.with_name(f"{self.state_dir.name}.log")
        cmd = [
            sys.executable,
            "-m",
            "molcloak.pipeline.cli",
            "serve",
            "--bundles",
            str(self.bundles),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
        ]
        if workers:
            cmd += ["--workers", str(workers)]
        if self.token_file:
            cmd += ["--token-file", str(self.token_file)]
        self.command = [*cmd, *map(str, extra_args)]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as fh:  # the child keeps its own descriptor
            self._log_start = fh.tell()  # this run's part of the log (a restart appends to it)
            self.process = subprocess.Popen(
                self.command,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )
        self._wait_healthy(timeout)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def token(self) -> str | None:
        """The bearer token clients must send (the content of `token_file`), or None."""
        return self.token_file.read_text().strip() if self.token_file else None

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self._kill_group()  # FHE workers it may have started
                raise RemoteError(
                    f"the FHE server exited with status {self.process.returncode} before answering "
                    f"{self.url}/health: {self.log_tail()} (command: {' '.join(self.command[1:])}; "
                    f"log: {self.log}); fix the error above and start it again"
                )
            if self._healthy():
                return
            if time.monotonic() >= deadline:
                self._kill_group()
                raise RemoteError(
                    f"the FHE server did not answer {self.url}/health within {timeout:g} s and was "
                    f"stopped; last log lines: {self.log_tail() or '(none)'} (log: {self.log}); "
                    "allow more time if its models are large, or read the log"
                )
            time.sleep(0.25)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines this run wrote to its log, on one line (' | ' between lines)."""
        try:
            with self.log.open("rb") as fh:
                fh.seek(self._log_start)
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())

    def alive(self) -> bool:
        """The process is running and answers GET /health."""
        return self.process.poll() is None and self._healthy()

    def stop(self, timeout: float = 30.0) -> None:
        """Clean shutdown: SIGTERM to the server, which stops its FHE workers itself; if it has not
        exited after `timeout` seconds, SIGKILL to its whole process group."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """A crash: SIGKILL to the server and its FHE workers (its process group), no clean shutdown."""
        if self.process.poll() is None:
            self._kill_group()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already
        self.process.wait(30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
