"""Model-extraction check of the FHE server (issue 13, weakness 10), on loopback.

An attacker with one key id encrypts N feature vectors of its choice, gets the model's decrypted raw
outputs, fits a small surrogate (an MLP with 16 hidden units) on half of them and predicts the other half.
This script measures how well that works against a real `molcloak serve` process, for each setting:

- `raw`: no budget; the server answers every query with the model's raw outputs (logits);
- `budget`: the server's `--max-predictions-per-key B`; the attacker queries until the server refuses
  (429 BudgetExhaustedError) and fits on what it got;
- `raw_curve`: surrogate quality against the number of answers (subsets of the raw answers), i.e. what a
  budget of that size leaves an attacker with one key id;
- `class_only_from_raw`: the surrogate fitted on the predicted class only (the argmax of the raw answers),
  i.e. what a circuit that outputs only the class would leave; derived from the raw answers, no such
  circuit is built (see the README), together with its accuracy cost on the owner's test split.

Truth for the held-out half is the raw answers of the server. JSON out; it never asserts on time.

    python -m molcloak.evaluation.extraction_check --bundle demo/bundle --n 512 --budget 64 --out x.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from molcloak.pipeline.bundle import load_manifest
from molcloak.pipeline.errors import BudgetExhaustedError, MolcloakError
from molcloak.pipeline.serving.http_client import RemoteModel
from molcloak.pipeline.serving.process import START_TIMEOUT, ServerProcess

HIDDEN = 16
BATCH = 16


def chosen_inputs(client, task_name: str, n: int, seed: int, kind: str) -> np.ndarray:
    """`n` feature vectors an attacker chooses: uniform in the box spanned by the features of public
    molecules (`box`), or those molecules' features themselves (`molecules`), shuffled."""
    from molcloak.pipeline import data

    ds = data.load_bundled(task_name)
    public = np.asarray(client.featurize(list(ds.smiles)), dtype=np.float64)
    rng = np.random.default_rng(seed)
    if kind == "molecules":
        return public[rng.permutation(len(public))[:n]]
    lo, hi = public.min(axis=0), public.max(axis=0)
    return lo + rng.random((n, public.shape[1])) * (hi - lo)


def query(model: RemoteModel, X: np.ndarray) -> tuple[np.ndarray, dict]:
    """Raw outputs of the rows of `X`, in batches, until done or the server refuses (budget)."""
    outs, refused = [], None
    for start in range(0, len(X), BATCH):
        rows = X[start : start + BATCH]
        try:
            answers, _ = model.run([model.client.encrypt(x) for x in rows])
        except BudgetExhaustedError as exc:
            refused = str(exc)
            break
        outs += [np.asarray(model.client.decrypt(a), dtype=np.float64).reshape(-1) for a in answers]
    info = {"answered": len(outs), "refused": refused, "remaining_header": model.predictions_remaining}
    return np.array(outs), info


def fit_surrogate(X_train, Y_train, X_test, Y_test, seed: int) -> dict:
    """R² of a 16-unit MLP regressor on the held-out raw outputs, and agreement of the argmax class."""
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    if len(X_train) < 2:
        return {"train": len(X_train), "r2": None, "class_agreement": None}
    scaler = StandardScaler().fit(X_train)
    mlp = MLPRegressor((HIDDEN,), max_iter=5000, random_state=seed).fit(scaler.transform(X_train), Y_train)
    pred = mlp.predict(scaler.transform(X_test)).reshape(len(X_test), -1)
    result = {"train": len(X_train), "r2": float(r2_score(Y_test, pred))}
    if Y_test.shape[1] > 1:
        margin = Y_test[:, 1] - Y_test[:, 0]
        result["r2_logit_margin"] = float(r2_score(margin, pred[:, 1] - pred[:, 0]))
        result["class_agreement"] = float(np.mean(pred.argmax(1) == Y_test.argmax(1)))
    return result


def fit_class_only(X_train, labels_train, X_test, Y_test, seed: int) -> dict:
    """Agreement of a 16-unit MLP classifier fitted on the predicted classes only."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    if len(set(labels_train.tolist())) < 2:
        return {"train": len(X_train), "class_agreement": None, "note": "one class only in the answers"}
    scaler = StandardScaler().fit(X_train)
    mlp = MLPClassifier((HIDDEN,), max_iter=5000, random_state=seed).fit(
        scaler.transform(X_train), labels_train
    )
    agree = float(np.mean(mlp.predict(scaler.transform(X_test)) == Y_test.argmax(1)))
    return {"train": len(X_train), "class_agreement": agree}


def class_only_cost(bundle: Path) -> dict | None:
    """ROC-AUC on the owner's test split from the raw outputs (FHE simulation) and from the class only."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    from molcloak.pipeline.bundle import load_checkpoint
    from molcloak.pipeline.predict import predict_local

    try:
        ckpt = load_checkpoint(bundle)
    except MolcloakError:
        return None
    if not ckpt.smiles_test:
        return None
    raw = np.array([p.raw for p in predict_local(bundle, ckpt.smiles_test, fhe="simulate").predictions])
    raw = raw.reshape(len(raw), -1)
    y = np.asarray(ckpt.y_test).reshape(-1)
    if raw.shape[1] != 2:
        return None
    score, label = raw[:, 1] - raw[:, 0], raw.argmax(1)
    return {
        "test_molecules": len(y),
        "roc_auc_from_logits": float(roc_auc_score(y, score)),
        "roc_auc_from_class_only": float(roc_auc_score(y, label)),
        "accuracy": float(accuracy_score(y, label)),
    }


def _server(bundles: Path, tmp: Path, name: str, args: list, timeout: float) -> ServerProcess:
    return ServerProcess(bundles, tmp / name, log=tmp / f"{name}.log", extra_args=args, timeout=timeout)


def run(bundle: Path, n: int, budget: int, seed: int, inputs: str, workers: int, timeout: float) -> dict:
    manifest = load_manifest(bundle, "server")
    tmp = Path(tempfile.mkdtemp(prefix="molcloak-extraction-"))
    bundles = tmp / "bundles"
    shutil.copytree(bundle / "client", bundles / "model" / "client")
    shutil.copytree(bundle / "server", bundles / "model" / "server")
    shutil.copy(bundle / "manifest.json", bundles / "model" / "manifest.json")
    common = ["--workers", workers, "--max-batch", BATCH]
    result: dict = {
        "model": manifest.name,
        "circuit": {k: manifest.circuit.get(k) for k in ("pbs_count", "max_bit_width", "p_error")},
        "n": n,
        "inputs": inputs,
        "surrogate": f"MLP, {HIDDEN} hidden units, fitted on the first half, scored on the second",
        "seed": seed,
    }
    try:
        server = _server(bundles, tmp, "raw", common, timeout)
        try:
            model = RemoteModel(server.url, manifest.name, key_dir=tmp / "attacker-keys")
            X = chosen_inputs(model.client, manifest.task.name, n, seed, inputs)
            t0 = time.perf_counter()
            Y, info = query(model, X)
            seconds = time.perf_counter() - t0
        finally:
            server.stop()
        half = n // 2
        X_train, Y_train, X_test, Y_test = X[:half], Y[:half], X[half:], Y[half:]
        result["raw"] = {
            **info,
            "key_ids": 1,
            "query_seconds": seconds,
            **fit_surrogate(X_train, Y_train, X_test, Y_test, seed),
        }
        result["raw_curve"] = [
            fit_surrogate(X_train[:q], Y_train[:q], X_test, Y_test, seed)
            for q in sorted({16, 32, 64, 128, 256, half})
            if q <= half
        ]
        labels = Y_train.argmax(1) if Y.shape[1] > 1 else None
        if labels is not None:
            result["class_only_from_raw"] = {
                "note": "derived from the raw answers (argmax); no class-only circuit is built",
                "curve": [
                    fit_class_only(X_train[:q], labels[:q], X_test, Y_test, seed)
                    for q in sorted({16, 32, 64, 128, 256, half})
                    if q <= half
                ],
                "accuracy_cost": class_only_cost(bundle),
            }
        server = _server(bundles, tmp, "budget", [*common, "--max-predictions-per-key", budget], timeout)
        try:
            model = RemoteModel(server.url, manifest.name, key_dir=tmp / "attacker-keys")
            Yb, info = query(model, X_train)
        finally:
            server.stop()
        result["budget"] = {
            "max_predictions_per_key": budget,
            **info,
            **fit_surrogate(X_train[: len(Yb)], Yb, X_test, Y_test, seed),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    result["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("demo/bundle"), help="the model's bundle")
    ap.add_argument("--n", type=int, default=512, help="chosen feature vectors (half to fit, half to score)")
    ap.add_argument("--budget", type=int, default=64, help="--max-predictions-per-key of the budget run")
    ap.add_argument("--inputs", choices=("box", "molecules"), default="box")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--start-timeout", type=float, default=START_TIMEOUT)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.n < 4 or args.budget < 1:
        print("extraction_check: error: --n must be >= 4 and --budget >= 1", file=sys.stderr)
        return 2
    try:
        result = run(
            args.bundle, args.n, args.budget, args.seed, args.inputs, args.workers, args.start_timeout
        )
    except MolcloakError as exc:
        print(f"extraction_check: error: {exc}", file=sys.stderr)
        return 2
    result["command"] = "python -m molcloak.evaluation.extraction_check " + " ".join(argv or sys.argv[1:])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # Concrete's atexit hook would turn any status into 0 (see load_check)
