"""Test helpers shared by several test files: a real `molcloak serve` process on loopback
(`molcloak.pipeline.serving.process`, with the tests' defaults) and CSV fixtures."""

from __future__ import annotations

import atexit
import csv
import functools
import shutil
import tempfile
from pathlib import Path

from molcloak.pipeline.serving import process
from molcloak.pipeline.serving.process import free_port

__all__ = ["ServerProcess", "free_port", "write_csv"]


@functools.cache
def _shapes_cache_dir() -> Path:
    """This test process's cache of the ciphertext shapes servers measured (`<state>/ciphertexts/<model>.json`)."""
    path = Path(tempfile.mkdtemp(prefix="molcloak-test-shapes-"))
    atexit.register(shutil.rmtree, path, True)
    return path


class ServerProcess(process.ServerProcess):
    """Two FHE workers; the log is `<state>/../server-<port>.log`, appended to by a restart on the same port.

    A new state directory gets the ciphertext shapes earlier test servers measured: each measurement is a throwaway
    keygen in a worker, and the server checks a cached shape's client fingerprint, so a shape of another bundle of
    the same name is measured again. (Measuring them stays tested: the first server of each model, the app, the
    load and attack checks, and `tests/test_serving_process.py`, which starts the library's class.)
    """

    def __init__(
        self,
        bundles: Path,
        state: Path,
        token_file: Path | None = None,
        port: int | None = None,
        workers: int = 2,
        **kwargs,
    ):
        port = port or free_port()
        shapes, cache = Path(state) / "ciphertexts", _shapes_cache_dir()
        for cached in cache.glob("*.json"):
            if not (shapes / cached.name).exists():
                shapes.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cached, shapes / cached.name)
        super().__init__(
            bundles,
            state,
            workers=workers,
            token_file=token_file,
            port=port,
            log=Path(state).parent / f"server-{port}.log",
            **kwargs,
        )
        for measured in shapes.glob("*.json"):
            shutil.copyfile(measured, cache / measured.name)

    @property
    def proc(self):
        return self.process


def write_csv(path: Path, header: list[str], rows) -> Path:
    """A CSV test fixture: `header`, then one line per row."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def upload_poisoned_keys(server, client, model: str) -> None:
    """Upload valid evaluation keys with bytes 100-200 zeroed (they pass the size check and deserialize,
    but crash the circuit) and check the server refuses them with a 400 and stores nothing."""
    import os

    import httpx

    poisoned = bytearray(client.client.evaluation_keys())
    poisoned[100:200] = bytes(100)
    keys_dir = server.state_dir / "keys"
    before = set(os.listdir(keys_dir))
    r = httpx.post(
        f"{server.url}/keys",
        params={"model": model},
        content=bytes(poisoned),
        headers={"Content-Type": "application/octet-stream"},
        timeout=300,
    )
    assert r.status_code == 400, r.text[:500]
    error = r.json()["error"]
    assert error["type"] == "CiphertextError" and "crashed the FHE worker" in error["message"]
    assert set(os.listdir(keys_dir)) == before  # nothing stored
