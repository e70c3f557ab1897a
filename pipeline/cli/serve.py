"""Serving commands: serve (the FHE server over HTTP) and app (the browser demo)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import ConfigError
from .common import app, cli_errors, err, read_token


@app.command()
@cli_errors
def serve(
    bundles: Path = typer.Option(
        ..., "--bundles", help="Folder with one bundle directory per model (each with server/server.zip)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    workers: int = typer.Option(
        0,
        "--workers",
        help="FHE worker processes, or Ray actors (0 = one per core, or per CPU of the Ray cluster).",
    ),
    executor: str = typer.Option(
        "processes",
        "--executor",
        help="Where FHE jobs run: 'processes' (a pool on this machine) or 'ray' (Ray actors; a local Ray "
        'unless --ray-address; needs pip install "molcloak\\[ray]").',
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="With --executor ray: the Ray cluster to use, 'auto' (started here with `ray start --head`) or "
        "HOST:PORT of its head; default: start a local Ray.",
    ),
    ray_cpus: int = typer.Option(
        0,
        "--ray-cpus",
        help="With --executor ray and no --ray-address: CPUs of the local Ray (0 = every core).",
    ),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        help="Require 'Authorization: Bearer <token>' with a token from this file: one token per line, "
        "one per client (key quotas and prediction budgets then count per token).",
    ),
    state_dir: Path | None = typer.Option(
        None,
        "--state-dir",
        help="Where uploaded evaluation keys are kept (default <bundles>/.molcloak-server).",
    ),
    max_body_mb: int = typer.Option(128, "--max-body-mb", help="Largest accepted request body."),
    key_cache_mb: int = typer.Option(
        2048,
        "--key-cache-mb",
        help="Memory for loaded evaluation keys (LRU): shared by the worker processes, or per Ray actor.",
    ),
    queue_size: int = typer.Option(
        64, "--queue-size", help="FHE jobs waiting or running before the server answers 503."
    ),
    max_batch: int = typer.Option(
        64, "--max-batch", help="Most ciphertexts in one POST /predict (1-64); advertised in GET /models."
    ),
    job_timeout: float = typer.Option(
        300.0,
        "--job-timeout",
        help="Seconds one FHE job may run; a job over it gets its worker replaced and the request a 503.",
    ),
    max_key_storage_mb: float = typer.Option(
        4096, "--max-key-storage-mb", help="Disk for all uploaded evaluation keys together (507 past it)."
    ),
    max_keys_per_model: int = typer.Option(
        32,
        "--max-keys-per-model",
        help="Key sets stored per model (429 past it); per token and model when tokens are used.",
    ),
    key_ttl_hours: float = typer.Option(
        72.0,
        "--key-ttl-hours",
        help="Delete a key set unused for this long (0 = never); checked periodically.",
    ),
    max_predictions_per_key: int = typer.Option(
        0, "--max-predictions-per-key", help="Predictions one key id may make in all (0 = no budget)."
    ),
    max_predictions_per_token: int = typer.Option(
        0,
        "--max-predictions-per-token",
        help="Predictions one token may make in all, over all its key ids (0 = no budget).",
    ),
    rate: float = typer.Option(
        0.0, "--rate", help="Predictions per minute per key id (token bucket; 0 = no rate limit)."
    ),
    audit_token_file: Path | None = typer.Option(
        None,
        "--audit-token-file",
        help="Tokens (one per line) that may run aggregate-only audits and nothing else: 403 on per-molecule "
        "predictions, so an auditor cannot collect the model's outputs.",
    ),
    aggregate_epsilon: float = typer.Option(
        0.0,
        "--aggregate-epsilon",
        help="Noise the server adds to the counts of aggregate-only audits (differential privacy per chunk; "
        "0 = none, else 0.5-100: smaller is more private, noisier).",
    ),
):
    """Serve every bundle in --bundles over HTTP: the server holds evaluation keys and ciphertexts only.

    Example: molcloak serve --bundles demo --port 8000, then in another terminal
    molcloak predict --server http://127.0.0.1:8000 --model sol-low "CCO"
    """
    import os

    from ..aggregate import check_epsilon
    from ..serving.http_api import MAX_BATCH, ServeConfig
    from ..serving.http_api import serve as run_server
    from ..serving.quotas import Limits

    if not 1 <= max_batch <= MAX_BATCH:
        raise ConfigError(f"--max-batch {max_batch} is out of range; use 1..{MAX_BATCH}")
    _check_executor(executor, ray_address, ray_cpus, workers)
    if not job_timeout > 0:
        raise ConfigError(f"--job-timeout {job_timeout} must be a positive number of seconds")
    for flag, value, low in [
        ("--max-key-storage-mb", max_key_storage_mb, 1),
        ("--max-keys-per-model", max_keys_per_model, 1),
        ("--key-ttl-hours", key_ttl_hours, 0),
        ("--max-predictions-per-key", max_predictions_per_key, 0),
        ("--max-predictions-per-token", max_predictions_per_token, 0),
        ("--rate", rate, 0),
    ]:
        if not value >= low:  # also refuses NaN
            raise ConfigError(
                f"{flag} {value} is out of range; use a number >= {low}"
                + (" (0 = no limit)" if low == 0 else "")
            )
    tokens, audit_tokens = (
        tuple(line.strip() for line in (read_token(f) or "").splitlines() if line.strip())
        for f in (token_file, audit_token_file)
    )
    limits = Limits(
        max_key_bytes=int(max_key_storage_mb * 2**20),
        max_keys_per_model=max_keys_per_model,
        key_ttl_seconds=key_ttl_hours * 3600,
        max_predictions_per_key=max_predictions_per_key,
        max_predictions_per_token=max_predictions_per_token,
        rate_per_minute=rate,
    )

    config = ServeConfig(
        bundles=bundles,
        state_dir=state_dir,
        workers=workers or (0 if executor == "ray" else max(1, os.cpu_count() or 1)),
        queue_size=queue_size,
        max_body_bytes=max_body_mb * 2**20,
        key_cache_bytes=key_cache_mb * 2**20,
        tokens=tokens,
        max_batch=max_batch,
        job_timeout=job_timeout,
        limits=limits,
        executor=executor,
        ray_address=ray_address,
        ray_cpus=ray_cpus,
        audit_tokens=audit_tokens,
        aggregate_epsilon=aggregate_epsilon,
    )
    check_epsilon(aggregate_epsilon)
    if executor == "ray":
        cluster = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray"
        runs = f"{f'{workers} FHE actors' if workers else 'one FHE actor per CPU'} on {cluster}"
    else:
        runs = f"{config.workers} FHE workers"
    err.print(
        f"molcloak serve: bundles from {bundles}, {runs}, keys in {config.keys_dir}; "
        f"starting on http://{host}:{port}"
    )
    run_server(config, host, port)


def _check_executor(executor: str, ray_address: str | None, ray_cpus: int, workers: int) -> None:
    """Refuse bad executor options before anything starts (and a missing Ray, with how to install it)."""
    if executor not in ("processes", "ray"):
        raise ConfigError(f"--executor {executor!r} is unknown; use 'processes' or 'ray'")
    if executor != "ray" and (ray_address or ray_cpus):
        raise ConfigError("--ray-address and --ray-cpus apply to --executor ray only; add --executor ray")
    if ray_address and ray_cpus:
        raise ConfigError("--ray-cpus sizes a local Ray; a cluster given with --ray-address has its own CPUs")
    for flag, value in (("--ray-cpus", ray_cpus), ("--workers", workers)):
        if value < 0:
            raise ConfigError(f"{flag} {value} is out of range; use a number >= 0 (0 = one per core)")
    if executor == "ray":
        from ..serving.executor_ray import import_ray

        import_ray()  # without Ray: one line naming `pip install "molcloak[ray]"`


@app.command("app")
@cli_errors
def app_cmd(
    bundle: Path | None = typer.Option(
        None, "--bundle", help="A bundle, or a folder of bundles, to serve (default demo/bundle)."
    ),
    server: str | None = typer.Option(
        None, "--server", help="Use a running FHE server (molcloak serve) instead of starting one."
    ),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Bearer token for --server, in a file."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface the web page listens on."),
    port: int = typer.Option(7860, "--port", help="TCP port of the web page."),
    state_dir: Path | None = typer.Option(
        None,
        "--state-dir",
        help="Session keys and the server's state (default $MOLCLOAK_HOME/app, ~/.molcloak/app).",
    ),
    workers: int = typer.Option(
        0, "--workers", help="FHE workers of the server it starts (0 = one per core)."
    ),
    max_sessions: int = typer.Option(
        16, "--max-sessions", help="Browser sessions whose keys are kept; older ones are deleted."
    ),
    session_hours: float = typer.Option(
        24.0, "--session-hours", help="Delete a session's keys after this long unused."
    ),
    compare: bool = typer.Option(
        True,
        "--compare/--no-compare",
        help="Offer the owner's plaintext prediction next to the private one (needs the bundle's owner/ part).",
    ),
):
    """The browser demo: watch a private prediction step by step (keys, encrypt, FHE run, decrypt).

    Without --server it starts `molcloak serve` on loopback as a separate process; the app is the
    client (it keeps each browser session's secret key), the server only sees evaluation keys and
    ciphertexts. Example: molcloak app --bundle demo/bundle, then open http://127.0.0.1:7860
    """
    if bundle is not None and server is not None:
        raise ConfigError(
            "pass either --bundle (start a server for it) or --server URL (use a running one), not both"
        )
    from molcloak.app.launcher import DEFAULT_STATE, run_app

    run_app(
        bundle=bundle,
        server_url=server,
        token=read_token(token_file),
        host=host,
        port=port,
        state_dir=state_dir or DEFAULT_STATE,
        workers=workers or None,
        max_sessions=max_sessions,
        session_ttl_hours=session_hours,
        compare=compare,
        say=lambda m: err.print(m, highlight=False, soft_wrap=True),
    )
