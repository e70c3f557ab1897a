"""Model-extraction check of the FHE server (issue 13, weakness 10), on loopback.

An attacker with one key id encrypts N feature vectors of its choice, gets the model's decrypted raw
outputs, fits a small surrogate (an MLP with 16 hidden units) on half of them and predicts the other half.
This script measures how well that works against a real `molcloak serve` process, for each setting:

- `raw`: no budget; the server answers every query with the model's raw outputs (logits);
- `budget`: the server's `--max-predictions-per-key B`; the attacker queries until the server refuses
  (429 BudgetExhaustedError) and fits on what it got;
- `raw_curve`: surrogate quality against the number of answers (subsets of the raw answers), i.e. what a
  budget of that size leaves an attacker with one key id;
- `class_only`: the same model deployed again with `--output class` (its circuit returns the predicted
  class only) and served beside it; the attacker's surrogate is a classifier fitted on the decrypted
  classes, scored by agreement with the logits model's class; with the accuracy cost of that bundle on
  the owner's test split (FHE-simulated ROC-AUC and accuracy, logits vs class).

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


def class_only_bundle(bundle: Path, out: Path) -> Path | None:
    """The owner's checkpoint deployed again with a class-only circuit (the bundle's compile settings
    otherwise); None when the bundle has no owner part or the task has no class."""
    from molcloak.pipeline import workflow
    from molcloak.pipeline.bundle import load_checkpoint
    from molcloak.pipeline.compile import CompileConfig

    manifest = load_manifest(bundle)
    if manifest.task.kind not in ("binary", "multilabel") or manifest.output == "class":
        return None
    try:
        ckpt = load_checkpoint(bundle)
    except MolcloakError:
        return None
    config = CompileConfig.from_dict(manifest.data.get("compile"), output="class")
    compiled = workflow.compile_checkpoint(ckpt, config)
    workflow.deploy(ckpt, compiled, out, f"{manifest.name}-class")
    return out


def accuracy_cost(logits_bundle: Path, class_bundle: Path) -> dict:
    """FHE-simulated test metrics of the two bundles (the owner's test split)."""
    pick = ("roc_auc", "accuracy", "f1")

    def metrics(path: Path) -> dict:
        m = load_manifest(path).metrics.get("fhe_simulate", {})
        return {k: m[k] for k in pick if k in m}

    return {"logits": metrics(logits_bundle), "class": metrics(class_bundle)}


def _copy_bundle(bundle: Path, target: Path) -> None:
    for part in ("client", "server"):
        shutil.copytree(bundle / part, target / part)
    shutil.copy(bundle / "manifest.json", target / "manifest.json")


def attack_class_only(url: str, name: str, X: np.ndarray, Y: np.ndarray, tmp: Path, seed: int) -> dict:
    """Query the class-only model with the same inputs; fit classifiers on its decrypted classes."""
    model = RemoteModel(url, name, key_dir=tmp / "attacker-keys-class")
    classes, info = query(model, X)
    half = len(X) // 2
    # a binary class-only circuit answers (-1, 1) for class 1 and (1, -1) for class 0
    predicted = classes.argmax(1) if classes.shape[1] > 1 else (classes[:, 0] > 0).astype(int)
    labels = predicted[:half]
    truth = Y.argmax(1) if Y.shape[1] > 1 else None
    return {
        **info,
        "answers_are": sorted({float(v) for v in np.unique(classes)}),
        "same_class_as_logits_model": None if truth is None else float(np.mean(predicted == truth)),
        "curve": [
            fit_class_only(X[:q], labels[:q], X[half:], Y[half:], seed)
            for q in sorted({16, 32, 64, 128, 256, half})
            if q <= half
        ],
    }


def _server(bundles: Path, tmp: Path, name: str, args: list, timeout: float) -> ServerProcess:
    return ServerProcess(bundles, tmp / name, log=tmp / f"{name}.log", extra_args=args, timeout=timeout)


def run(bundle: Path, n: int, budget: int, seed: int, inputs: str, workers: int, timeout: float) -> dict:
    manifest = load_manifest(bundle, "server")
    tmp = Path(tempfile.mkdtemp(prefix="molcloak-extraction-"))
    bundles = tmp / "bundles"
    _copy_bundle(bundle, bundles / "model")
    try:
        class_bundle = class_only_bundle(bundle, tmp / "class-bundle")
    except MolcloakError as exc:  # e.g. a 2-bit model whose comparison Concrete cannot compile
        class_bundle, result_note = None, {"skipped": str(exc)}
    else:
        result_note = (
            None if class_bundle else {"skipped": "no owner part, or not a binary/multi-label model"}
        )
    if class_bundle is not None:
        _copy_bundle(class_bundle, bundles / "model-class")
    common = ["--workers", workers, "--max-batch", BATCH]
    result: dict = {
        "model": manifest.name,
        "circuit": {k: manifest.circuit.get(k) for k in ("pbs_count", "max_bit_width", "p_error")},
        "n": n,
        "inputs": inputs,
        "surrogate": f"MLP, {HIDDEN} hidden units, fitted on the first half, scored on the second",
        "seed": seed,
    }
    if result_note:
        result["class_only"] = result_note
    try:
        server = _server(bundles, tmp, "raw", common, timeout)
        try:
            model = RemoteModel(server.url, manifest.name, key_dir=tmp / "attacker-keys")
            X = chosen_inputs(model.client, manifest.task.name, n, seed, inputs)
            t0 = time.perf_counter()
            Y, info = query(model, X)
            seconds = time.perf_counter() - t0
            if class_bundle is not None:
                result["class_only"] = attack_class_only(
                    server.url, f"{manifest.name}-class", X, Y, tmp, seed
                )
                result["class_only"]["accuracy_cost"] = accuracy_cost(bundle, class_bundle)
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
