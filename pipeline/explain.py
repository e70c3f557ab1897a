"""Per-molecule private explanations: attributions by perturbation, run as encrypted predictions.

Everything runs through one `PredictionBackend` (a bundle in this process, or a `molcloak serve` server):
the client featurizes, perturbs and encrypts here; the server sees ciphertexts and evaluation keys only;
only this machine decrypts. `explain_molecules` makes the molecule's encrypted run, then one run per
input group (`attributions`) with that group replaced by its neutral value: the contribution of a group
to an output is f(x) - f(x with the group neutral), f the decrypted prediction (class probability, value
in task units, or per task). Cost: (groups + 1) encrypted runs per molecule (`plan_molecules` counts
them before anything runs); a perturbation that leaves the model's input unchanged (a descriptor already
at its neutral value, an atom whose bits the feature selection dropped) has contribution 0 and is not run.

For fingerprint models, the atom map: occlusion contributions c_i of the atoms plus an equal share of what
they leave unexplained, so the map sums exactly to the contribution of all atoms together,
Δ = f(x) - f(x with every fingerprint environment off): w_i = c_i + (Δ - Σ c_j) / n_atoms; `draw_atom_map`
draws it RDKit similarity-map style. Used by `molcloak explain`, `molcloak audit --explain` and the app.
The runs go in batches (`Runner`); given a cache of the batches already run (the checkpoint those commands
keep in their run directory), an interrupted explanation resumes. This module itself writes nothing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, MutableMapping

import numpy as np

from .attributions import ALL_ATOMS, Featurization
from .errors import DataError

ProgressCallback = Callable[[int, int, str], None]
NEUTRAL = (
    "training median of a descriptor or column (the training mean in a bundle saved before the medians "
    "were stored); fingerprint environments of an atom: off"
)


def output_names(task) -> list[str]:
    if task.is_multitask:
        return list(task.tasks)
    return list(task.labels) if task.is_classification else [task.target]


def explained_output(task, prediction: np.ndarray, wanted: str | None) -> int:
    """The output an attribution ranks and draws: `wanted`, else the positive class (binary), the predicted
    class (multiclass), the value (regression) or the first task."""
    names = output_names(task)
    if wanted is not None:
        if wanted not in names:
            raise DataError(f"--output {wanted!r} is not an output of this model; choose one of {names}")
        return names.index(wanted)
    if task.kind == "binary":
        return 1
    if task.kind == "multiclass":
        return int(np.argmax(prediction))
    return 0


def values(client, raws: np.ndarray) -> np.ndarray:
    """Decrypted raw outputs -> predictions (n, outputs): probabilities, values in units, per task."""
    pred = client.predictions(np.asarray(raws, dtype=np.float64).reshape(len(raws), -1))
    return pred.reshape(len(raws), -1)


def batch_key(label: str, index: int, batch: np.ndarray) -> str:
    """The key of batch number `index` of the stage `label` ("attributions", "importance", ...): sha256 of
    the stage, the number, the rows' shape and dtype, and their bytes. A stage numbers its batches in
    order, so two batches of one explanation never share a key; a rerun of it makes the same keys."""
    batch = np.ascontiguousarray(batch)
    h = hashlib.sha256(f"{label}|{index}|{batch.shape}|{batch.dtype.str}|".encode())
    h.update(batch.tobytes())
    return h.hexdigest()


class Runner:
    """Scores feature rows through the backend in batches, reporting progress with a rate.

    `cache`: the decrypted raw outputs of batches already run, a mapping of `batch_key`s (`get(key)` and
    `cache[key] = raws`: a dict, or a checkpoint that saves each batch it is given, as `molcloak explain`
    passes); a batch it holds is counted as done and not run again. None: every batch runs."""

    def __init__(
        self,
        backend,
        total: int,
        batch_size: int,
        on_progress: ProgressCallback,
        label: str,
        cache: MutableMapping | None = None,
    ):
        self.backend, self.total, self.batch_size, self.done = backend, total, batch_size, 0
        self.on_progress, self.label, self.t0 = on_progress, label, time.perf_counter()
        self.cache, self.batches, self.ran = cache, 0, 0

    def __call__(self, X: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(X), self.batch_size):
            batch = X[start : start + self.batch_size]
            out += self._batch(batch)
            self.done += len(batch)
            rate = self.ran / max(time.perf_counter() - self.t0, 1e-9)
            self.on_progress(self.done, self.total, f"{self.label} {rate:.2f} runs/s")
        return values(self.backend.client, np.array(out)) if out else np.zeros((0, 0))

    def _batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """The raw outputs of one batch: from the cache, else run encrypted (and given to the cache)."""
        key = None if self.cache is None else batch_key(self.label, self.batches, batch)
        self.batches += 1
        saved = None if key is None else self.cache.get(key)
        if saved is not None:
            return [np.asarray(raw, dtype=np.float64) for raw in saved]
        raws = [np.ravel(r.raw) for r in self.backend.run_rows(batch)]
        self.ran += len(batch)
        if key is not None:
            self.cache[key] = raws
        return raws


def plan_molecules(feat: Featurization, inputs: list, smiles: list[str] | None):
    """Per molecule: its raw row, groups and the perturbed feature rows that change the model's input."""
    plans = []
    for j, item in enumerate(inputs):
        raw = feat.raw([item])[0]
        x = feat.features(raw[None])[0]
        groups = feat.molecule_groups(smiles[j] if smiles else None)
        rows = [feat.features(perturb(raw)[None])[0] for _, perturb in groups]
        changed = [i for i, r in enumerate(rows) if not np.array_equal(r, x)]
        plans.append({"x": x, "groups": [g for g, _ in groups], "rows": rows, "changed": changed})
    return plans


def plan_cost(plans: list[dict], originals_known: bool = False) -> dict:
    """What explaining these plans costs, before anything runs: groups, encrypted runs, skipped ones."""
    n_groups = sum(len(p["groups"]) for p in plans)
    changed = sum(len(p["changed"]) for p in plans)
    return {
        "groups": n_groups,
        "molecules": len(plans),
        "encrypted_runs": changed + (0 if originals_known else len(plans)),
        "skipped_unchanged": n_groups - changed,
    }


def explain_molecules(
    backend,
    inputs: list,
    smiles: list[str] | None,
    on_progress: ProgressCallback,
    originals: np.ndarray | None = None,
    ids: list | None = None,
    batch_size: int = 8,
    output: str | None = None,
    cache: MutableMapping | None = None,
) -> dict:
    """Attributions of each input (SMILES, or tabular rows in column order); `originals`: predictions of
    the unperturbed inputs when already known (an audit's), else they are run too; `output`: the output
    explained (default: see `explained_output`); `cache`: batches already run (see `Runner`)."""
    plans = plan_molecules(Featurization(backend.client.featurizer), inputs, smiles)
    cost = plan_cost(plans, originals is not None)
    runner = Runner(backend, cost["encrypted_runs"], batch_size, on_progress, "attributions", cache)
    on_progress(0, cost["encrypted_runs"], "attributions")
    task, names = backend.client.task, output_names(backend.client.task)
    if originals is None:
        originals = runner(np.stack([p["x"] for p in plans])) if plans else np.zeros((0, len(names)))
    X = [p["rows"][i] for p in plans for i in p["changed"]]
    perturbed = runner(np.stack(X)) if X else np.zeros((0, len(names)))
    out, k = [], 0
    for j, p in enumerate(plans):
        pv = np.repeat(originals[j][None], len(p["groups"]), 0)
        pv[p["changed"]] = perturbed[k : k + len(p["changed"])]
        k += len(p["changed"])
        out.append(_molecule(task, names, originals[j], pv, p, output))
        out[-1]["id"] = ids[j] if ids else j + 1
        if smiles:
            out[-1]["smiles"] = smiles[j]
        else:
            out[-1]["features"] = dict(zip(backend.client.featurizer.columns, map(float, inputs[j])))
    return {"outputs": names, "neutral": NEUTRAL, "cost": cost, "molecules": out}


def _molecule(task, names, original: np.ndarray, perturbed: np.ndarray, plan: dict, wanted) -> dict:
    o = explained_output(task, original, wanted)
    contrib = original[None, :] - perturbed  # (groups, outputs)
    groups = [
        {
            **g.to_dict(),
            "contribution": float(c[o]),
            "contributions": dict(zip(names, map(float, c))),
            "encrypted_run": i in plan["changed"],
        }
        for i, (g, c) in enumerate(zip(plan["groups"], contrib))
    ]
    mol = {"prediction": dict(zip(names, map(float, original))), "output": names[o], "groups": groups}
    atoms = [g for g in groups if g["kind"] == "atom"]
    if atoms:
        occlusion = np.array([g["contribution"] for g in atoms])
        total = next(g["contribution"] for g in groups if g["name"] == ALL_ATOMS)
        rest = total - occlusion.sum()
        mol["atom_map"] = {
            "output": names[o],
            "occlusion": occlusion.tolist(),
            "total": total,
            "unexplained_by_single_atoms": float(rest),
            "weights": (occlusion + rest / len(atoms)).tolist(),
        }
    return mol


def top_groups(groups: list[dict], n: int) -> list[dict]:
    """The `n` non-atom groups (descriptors, columns, fingerprint blocks) of largest |contribution|."""
    shown = [g for g in groups if g["kind"] != "atom"]
    return sorted(shown, key=lambda g: -abs(g["contribution"]))[:n]


def top_atoms(groups: list[dict], n: int) -> list[dict]:
    """The `n` atom groups of largest |contribution| (single-atom occlusions)."""
    return sorted((g for g in groups if g["kind"] == "atom"), key=lambda g: -abs(g["contribution"]))[:n]


def draw_atom_map(smiles: str, weights: list[float], size: int = 360) -> tuple[bytes, str]:
    """(PNG bytes, SVG text) of the molecule with its atom weights as a similarity map (green +, pink -)."""
    from rdkit import Chem
    from rdkit.Chem.Draw import SimilarityMaps, rdMolDraw2D

    mol = Chem.MolFromSmiles(smiles)
    out = []
    for canvas in (rdMolDraw2D.MolDraw2DCairo(size, size), rdMolDraw2D.MolDraw2DSVG(size, size)):
        SimilarityMaps.GetSimilarityMapFromWeights(mol, [float(w) for w in weights], draw2d=canvas)
        canvas.FinishDrawing()
        out.append(canvas.GetDrawingText())
    return out[0], out[1]
