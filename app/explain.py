"""The explain panel of the single-prediction tab: why the model predicts what it does for the current
input, from encrypted runs only.

The work is `molcloak.pipeline.explain.explain_molecules`, the core `molcloak explain` runs: the input's
encrypted run, then one per input group (a descriptor or column at its training median or mean; for
fingerprint models each atom's fingerprint environments off), all through this session's `RemoteModel`:
the same keys and server as the prediction, so the server gets nothing but ciphertexts. The cost,
(groups + 1) encrypted runs, is shown on the button before anything runs, with an estimate from the
run this prediction just measured.
"""

from __future__ import annotations

import io
import time

import gradio as gr

from molcloak.pipeline.attributions import Featurization
from molcloak.pipeline.errors import DataError, MolcloakError
from molcloak.pipeline.explain import (
    draw_atom_map,
    explain_molecules,
    plan_cost,
    plan_molecules,
    top_atoms,
    top_groups,
)
from molcloak.pipeline.tasks import TaskSpec

from .guard import picture

TOP = 8  # groups listed (largest |contribution|)
BATCH = 8  # ciphertexts per request
IDLE = (
    "Predict first; then *Explain* shows which descriptors (and, for fingerprint models, which atoms) "
    "drive this prediction, from encrypted runs of perturbed inputs only."
)
PHYSCHEM = {  # RDKit descriptor names in a chemist's words
    "MolLogP": "logP (Crippen)",
    "TPSA": "polar surface area (TPSA)",
    "MolWt": "molecular weight",
    "NumHDonors": "H-bond donors",
    "NumHAcceptors": "H-bond acceptors",
    "NumRotatableBonds": "rotatable bonds",
    "NumAromaticRings": "aromatic rings",
    "FractionCSP3": "fraction of sp3 carbons",
    "RingCount": "rings",
    "HeavyAtomCount": "heavy atoms",
}


# ---------------------------------------------------------------- the work (no Gradio)


def _inputs(featurizer, item) -> tuple[list, list[str] | None]:
    """(inputs, SMILES or None) as `explain_molecules` takes them: the canonical SMILES, or the row in
    column order."""
    if featurizer.input_kind != "smiles":
        return [[float(item[c]) for c in featurizer.names]], None
    canon, reason = featurizer.check_input(item)
    if canon is None:
        raise DataError(f"SMILES {item!r} cannot be explained: {reason}")
    return [canon], [canon]


def plan(backend, name: str, item) -> dict:
    """What explaining `item` costs, before anything runs (featurization only): groups and encrypted
    runs; and the raw value and neutral value of each descriptor or column, for the listing."""
    featurizer = backend.featurizer(name)
    inputs, smiles = _inputs(featurizer, backend.check_input(name, item))
    feat = Featurization(featurizer)
    raw, neutral = feat.raw(inputs)[0], feat.neutral()
    values = {
        g.name: (float(raw[c[0]]), float(neutral[c[0]])) for g, c in feat.column_groups() if len(c) == 1
    }
    return {**plan_cost(plan_molecules(feat, inputs, smiles)), "values": values}


def explain(backend, session_id: str, name: str, item, on_progress=None) -> dict:
    """Attributions of `item` with this session's keys (made and uploaded first if it has none) through
    the app's server: `explain_molecules`' result for one input, plus the seconds it took."""
    featurizer = backend.featurizer(name)
    inputs, smiles = _inputs(featurizer, backend.check_input(name, item))
    backend.predict_keys(session_id, name)
    s = backend.session(session_id)
    with s.lock:
        remote = backend._remote(s, name)  # the session's RemoteModel: its keys, the app's server
        t0 = time.perf_counter()
        result = explain_molecules(remote, inputs, smiles, on_progress or (lambda *_: None), batch_size=BATCH)
    return {**result, "seconds": time.perf_counter() - t0}


def atom_map_image(result: dict):
    """The atom-contribution map of a fingerprint model's explanation as a PIL image, or None."""
    mol = result["molecules"][0]
    if "atom_map" not in mol:
        return None
    from PIL import Image

    png, _ = draw_atom_map(mol["smiles"], mol["atom_map"]["weights"])
    return Image.open(io.BytesIO(png))


# ---------------------------------------------------------------- text


def fmt_cost(cost: dict, seconds_per_run: float | None) -> tuple[str, str]:
    """(the panel's text, the button's label): the cost of an explanation, said before it starts."""
    runs = cost["encrypted_runs"]
    estimate = f", about {runs * seconds_per_run:.0f} s" if seconds_per_run else ""
    skipped = cost["skipped_unchanged"]
    text = (
        f"Explaining this prediction costs **{runs} encrypted runs** ({cost['groups']} input groups + 1"
        + (f", less {skipped} {_perturbations(skipped)} the model's input unchanged" if skipped else "")
        + ") through the same server with this session's keys: the server sees only ciphertexts"
        + (
            f". Estimate: {runs} × the {seconds_per_run:.2f} s this prediction's encrypted run took."
            if seconds_per_run
            else "."
        )
    )
    return text, f"Explain privately ({runs} encrypted runs{estimate})"


def _perturbations(n: int) -> str:
    return "perturbation that leaves" if n == 1 else "perturbations that leave"


def _effect(task: TaskSpec, output: str, c: float) -> str:
    """A contribution in the task's terms: towards a class, or in the target's units."""
    if task.is_classification:
        return f"**{c:+.3f}** towards '{output}'"
    unit = task.unit_of(list(task.tasks).index(output)) if task.is_multitask else task.units
    return f"**{c:+.3f}** {unit}".rstrip() + (f" on {output}" if task.is_multitask else "")


def _group_name(group: dict) -> str:
    name = group["name"]
    return f"{PHYSCHEM[name]} (`{name}`)" if name in PHYSCHEM else f"`{name}`"


def fmt_explanation(result: dict, task: TaskSpec, values: dict, approximate: bool = False) -> str:
    """The top contributions of the explained output, in the chemist's terms, then the atoms; with
    `approximate` rounding, a warning that the smallest contributions are within the runs' spread."""
    mol = result["molecules"][0]
    out = mol["output"]
    what = f"the probability of '{out}'" if task.is_classification else f"the predicted {out}"
    lines = [
        f"#### Why {what} is {mol['prediction'][out]:.3f}",
        "Each contribution is the prediction minus the prediction with that group at its neutral value "
        "(descriptor or column: its training median or mean; an atom: its fingerprint environments off).",
        "",
    ]
    for g in top_groups(mol["groups"], TOP):
        value = ""
        if g["name"] in values:
            v, neutral = values[g["name"]]
            shown = "not computable, imputed" if v != v else f"{v:.3g}"  # NaN: an rdkit2d descriptor failed
            value = f" = {shown} (neutral {neutral:.3g})"
        lines.append(f"- {_group_name(g)}{value}: {_effect(task, out, g['contribution'])}")
    atoms = top_atoms(mol["groups"], 5)
    if atoms:
        lines.append(
            "\nAtoms (their fingerprint environments off, one at a time): "
            + ", ".join(f"{a['name']} {_effect(task, out, a['contribution'])}" for a in atoms)
        )
        lines.append(
            f"\nThe map colours each atom by its share (green raises '{out}', pink lowers it); the shares "
            f"sum to {mol['atom_map']['total']:+.3f}, the change with every fingerprint environment off."
        )
    if approximate:
        lines.append(
            "\nThis circuit rounds approximately, so every run is slightly random: contributions of a few "
            "hundredths may be noise; explaining again shows which ones hold."
        )
    cost = result["cost"]
    lines.append(
        f"\n{cost['encrypted_runs']} encrypted runs in {result['seconds']:.1f} s, decrypted here; "
        "the server received only ciphertexts."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- the panel


class ExplainPanel:
    """Components of the panel (built inside the single-prediction tab) and their updates."""

    def __init__(self, backend):
        self.b = backend
        with gr.Accordion("Why this prediction? A private explanation", open=True, elem_id="explain"):
            self.cost = gr.Markdown(IDLE, elem_id="explain-cost")
            self.button = gr.Button(
                "Explain privately", elem_id="explain-btn", interactive=False, size="sm", variant="secondary"
            )
            with gr.Row(equal_height=False):  # stacked on a narrow screen
                with gr.Column(scale=3, min_width=300):
                    self.out = gr.Markdown(elem_id="explain-out")
                self.map = picture("Atom contributions", "explain-map", 300, False)

    @property
    def components(self) -> list:
        return [self.cost, self.button, self.out, self.map]

    def view(self, memo: dict) -> dict:
        """The cost line and the button, from the session's memo: enabled once the input is predicted."""
        text, label = memo.get("explain_cost") or (IDLE, None)
        return {
            self.cost: text,
            self.button: gr.update(value=label or "Explain privately", interactive=label is not None),
        }

    def cleared(self) -> dict:
        return {self.out: "", self.map: gr.update(value=None, visible=False)}

    def cost_of(self, name: str, memo: dict) -> tuple[str, str | None]:
        """After a prediction: (the cost line, the button's label) of explaining its input, or (why it
        cannot be explained, None)."""
        try:
            cost = plan(self.b, name, memo["decrypt"]["item"])
        except MolcloakError as exc:
            return f"This input cannot be explained: {exc}", None
        return fmt_cost(cost, (memo.get("run") or {}).get("round_trip_seconds"))

    def shown(self, name: str, result: dict, values: dict, approximate: bool) -> dict:
        """The explanation: the contributions and, for fingerprint models, the atom map."""
        task = TaskSpec.from_dict(self.b.model(name)["task"])
        image = atom_map_image(result)
        return {
            self.out: fmt_explanation(result, task, values, approximate),
            self.map: gr.update(value=image, visible=image is not None),
        }

    def run(self, session_id: str, name: str, memo: dict, progress) -> dict:
        """The explain button: the encrypted runs with a progress bar, then the explanation."""
        decrypted = memo.get("decrypt") or {}
        item = decrypted.get("item")
        if item is None:
            raise DataError("predict an input first, then explain it (the explanation is of that input)")
        progress(0, desc="explaining")
        values = plan(self.b, name, item)["values"]

        def on_progress(done: int, total: int, status: str) -> None:
            progress(done / max(total, 1), desc=f"{done} of {total} encrypted runs ({status})")

        result = explain(self.b, session_id, name, item, on_progress)
        return self.shown(name, result, values, decrypted.get("approximate", False))
