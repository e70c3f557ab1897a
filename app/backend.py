"""The app's client side, without any UI: sessions, keys, encrypt, run on the server, decrypt.

The app process is the client. Each browser session gets a key directory of its own under
`<state_dir>/sessions/<id>/` (secret key mode 0600, never sent anywhere); the FHE server is
reached over HTTP exactly as a remote deployment would be (`RemoteModel`, the remote
`PredictionBackend`), so it only ever receives evaluation keys and ciphertexts. Old sessions are
cleaned up (count and age bounds), together with their evaluation keys on the server, so the app
can run for days. The page shows every kind of model `molcloak predict` serves: molecules (SMILES) or
tabular rows, one task or several, classes or values with units. The owner's plaintext comparison
runs in a child process (`compare.Comparison`), never in the page's threads.
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

from molcloak.pipeline.errors import (
    ConfigError,
    DataError,
    InvalidSmilesError,
    MolcloakError,
    RemoteError,
    StepError,
)
from molcloak.pipeline.featurize import canonical_smiles
from molcloak.pipeline.metrics import describe
from molcloak.pipeline.serving.http_client import RemoteModel
from molcloak.pipeline.tasks import TaskSpec

from .compare import Comparison
from .views import _floats, excerpt, quantized, task_description, true_label, unsupported

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
    ciphertext: dict | None = None  # {"model", "item", "bytes"}
    output: dict | None = None  # {"model", "item", "bytes", "server_seconds"}
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
        self._examples: dict[tuple[str, int], list[tuple[str, object, str]]] = {}
        self._featurizers: dict[str, object] = {}
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
        # the owner's plaintext comparison: compiled once per model in a child process, never in a page thread
        self._comparison = Comparison(
            {n: p for n, p in self.bundles.items() if n in self.models and self.can_compare(n)}
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
        task, circuit = TaskSpec.from_dict(m["task"]), m.get("circuit", {})
        featurizer = self.featurizer(name)
        inputs = "molecules" if featurizer.input_kind == "smiles" else f"rows of {featurizer.width} numbers"
        if task.kind == "multilabel":
            what = f"gives, for {inputs}, the probability of each label: {', '.join(task.tasks)}"
        elif task.is_multitask:
            outs = [f"{t} ({task.unit_of(j)})" if task.unit_of(j) else t for j, t in enumerate(task.tasks)]
            what = f"predicts {', '.join(outs)} of {inputs}"
        elif task.is_classification:
            what = f"classifies {inputs} as {' / '.join(task.labels)}"
        else:
            what = f"predicts {task.target} {('in ' + task.units) if task.units else ''} of {inputs}"
        lines = [
            f"**{name}**: {task_description(task)}. It {what} from `{m['featurizer'].get('spec', '?')}` features."
        ]
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

    # -- inputs -------------------------------------------------------------

    def featurizer(self, name: str):
        """The model's fitted featurizer (from its GET /models entry): what the client computes."""
        from molcloak.pipeline.featurize import featurizer_from_dict

        if name not in self._featurizers:
            self._featurizers[name] = featurizer_from_dict(self.model(name)["featurizer"])
        return self._featurizers[name]

    def input_kind(self, name: str) -> str:
        """ "smiles" (molecules) or "rows" (a tabular model's numeric columns)."""
        return self.featurizer(name).input_kind

    def check_input(self, name: str, item):
        """A SMILES string or a row {column: value}, checked the way `molcloak predict` checks it."""
        featurizer = self.featurizer(name)
        if featurizer.input_kind == "smiles":
            return self.check_smiles(item)
        value, reason = featurizer.check_input(item if item is not None else {})
        if value is None:
            raise DataError(f"row: {reason}")
        return dict(zip(featurizer.names, value))

    def examples(self, name: str, n: int = 6) -> list[tuple[str, object, str]]:
        """(caption, input, true label) triples from the bundled test split of the model's task.

        The input is a SMILES string, or a row {column: value} for a tabular model; classes alternate."""
        if (name, n) not in self._examples:  # loading a bundled dataset parses ~1,300 molecules with RDKit
            self._examples[(name, n)] = self._pick_examples(name, n)
        return self._examples[(name, n)]

    def truth(self, name: str, item) -> str:
        """The true label of `item` when it is one of the test-set examples shown, else ""."""
        for _, example, truth in self.examples(name):
            if example == item:
                return truth
        return ""

    def _pick_examples(self, name: str, n: int) -> list[tuple[str, object, str]]:
        task = TaskSpec.from_dict(self.model(name)["task"])
        tabular = self.input_kind(name) == "rows"
        fallback = [] if tabular else [(f"{smi}  ({what})", smi, "") for smi, what in FALLBACK_EXAMPLES[:n]]
        try:
            from molcloak.pipeline.data import load_bundled
            from molcloak.pipeline.splits import balanced_sample, split_dataset

            ds = load_bundled(task.name)
            test = ds.subset(split_dataset(ds).test)
        except (MolcloakError, KeyError, ValueError):
            return fallback
        y = np.asarray(test.y, dtype=float)
        if len(y) == 0 or test.is_tabular != tabular or (y.ndim != 1) != task.is_multitask:
            return fallback
        if task.is_classification and not task.is_multitask:
            idx = balanced_sample(y, n, seed=0)
        else:
            idx = np.linspace(0, len(y) - 1, min(n, len(y))).astype(int)
        out = []
        for i in idx:
            truth = true_label(task, y[i])
            if tabular:
                item = {c: float(v) for c, v in zip(test.columns, test.table[i])}
                out.append((f"test row {int(test.rows[i])} (true: {truth})", item, truth))
            else:
                out.append((f"{test.smiles[i]}  (test set, true: {truth})", test.smiles[i], truth))
        return out

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

    # -- the four steps -------------------------------------------------------

    def keygen(self, session_id: str, name: str) -> dict:
        """Fresh keys for this session and model; the evaluation keys are uploaded."""
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
            secret = sum(p.stat().st_size for p in info.path.parent.glob("keys.bin"))
            s.keys[name] = {
                "key_id": key_id,
                "keygen_seconds": info.seconds,
                "upload_seconds": upload,
                "evaluation_key_bytes": info.evaluation_key_bytes,
                "key_file_bytes": secret,
                "reused": False,
            }
            return dict(s.keys[name])

    def encrypt(self, session_id: str, name: str, item) -> dict:
        """Featurize and encrypt on this machine; the ciphertext is all the server will get."""
        item = self.check_input(name, item)
        s = self.session(session_id)
        with s.lock:
            if name not in s.keys:
                raise StepError("generate keys first (step 1): encryption needs this session's secret key")
            client = self._remote(s, name).client
            t0 = time.perf_counter()
            x = client.featurize([item])[0]
            ct = client.encrypt(x)
            seconds = time.perf_counter() - t0
            s.ciphertext, s.output = {"model": name, "item": item, "bytes": ct}, None
            return {
                "item": item,
                "seconds": seconds,
                "features": [float(v) for v in np.ravel(x)],
                "feature_bytes": int(np.asarray(x, dtype=np.float32).nbytes),
                "quantized": quantized(client, x),
                "bytes": len(ct),
                "hex": excerpt(ct),
                "sha256": hashlib.sha256(ct).hexdigest()[:16],
            }

    def run(self, session_id: str, name: str) -> dict:
        """Send the ciphertext and the key id; the server runs the whole network in FHE."""
        s = self.session(session_id)
        with s.lock:
            ct = s.ciphertext
            if ct is None or ct["model"] != name:
                raise StepError(f"encrypt an input for model {name!r} first (step 2)")
            t0 = time.perf_counter()
            outs, server_s = self._remote(s, name).run([ct["bytes"]])
            s.output = {"model": name, "item": ct["item"], "bytes": outs[0], "server_seconds": server_s[0]}
            return {
                "item": ct["item"],
                "server_seconds": server_s[0],
                "round_trip_seconds": time.perf_counter() - t0,
                "bytes": len(outs[0]),
                "input_bytes": len(ct["bytes"]),
                "hex": excerpt(outs[0]),
            }

    def decrypt(self, session_id: str, name: str) -> dict:
        """Only this session's secret key turns the server's answer into a prediction."""
        s = self.session(session_id)
        with s.lock:
            out = s.output
            if out is None or out["model"] != name:
                raise StepError(f"run the encrypted input on the server first (step 3) for model {name!r}")
            client = self._remote(s, name).client
            t0 = time.perf_counter()
            raw = client.decrypt(out["bytes"])
            values = client.predictions(raw)[0]
            compile_cfg = client.manifest.data.get("compile", {})
            return {
                "item": out["item"],
                "seconds": time.perf_counter() - t0,
                "text": describe(client.task, values),
                "values": _floats(values),
                "raw": _floats(raw[0]),
                "truth": self.truth(name, out["item"]),
                "approximate": compile_cfg.get("rounding_method") == "approximate"
                and compile_cfg.get("rounding_bits") is not None,
            }

    def state(self, session_id: str, name: str) -> dict[str, bool]:
        """Which steps can run now for this session and model (the page enables their buttons)."""
        s = self.session(session_id)
        ct, out = s.ciphertext, s.output
        return {
            "keys": True,
            "encrypt": name in s.keys,
            "run": ct is not None and ct["model"] == name,
            "decrypt": out is not None and out["model"] == name,
        }

    def forget(self, session_id: str) -> None:
        """Drop the session's ciphertext and encrypted answer (the input changed: they belong to the old one)."""
        s = self.session(session_id)
        with s.lock:
            s.ciphertext = s.output = None

    def keys_of(self, session_id: str, name: str) -> dict | None:
        """The keys this session holds for `name` (marked reused), or None."""
        k = self.session(session_id).keys.get(name)
        return {**k, "reused": True} if k else None

    def predict(self, session_id: str, name: str, item) -> dict:
        """All steps at once ("Predict privately"): {step: its result}."""
        return dict(self.steps(session_id, name, item))

    def steps(self, session_id: str, name: str, item):
        """The four steps one by one, yielding (step, result); keys only when the session has none."""
        item = self.check_input(name, item)
        yield "keys", self.predict_keys(session_id, name)
        yield "encrypt", self.encrypt(session_id, name, item)
        yield "run", self.run(session_id, name)
        yield "decrypt", self.decrypt(session_id, name)

    def predict_keys(self, session_id: str, name: str) -> dict:
        """This session's keys for `name`, generated (and uploaded) only if it has none yet; "reused"
        says which happened (the page must not present old figures as a new key generation)."""
        return self.keys_of(session_id, name) or self.keygen(session_id, name)

    def batch(self, session_id: str, name: str, inputs: list, on_item=None, batch_size: int = 8):
        """Private predictions of many inputs with this session's keys: `PredictionBackend.predict`,
        exactly what `molcloak predict --server` runs (invalid inputs are reported by row, not fatal)."""
        s = self.session(session_id)
        with s.lock:
            remote = self._remote(s, name)
            report = remote.predict(inputs, batch_size=batch_size, skip_invalid=True, on_item=on_item)
            if name not in s.keys:  # the keys `predict` made (or loaded) are this session's keys now
                s.keys[name] = {
                    "key_id": remote.key_id(),
                    "keygen_seconds": report.keygen_seconds,
                    "upload_seconds": 0.0,
                    "evaluation_key_bytes": report.evaluation_key_bytes,
                    "key_file_bytes": 0,
                    "reused": False,
                }
            return report

    # -- optional comparison (owner side only) --------------------------------

    def can_compare(self, name: str) -> bool:
        bundle = self.bundles.get(name)
        return bool(bundle and (bundle / "owner" / "checkpoint.json").is_file())

    def plaintext(self, name: str, item) -> dict:
        """The same quantized model in the clear (owner's weights; NOT private), simulated `RUNS` times
        in the comparison process: the prediction of the first run and the spread of all runs."""
        item = self.check_input(name, item)
        if not self.can_compare(name):
            raise MolcloakError(
                f"no local weights for model {name!r}: the plaintext comparison is only available "
                "when the app runs next to the owner's bundle (molcloak app --bundle DIR)"
            )
        sim = self._comparison.simulate(name, [item])
        task = TaskSpec.from_dict(self.model(name)["task"])
        values = np.asarray([v[0] for v in sim["values"]], dtype=float)  # (runs, outputs)
        return {
            "item": item,
            "text": describe(task, values[0]),
            "values": _floats(values[0]),
            "raw": _floats(np.asarray(sim["raw"][0][0])),
            "runs": len(values),
            "spread": _ptp(values),
            "raw_spread": _ptp(np.asarray(sim["raw"], dtype=float)),
            "approximate": sim["approximate"],
        }

    def close(self) -> None:
        for sid in list(self._sessions):
            self.end_session(sid)
        self._comparison.close()


def _ptp(runs: np.ndarray) -> float:
    """The largest difference between runs, over the outputs (axis 0: runs)."""
    return float(np.max(np.ptp(runs.reshape(len(runs), -1), axis=0)))
