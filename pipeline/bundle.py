"""Everything molcloak writes to disk: training checkpoints and deployment bundles.

Checkpoint (output of `molcloak train`, the owner's private artifact)::

    checkpoint.json  task, featurizer spec, model/training config, float metrics
    model.pt         Brevitas weights
    data.npz         calibration features (train split) and the test split for metrics

Bundle (output of `molcloak deploy`)::

    manifest.json    name, task, labels, featurizer spec, metrics, circuit statistics, versions
    client/          client.zip (quantizers + crypto parameters, no weights) + manifest.json
    server/          server.zip (the compiled circuit) + manifest.json
    owner/           the checkpoint the bundle was compiled from: weights, never served

Directories are written to a temporary sibling and renamed into place, so a
crash never leaves a half-written bundle.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import BundleError
from .featurize import FeaturizerSpec, featurizer_from_dict
from .metrics import TargetScaler
from .tabular import TabularSpec
from .tasks import TaskSpec

BUNDLE_FORMAT = 1
CHECKED_PACKAGES = ("concrete-ml", "concrete-python")


def package_versions() -> dict[str, str]:
    out = {"python": ".".join(platform.python_version_tuple()[:2])}
    for pkg in ("molcloak",) + CHECKED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def check_versions(recorded: dict[str, str], where: Path) -> None:
    """Fail clearly when the bundle was built with other Concrete or Python versions."""
    here = package_versions()
    for pkg in ("python",) + CHECKED_PACKAGES:
        if recorded.get(pkg) != here[pkg]:
            raise BundleError(
                f"{where} was built with {pkg} {recorded.get(pkg)}, this machine has {here[pkg]}; "
                f"install {pkg}=={recorded.get(pkg)} or rebuild the bundle with `molcloak deploy`"
            )


# ---------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A trained model and what is needed to compile and evaluate it."""

    task: TaskSpec
    featurizer: FeaturizerSpec | TabularSpec
    model_name: str
    model_config: dict
    n_inputs: int
    train_info: dict  # training config, epochs, dataset description
    metrics: dict  # {"float": {...}} on the test split
    state_dict: dict
    X_calib: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    smiles_test: list[str]
    scaler: TargetScaler | None = None

    def build_model(self) -> torch.nn.Module:
        from .networks import build_network

        model = build_network(self.model_name, self.model_config, self.n_inputs, self.task.n_outputs)
        model.load_state_dict(self.state_dict)
        model.eval()
        return model

    def meta(self) -> dict:
        return {
            "format": BUNDLE_FORMAT,
            "task": self.task.to_dict(),
            "featurizer": self.featurizer.to_dict(),
            "model": {"name": self.model_name, "config": self.model_config, "n_inputs": self.n_inputs},
            "target_scaler": None
            if self.scaler is None
            else {"mean": self.scaler.mean, "std": self.scaler.std},
            "training": self.train_info,
            "metrics": self.metrics,
            "versions": package_versions(),
        }


def save_checkpoint(ckpt: Checkpoint, out_dir: str | Path, force: bool = False) -> Path:
    with _atomic_dir(Path(out_dir), force) as tmp:
        _write_checkpoint(ckpt, tmp)
    return Path(out_dir)


def _write_checkpoint(ckpt: Checkpoint, d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "checkpoint.json").write_text(json.dumps(ckpt.meta(), indent=2))
    torch.save(ckpt.state_dict, d / "model.pt")
    np.savez_compressed(
        d / "data.npz",
        X_calib=ckpt.X_calib,
        X_test=ckpt.X_test,
        y_test=ckpt.y_test,
        smiles_test=np.asarray(ckpt.smiles_test, dtype=object).astype(str),
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint directory, or the owner/ part of a bundle."""
    d = Path(path)
    if (d / "owner").is_dir():
        d = d / "owner"
    files = [d / "checkpoint.json", d / "model.pt", d / "data.npz"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BundleError(
            f"{path} is not a molcloak checkpoint (missing {', '.join(missing)}); "
            "pass the --out directory of `molcloak train` or a bundle that has its owner/ part"
        )
    meta = _read_json(d / "checkpoint.json")
    data = np.load(d / "data.npz")
    sc = meta.get("target_scaler")
    return Checkpoint(
        task=TaskSpec.from_dict(meta["task"]),
        featurizer=featurizer_from_dict(meta["featurizer"]),
        model_name=meta["model"]["name"],
        model_config=meta["model"]["config"],
        n_inputs=int(meta["model"]["n_inputs"]),
        train_info=meta.get("training", {}),
        metrics=meta.get("metrics", {}),
        state_dict=torch.load(d / "model.pt"),
        X_calib=data["X_calib"],
        X_test=data["X_test"],
        y_test=data["y_test"],
        smiles_test=[str(s) for s in data["smiles_test"]],
        scaler=None if sc is None else TargetScaler(sc["mean"], sc["std"]),
    )


# ---------------------------------------------------------------- bundles


@dataclass
class Manifest:
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def task(self) -> TaskSpec:
        return TaskSpec.from_dict(self.data["task"])

    @property
    def featurizer(self) -> FeaturizerSpec | TabularSpec:
        return featurizer_from_dict(self.data["featurizer"])

    @property
    def scaler(self) -> TargetScaler | None:
        sc = self.data.get("target_scaler")
        return None if sc is None else TargetScaler(sc["mean"], sc["std"])

    @property
    def metrics(self) -> dict:
        return self.data.get("metrics", {})

    @property
    def circuit(self) -> dict:
        return self.data.get("circuit", {})

    @property
    def output(self) -> str:
        """`logits`, or `class` for a class-only circuit (`output_head`); older bundles: logits."""
        return (self.data.get("compile") or {}).get("output", "logits")


def write_bundle(
    out_dir: str | Path,
    name: str,
    ckpt: Checkpoint,
    q_module,
    compile_info: dict,
    metrics: dict,
    force: bool = False,
) -> Manifest:
    """Write the deployment bundle of a compiled model (see module docstring)."""
    from concrete.ml.deployment import FHEModelDev

    meta = ckpt.meta()
    meta.update(
        {"name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "metrics": metrics, **compile_info}
    )
    manifest = Manifest(meta)
    with _atomic_dir(Path(out_dir), force) as tmp:
        with tempfile.TemporaryDirectory(dir=tmp) as dev_dir:
            FHEModelDev(dev_dir, model=q_module).save()
            for part, zip_name in (("client", "client.zip"), ("server", "server.zip")):
                (tmp / part).mkdir()
                shutil.move(str(Path(dev_dir) / zip_name), tmp / part / zip_name)
                (tmp / part / "manifest.json").write_text(json.dumps(meta, indent=2))
        (tmp / "manifest.json").write_text(json.dumps(meta, indent=2))
        _write_checkpoint(ckpt, tmp / "owner")
    return manifest


def write_aggregate_part(
    bundle: str | Path, circuit, spec_json: str, owner_json: str, force: bool = False
) -> Path:
    """Write `<bundle>/aggregate/` (see `aggregate.py`): server.zip for the owner's server, client.zip (crypto
    parameters only) and aggregate.json for auditors; and the thresholds, which are never served, to
    `<bundle>/owner/aggregate.json`."""
    target = Path(bundle) / "aggregate"
    with _atomic_dir(target, force) as tmp:
        circuit.server.save(tmp / "server.zip", via_mlir=True)
        circuit.client.save(tmp / "client.zip")
        (tmp / "aggregate.json").write_text(spec_json)
        (Path(bundle) / "owner" / "aggregate.json").write_text(owner_json)
    return target


def load_manifest(path: str | Path, part: str | None = None, check: bool = True) -> Manifest:
    """Read a bundle's manifest and check versions.

    `part` = "client" or "server" requires that half; `path` may then be the bundle root or the
    part's own directory (a downloaded client part, say).
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle directory {str(root)!r} does not exist; create one with `molcloak deploy`")
    base = root / part if part and (root / part).is_dir() else root
    manifest_path = base / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(
            f"{root} has no manifest.json; it is not a molcloak bundle (create one with `molcloak deploy`)"
        )
    if part and not (base / f"{part}.zip").is_file():
        raise BundleError(
            f"{root} has no {part}.zip; the bundle is incomplete, rebuild it with `molcloak deploy`"
        )
    data = _read_json(manifest_path)
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{root}: bundle format {data.get('format')!r}, expected {BUNDLE_FORMAT}; rebuild it with `molcloak deploy`"
        )
    if check:
        check_versions(data.get("versions", {}), root)
    return Manifest(data)


def client_fingerprint(bundle: str | Path) -> str:
    """The model's client fingerprint: sha256 of client/client.zip (16 hex characters). The client,
    the server (GET /models, POST /predict) and the audit's resume check all use this value; it changes
    exactly when the model is redeployed."""
    return hashlib.sha256((part_dir(bundle, "client") / "client.zip").read_bytes()).hexdigest()[:16]


def part_dir(path: str | Path, part: str) -> Path:
    """The directory holding `<part>.zip`: `bundle/<part>`, or `path` itself for a part on its own."""
    b = Path(path)
    return b / part if (b / part / f"{part}.zip").is_file() else b


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is unreadable ({exc}); rebuild it") from exc


@contextmanager
def _atomic_dir(target: Path, force: bool) -> Iterator[Path]:
    if target.exists() and not force:
        raise BundleError(f"{target} already exists; pass --force to replace it or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{time.time_ns()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
