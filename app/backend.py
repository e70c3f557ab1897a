"""The app's client side, without any UI: sessions, keys, encrypt, run on the server, decrypt.

The app process is the client. Each browser session gets a key directory of its own under
`<state_dir>/sessions/<id>/` (secret key mode 0600, never sent anywhere); the FHE server is
reached over HTTP exactly as a remote deployment would be (`RemoteModel`, the remote
`PredictionBackend`), so it only ever receives evaluation keys and ciphertexts. Old sessions are
cleaned up (count and age bounds), together with their evaluation keys on the server, so the app
can run for days. The page shows single-task SMILES models; other served models are named in the
model card as not shown (see `unsupported`), and a server with none to show is refused at start.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from molcloak.pipeline.errors import ConfigError, InvalidSmilesError, MolcloakError, RemoteError, StepError
from molcloak.pipeline.featurize import canonical_smiles
from molcloak.pipeline.metrics import describe
from molcloak.pipeline.serving.http_client import RemoteModel

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FALLBACK_EXAMPLES = [  # used when the model's task is not one of the bundled datasets
    ("CC(=O)Oc1ccccc1C(=O)O", "aspirin"),
    ("Cn1cnc2c1c(=O)n(C)c(=O)n2C", "caffeine"),
    ("CC(C)Cc1ccc(cc1)C(C)C(=O)O", "ibuprofen"),
    ("c1ccc2ccccc2c1", "naphthalene"),
    ("OCC(O)CO", "glycerol"),
]


@dataclass
class Session:
    id: str
    directory: Path
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    remotes: dict[str, RemoteModel] = field(default_factory=dict)
    keys: dict[str, dict] = field(default_factory=dict)  # model -> keygen facts
    ciphertext: dict | None = None  # {"model", "smiles", "bytes"}
    output: dict | None = None  # {"model", "smiles", "bytes", "server_seconds"}
    lock: threading.Lock = field(default_factory=threading.Lock)


class AppBackend:
    """Everything the app does, callable from tests without a browser."""

    def __init__(
        self,
        server_url: str,
        state_dir: str | Path,
        token: str | None = None,
        bundles: dict[str, Path] | None = None,
        max_sessions: int = 16,
        session_ttl_s: float = 24 * 3600,
    ):
        self.server_url, self.token = server_url.rstrip("/"), token
        self.state_dir = Path(state_dir)
        self.sessions_dir = self.state_dir / "sessions"
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self.bundles = (
            bundles or {}
        )  # name -> local bundle (only when the app runs next to the owner's bundles)
        self.max_sessions, self.session_ttl_s = max_sessions, session_ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._simulators: dict[str, object] = {}
        self._examples: dict[tuple[str, int], list[tuple[str, str]]] = {}
        served = self._fetch_models()
        why = {name: unsupported(m, self.server_url, self.bundles.get(name)) for name, m in served.items()}
        self.skipped = {
            name: reason for name, reason in why.items() if reason
        }  # name -> why the page cannot show it
        self.models = {name: m for name, m in served.items() if name not in self.skipped}
        if not self.models:  # before the page starts: one line naming each model, its kind and what to use
            raise ConfigError(
                f"the app cannot show any model served at {self.server_url}: {'; '.join(self.skipped.values())}"
            )

    # -- models ---------------------------------------------------------------

    def _fetch_models(self) -> dict[str, dict]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            r = httpx.get(f"{self.server_url}/models", headers=headers, timeout=30)
        except httpx.TransportError as exc:
            raise RemoteError(
                f"cannot reach the FHE server at {self.server_url} ({exc}); is `molcloak serve` running?"
            ) from exc
        if not r.is_success:
            raise RemoteError(
                f"the FHE server at {self.server_url} answered {r.status_code} to GET /models: {r.text[:200]}"
            )
        return {m["name"]: m for m in r.json()}

    def model(self, name: str) -> dict:
        if name in self.skipped:
            raise ConfigError(self.skipped[name])
        if name not in self.models:
            raise MolcloakError(f"model {name!r} is not served; pick one of: {', '.join(self.models)}")
        return self.models[name]

    def model_card(self, name: str) -> str:
        """Markdown: what the model predicts and how it scored on its test split (from the manifest)."""
        m = self.model(name)
        task, circuit = m["task"], m.get("circuit", {})
        what = (
            f"classifies molecules as {' / '.join(task['labels'])}"
            if task["kind"] != "regression"
            else f"predicts {task['target']} {('in ' + task['units']) if task.get('units') else ''}".rstrip()
        )
        lines = [f"**{name}** {what} from `{m['featurizer'].get('spec', '?')}` features."]
        for split, values in m.get("metrics", {}).items():
            vals = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, (int, float)))
            lines.append(f"- {split.replace('_', ' ')} on the owner's test split: {vals}")
        if circuit:
            lines.append(
                f"- circuit: {circuit.get('pbs_count')} programmable bootstraps, "
                f"max bit width {circuit.get('max_bit_width')}"
            )
        if self.skipped:  # the model list shows only what the page can run; say what else is served
            lines.append("\nAlso served, not shown here: " + "; ".join(self.skipped.values()))
        return "\n".join(lines)

    def examples(self, name: str, n: int = 6) -> list[tuple[str, str]]:
        """(SMILES, caption) pairs from the bundled test split of the model's task, both classes shown."""
        if (name, n) not in self._examples:  # loading a bundled dataset parses ~1,300 molecules with RDKit
            self._examples[(name, n)] = self._pick_examples(name, n)
        return self._examples[(name, n)]

    def _pick_examples(self, name: str, n: int) -> list[tuple[str, str]]:
        task = self.model(name)["task"]
        try:
            from molcloak.pipeline.data import load_bundled
            from molcloak.pipeline.splits import balanced_sample, split_dataset

            ds = load_bundled(task["name"])
            test = ds.subset(split_dataset(ds, "official").test)
        except (MolcloakError, KeyError, ValueError):
            return FALLBACK_EXAMPLES[:n]
        y = np.asarray(test.y)
        if not test.smiles or len(y) == 0 or y.ndim != 1:  # not a single-task molecular test split
            return FALLBACK_EXAMPLES[:n]
        idx = (
            balanced_sample(y, n, seed=0)
            if task["kind"] != "regression"
            else np.linspace(0, len(y) - 1, n).astype(int)
        )
        caption = (
            (lambda v: task["labels"][int(v)])
            if task["kind"] != "regression"
            else (lambda v: f"{v:.2f} {task.get('units', '')}")
        )
        return [(test.smiles[i], f"test set, true: {caption(y[i])}") for i in idx]

    # -- molecule -------------------------------------------------------------

    @staticmethod
    def check_smiles(smiles: str) -> str:
        smiles = (smiles or "").strip()
        if not smiles:
            raise InvalidSmilesError("no SMILES given; type one (e.g. CCO for ethanol) or pick an example")
        if canonical_smiles(smiles) is None:
            raise InvalidSmilesError(
                f"SMILES {smiles!r} could not be parsed by RDKit; check brackets, ring closures "
                "and atom symbols, or pick an example"
            )
        return smiles

    def draw(self, smiles: str, size: int = 320):
        """The molecule as a PIL image (RDKit depiction)."""
        from rdkit import Chem
        from rdkit.Chem import Draw

        return Draw.MolToImage(Chem.MolFromSmiles(self.check_smiles(smiles)), size=(size, size))

    # -- sessions -------------------------------------------------------------

    def session(self, session_id: str) -> Session:
        if not SESSION_ID.match(session_id or ""):
            raise MolcloakError(f"invalid session id {session_id!r}")
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                s = Session(session_id, self.sessions_dir / session_id)
                s.directory.mkdir(parents=True, exist_ok=True)
                self._sessions[session_id] = s
            s.last_used = time.time()
        self.cleanup(keep=session_id)
        return s

    def cleanup(self, keep: str | None = None, now: float | None = None) -> list[str]:
        """End sessions older than the TTL, then the least recently used beyond `max_sessions`.

        Also removes session folders left on disk by an earlier run of the app. Returns the ended ids.
        """
        now = time.time() if now is None else now
        with self._lock:
            live = sorted(self._sessions.values(), key=lambda s: s.last_used, reverse=True)
            ended = [s for s in live if s.id != keep and now - s.last_used > self.session_ttl_s]
            rest = [s for s in live if s not in ended]
            ended += [s for s in rest[self.max_sessions :] if s.id != keep]
            for s in ended:
                del self._sessions[s.id]
            orphans = [d for d in self.sessions_dir.iterdir() if d.is_dir() and d.name not in self._sessions]
        for s in ended:
            self._end(s)
        for d in orphans:
            shutil.rmtree(d, ignore_errors=True)
        return [s.id for s in ended]

    def end_session(self, session_id: str) -> None:
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is not None:
            self._end(s)

    def _end(self, s: Session) -> None:
        with s.lock:
            for name, remote in s.remotes.items():
                key_id = s.keys.get(name, {}).get("key_id")
                if key_id:
                    try:  # forget our evaluation keys on the server too
                        remote.request("DELETE", f"/keys/{key_id}")
                    except MolcloakError:
                        pass
                remote.close()
            s.remotes.clear()
        shutil.rmtree(s.directory, ignore_errors=True)

    @property
    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def _remote(self, s: Session, name: str) -> RemoteModel:
        self.model(name)
        if name not in s.remotes:
            s.remotes[name] = RemoteModel(
                self.server_url, name, key_dir=s.directory / "keys", token=self.token
            )
        return s.remotes[name]

    # -- the five steps -------------------------------------------------------

    def keygen(self, session_id: str, name: str) -> dict:
        """Step 2: fresh keys for this session and model; the evaluation keys are uploaded."""
        s = self.session(session_id)
        with s.lock:
            remote = self._remote(s, name)
            old = s.keys.pop(name, {}).get("key_id")
            t0 = time.perf_counter()
            info = remote.keygen(force=True)  # fresh keys; the evaluation keys are uploaded
            upload = max(0.0, time.perf_counter() - t0 - info.seconds)
            key_id = remote.key_id()
            if old and old != key_id:
                remote.request("DELETE", f"/keys/{old}")
            s.ciphertext = s.output = None  # made with the old keys
            s.keys[name] = {
                "key_id": key_id,
                "keygen_seconds": info.seconds,
                "upload_seconds": upload,
                "evaluation_key_bytes": info.evaluation_key_bytes,
            }
            return dict(s.keys[name])

    def encrypt(self, session_id: str, name: str, smiles: str) -> dict:
        """Step 3: featurize and encrypt on this machine; the ciphertext is all the server will get."""
        smiles = self.check_smiles(smiles)
        s = self.session(session_id)
        with s.lock:
            if name not in s.keys:
                raise StepError("generate keys first (step 2): encryption needs this session's secret key")
            client = self._remote(s, name).client
            t0 = time.perf_counter()
            x = client.featurize([smiles])[0]
            ct = client.encrypt(x)
            seconds = time.perf_counter() - t0
            s.ciphertext, s.output = {"model": name, "smiles": smiles, "bytes": ct}, None
            return {
                "smiles": smiles,
                "bytes": len(ct),
                "seconds": seconds,
                "hex": excerpt(ct),
                "sha256": hashlib.sha256(ct).hexdigest()[:16],
            }

    def run(self, session_id: str, name: str) -> dict:
        """Step 4: send the ciphertext and the key id; the server runs the whole network in FHE."""
        s = self.session(session_id)
        with s.lock:
            ct = s.ciphertext
            if ct is None or ct["model"] != name:
                raise StepError(f"encrypt a molecule for model {name!r} first (step 3)")
            t0 = time.perf_counter()
            outs, server_s = self._remote(s, name).run([ct["bytes"]])
            s.output = {
                "model": name,
                "smiles": ct["smiles"],
                "bytes": outs[0],
                "server_seconds": server_s[0],
            }
            return {
                "smiles": ct["smiles"],
                "server_seconds": server_s[0],
                "round_trip_seconds": time.perf_counter() - t0,
                "bytes": len(outs[0]),
                "hex": excerpt(outs[0]),
            }

    def decrypt(self, session_id: str, name: str) -> dict:
        """Step 5: only this session's secret key turns the server's answer into a prediction."""
        s = self.session(session_id)
        with s.lock:
            out = s.output
            if out is None or out["model"] != name:
                raise StepError(f"run the encrypted molecule on the server first (step 4) for model {name!r}")
            client = self._remote(s, name).client
            raw = client.decrypt(out["bytes"])
            values = client.predictions(raw)[0]
            return {
                "smiles": out["smiles"],
                "text": describe(client.task, values),
                "values": _floats(values),
                "raw": _floats(raw[0]),
            }

    def predict(self, session_id: str, name: str, smiles: str, on_step=None) -> dict:
        """All steps at once ("Predict privately"); keys are generated only when the session has none.

        `on_step(fraction, description)` is called before each step (the app's progress bar).
        """
        step = on_step or (lambda fraction, desc: None)
        smiles = self.check_smiles(smiles)
        step(0.05, "keys")
        keys = self.predict_keys(session_id, name)
        step(0.3, "encrypting")
        enc = self.encrypt(session_id, name, smiles)
        step(0.4, "running in FHE on the server")
        run = self.run(session_id, name)
        step(0.9, "decrypting")
        return {"keys": keys, "encrypt": enc, "run": run, "decrypt": self.decrypt(session_id, name)}

    def predict_keys(self, session_id: str, name: str) -> dict:
        """This session's keys for `name`, generated (and uploaded) only if it has none yet."""
        s = self.session(session_id)
        return dict(s.keys[name]) if name in s.keys else self.keygen(session_id, name)

    # -- optional comparison (owner side only) --------------------------------

    def can_compare(self, name: str) -> bool:
        bundle = self.bundles.get(name)
        return bool(bundle and (bundle / "owner" / "checkpoint.json").is_file())

    def plaintext(self, name: str, smiles: str) -> dict:
        """The same quantized model in the clear (needs the owner's weights; NOT private)."""
        from molcloak.pipeline.predict import Simulator

        smiles = self.check_smiles(smiles)
        if not self.can_compare(name):
            raise MolcloakError(
                f"no local weights for model {name!r}: the plaintext comparison is only available "
                "when the app runs next to the owner's bundle (molcloak app --bundle DIR)"
            )
        if name not in self._simulators:
            self._simulators[name] = Simulator(self.bundles[name])
        sim = self._simulators[name]
        raw, values = sim([smiles])
        return {
            "smiles": smiles,
            "text": describe(sim.task, values[0]),
            "values": _floats(values[0]),
            "raw": _floats(raw[0]),
        }

    def close(self) -> None:
        for sid in list(self._sessions):
            self.end_session(sid)


def unsupported(info: dict, server_url: str, bundle: Path | None = None) -> str:
    """Why the page cannot show a served model (from its GET /models entry), or "" when it can.

    The page draws, encrypts and explains one molecule with one prediction: models that read tabular
    rows, or predict several tasks at once, are used with `molcloak predict` instead.
    """
    from molcloak.pipeline.featurize import featurizer_from_dict
    from molcloak.pipeline.tasks import TaskSpec

    name = info.get("name", "?")

    def use(extra: str = "") -> str:
        local = f" (or `molcloak predict --bundle {bundle}{extra}`)" if bundle else ""
        return f"use `molcloak predict --server {server_url} --model {name}{extra}`{local} instead"

    try:
        featurizer, task = featurizer_from_dict(info["featurizer"]), TaskSpec.from_dict(info["task"])
    except (MolcloakError, KeyError, TypeError, ValueError) as exc:
        return f"model {name!r} has a featurizer or task this app cannot read ({exc}); {use()}"
    if featurizer.input_kind != "smiles":
        return (
            f"model {name!r} reads {featurizer.input_kind} ({featurizer}), not SMILES, and the app only shows "
            f"molecules; {use(' --input rows.csv')}"
        )
    if task.is_multitask:
        return (
            f"model {name!r} is a multi-task {task.kind} model ({len(task.tasks)} tasks: {', '.join(task.tasks)}) "
            f"and the app shows one prediction per molecule; {use()}"
        )
    return ""


def excerpt(data: bytes, width: int = 32) -> str:
    """A short hex view from the middle of a ciphertext (the start is a header of sizes and zeros)."""
    if len(data) <= width:
        return data.hex(" ")
    start = (len(data) - width) // 2
    return f"bytes {start}-{start + width - 1} of {len(data)}: {data[start : start + width].hex(' ')}"


def _floats(a) -> list[float] | float:
    return [float(v) for v in np.ravel(a)] if np.ndim(a) else float(a)
