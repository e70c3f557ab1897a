"""Resumable runs of the evaluation commands: a run directory checkpointed after every batch.

A run directory holds `<meta>.json` (format, the run's identity, one record per session) and
append-only data files. Every batch is appended and fsynced before the next one counts as done, so
a rerun after Ctrl-C, a kill or a lost connection continues where the last run stopped and scores
every row exactly once: a line cut short by a crash mid-write is dropped (its rows are scored again).
A rerun whose identity (input file hash, columns, model) differs is refused, unless `restart`; so is a
directory whose metadata is damaged or written in another checkpoint format.

`molcloak screen` (evaluation/screen: screen.json, predictions.csv), `molcloak audit` (evaluation/audit:
audit.json, progress.jsonl read with `read_jsonl`) and `molcloak explain` (explain-run.json; its encrypted
runs in explain-runs.jsonl, a `BatchCache`, as `audit --explain` keeps them in the audit's directory) use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from molcloak.pipeline.errors import ConfigError, MolcloakError

T = TypeVar("T")


class RunState:
    """The run directory `out`: `meta_name` (JSON: format, identity, sessions) and `data_files`.

    `names` maps identity keys to what the user calls them (for the refusal message), `what` names
    the run ("a screen"), `error` is the exception class of a refusal."""

    def __init__(
        self,
        out: Path,
        meta_name: str,
        identity: dict,
        data_files: Sequence[str] = (),
        restart: bool = False,
        names: dict[str, str] | None = None,
        what: str = "a run",
        error: type[MolcloakError] = ConfigError,
        fmt: int = 1,
    ):
        self.out, self.meta_path = Path(out), Path(out) / meta_name
        self.out.mkdir(parents=True, exist_ok=True)
        os.chmod(self.out, 0o700)  # decrypted predictions: for this user only
        data = [self.out / name for name in data_files]
        if restart:
            for p in (self.meta_path, *data):
                p.unlink(missing_ok=True)
        if self.meta_path.is_file():
            self.meta = self._read_meta(fmt, error)
            check_same_run(self.meta["identity"], identity, self.out, names or {}, what, error)
            self.resumed = True
        else:
            self.meta = {"format": fmt, "identity": identity, "sessions": []}
            for p in data:
                p.unlink(missing_ok=True)
            self.save()
            self.resumed = False

    def _read_meta(self, fmt: int, error: type[MolcloakError]) -> dict:
        """The stored metadata; damaged or in another format: `error` naming --restart."""
        try:
            meta = json.loads(self.meta_path.read_text())
            stored, _ = meta.get("format"), meta["identity"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise error(
                f"{self.meta_path} is damaged ({exc}); pass --restart to start over (the saved rows are "
                "scored again), or choose another --out"
            ) from exc
        if stored != fmt:
            raise error(
                f"{self.meta_path} is a checkpoint of format {stored!r}, this molcloak reads format {fmt}; "
                "pass --restart to start over (the saved rows are scored again), or choose another --out"
            )
        return meta

    def save(self) -> None:
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta, indent=2))
        os.replace(tmp, self.meta_path)

    @contextlib.contextmanager
    def session(self, saved: Callable[[], str]) -> Iterator[dict]:
        """One run over the remaining rows: yields its record (the caller counts `rows_scored` and adds
        what it measures), stored in the metadata at the end if it scored anything. An interruption or a
        molcloak error is re-raised saying what is saved (`saved()`, e.g. "8 of 14 rows are scored") and
        how to resume."""
        record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows_scored": 0}
        t0 = time.perf_counter()
        tail = f" and saved in {self.out}; rerun the same command to resume"
        try:
            yield record
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted; {saved()}{tail}") from None
        except MolcloakError as exc:
            raise type(exc)(f"{exc}; {saved()}{tail}") from exc
        finally:
            record["seconds"] = time.perf_counter() - t0
            if record["rows_scored"] or record.get("keygen_seconds") is not None:
                self.meta["sessions"].append(record)
                self.save()


def check_same_run(
    old: dict, new: dict, out: Path, names: dict[str, str], what: str, error: type[MolcloakError]
) -> None:
    """Refuse to mix the rows of two runs with different inputs in one directory."""
    changed = [
        f"{names.get(k, k)} (was {old.get(k)!r}, now {new.get(k)!r})" for k in new if old.get(k) != new[k]
    ]
    if changed:
        raise error(
            f"{out} holds {what} with other inputs: {'; '.join(changed)}; predictions of different runs "
            "cannot be mixed. Rerun with the original arguments to resume, choose another --out, or pass "
            "--restart to start over"
        )


def append_durably(path: Path, text: str) -> None:
    """Append `text` (whole lines) and make it durable before returning: the checkpoint of one batch."""
    with path.open("a", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def drop_torn_line(path: Path, block: int = 1 << 16) -> bytes:
    """Cut a last line left unfinished by a crash mid-write (no final newline) off `path`; return the
    last complete line (b"" when there is none). Reads only the end of the file."""
    if not path.is_file():
        return b""
    with path.open("r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        tail, start = b"", size
        while start > 0 and tail.count(b"\n") < 2:
            start = max(0, start - block)
            fh.seek(start)
            tail = fh.read(size - start)
        cut = tail.rfind(b"\n") + 1  # 0: no complete line at all
        if start + cut < size:
            fh.truncate(start + cut)
        lines = tail[:cut].split(b"\n")
        return lines[-2] if len(lines) >= 2 else b""


def read_jsonl(path: Path, parse: Callable[[dict], T], error: type[MolcloakError] = ConfigError) -> list[T]:
    """`parse(record)` of every line of an append-only JSON-lines checkpoint, after cutting a last line
    torn by a crash (`drop_torn_line`: its rows are scored again). A line that is not JSON or that
    `parse` rejects (ValueError, KeyError, TypeError) is `error` naming the file, the line and --restart."""
    drop_torn_line(path)
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            out.append(parse(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise error(
                f"{path} line {n} is damaged ({exc}); delete the directory or pass --restart"
            ) from exc
    return out


class BatchCache:
    """The decrypted raw outputs of batches of encrypted runs, by key, in the append-only JSON-lines file
    `path` (one line per batch: {"key": ..., "raw": [[...], ...]}): the `cache` the explanation `Runner`
    (molcloak.pipeline.explain) takes. `get(key)` -> the raws or None; `cache[key] = raws` appends and
    fsyncs the batch before the next one runs, and counts its runs in `record` (a session's, if set).
    `runs` counts the batches this explanation asked for, not those an earlier, different one left in the file
    (an audit directory keeps them across `--explain`, `--seed` or `--batch-size` changes)."""

    def __init__(self, path: Path, error: type[MolcloakError] = ConfigError):
        self.path, self.record = Path(path), None
        self.saved: dict[str, list[list[float]]] = dict(read_jsonl(self.path, _batch_record, error))
        self.used: set[str] = set()

    def get(self, key: str) -> list[list[float]] | None:
        if key in self.saved:
            self.used.add(key)
        return self.saved.get(key)

    def __setitem__(self, key: str, raws: Sequence) -> None:
        raws = [[float(v) for v in raw] for raw in raws]
        append_durably(self.path, json.dumps({"key": key, "raw": raws}) + "\n")
        self.saved[key] = raws
        self.used.add(key)
        if self.record is not None:
            self.record["rows_scored"] += len(raws)

    @property
    def runs(self) -> int:
        """Encrypted runs of this explanation saved (read back or run so far)."""
        return sum(len(self.saved[key]) for key in self.used)

    def done(self) -> str:
        """What an interruption message says is saved: this explanation's runs, and the earlier ones still in
        the file (an interruption can come before the runner reaches them; a rerun reuses those that match)."""
        earlier = sum(len(raws) for key, raws in self.saved.items() if key not in self.used)
        kept = f" ({earlier} earlier ones are kept too, for a rerun that asks for them)" if earlier else ""
        return f"{self.runs} encrypted runs are done{kept}"


def _batch_record(rec: dict) -> tuple[str, list[list[float]]]:
    return str(rec["key"]), [[float(v) for v in raw] for raw in rec["raw"]]


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
