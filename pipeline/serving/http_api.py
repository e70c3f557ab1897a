"""The FHE prediction server: FastAPI around the server half. It only ever holds evaluation keys
and ciphertexts; it never receives a secret key, a SMILES string, features or a plaintext result.

Endpoints: GET /health, GET /models, GET /models/{name}/client, POST /keys?model=NAME,
DELETE /keys/{key_id}, POST /predict. Errors are JSON: {"error": {"type": ..., "message": ...}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import secrets
import time
import zipfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from ..bundle import Manifest, client_fingerprint, load_manifest
from ..errors import (
    BundleError,
    CiphertextError,
    KeyMismatchError,
    KeysError,
    MolcloakError,
    ServerBusyError,
    UnknownModelError,
)
from .executor import WorkerPool
from .keystore import KeyStore

MAX_BATCH = 64


@dataclass(frozen=True)
class ServeConfig:
    bundles: Path
    state_dir: Path | None = None  # default <bundles>/.molcloak-server
    workers: int = max(1, os.cpu_count() or 1)
    queue_size: int = 64
    max_body_bytes: int = 128 * 2**20
    key_cache_bytes: int = 2 * 2**30
    token: str | None = None

    @property
    def keys_dir(self) -> Path:
        return (self.state_dir or self.bundles / ".molcloak-server") / "keys"


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


# ---------------------------------------------------------------- schemas


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelInfo(BaseModel):
    name: str
    task: dict
    labels: list[str]
    metrics: dict
    featurizer: dict
    circuit: dict
    client_fingerprint: str = Field(
        description="sha256 of the client part's client.zip (16 hex characters), as "
        "`PrivateClient.fingerprint` computes it; changes when the model is redeployed"
    )
    evaluation_key_bytes: int | None = Field(
        None, description="exact size of this model's serialized evaluation keys"
    )


class KeyUploaded(BaseModel):
    key_id: str
    model: str
    bytes: int


class PredictRequest(BaseModel):
    model: str
    key_id: str
    ciphertexts: list[str] = Field(
        min_length=1, max_length=MAX_BATCH, description="base64 serialized ciphertexts, one per molecule"
    )
    client_fingerprint: str | None = Field(
        None,
        description="fingerprint of the client part used to encrypt (from GET /models); "
        "checked when given, so ciphertexts made for another model are refused",
    )


class PredictResponse(BaseModel):
    model: str
    outputs: list[str] = Field(description="base64 serialized encrypted outputs, in request order")
    server_seconds: list[float] = Field(description="FHE run time of each ciphertext")
    total_seconds: float


STATUS = {
    UnknownModelError: 404,
    KeyMismatchError: 409,
    KeysError: 404,
    CiphertextError: 400,
    ServerBusyError: 503,
}
ERRORS = {
    400: {"model": ErrorResponse, "description": "malformed ciphertext or keys"},
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    404: {"model": ErrorResponse, "description": "unknown model or key id"},
    409: {"model": ErrorResponse, "description": "key id belongs to another model"},
    413: {"model": ErrorResponse, "description": "body over the size limit"},
    415: {"model": ErrorResponse, "description": "wrong content type"},
    503: {"model": ErrorResponse, "description": "queue full or worker restarted; retry"},
}


def status_of(exc: MolcloakError) -> int:
    """The HTTP status of a molcloak error (400 unless listed in STATUS)."""
    return next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)


def error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


# ---------------------------------------------------------------- app


def create_app(config: ServeConfig) -> FastAPI:
    models = find_bundles(config.bundles)
    client_zips = {name: _client_zip(d) for name, (d, _) in models.items()}
    fingerprints = {
        name: client_fingerprint(d) for name, (d, _) in models.items()
    }  # the value clients compute
    config.keys_dir.mkdir(parents=True, exist_ok=True)
    store = KeyStore(config.keys_dir, 0, load=lambda m, d: None, cost=lambda m: 0)  # metadata only
    pool = WorkerPool(
        {n: d for n, (d, _) in models.items()},
        config.keys_dir,
        config.workers,
        config.queue_size,
        config.key_cache_bytes,
    )

    @asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown()

    app = FastAPI(
        title="molcloak FHE server",
        version="1",
        lifespan=lifespan,
        description="Encrypted molecular property prediction. The server sees evaluation keys and ciphertexts only.",
    )
    app.state.pool = pool

    def model_or_404(name: str) -> Manifest:
        if name not in models:
            raise UnknownModelError(f"model {name!r} is not served here; available: {', '.join(models)}")
        return models[name][1]

    @app.exception_handler(MolcloakError)
    async def molcloak_error(_request, exc: MolcloakError):
        status = status_of(exc)
        return error(status, type(exc).__name__, str(exc), {"Retry-After": "2"} if status == 503 else None)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):
        return error(
            500, "InternalError", f"unexpected server error ({type(exc).__name__}); the server keeps running"
        )

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path, method = request.url.path, request.method
        if config.token and path != "/health" and not _authorized(request, config.token):
            return error(401, "Unauthorized", "missing or wrong token; send 'Authorization: Bearer <token>'")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return error(
                413,
                "BodyTooLarge",
                f"body of {length} bytes is over the limit of {config.max_body_bytes} bytes",
            )
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        expected = {
            ("POST", "/predict"): "application/json",
            ("POST", "/keys"): "application/octet-stream",
        }.get((method, path))
        if expected and ctype != expected:
            return error(
                415,
                "UnsupportedMediaType",
                f"{method} {path} takes {expected}, got {ctype or 'no content type'!r}",
            )
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "models": list(models),
            "pending_jobs": pool.pending,
            "worker_restarts": pool.restarts,
        }

    @app.get("/models", response_model=list[ModelInfo])
    async def list_models():
        return [_model_info(name, m, fingerprints[name]) for name, (_, m) in models.items()]

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
        responses={k: ERRORS[k] for k in (400, 404, 413, 415, 503)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload_keys(
        request: Request, model: str = Query(..., description="model the keys were generated for")
    ):
        manifest = model_or_404(model)
        data = await _read_capped(request, config.max_body_bytes)
        expected = manifest.circuit.get("serialized_evaluation_key_bytes")
        if not data:
            raise CiphertextError("the body is empty; send the serialized evaluation keys")
        if expected and len(data) != expected:
            raise CiphertextError(
                f"evaluation keys have {len(data)} bytes, model {model!r} expects {expected}; "
                "were they generated with this model's client part?"
            )
        key_id = await asyncio.to_thread(store.put, model, data)  # 10s of MB + fsync: off the event loop
        try:
            await pool.check_keys(model, key_id)
        except MolcloakError:
            store.delete(key_id)
            raise
        return KeyUploaded(key_id=key_id, model=model, bytes=len(data))

    @app.delete("/keys/{key_id}", status_code=204, responses={404: ERRORS[404]})
    async def delete_keys(key_id: str):
        store.delete(key_id)
        return Response(status_code=204)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses={k: ERRORS[k] for k in (400, 404, 409, 413, 415, 503)},
    )
    async def predict(req: PredictRequest):
        model_or_404(req.model)
        store.check_owner(req.key_id, req.model)
        if req.client_fingerprint is not None and req.client_fingerprint != fingerprints[req.model]:
            raise CiphertextError(
                f"the ciphertexts were encrypted with the client part {req.client_fingerprint!r}, "
                f"model {req.model!r} has {fingerprints[req.model]!r}; download its client part again"
            )
        cts = [_b64(c, i) for i, c in enumerate(req.ciphertexts)]
        start = time.perf_counter()
        results = await asyncio.gather(*(pool.run(req.model, req.key_id, ct, i) for i, ct in enumerate(cts)))
        return PredictResponse(
            model=req.model,
            outputs=[base64.b64encode(o).decode() for o, _ in results],
            server_seconds=[s for _, s in results],
            total_seconds=time.perf_counter() - start,
        )

    return app


def _authorized(request: Request, token: str) -> bool:
    got = request.headers.get("authorization", "")
    return got.startswith("Bearer ") and secrets.compare_digest(got[7:].strip().encode(), token.encode())


async def _read_capped(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise CiphertextError(f"body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _b64(text: str, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CiphertextError(
            f"ciphertext {index} is not valid base64; send base64 of the serialized ciphertext"
        ) from exc


def _client_zip(bundle_dir: Path) -> bytes:
    """The download of GET /models/{name}/client: client.zip and manifest.json, with fixed timestamps so
    the same files always give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ("client.zip", "manifest.json"):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, (bundle_dir / "client" / name).read_bytes(), zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _model_info(name: str, m: Manifest, fingerprint: str) -> ModelInfo:
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
    )


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = create_app(config)
    app.state.pool.warm_up()
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=30)
