"""`molcloak app`: start (or reach) the FHE server, then serve the Gradio page.

Without `--server`, the FHE server runs as a separate process (`molcloak serve` on loopback,
protected by a random bearer token), so the app talks to it over HTTP exactly as it would to a
remote deployment: the app process holds the secret keys, the server process never sees them.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

from molcloak.pipeline.errors import BundleError
from molcloak.pipeline.files import molcloak_home, write_private
from molcloak.pipeline.serving.process import ServerProcess, free_port

__all__ = ["DEFAULT_BUNDLE", "DEFAULT_STATE", "ServerProcess", "free_port", "run_app", "start_server"]

DEFAULT_BUNDLE = Path("demo/bundle")
DEFAULT_STATE = molcloak_home() / "app"


def start_server(
    bundles: Path, state_dir: Path, workers: int | None = None, timeout: float = 180.0
) -> ServerProcess:
    """Start `molcloak serve` for `bundles`, protected by a new random token (`<state_dir>/server-token`,
    mode 0600; `.token` of the result), and wait until /health answers. Log: `<state_dir>/server.log`."""
    from molcloak.pipeline.serving.http_api import find_bundles

    find_bundles(Path(bundles))  # a clear error now rather than a dead child later
    state_dir = Path(state_dir)
    token_file = write_private(
        state_dir / "server-token", secrets.token_urlsafe(24).encode(), private_dir=False
    )
    log = state_dir / "server.log"
    log.write_bytes(b"")  # this run's log only
    return ServerProcess(
        bundles, state_dir / "server", workers=workers, token_file=token_file, log=log, timeout=timeout
    )


def run_app(
    bundle: Path | None = None,
    server_url: str | None = None,
    token: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    state_dir: Path = DEFAULT_STATE,
    workers: int | None = None,
    max_sessions: int = 16,
    session_ttl_hours: float = 24.0,
    compare: bool = True,
    say=print,
) -> None:
    """Blocking: run until Ctrl-C, then stop the server child and remove this run's session keys."""
    from molcloak.pipeline.serving.http_api import find_bundles

    from .backend import AppBackend
    from .ui import CSS, build_ui

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server child and cleans up like Ctrl-C
    child = None
    bundles: dict[str, Path] = {}
    if server_url is None:
        bundle = Path(bundle or DEFAULT_BUNDLE)
        if not bundle.exists():
            raise BundleError(
                f"no bundle at {str(bundle)!r}; run `molcloak demo` first, or pass --bundle DIR "
                "or --server URL"
            )
        if compare:
            bundles = {name: path for name, (path, _) in find_bundles(bundle).items()}
        say(f"starting the FHE server for {bundle} (a separate process: it never sees your secret keys)...")
        child = start_server(bundle, Path(state_dir), workers)
        server_url, token = child.url, child.token
    try:
        backend = AppBackend(
            server_url,
            state_dir,
            token=token,
            bundles=bundles,
            max_sessions=max_sessions,
            session_ttl_s=session_ttl_hours * 3600,
        )
        ui = build_ui(backend)
        ui.queue(default_concurrency_limit=4)
        ui.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            ssr_mode=False,
            quiet=True,
            show_error=True,
            footer_links=[],
            css=CSS,
            allowed_paths=[str(backend.sessions_dir)],  # the batch tab's predictions CSV, per session
        )
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
