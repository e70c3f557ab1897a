"""HTTP client of the FHE server: what `molcloak predict --server`, the app and audits use.

It downloads and caches the client part of a model, generates keys once per model (kept in the
local key directory, secret key mode 0600), uploads the evaluation keys once (and again if the
server forgot them), encrypts locally, sends batches of ciphertexts, decrypts locally.
"""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from pathlib import Path
from typing import Sequence

import httpx

from ..errors import RemoteError
from ..fhe_client import DEFAULT_KEY_DIR, PrivateClient
from ..predict import ItemCallback, PredictReport, fill_prediction, validate_inputs

RETRIES = 5


class RemoteModel:
    def __init__(self, url: str, model: str, key_dir: str | Path | None = None, token: str | None = None,
                 timeout: float = 600.0, transport: httpx.BaseTransport | None = None):
        self.url, self.model = url.rstrip("/"), model
        self.key_dir = Path(key_dir or DEFAULT_KEY_DIR)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.info = self._model_info()
        self.client = PrivateClient(self._client_part(), self.key_dir)
        self._key_file = self.client.key_path.parent / f"server-{_slug(self.url)}.json"

    # -- HTTP with retries ----------------------------------------------------

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        delay = 0.5
        for attempt in range(RETRIES):
            try:
                r = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == RETRIES - 1:
                    raise RemoteError(f"cannot reach the FHE server at {self.url} ({exc}); is `molcloak serve` running?") from exc
            else:
                if r.status_code != 503 or attempt == RETRIES - 1:
                    return r
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _ok(self, r: httpx.Response) -> httpx.Response:
        if r.is_success:
            return r
        try:
            body = r.json()["error"]
            message, kind = body["message"], body["type"]
        except (ValueError, KeyError, TypeError):
            message, kind = r.text[:300], "HTTPError"
        raise RemoteError(f"server answered {r.status_code} {kind}: {message}")

    # -- client part and keys -----------------------------------------------

    def _model_info(self) -> dict:
        models = self._ok(self.request("GET", "/models")).json()
        for m in models:
            if m["name"] == self.model:
                return m
        raise RemoteError(f"model {self.model!r} is not served at {self.url}; available: {', '.join(m['name'] for m in models)}")

    def _client_part(self) -> Path:
        target = self.key_dir.parent / "clients" / f"{self.model}-{self.info['client_fingerprint']}"
        if not (target / "client.zip").is_file():
            data = self._ok(self.request("GET", f"/models/{self.model}/client")).content
            target.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for name in ("client.zip", "manifest.json"):
                    (target / name).write_bytes(z.read(name))
        return target

    def key_id(self, refresh: bool = False) -> str:
        """The server's id for our evaluation keys; generates and uploads them when needed."""
        if not refresh and self._key_file.is_file():
            return json.loads(self._key_file.read_text())["key_id"]
        self.client.keygen()
        r = self._ok(self.request("POST", "/keys", params={"model": self.model}, content=self.client.evaluation_keys(),
                                  headers={"Content-Type": "application/octet-stream"}))
        key_id = r.json()["key_id"]
        self._key_file.write_text(json.dumps({"key_id": key_id, "model": self.model, "url": self.url}))
        return key_id

    # -- prediction -----------------------------------------------------------

    def run(self, ciphertexts: list[bytes]) -> tuple[list[bytes], list[float]]:
        """Send one batch; re-upload the keys once if the server no longer knows our key id."""
        body = {"model": self.model, "ciphertexts": [base64.b64encode(c).decode() for c in ciphertexts],
                "client_fingerprint": self.info["client_fingerprint"]}
        for refresh in (False, True):
            r = self.request("POST", "/predict", json={**body, "key_id": self.key_id(refresh)})
            if r.status_code == 404 and "KeysError" in r.text and not refresh:
                continue
            data = self._ok(r).json()
            return [base64.b64decode(o) for o in data["outputs"]], data["server_seconds"]
        raise AssertionError("unreachable")

    def predict(self, inputs: Sequence, batch_size: int = 8, skip_invalid: bool = False,
                on_item: ItemCallback | None = None) -> PredictReport:
        """Encrypted predictions of SMILES, or of rows for a tabular model (see `predict.validate_inputs`)."""
        preds = validate_inputs(self.client.featurizer, inputs, skip_invalid)
        todo = [p for p in preds if not p.error]
        keyinfo = self.client.keygen()
        self.key_id()
        report = PredictReport(preds, "server", keyinfo.seconds, keyinfo.reused, keyinfo.evaluation_key_bytes)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            t0 = time.perf_counter()
            cts = [self.client.encrypt(x) for x in self.client.featurize([p.input for p in batch])]
            t1 = time.perf_counter()
            outs, server_s = self.run(cts)
            t2 = time.perf_counter()
            for pred, out, s in zip(batch, outs, server_s):
                raw = self.client.decrypt(out)
                fill_prediction(pred, self.client.task, self.client.predictions(raw)[0], raw)
                pred.seconds = {"encrypt": (t1 - t0) / len(batch), "run": s, "round_trip": (t2 - t1) / len(batch)}
                report.input_ciphertext_bytes, report.output_ciphertext_bytes = len(cts[0]), len(out)
                if on_item:
                    on_item(pred)
        return report

    def close(self) -> None:
        self.http.close()


def _slug(url: str) -> str:
    import hashlib

    return hashlib.sha256(url.encode()).hexdigest()[:12]
