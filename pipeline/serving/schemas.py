"""The JSON schemas of the FHE server's requests and answers, and how errors map to HTTP statuses."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..errors import (
    BodyTooLargeError,
    CiphertextError,
    ForbiddenError,
    KeyMismatchError,
    KeysError,
    KeysRevokedError,
    KeyStorageError,
    MolcloakError,
    QuotaError,
    ServerBusyError,
    UnknownModelError,
)

MAX_BATCH = 64

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
    max_batch: int = Field(MAX_BATCH, description="most ciphertexts this server takes in one POST /predict")


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


class AggregateChunk(BaseModel):
    rows: str = Field(
        description="base64 serialized ciphertext of the chunk's molecules (aggregate client part)"
    )
    labels: str = Field(description="base64 serialized ciphertext of the chunk's labels")


class AggregateRequest(BaseModel):
    model: str = Field(
        description="the model whose aggregate program runs (its keys: POST /keys?model=NAME:aggregate)"
    )
    key_id: str
    chunks: list[AggregateChunk] = Field(min_length=1, max_length=MAX_BATCH)


class AggregateResponse(BaseModel):
    model: str
    outputs: list[str] = Field(description="base64 encrypted counts of each chunk, in request order")
    epsilon: float = Field(description="the server's noise level per chunk (0: no noise)")
    noise_offset: int = Field(description="added to every count so that noisy counts stay non-negative")
    server_seconds: list[float]
    total_seconds: float


STATUS = {  # the first class that matches wins
    ForbiddenError: 403,
    UnknownModelError: 404,
    KeyMismatchError: 409,
    KeysRevokedError: 400,
    KeysError: 404,
    CiphertextError: 400,
    BodyTooLargeError: 413,
    QuotaError: 429,
    KeyStorageError: 507,
    ServerBusyError: 503,
}
ERRORS = {
    400: {"model": ErrorResponse, "description": "malformed ciphertext or keys, or revoked key id"},
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    403: {"model": ErrorResponse, "description": "an audit-only token asked for per-molecule predictions"},
    404: {"model": ErrorResponse, "description": "unknown model or key id"},
    409: {"model": ErrorResponse, "description": "key id belongs to another model"},
    413: {"model": ErrorResponse, "description": "body over the size limit"},
    415: {"model": ErrorResponse, "description": "wrong content type"},
    422: {"model": ErrorResponse, "description": "request not valid for the schema, or batch too large"},
    429: {
        "model": ErrorResponse,
        "description": "a quota is reached: key sets per model or token, prediction budget, or rate "
        "(Retry-After when waiting helps)",
    },
    503: {"model": ErrorResponse, "description": "queue full, worker restarted or job timed out"},
    507: {
        "model": ErrorResponse,
        "description": "no room left to store evaluation keys (disk full or --max-key-storage-mb)",
    },
}


def status_of(exc: MolcloakError) -> int:
    """The HTTP status of a molcloak error (400 unless listed in STATUS)."""
    return next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)


def error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)
