"""The server's aggregate-only audits (`pipeline/aggregate.py`): routes added to the FastAPI app.

GET /models/{name}/aggregate   the program's client part (zip: client.zip with crypto parameters, aggregate.json)
POST /keys?model=NAME:aggregate  an auditor's evaluation keys for it (the usual endpoint; the key id is bound
                               to the program, so POST /predict answers 409 for it)
POST /aggregate                chunks of (encrypted molecules, encrypted labels) -> encrypted counts only

The server draws each chunk's noise itself (`--aggregate-epsilon`) and never returns anything per molecule.
Tokens given with `--audit-token` may use aggregate programs only: 403 on POST /predict and on keys for a
model itself, so an auditor cannot collect per-molecule predictions with normal keys instead.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..aggregate import AggregateSpec, draw_noise, pack_job, program_name
from ..errors import CiphertextError, ForbiddenError, KeysRevokedError, UnknownModelError, WorkerCrashError
from ..files import fixed_zip
from .schemas import ERRORS, AggregateRequest, AggregateResponse


def find_programs(models: dict, fingerprints: dict[str, str]) -> dict[str, tuple[Path, AggregateSpec]]:
    """The aggregate programs of the served bundles (`<bundle>/aggregate/`), by program name. A program
    built for another client part (the model was redeployed since) is not served: its auditors would
    quantize differently from the program; the log says how to rebuild it."""
    found = {}
    for name, (directory, _) in models.items():
        part = Path(directory) / "aggregate"
        if not ((part / "aggregate.json").is_file() and (part / "server.zip").is_file()):
            continue
        spec = AggregateSpec.load(part)
        if spec.client_fingerprint != fingerprints[name]:
            print(
                f"molcloak serve: not serving the aggregate program of {name!r}: it was built for another "
                f"client part; rebuild it with `molcloak aggregate {directory} --force`",
                file=sys.stderr,
            )
            continue
        found[program_name(name)] = (part, spec)
    return found


def check_audit_only(owner: str | None, audit_owners: set[str], what: str) -> None:
    if owner is not None and owner in audit_owners:
        raise ForbiddenError(
            f"this token may run aggregate-only audits only, not {what}; use `molcloak audit --aggregate-only`"
        )


def add_aggregate_routes(app: FastAPI, programs: dict, ctx) -> None:
    """`ctx`: the app's config, key store, quotas and executor (see `http_api.create_app`)."""
    zips = {
        name: fixed_zip(directory, ("client.zip", "aggregate.json"))
        for name, (directory, _) in programs.items()
    }

    def program_or_404(model: str) -> tuple[str, AggregateSpec]:
        name = program_name(model)
        if name not in programs:
            raise UnknownModelError(
                f"model {model!r} has no aggregate program on this server; the owner adds one with "
                "`molcloak aggregate BUNDLE` and restarts `molcloak serve`"
            )
        return name, programs[name][1]

    @app.get(
        "/models/{name}/aggregate",
        responses={404: ERRORS[404]},
        response_class=Response,
        summary="The client part of a model's aggregate-only audit program (zip: crypto parameters, aggregate.json)",
    )
    async def aggregate_part(name: str):
        program, _ = program_or_404(name)
        return Response(
            zips[program],
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}-aggregate.zip"'},
        )

    @app.post(
        "/aggregate",
        response_model=AggregateResponse,
        responses={k: ERRORS[k] for k in (400, 403, 404, 409, 413, 415, 422, 429, 503)},
    )
    async def aggregate(req: AggregateRequest, request: Request):
        program, spec = program_or_404(req.model)
        if len(req.chunks) > ctx.config.batch_limit:
            raise CiphertextError(
                f"{len(req.chunks)} chunks in one request, this server takes at most {ctx.config.batch_limit}"
            )
        meta = ctx.store.check_owner(req.key_id, program)
        owner = request.state.owner
        ctx.quotas.check_access(req.key_id, meta, owner)
        jobs = [
            pack_job(
                _b64(c.rows, i, "rows"), _b64(c.labels, i, "labels"), draw_noise(spec.counters, ctx.epsilon)
            )
            for i, c in enumerate(req.chunks)
        ]
        grant = ctx.quotas.charge(req.key_id, meta, owner, len(jobs) * spec.rows)
        start = time.perf_counter()
        try:
            results = await asyncio.gather(
                *(ctx.pool.run(program, req.key_id, job, i) for i, job in enumerate(jobs))
            )
        except BaseException as exc:
            ctx.quotas.refund(grant)
            if not isinstance(exc, WorkerCrashError):
                raise
            ctx.store.revoke(req.key_id, "an aggregate job with its evaluation keys crashed an FHE worker")
            raise KeysRevokedError(
                f"an FHE worker crashed while evaluating this request; key id {req.key_id} is revoked; "
                "generate new keys for the aggregate program and upload them"
            ) from exc
        return AggregateResponse(
            model=req.model,
            outputs=[base64.b64encode(o).decode() for o, _ in results],
            epsilon=ctx.epsilon,
            noise_offset=spec.noise_offset,
            server_seconds=[s for _, s in results],
            total_seconds=time.perf_counter() - start,
        )


def _b64(text: str, index: int, what: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise CiphertextError(f"chunk {index}: {what} is not valid base64") from exc
    if not data:
        raise CiphertextError(f"chunk {index}: {what} is empty; send the aggregate client's ciphertext")
    return data
