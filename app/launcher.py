"""`molcloak app`: start (or reach) the FHE server, then serve the Gradio page.

Without `--server`, the FHE server runs as a separate process (`molcloak serve` on loopback,
protected by a random bearer token), so the app talks to it over HTTP exactly as it would to a
remote deployment: the app process holds the secret keys, the server process never sees them.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from molcloak.pipeline.errors import BundleError, RemoteError
from molcloak.pipeline.files import molcloak_home

DEFAULT_BUNDLE = Path("demo/bundle")
DEFAULT_STATE = molcloak_home() / "app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A `molcloak serve` child process on loopback."""

    url: str
    token: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_server(bundles: Path, state_dir: Path, workers: int | None = None, timeout: float = 180.0) -> ServerProcess:
    """Start `molcloak serve` for `bundles` and wait until /health answers."""
    from molcloak.pipeline.serving.http_api import find_bundles

    find_bundles(Path(bundles))  # a clear error now rather than a dead child later
    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    token_file = state_dir / "server-token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    port = free_port()
    cmd = [sys.executable, "-m", "molcloak.pipeline.cli", "serve", "--bundles", str(bundles), "--host", "127.0.0.1",
           "--port", str(port), "--state-dir", str(state_dir / "server"), "--token-file", str(token_file)]
    if workers:
        cmd += ["--workers", str(workers)]
    log = state_dir / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", token, proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RemoteError(f"the FHE server exited with code {proc.returncode}: {' | '.join(tail)} (log: {log})")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).is_success:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RemoteError(f"the FHE server did not answer /health within {timeout:.0f} s (log: {log})")


def run_app(bundle: Path | None = None, server_url: str | None = None, token: str | None = None,
            host: str = "127.0.0.1", port: int = 7860, state_dir: Path = DEFAULT_STATE, workers: int | None = None,
            max_sessions: int = 16, session_ttl_hours: float = 24.0, compare: bool = True, say=print) -> None:
    """Blocking: run until Ctrl-C, then stop the server child and remove this run's session keys."""
    from molcloak.pipeline.serving.http_api import find_bundles

    from .backend import AppBackend
    from .ui import build_ui

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server child and cleans up like Ctrl-C
    child = None
    bundles: dict[str, Path] = {}
    if server_url is None:
        bundle = Path(bundle or DEFAULT_BUNDLE)
        if not bundle.exists():
            raise BundleError(f"no bundle at {str(bundle)!r}; run `molcloak demo` first, or pass --bundle DIR "
                              "or --server URL")
        if compare:
            bundles = {name: path for name, (path, _) in find_bundles(bundle).items()}
        say(f"starting the FHE server for {bundle} (a separate process: it never sees your secret keys)...")
        child = start_server(bundle, Path(state_dir), workers)
        server_url, token = child.url, child.token
    try:
        backend = AppBackend(server_url, state_dir, token=token, bundles=bundles, max_sessions=max_sessions,
                             session_ttl_s=session_ttl_hours * 3600)
        ui = build_ui(backend)
        ui.queue(default_concurrency_limit=4)
        ui.launch(server_name=host, server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True,
                  show_error=True, footer_links=[])
        say(f"molcloak app running at http://{host}:{port}  (FHE server {server_url}; Ctrl-C to stop)")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            ui.close()
            backend.close()
    finally:
        if child is not None:
            child.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
