"""An aggregate program on a `molcloak serve` server, for `molcloak audit --aggregate-only`: the auditor's side
of POST /aggregate. Keys are made for one audit, uploaded, and deleted from the server when it ends."""

from __future__ import annotations

import base64
import io
import zipfile

from ..aggregate import AggregateSpec, program_name
from ..aggregate_client import AggregateClient
from ..errors import MolcloakError, RemoteError
from .http_client import RemoteModel


class RemoteAggregate:
    """`start`, `run(rows, labels)` per chunk (thread-safe), `finish`: the same interface as `LocalAggregate`."""

    def __init__(self, remote: RemoteModel):
        self.remote = remote
        self.program = program_name(remote.model)
        self.client = AggregateClient(self._part(), remote.client)
        self.epsilon: float | None = None  # the server's noise level, from its first answer
        self.key_id: str | None = None
        self.concurrency = remote.default_concurrency(1)  # chunks in flight: the server's workers, plus one

    def _part(self):
        data = self.remote.checked(
            self.remote.request("GET", f"/models/{self.remote.model}/aggregate")
        ).content
        target = self.remote.key_dir.parent / "clients" / f"{self.program.replace(':', '-')}"
        target.mkdir(parents=True, exist_ok=True)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for name in ("client.zip", "aggregate.json"):
                    (target / name).write_bytes(z.read(name))
        except (zipfile.BadZipFile, KeyError) as exc:
            raise RemoteError(f"the aggregate client part from {self.remote.url} is not a valid zip") from exc
        AggregateSpec.load(target)
        return target

    def start(self) -> None:
        """A fresh key set for this audit; its evaluation keys go to the server."""
        keys = self.client.keygen()
        r = self.remote.request(
            "POST",
            "/keys",
            params={"model": self.program},
            content=keys,
            headers={"Content-Type": "application/octet-stream"},
        )
        self.key_id = self.remote.checked(r).json()["key_id"]

    def run(self, rows: bytes, labels: bytes) -> bytes:
        body = {
            "model": self.remote.model,
            "key_id": self.key_id,
            "chunks": [
                {"rows": base64.b64encode(rows).decode(), "labels": base64.b64encode(labels).decode()}
            ],
        }
        data = self.remote.checked(self.remote.request("POST", "/aggregate", json=body)).json()
        self.epsilon = float(data["epsilon"])
        return base64.b64decode(data["outputs"][0])

    def finish(self) -> None:
        """Delete this audit's keys on the server (best effort: expiry removes them otherwise)."""
        if self.key_id:
            try:
                self.remote.request("DELETE", f"/keys/{self.key_id}")
            except MolcloakError:
                pass
            self.key_id = None
