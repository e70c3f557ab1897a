"""The FHE prediction server: FastAPI around the server half. It only ever holds evaluation keys
and ciphertexts; it never receives a secret key, a SMILES string, features or a plaintext result.

Endpoints: GET /health, GET /models, GET /models/{name}/client, POST /keys?model=NAME,
DELETE /keys/{key_id}, POST /predict. Errors are JSON: {"error": {"type": ..., "message": ...}}.
Key storage quotas, key expiry, prediction budgets and the rate limit: `quotas.py` (429/507); schemas and
the status of each error: `schemas.py`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import secrets
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from ..aggregate import check_epsilon
from ..bundle import Manifest, client_fingerprint, load_manifest
from ..errors import (
    BodyTooLargeError,
    BundleError,
    CiphertextError,
    ConfigError,
    JobTimeoutError,
    KeysRevokedError,
    MolcloakError,
    UnknownModelError,
    WorkerCrashError,
)
from ..files import fixed_zip
from .aggregate_api import add_aggregate_routes, check_audit_only, find_programs
from .executor import FheExecutor, WorkerPool
from .guards import BodyLimit, CiphertextShape, validation_message
from .keystore import KeyStore
from .quotas import Limits, Quotas, token_owner
from .schemas import (  # noqa: F401  (status_of, ErrorResponse: part of this module's interface)
    ERRORS,
    MAX_BATCH,
    ErrorResponse,
    KeyUploaded,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    error,
    status_of,
)


@dataclass(frozen=True)
class ServeConfig:
    bundles: Path
    state_dir: Path | None = None  # default <bundles>/.molcloak-server
    workers: int = max(1, os.cpu_count() or 1)
    queue_size: int = 64
    max_body_bytes: int = 128 * 2**20
    key_cache_bytes: int = 2 * 2**30
    token: str | None = None
    max_batch: int = MAX_BATCH  # ciphertexts per POST /predict, 1..MAX_BATCH
    job_timeout: float = 300.0  # seconds one FHE job may run before its worker is replaced
    tokens: tuple[str, ...] = ()  # more bearer tokens (one per client: quotas and budgets count per token)
    limits: Limits = Limits()
    executor: str = "processes"  # or "ray": FHE jobs on Ray actors (executor_ray.py)
    ray_address: str | None = None  # None: a local Ray; "auto" or host:port: an existing cluster
    ray_cpus: int = 0  # CPUs of a local Ray (0: every core)
    aggregate_epsilon: float = 0.0  # noise of aggregate-only audits (aggregate.draw_noise); 0: none
    audit_tokens: tuple[str, ...] = ()  # tokens that may run aggregate-only audits and nothing else

    @property
    def batch_limit(self) -> int:
        """Ciphertexts one POST /predict may carry: --max-batch, and never more than the job queue holds
        (a larger batch could only ever be answered 503)."""
        return min(self.max_batch, self.queue_size)

    @property
    def all_tokens(self) -> tuple[str, ...]:
        given = (*((self.token,) if self.token else ()), *self.tokens, *self.audit_tokens)
        return tuple(dict.fromkeys(given))

    @property
    def keys_dir(self) -> Path:
        return (self.state_dir or self.bundles / ".molcloak-server") / "keys"

    @property
    def shapes_dir(self) -> Path:
        return (self.state_dir or self.bundles / ".molcloak-server") / "ciphertexts"

    @property
    def usage_path(self) -> Path:
        return (self.state_dir or self.bundles / ".molcloak-server") / "token-usage.json"


def make_executor(
    kind: str,
    bundles: dict[str, Path],
    key_root: Path,
    *,
    workers: int,
    queue_size: int,
    cache_bytes: int,
    job_timeout: float,
    ray_address: str | None = None,
    ray_cpus: int = 0,
) -> FheExecutor:
    """The executor `kind` ("processes" or "ray") over the served `bundles` and the key store at `key_root`.

    processes: `workers` processes (0: one per core) sharing `cache_bytes` of loaded keys; ray: `workers`
    actors (0: one per CPU of the Ray cluster at `ray_address`, or of a local Ray with `ray_cpus` CPUs),
    each with `cache_bytes` of loaded keys."""
    if kind == "ray":
        from .executor_ray import RayPool  # only with --executor ray: Ray is an optional extra

        return RayPool(
            bundles, key_root, workers, queue_size, cache_bytes, job_timeout, ray_address, ray_cpus
        )
    if kind != "processes":
        raise ConfigError(f"executor {kind!r} is unknown; use 'processes' or 'ray'")
    workers = workers or max(1, os.cpu_count() or 1)
    return WorkerPool(bundles, key_root, workers, queue_size, cache_bytes, job_timeout)


def find_bundles(root: Path) -> dict[str, tuple[Path, Manifest]]:
    """Every subdirectory of `root` with a server part, by model name (or `root` itself if it is a bundle)."""
    if not root.is_dir():
        raise BundleError(
            f"bundles directory {str(root)!r} does not exist; point --bundles at a folder of bundles"
        )
    found = {}
    dirs = (
        [root]
        if (root / "server" / "server.zip").is_file()
        else sorted(p for p in root.iterdir() if p.is_dir())
    )
    for d in (p for p in dirs if (p / "server" / "server.zip").is_file()):
        m = load_manifest(d, "server")
        found[m.name] = (d, m)
    if not found:
        raise BundleError(
            f"no bundle found in {root}; each model needs <dir>/server/server.zip (from `molcloak deploy`)"
        )
    return found


# ---------------------------------------------------------------- app


def create_app(config: ServeConfig) -> FastAPI:
    models = find_bundles(config.bundles)
    check_epsilon(config.aggregate_epsilon)
    client_zips = {name: _client_zip(d) for name, (d, _) in models.items()}
    fingerprints = {
        name: client_fingerprint(d) for name, (d, _) in models.items()
    }  # the value clients compute
    programs = find_programs(models, fingerprints)  # aggregate-only audit programs, as "<model>:aggregate"
    config.keys_dir.mkdir(parents=True, exist_ok=True)
    store = KeyStore(config.keys_dir, 0, load=lambda m, d: None, cost=lambda m: 0)  # metadata only
    swept = store.sweep()  # what a failed or interrupted key write left behind
    if swept:
        print(f"molcloak serve: removed {len(swept)} leftover key files: {', '.join(swept)}", file=sys.stderr)
    quotas = Quotas(store, config.limits, config.usage_path)
    expired = quotas.collect()  # key sets unused for longer than --key-ttl-hours
    if expired:
        print(f"molcloak serve: removed {len(expired)} expired key sets", file=sys.stderr)
    owners = {token: token_owner(token) for token in config.all_tokens}
    audit_owners = {token_owner(token) for token in config.audit_tokens}
    pool = make_executor(
        config.executor,
        {**{n: d for n, (d, _) in models.items()}, **{n: d for n, (d, _) in programs.items()}},
        config.keys_dir,
        workers=config.workers,
        queue_size=config.queue_size,
        cache_bytes=config.key_cache_bytes,
        job_timeout=config.job_timeout,
        ray_address=config.ray_address,
        ray_cpus=config.ray_cpus,
    )
    shapes: dict[str, CiphertextShape] = {}  # filled by `measure_ciphertexts` before serving

    async def collect_garbage() -> None:
        while True:
            await asyncio.sleep(config.limits.gc_interval)
            try:
                removed = quotas.collect()
            except OSError as exc:  # a transient disk error: try again next time
                print(f"molcloak serve: key expiry failed ({exc}); retrying later", file=sys.stderr)
                continue
            if removed:
                print(f"molcloak serve: removed {len(removed)} expired key sets", file=sys.stderr)

    @asynccontextmanager
    async def lifespan(_app):
        collector = asyncio.create_task(collect_garbage())
        yield
        collector.cancel()
        pool.shutdown()

    app = FastAPI(
        title="molcloak FHE server",
        version="1",
        lifespan=lifespan,
        description="Encrypted molecular property prediction. The server sees evaluation keys and ciphertexts only.",
    )
    app.state.pool = pool
    app.state.quotas = quotas
    app.state.measure_ciphertexts = lambda: shapes.update(_measure_ciphertexts(config, pool, fingerprints))
    # inside the token and content-type guard below: counts the bytes of every body as they arrive
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    def model_or_404(name: str) -> Manifest:
        if name not in models:
            raise UnknownModelError(f"model {name!r} is not served here; available: {', '.join(models)}")
        return models[name][1]

    @app.exception_handler(MolcloakError)
    async def molcloak_error(_request, exc: MolcloakError):
        status = status_of(exc)
        headers = {"Retry-After": "2"} if status == 503 else getattr(exc, "headers", None)
        return error(status, type(exc).__name__, str(exc), headers or None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        return error(422, "RequestValidationError", validation_message(exc.errors()))

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        return error(
            500, "InternalError", f"unexpected server error ({type(exc).__name__}); the server keeps running"
        )

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path, method = request.url.path, request.method
        request.state.owner = _owner(request, owners)  # None: no or wrong token, or a server without
        if owners and path != "/health" and request.state.owner is None:
            return error(401, "Unauthorized", "missing or wrong token; send 'Authorization: Bearer <token>'")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        expected = {
            ("POST", "/predict"): "application/json",
            ("POST", "/keys"): "application/octet-stream",
            ("POST", "/aggregate"): "application/json",
        }.get((method, path))
        if expected and ctype != expected:
            return error(
                415,
                "UnsupportedMediaType",
                f"{method} {path} takes {expected}, got {ctype or 'no content type'!r}",
            )
        return await call_next(request)

    @app.get("/health")
    async def health(request: Request) -> dict:
        """Status for anyone; the figures only for token holders when the server has tokens."""
        if owners and request.state.owner is None:
            return {"status": "ok"}
        return {
            "status": "ok",
            "models": list(models),
            "aggregate_programs": list(programs),
            **pool.figures(),
            "max_batch": config.batch_limit,
            "keys": quotas.figures(),
        }

    @app.get("/models", response_model=list[ModelInfo])
    async def list_models():
        return [
            _model_info(name, m, fingerprints[name], config.batch_limit) for name, (_, m) in models.items()
        ]

    @app.get(
        "/models/{name}/client",
        responses={404: ERRORS[404]},
        response_class=Response,
        summary="The client part of a bundle (zip): quantizers, crypto parameters, manifest; no weights",
    )
    async def client_part(name: str):
        model_or_404(name)
        return Response(
            client_zips[name],
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}-client.zip"'},
        )

    @app.post(
        "/keys",
        status_code=201,
        response_model=KeyUploaded,
        responses={k: ERRORS[k] for k in (400, 404, 413, 415, 429, 503, 507)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload_keys(
        request: Request,
        model: str = Query(..., description="model (or NAME:aggregate program) the keys were generated for"),
    ):
        owner = request.state.owner
        if model in programs:
            circuit, sample = programs[model][1].circuit, b""  # an empty job: deserialize only
        else:
            check_audit_only(owner, audit_owners, f"keys for model {model!r} itself")
            circuit, sample = model_or_404(model).circuit, None
        expected = circuit.get("serialized_evaluation_key_bytes")
        if expected:  # quotas first: a refused upload is not read
            quotas.reserve(model, expected, owner)()
        data = await _read_capped(request, config.max_body_bytes)
        if not data:
            raise CiphertextError("the body is empty; send the serialized evaluation keys")
        if expected and len(data) != expected:
            raise CiphertextError(
                f"evaluation keys have {len(data)} bytes, model {model!r} expects {expected}; "
                "were they generated with this model's client part?"
            )
        release = quotas.reserve(model, len(data), owner)  # again: other uploads may have come meanwhile
        try:  # 10s of MB + fsync: off the event loop
            key_id = await asyncio.to_thread(store.put, model, data, owner)
        finally:
            release()
        try:  # run the circuit once with the keys, in a worker: a crash there only rejects these keys
            await pool.check_keys(model, key_id, shapes[model].sample if sample is None else sample)
        except (WorkerCrashError, JobTimeoutError) as exc:
            store.delete(key_id)
            what = "crashed the FHE worker" if isinstance(exc, WorkerCrashError) else "stalled the circuit"
            raise CiphertextError(
                f"these evaluation keys {what} when the server ran model {model!r} with them once, and were "
                "refused; generate new keys with this model's client part and upload them"
            ) from exc
        except BaseException:
            store.delete(key_id)
            raise
        return KeyUploaded(key_id=key_id, model=model, bytes=len(data))

    @app.delete("/keys/{key_id}", status_code=204, responses={404: ERRORS[404]})
    async def delete_keys(key_id: str, request: Request):
        quotas.check_access(key_id, store.read_meta(key_id), request.state.owner)
        store.delete(key_id)
        return Response(status_code=204)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses={k: ERRORS[k] for k in (400, 403, 404, 409, 413, 415, 422, 429, 503)},
    )
    async def predict(req: PredictRequest, request: Request, response: Response):
        check_audit_only(request.state.owner, audit_owners, "per-molecule predictions")
        model_or_404(req.model)
        if len(req.ciphertexts) > config.batch_limit:
            return error(
                422,
                "BatchTooLarge",
                f"{len(req.ciphertexts)} ciphertexts in one request, this server takes at most "
                f"{config.batch_limit}; send smaller batches (molcloak predict --batch-size)",
            )
        meta = store.check_owner(req.key_id, req.model)
        quotas.check_access(req.key_id, meta, request.state.owner)  # another token's key id: unknown
        if req.client_fingerprint is not None and req.client_fingerprint != fingerprints[req.model]:
            raise CiphertextError(
                f"the ciphertexts were encrypted with the client part {req.client_fingerprint!r}, "
                f"model {req.model!r} has {fingerprints[req.model]!r}; download its client part again"
            )
        cts = [_b64(c, i) for i, c in enumerate(req.ciphertexts)]
        for i, ct in enumerate(cts):
            shapes[req.model].check(ct, i)  # size and header, before a worker deserializes it
        grant = quotas.charge(req.key_id, meta, request.state.owner, len(cts))  # budget and rate: 429
        start = time.perf_counter()
        try:
            results = await asyncio.gather(
                *(pool.run(req.model, req.key_id, ct, i) for i, ct in enumerate(cts))
            )
        except BaseException as exc:
            quotas.refund(grant)  # no outputs left the server
            if not isinstance(exc, WorkerCrashError):
                raise
            # one job per worker: this request's keys or ciphertexts did it
            store.revoke(req.key_id, "a job with its evaluation keys crashed an FHE worker")
            raise KeysRevokedError(
                f"an FHE worker crashed while evaluating this request; key id {req.key_id} is revoked "
                "(the server refuses it from now on); generate new keys with this model's client part, "
                "upload them and re-encrypt"
            ) from exc
        response.headers.update(grant.headers)
        return PredictResponse(
            model=req.model,
            outputs=[base64.b64encode(o).decode() for o, _ in results],
            server_seconds=[s for _, s in results],
            total_seconds=time.perf_counter() - start,
        )

    context = SimpleNamespace(
        config=config, store=store, quotas=quotas, pool=pool, epsilon=config.aggregate_epsilon
    )
    add_aggregate_routes(app, programs, context)
    return app


def _owner(request: Request, owners: dict[str, str]) -> str | None:
    """The recorded identity (`token_owner`) of the request's bearer token, or None if it has none of
    `owners`' tokens; every token is compared, in constant time."""
    got = request.headers.get("authorization", "")
    sent = got[7:].strip().encode() if got.startswith("Bearer ") else b""
    found = None
    for token, owner in owners.items():
        if secrets.compare_digest(sent, token.encode()) and sent:
            found = owner
    return found


async def _read_capped(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(f"body of more than {limit} bytes is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _measure_ciphertexts(config: ServeConfig, pool: FheExecutor, fingerprints: dict) -> dict:
    """Each model's `CiphertextShape`, from ciphertexts a worker encrypts under a throwaway key; cached
    in the state directory per client part, so a restart does not generate keys again."""
    shapes = {}
    config.shapes_dir.mkdir(parents=True, exist_ok=True)
    for name, fingerprint in fingerprints.items():
        path = config.shapes_dir / f"{name}.json"
        shape = CiphertextShape.load(name, path, fingerprint)
        if shape is None:
            shape = CiphertextShape.from_samples(name, pool.reference_ciphertexts(name))
            path.write_text(shape.to_json(fingerprint))
        shapes[name] = shape
    return shapes


def _b64(text: str, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CiphertextError(
            f"ciphertext {index} is not valid base64; send base64 of the serialized ciphertext"
        ) from exc


def _client_zip(bundle_dir: Path) -> bytes:
    """The download of GET /models/{name}/client: client.zip and manifest.json (fixed bytes)."""
    return fixed_zip(bundle_dir / "client", ("client.zip", "manifest.json"))


def _model_info(name: str, m: Manifest, fingerprint: str, max_batch: int = MAX_BATCH) -> ModelInfo:
    task = m.task
    return ModelInfo(
        name=name,
        task=task.to_dict(),
        labels=list(task.labels),
        metrics=m.metrics,
        featurizer=m.data["featurizer"],
        circuit=m.circuit,
        client_fingerprint=fingerprint,
        evaluation_key_bytes=m.circuit.get("serialized_evaluation_key_bytes"),
        max_batch=max_batch,
    )


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = create_app(config)
    app.state.pool.warm_up()
    app.state.measure_ciphertexts()
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=30)
