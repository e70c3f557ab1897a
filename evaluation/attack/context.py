"""What the cases share: a copy of the bundle (and a renamed twin of it, a second model on the same
server), the `molcloak serve` processes on loopback (started when a case first needs one, each with the
options its cases need), an honest client with real keys, and raw-HTTP helpers."""

from __future__ import annotations

import base64
import json
import math
import os
import resource
import select
import shutil
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from molcloak.pipeline.bundle import load_checkpoint, load_manifest
from molcloak.pipeline.errors import MolcloakError
from molcloak.pipeline.serving.http_client import RemoteModel
from molcloak.pipeline.serving.process import HOST, ServerProcess

OCTET = {"Content-Type": "application/octet-stream"}
JSON = {"Content-Type": "application/json"}
TOKENS = ("tok-quota-a", "tok-quota-b", "tok-quota-c", "tok-budget")
TTL_SECONDS = 30  # the open server's --key-ttl-hours, in seconds
FSIZE_LIMIT = 8 * 2**20  # the full-disk server may not write a file over 8 MiB (RLIMIT_FSIZE)
ORPHAN = "cd" * 16  # a key id with a .json and no .keys, left in the full-disk server's state before start
EXPIRED = "0a" * 16  # a key set last used in 1970, left in the open server's state before start


def auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def error_of(r: httpx.Response) -> tuple[str, str]:
    """(type, message) of a JSON error answer, or ("-", start of the body)."""
    try:
        e = r.json()["error"]
        return str(e["type"]), str(e["message"])
    except (ValueError, KeyError, TypeError):
        return "-", r.text[:120]


def answers(rs) -> str:
    """'422 RequestValidationError x3, 404 KeysError': the answers grouped, in order of first appearance."""
    seen: dict[str, int] = {}
    for r in rs:
        what = f"{r.status_code} {error_of(r)[0]}".removesuffix(" -")
        seen[what] = seen.get(what, 0) + 1
    return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in seen.items())


def rss(pid: int) -> int:
    """Resident memory of one process in bytes, from /proc/<pid>/status (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def workers_of(server: ServerProcess) -> list[psutil.Process]:
    """The server's FHE worker processes (not multiprocessing's resource tracker)."""
    try:
        children = psutil.Process(server.pid).children()
    except psutil.Error:
        return []
    return [p for p in children if "spawn_main" in " ".join(p.cmdline())]


def _small_files() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def _copy_bundle(src: Path, dst: Path, name: str | None = None) -> None:
    """client/, server/ and manifest.json of a bundle (not owner/: a server never gets the weights);
    `name` renames the model in its three manifests."""
    shutil.copytree(src / "client", dst / "client")
    shutil.copytree(src / "server", dst / "server")
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    if name:
        for path in (
            dst / "manifest.json",
            dst / "client" / "manifest.json",
            dst / "server" / "manifest.json",
        ):
            meta = json.loads(path.read_text())
            meta["name"] = name
            path.write_text(json.dumps(meta, indent=2))


class Context:
    """`bundle` (a deployment bundle; its owner/ part, when there, gives the feature rows encrypted),
    `work` (an empty directory for servers, keys and logs), `workers` (FHE workers of the main server)."""

    def __init__(self, bundle: Path, work: Path, workers: int = 2, start_timeout: float = 240.0):
        manifest = load_manifest(bundle, "server")
        self.bundle, self.work, self.workers = Path(bundle), Path(work), workers
        self.start_timeout = start_timeout
        self.model, self.twin = manifest.name, f"{manifest.name}-twin"
        self.declared_key_bytes = manifest.circuit.get("serialized_evaluation_key_bytes")
        # approximate rounding: Concrete draws off-by-one steps at random, so two runs of one ciphertext
        # agree on the predicted class, not always bit for bit
        self.approximate = (manifest.data.get("compile") or {}).get("rounding_method") == "approximate"
        self.bundles, self.solo = self.work / "bundles", self.work / "solo"  # two models / the model alone
        _copy_bundle(self.bundle, self.bundles / "model")
        _copy_bundle(self.bundle, self.bundles / "twin", self.twin)
        _copy_bundle(self.bundle, self.solo / "model")
        self.servers: dict[str, ServerProcess] = {}
        self.commands: dict[str, str] = {}  # every server started: its `molcloak serve` options
        self._honest: RemoteModel | None = None
        self._rows: np.ndarray | None = None

    # -- sizes -----------------------------------------------------------------

    @property
    def key_bytes(self) -> int:
        return int(self.declared_key_bytes or len(self.honest().client.evaluation_keys()))

    @property
    def body_mb(self) -> int:
        """--max-body-mb of the servers: room for one key upload and 8 MiB more."""
        return math.ceil(self.key_bytes / 2**20) + 8

    # -- servers ---------------------------------------------------------------

    def start(self, name: str, bundles: Path, workers: int, args=(), token_file=None, preexec=None):
        """A new `molcloak serve` on loopback with its own state directory (seeded with the main server's
        measured ciphertext shapes, so it makes no throwaway keys at start); the caller stops it."""
        state = self.work / f"state-{name}"
        state.mkdir(parents=True, exist_ok=True)
        if name != "main":
            shapes = self.server("main").state_dir / "ciphertexts"
            shutil.copytree(shapes, state / "ciphertexts", dirs_exist_ok=True)
        server = ServerProcess(
            bundles,
            state,
            workers=workers,
            token_file=token_file,
            log=self.work / f"server-{name}.log",
            extra_args=[str(a) for a in args],
            timeout=self.start_timeout,
            preexec_fn=preexec,
        )
        self.commands[name] = " ".join(server.command[3:])
        if not server.url.startswith(f"http://{HOST}:") or HOST != "127.0.0.1":
            server.kill()
            raise MolcloakError(f"the server listens on {server.url}, not on loopback; refusing to attack it")
        return server

    def server(self, name: str) -> ServerProcess:
        """The shared server `name`, started at first use: main, guarded, open, timeout, fsize."""
        if name in self.servers:
            return self.servers[name]
        limits = ["--max-body-mb", self.body_mb, "--max-batch", 2]
        if name == "main":
            server = self.start(name, self.bundles, self.workers, limits)
        elif name == "guarded":
            tokens = self.work / "tokens"
            tokens.write_text("\n".join(TOKENS) + "\n")
            storage = f"{2.5 * self.key_bytes / 2**20:.3f}"  # two and a half key sets
            args = [*limits, "--max-keys-per-model", 1, "--max-key-storage-mb", storage]
            args += ["--max-predictions-per-key", 3]
            server = self.start(name, self.solo, 2, args, token_file=tokens)
        elif name == "open":
            keys = self.work / "state-open" / "keys"
            keys.mkdir(parents=True)
            os.chmod(keys, 0o700)
            (keys / f"{EXPIRED}.keys").write_bytes(b"old keys")
            meta = {"model": self.model, "bytes": 8, "created": 0, "last_used": 0}
            (keys / f"{EXPIRED}.json").write_text(json.dumps(meta))
            args = [*limits, "--key-ttl-hours", f"{TTL_SECONDS / 3600:.6f}", "--rate", 2]
            server = self.start(name, self.solo, 2, args)
        elif name == "timeout":
            server = self.start(name, self.solo, 1, [*limits, "--job-timeout", 0.001])
        elif name == "fsize":
            keys = self.work / "state-fsize" / "keys"
            keys.mkdir(parents=True)
            (keys / f"{ORPHAN}.json").write_text(json.dumps({"model": self.model, "bytes": 1}))
            (keys / f".{'ef' * 16}.keys.0a1b2c3d.tmp").write_bytes(b"partial")
            (keys / f"{'ef' * 16}.keys").write_bytes(b"no metadata")
            server = self.start(name, self.solo, 1, limits, preexec=_small_files)
        else:
            raise KeyError(name)
        self.servers[name] = server
        return server

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        if self._honest is not None:
            self._honest.close()

    # -- the honest client -----------------------------------------------------

    def honest(self) -> RemoteModel:
        """A well-behaved client of the main server: real keys (uploaded once), real ciphertexts."""
        if self._honest is None:
            self._honest = RemoteModel(
                self.server("main").url, self.model, key_dir=self.work / "client" / "keys"
            )
        return self._honest

    def rows(self) -> np.ndarray:
        """Feature rows to encrypt: the owner's test split, else the featurized public molecules."""
        if self._rows is None:
            try:
                self._rows = np.asarray(load_checkpoint(self.bundle).X_test[:8])
            except MolcloakError:
                self._rows = np.asarray(self.honest().client.featurize(["CCO", "c1ccccc1", "CCN"]))
        return self._rows

    def ciphertext(self, i: int = 0) -> bytes:
        rows = self.rows()
        return self.honest().client.encrypt(rows[i % len(rows)])

    def ct64(self, i: int = 0) -> str:
        return base64.b64encode(self.ciphertext(i)).decode()

    def agree(self, a: list, b: list) -> bool:
        """Two decrypted outputs of the same ciphertext: equal, or the same class with approximate rounding."""
        return a == b or (self.approximate and int(np.argmax(a)) == int(np.argmax(b)))

    def decrypt(self, output_b64: str) -> list:
        return np.asarray(self.honest().client.decrypt(base64.b64decode(output_b64))).tolist()

    # -- raw HTTP --------------------------------------------------------------

    def predict(
        self, server: ServerProcess, key_id: str, cts: list[str], model=None, token=None, timeout=300
    ):
        body = {"model": model or self.model, "key_id": key_id, "ciphertexts": cts}
        return httpx.post(f"{server.url}/predict", json=body, headers=auth(token), timeout=timeout)

    def upload(self, server: ServerProcess, keys: bytes, model=None, token=None) -> httpx.Response:
        return httpx.post(
            f"{server.url}/keys",
            params={"model": model or self.model},
            content=keys,
            headers={**OCTET, **auth(token)},
            timeout=300,
        )

    def health(self, server: ServerProcess, token=None) -> dict:
        return httpx.get(f"{server.url}/health", headers=auth(token), timeout=30).json()

    def stored(self, server: ServerProcess) -> set[str]:
        return {p.stem for p in (server.state_dir / "keys").glob("*.keys")}


def raw_request(url: str, head: str, timeout: float = 30) -> bytes:
    """Send only the request line and headers `head` (a body may be declared and never sent), return
    what the server answers within `timeout`."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode())
        return _read_answer(s, timeout)


def _read_answer(s: socket.socket, wait: float) -> bytes:
    answer = b""
    while select.select([s], [], [], wait)[0]:
        try:
            data = s.recv(65536)
        except OSError:
            break
        if not data:
            break
        answer += data
        if b"}}" in answer:
            break
    return answer


def chunked_post(url: str, path: str, total: int, ctype: str) -> tuple[int, bytes, float]:
    """POST up to `total` bytes with chunked transfer encoding on a raw socket, stopping as soon as the
    server answers; (bytes sent when it answered, the answer, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    chunk = b"x" * 2**16
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        sent = 0
        while sent < total and not select.select([s], [], [], 0)[0]:
            try:
                s.sendall(frame)
            except OSError:
                break
            sent += len(chunk)
        answer = _read_answer(s, 10)
    return sent, answer, time.monotonic() - start
