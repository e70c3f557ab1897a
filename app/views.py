"""What the page shows, as text: the task in words, true labels, the step cards, the result and the two
columns "what stays here / what the server sees". Pure functions of what `AppBackend` returns; no Gradio."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from molcloak.pipeline.errors import MolcloakError
from molcloak.pipeline.tasks import TaskSpec

TASKS = {  # what a bundled task predicts, in a chemist's words
    "sol-low": "aqueous solubility class (Huuskonen)",
    "sol-class": "aqueous solubility class (Huuskonen)",
    "sol-logs": "aqueous solubility (Huuskonen, logS)",
    "freesolv": "hydration free energy (FreeSolv)",
    "sol-freesolv": "aqueous solubility (logS) and hydration free energy (kcal/mol)",
    "breast-cancer": "breast tumour diagnosis from cell-nucleus measurements (Wisconsin)",
}


def task_description(task: TaskSpec) -> str:
    """What the model predicts, in words: the bundled task's description, else its target and kind."""
    if task.name in TASKS:
        return TASKS[task.name]
    kind = {"binary": "class", "multiclass": "class", "regression": "value"}.get(task.kind, "tasks")
    return f"{task.target.replace('_', ' ')} ({kind})"


def true_label(task: TaskSpec, y) -> str:
    """A test-set target as a person reads it (class name, value with units, or one per task)."""
    if task.is_multitask:
        parts = []
        for j, (t, v) in enumerate(zip(task.tasks, np.ravel(y))):
            if np.isnan(v):
                parts.append(f"{t} n/a")
            elif task.kind == "multilabel":
                parts.append(f"{t} {int(v)}")
            else:
                parts.append(f"{t} {v:.2f} {task.unit_of(j)}".strip())
        return ", ".join(parts)
    if task.is_classification:
        return task.labels[int(y)]
    return f"{float(y):.2f} {task.units}".strip()


def quantized(client, x) -> list[int]:
    """The integers the client encrypts (its input quantizer applied to the features)."""
    try:
        q = client._fhe.model.quantize_input(np.asarray(x, dtype=np.float32).reshape((1, -1)))
    except (AttributeError, TypeError, ValueError):
        return []
    return [int(v) for v in np.ravel(q)]


def excerpt(data: bytes, width: int = 32) -> str:
    """A short hex view from the middle of a ciphertext (the start is a header of sizes and zeros)."""
    if len(data) <= width:
        return data.hex(" ")
    start = (len(data) - width) // 2
    return f"bytes {start}-{start + width - 1} of {len(data)}: {data[start : start + width].hex(' ')}"


def _floats(a) -> list[float] | float:
    return [float(v) for v in np.ravel(a)] if np.ndim(a) else float(a)


# ---------------------------------------------------------------- step cards

STEPS = ("keys", "encrypt", "run", "decrypt")
TITLES = {
    "keys": "1 · Keys",
    "encrypt": "2 · Encrypt here",
    "run": "3 · Run in FHE on the server",
    "decrypt": "4 · Decrypt here",
}
ICONS = {"pending": "○", "running": "◌", "done": "●", "reused": "●"}


def card_state(step: str, state: str, seconds: float | None = None) -> str:
    """A card's title line: its step, its state (pending / running / done) and how long it took."""
    note = {"pending": "pending", "running": "running…", "reused": "done earlier (reused)"}.get(state, "done")
    if state == "done" and seconds is not None:
        note = f"done in {seconds:.2f} s" if seconds >= 1 else f"done in {seconds * 1e3:.0f} ms"
    return f"**{TITLES[step]}** <span class='mc-state mc-{state}'>{ICONS[state]} {note}</span>"


def show_item(item) -> str:
    if isinstance(item, dict):
        return f"a row of {len(item)} numbers"
    return f"`{item}`"


def fmt_keys(k: dict) -> str:
    size = f"{k['evaluation_key_bytes'] / 1e6:.1f} MB"
    if k.get("reused"):
        return (
            f"Using the keys this session made earlier (key id `{k['key_id'][:12]}…`): the server already "
            f"holds their {size} of evaluation keys, nothing was generated or uploaded now."
        )
    return (
        f"New keys in {k['keygen_seconds']:.2f} s; {size} of evaluation keys uploaded in "
        f"{k['upload_seconds']:.2f} s (key id `{k['key_id'][:12]}…`). The secret key stays here."
    )


def fmt_encrypt(e: dict) -> str:
    return (
        f"{show_item(e['item'])} → {len(e['features'])} features → ciphertext of **{e['bytes']:,} bytes** "
        f"in {e['seconds'] * 1e3:.0f} ms. This is all the server gets about your input."
    )


def fmt_run(r: dict) -> str:
    return (
        f"Computed on ciphertexts in **{r['server_seconds']:.2f} s** on the server (round trip "
        f"{r['round_trip_seconds']:.2f} s); encrypted answer of {r['bytes']:,} bytes."
    )


def fmt_decrypt(d: dict) -> str:
    return f"Decrypted here in {d['seconds'] * 1e3:.0f} ms with your secret key: **{d['text']}**."


# ---------------------------------------------------------------- the result


def label_values(task: TaskSpec, values) -> dict[str, float] | None:
    """{class or label: probability} for a `gr.Label`, or None for values (regression)."""
    if task.kind == "multilabel":
        return {t: float(v) for t, v in zip(task.tasks, np.ravel(values))}
    if task.is_classification:
        return {c: float(v) for c, v in zip(task.labels, np.ravel(values))}
    return None


def headline(task: TaskSpec, values, description: str) -> str:
    """The prediction in the task's terms: the class, or each value with its units."""
    v = np.ravel(values)
    if task.kind == "multilabel":
        return f"### {description}\n" + "\n".join(f"- {t}: p = {p:.2f}" for t, p in zip(task.tasks, v))
    if task.is_multitask:
        rows = "\n".join(
            f"| {t} | **{x:.2f}** | {task.unit_of(j)} |" for j, (t, x) in enumerate(zip(task.tasks, v))
        )
        return f"### {description}\n| task | predicted | units |\n|---|---|---|\n{rows}"
    if task.is_classification:
        return f"### {description}: **{task.labels[int(np.argmax(v))]}**"
    return f"### {description}: **{float(v[0]):.2f} {task.units}**".rstrip()


def spread_sentence(approximate: bool, plain: dict | None, task: TaskSpec) -> str:
    """Why two runs of one input may differ (approximate rounding), with the spread measured when the
    owner's comparison is available."""
    what = "probabilities" if task.is_classification else "values"
    if plain is not None and "spread" in plain:
        measured = (
            f"{plain['runs']} simulated runs of this input varied by up to {plain['raw_spread']:.3f} in the "
            f"decrypted outputs and {plain['spread']:.3f} in the {what}"
        )
        if plain["approximate"]:
            return (
                "Two runs of the same input can differ by about 1%: the circuit rounds approximately "
                f"(faster, random in the last bit); here {measured}."
            )
        return f"This circuit rounds exactly, so every run gives the same result ({measured})."
    if approximate:
        return (
            "Two runs of the same input can differ by about 1% in the "
            f"{what}: the circuit rounds approximately (faster, random in the last bit)."
        )
    return "This circuit rounds exactly: every run of the same input gives the same result."


def fmt_result(d: dict, task: TaskSpec, description: str, model: str, plain: dict | None = None) -> str:
    truth = ""
    if d.get("truth"):
        truth = f"\n\nTrue value (this is a test-set example the model never trained on): **{d['truth']}**"
    return (
        f"{headline(task, d['values'], description)}\n\n{show_item(d['item'])} · model **{model}** · "
        f"decrypted here: the first and only place this prediction exists in the clear.{truth}\n\n"
        f"{spread_sentence(d.get('approximate', False), plain, task)}"
    )


def fmt_logits(d: dict, task: TaskSpec) -> str:
    names = list(task.tasks or task.labels) or [task.target]
    raw = d["raw"] if isinstance(d["raw"], list) else [d["raw"]]
    rows = "\n".join(f"| {names[i] if i < len(names) else i} | {v:.4f} |" for i, v in enumerate(raw))
    return (
        "The network's outputs as decrypted and dequantized (before softmax, sigmoid or the target's "
        f"scaling):\n\n| output | value |\n|---|---|\n{rows}"
    )


def fmt_plain(p: dict) -> str:
    return (
        "Plaintext, same quantized model (owner's weights, FHE simulation in the clear, **not private**): "
        f"**{p['text']}**; outputs {', '.join(f'{v:.4f}' for v in _as_list(p['raw']))}"
    )


# ---------------------------------------------------------------- what stays here / what the server sees


def _numbers(values, n: int = 6) -> str:
    shown = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values[:n])
    return f"[{shown}{', …' if len(values) > n else ''}]"


def fmt_here(keys: dict | None, enc: dict | None, result: dict | None) -> str:
    lines = ["#### What stays here (this app, your session)"]
    if enc:
        lines.append(f"- **Your input**: {show_item(enc['item'])}.")
        lines.append(
            f"- **Feature vector**: {len(enc['features'])} numbers ({enc['feature_bytes']} B) "
            f"{_numbers(enc['features'])}, computed here from the input."
        )
        if enc.get("quantized"):
            lines.append(
                f"- **Quantized input**: the integers that get encrypted {_numbers(enc['quantized'])}."
            )
    if keys:
        lines.append(
            "- **Secret key**: in this session's key folder (file mode 0600); it never leaves this machine "
            "and is deleted when you close the page."
        )
    if result:
        lines.append(f"- **The prediction**: {result['text']}, decrypted here.")
    if len(lines) == 1:
        lines.append("- nothing yet: generate keys or press *Predict privately*.")
    return "\n".join(lines)


def fmt_server(keys: dict | None, enc: dict | None, run: dict | None) -> str:
    lines = ["#### What the server sees"]
    if keys:
        lines.append(
            f"- **Evaluation keys**: {keys['evaluation_key_bytes'] / 1e6:.1f} MB, uploaded once per session: "
            "they let it compute on ciphertexts, not decrypt them."
        )
    if enc:
        lines.append(
            f"- **Ciphertext** of your input: {enc['bytes']:,} B, noise-masked integers, e.g.\n"
            f"  `{enc['hex']}`"
        )
    if run:
        lines.append(
            f"- **Encrypted answer** it sends back: {run['bytes']:,} B, bigger than the input because it is "
            "not compressed: each output is a full LWE ciphertext in the circuit's large key dimension, "
            "while the input travels in compressed (seeded) form."
        )
        lines.append(
            "- **Metadata**: a key id, the time of the request and how long it took; never the input, "
            "the features or the prediction."
        )
    if len(lines) == 1:
        lines.append("- nothing yet.")
    return "\n".join(lines)


def _as_list(v):
    return v if isinstance(v, list) else [v]


def unsupported(info: dict, server_url: str, bundle: Path | None = None) -> str:
    """Why the page cannot show a served model (from its GET /models entry), or "" when it can.

    The page shows molecules (SMILES) and tabular rows, single- and multi-task; a model whose
    featurizer or task this app cannot read is used with `molcloak predict` instead."""
    from molcloak.pipeline.featurize import featurizer_from_dict

    name = info.get("name", "?")
    local = f" (or `molcloak predict --bundle {bundle}`)" if bundle else ""
    use = f"use `molcloak predict --server {server_url} --model {name}`{local} instead"
    try:
        featurizer, _ = featurizer_from_dict(info["featurizer"]), TaskSpec.from_dict(info["task"])
    except (MolcloakError, KeyError, TypeError, ValueError) as exc:
        return f"model {name!r} has a featurizer or task this app cannot read ({exc}); {use}"
    if featurizer.input_kind not in ("smiles", "rows"):
        return f"model {name!r} reads {featurizer.input_kind} inputs, which the app cannot enter; {use}"
    return ""
