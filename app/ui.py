"""The Gradio page: four step cards (keys, encrypt, run, decrypt) or one "Predict privately" button,
the result in the task's terms, its private explanation (`explain.ExplainPanel`), what stays here and what
the server sees, and a batch tab.

Callbacks are thin: they call `AppBackend` (the client side) and format what it returns with `views`.
Each returns {component: value}; a step's button first marks its card "running" and disables every
button (no queue), then does the work, then the buttons are set from what the session can do next.
Every molcloak error becomes a toast titled "molcloak" (`_guard`); the page keeps working.
"""

from __future__ import annotations

import gradio as gr

from molcloak.pipeline.errors import MolcloakError
from molcloak.pipeline.tasks import TaskSpec

from . import views
from .backend import AppBackend
from .batch import batch_tab
from .explain import ExplainPanel
from .guard import _guard, _session, picture
from .views import STEPS, card_state

INTRO = """
# molcloak: a private prediction you can watch
Your input is featurized and **encrypted in this app** with a secret key made for your browser session.
The FHE server gets only **evaluation keys** and **ciphertexts**, runs the whole network on them and returns
an encrypted answer that only your key opens. It never sees the molecule, the features or the prediction;
you never see the model's weights.
"""

CSS = """
.mc-card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px; }
.mc-out { min-height: 7.5em; }
.mc-running { color: var(--color-accent); }
.mc-done, .mc-reused { color: #15803d; }
.mc-pending { color: var(--body-text-color-subdued); }
#result { min-height: 6em; }
#batch-status { min-height: 5em; }
"""

BUTTONS = {"keys": "Generate keys", "encrypt": "Encrypt", "run": "Run in FHE", "decrypt": "Decrypt"}
SCROLL = "() => { if (window.innerWidth < 800) document.getElementById('result')?.scrollIntoView(); }"


def _rows_value(rows) -> dict:
    """The tabular form (a 2-column table: column, value) as a row {column: value}."""
    if rows is None:
        return {}
    records = rows.values.tolist() if hasattr(rows, "values") else rows.get("data", rows)
    return {str(r[0]): r[1] for r in records if len(r) >= 2}


class Page:
    """The components and callbacks of the single-prediction tab (built inside `build_ui`)."""

    def __init__(self, backend: AppBackend, first: str):
        self.b, self.first = backend, first
        smiles_model = backend.input_kind(first) == "smiles"
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=320):
                self.example = gr.Dropdown(
                    label="Examples from the model's test set (true label shown)",
                    choices=self.example_choices(first),
                    value=None,
                    elem_id="examples",
                )
                self.smiles = gr.Textbox(
                    label="SMILES (Enter: predict privately)",
                    placeholder="e.g. CCO",
                    elem_id="smiles",
                    visible=smiles_model,
                )
                self.mol_status = gr.Markdown(elem_id="mol-status")
                self.rows = gr.Dataframe(
                    value=self.form(first),
                    headers=["column", "value"],
                    datatype=["str", "number"],
                    column_count=(2, "fixed"),
                    interactive=True,
                    label="Input row (edit the values)",
                    visible=not smiles_model,
                    elem_id="row-form",
                    max_height=320,
                )
                with gr.Row():
                    self.predict_btn = gr.Button(
                        "Predict privately (all steps)",
                        variant="primary",
                        elem_id="predict-btn",
                        min_width=200,
                    )
                    self.compare = gr.Checkbox(
                        label="also show the plaintext prediction of the same quantized model (owner only)",
                        value=False,
                        visible=backend.can_compare(first),
                        elem_id="compare",
                        min_width=200,
                    )
            self.image = picture("Molecule (RDKit)", "mol-image", 240, smiles_model)
        self.state, self.btn, self.out = {}, {}, {}
        with gr.Row(elem_id="steps", equal_height=True):
            for step in STEPS:
                with gr.Column(min_width=200, elem_classes=["mc-card"]):
                    self.state[step] = gr.Markdown(card_state(step, "pending"), elem_id=f"{step}-state")
                    self.btn[step] = gr.Button(
                        BUTTONS[step], elem_id=f"{step}-btn", interactive=step == "keys", size="sm"
                    )
                    self.out[step] = gr.Markdown(elem_id=f"{step}-out", elem_classes=["mc-out"])
        with gr.Group(elem_id="result"):
            self.result = gr.Markdown(elem_id="result-out")
            self.label = gr.Label(visible=False, show_label=False, elem_id="result-label")
            with gr.Accordion("Decrypted outputs (logits)", open=False, elem_id="logits"):
                self.logits = gr.Markdown(elem_id="logits-out")
            self.plain = gr.Markdown(elem_id="plain-out")
        self.explain = ExplainPanel(backend)
        with gr.Row(equal_height=False):  # two columns; stacked on a narrow screen
            with gr.Column(min_width=300):
                self.here = gr.Markdown(views.fmt_here(None, None, None), elem_id="here-out")
            with gr.Column(min_width=300):
                self.server = gr.Markdown(views.fmt_server(None, None, None), elem_id="server-out")
        self.memo = gr.State({})

    # -- helpers ----------------------------------------------------------

    def example_choices(self, name: str) -> list[tuple[str, str]]:
        return [(caption, str(i)) for i, (caption, _, _) in enumerate(self.b.examples(name))]

    def form(self, name: str, row: dict | None = None) -> list[list]:
        if self.b.input_kind(name) != "rows":
            return [["", 0.0]]
        row = row or {}
        return [[c, float(row.get(c, 0.0))] for c in self.b.featurizer(name).names]

    def item(self, name: str, smiles, rows):
        return smiles if self.b.input_kind(name) == "smiles" else _rows_value(rows)

    @property
    def buttons(self) -> list:
        return [self.predict_btn, *self.btn.values(), self.explain.button]

    def view(self, name: str, memo: dict, session: str) -> dict:
        """Cards, buttons and the two columns, from the session's memo (what the steps returned)."""
        cards = memo.get("cards", {})
        can = self.b.state(session, name)
        up = {self.state[s]: card_state(s, *cards.get(s, ("pending", None))) for s in STEPS}
        up.update({self.btn[s]: gr.update(interactive=can[s]) for s in STEPS})
        up[self.predict_btn] = gr.update(interactive=True)
        up.update(self.explain.view(memo))
        up[self.here] = views.fmt_here(memo.get("keys"), memo.get("encrypt"), memo.get("decrypt"))
        up[self.server] = views.fmt_server(memo.get("keys"), memo.get("encrypt"), memo.get("run"))
        up[self.memo] = memo
        return up

    def cleared(self, name: str, memo: dict, session: str, keep: int) -> dict:
        """Forget the results of the steps after the first `keep` ones (an input, the model or the keys changed)."""
        cards = {k: v for k, v in memo.get("cards", {}).items() if k in STEPS[:keep]}
        memo = {**{k: v for k, v in memo.items() if k in STEPS[:keep]}, "cards": cards}
        up = self.view(name, memo, session)
        up.update({self.out[s]: "" for s in STEPS[keep:]})
        up.update({self.result: "", self.logits: "", self.plain: "", self.label: gr.update(visible=False)})
        up.update(self.explain.cleared())
        return up

    def running(self, memo: dict, step: str) -> dict:
        cards = memo.get("cards", {})
        up = {
            self.state[s]: card_state(s, "running" if s == step else cards.get(s, ("pending",))[0])
            for s in STEPS
        }
        up.update({b: gr.update(interactive=False) for b in self.buttons})
        return up

    def done(self, name, memo, session, step, result) -> dict:
        memo = {**memo, step: result, "cards": {**memo.get("cards", {})}}
        if step == "keys" and result.get("reused"):
            memo["cards"]["keys"] = ("reused", None)
        else:
            seconds = {
                "keys": result.get("keygen_seconds", 0) + result.get("upload_seconds", 0),
                "run": result.get("round_trip_seconds"),
            }.get(step, result.get("seconds"))
            memo["cards"][step] = ("done", seconds)
        if step == "decrypt":  # what explaining this input costs, said before anything runs
            memo["explain_cost"] = self.explain.cost_of(name, memo)
        up = self.view(name, memo, session)
        up[self.out[step]] = getattr(views, f"fmt_{step}")(result)
        return up

    def outcome(self, name: str, d: dict, plain: dict | None, compare: bool, error: str = "") -> dict:
        """The result in the task's terms; the comparison (or why it is missing) below it."""
        task = TaskSpec.from_dict(self.b.model(name)["task"])
        labels = views.label_values(task, d["values"])
        text = views.fmt_plain(plain) if compare and plain else ""
        if compare and error:
            text = f"The plaintext comparison is unavailable ({error}); the private result above is complete."
        return {
            self.result: views.fmt_result(d, task, views.task_description(task), name, plain),
            self.label: gr.update(value=labels, visible=labels is not None),
            self.logits: views.fmt_logits(d, task),
            self.plain: text,
        }

    def comparison(self, name: str, d: dict, compare: bool) -> dict:
        """The owner's simulation of the same input (in the comparison process); never raises."""
        if not self.b.can_compare(name):
            return {}
        try:
            plain, error = self.b.plaintext(name, d["item"]), ""
        except Exception as exc:  # noqa: BLE001 - a failed comparison must not hide the private result
            plain, error = None, str(exc) or type(exc).__name__
        return self.outcome(name, d, plain, compare, error)


def build_ui(backend: AppBackend) -> gr.Blocks:
    names = list(backend.models)
    with gr.Blocks(title="molcloak: private molecular property prediction", analytics_enabled=False) as ui:
        gr.Markdown(INTRO)
        with gr.Row(equal_height=False):
            model = gr.Dropdown(names, value=names[0], label="Model", elem_id="model", scale=1, min_width=220)
            card = gr.Markdown(backend.model_card(names[0]), elem_id="model-card")
        with gr.Tabs():
            with gr.Tab("One prediction", id="single", elem_id="tab-single"):
                page = Page(backend, names[0])
            with gr.Tab("Batch: a CSV file", id="batch", elem_id="tab-batch"):
                batch_tab(backend, model)
        _wire(backend, page, model, card)

        def on_unload(request: gr.Request):
            backend.end_session(_session(request))

        ui.unload(on_unload)
    return ui


def _wire(backend: AppBackend, page: Page, model, card) -> None:  # noqa: C901 - one place wires the page
    p = page
    every = [
        *p.state.values(),
        *p.out.values(),
        *p.buttons,
        p.result,
        p.label,
        p.logits,
        p.plain,
        p.here,
        p.server,
        p.memo,
        *p.explain.components,
    ]

    def on_model(name, request: gr.Request):
        sid = _session(request)
        backend.forget(sid)
        keys = backend.keys_of(sid, name)
        memo = {"keys": keys, "cards": {"keys": ("reused", None)}} if keys else {}
        smiles_model = backend.input_kind(name) == "smiles"
        up = p.cleared(name, memo, sid, keep=1)
        up.update(
            {
                card: backend.model_card(name),
                p.example: gr.update(choices=p.example_choices(name), value=None),
                p.compare: gr.update(visible=backend.can_compare(name)),
                p.smiles: gr.update(visible=smiles_model, value=""),
                p.image: gr.update(visible=smiles_model, value=None),
                p.rows: gr.update(visible=not smiles_model, value=p.form(name)),
                p.out["keys"]: views.fmt_keys(keys) if keys else "",
            }
        )
        return up

    def on_example(name, index):
        if index in (None, ""):
            return {}
        _, item, _ = backend.examples(name)[int(index)]
        return {p.rows: p.form(name, item)} if isinstance(item, dict) else {p.smiles: item}

    def on_input(name, smiles, memo, request: gr.Request):
        """The input changed: earlier ciphertexts and results belong to the old one and go away."""
        sid = _session(request)
        backend.forget(sid)
        up = p.cleared(name, memo or {}, sid, keep=1)
        if backend.input_kind(name) == "smiles":
            if not (smiles or "").strip():
                up.update({p.image: None, p.mol_status: ""})
            else:
                try:
                    up.update(
                        {p.image: backend.draw(smiles), p.mol_status: f"✓ `{smiles.strip()}` parsed by RDKit"}
                    )
                except MolcloakError as exc:
                    up.update({p.image: None, p.mol_status: f"⚠ {exc}"})
        return up

    def on_refresh(name, memo, request: gr.Request):
        return p.view(name, memo or {}, _session(request))

    @_guard
    def on_keygen(name, memo, request: gr.Request):
        sid = _session(request)
        up = p.cleared(name, {}, sid, keep=0)
        up.update(p.done(name, {}, sid, "keys", backend.keygen(sid, name)))
        return up

    @_guard
    def on_encrypt(name, smiles, rows, memo, request: gr.Request):
        sid = _session(request)
        e = backend.encrypt(sid, name, p.item(name, smiles, rows))
        memo = {k: v for k, v in memo.items() if k in ("keys", "cards")}
        memo["cards"] = {k: v for k, v in memo.get("cards", {}).items() if k == "keys"}
        up = p.cleared(name, memo, sid, keep=1)
        up.update(p.done(name, memo, sid, "encrypt", e))
        return up

    @_guard
    def on_run(name, memo, request: gr.Request):
        sid = _session(request)
        return p.done(name, memo, sid, "run", backend.run(sid, name))

    @_guard
    def on_decrypt(name, compare, memo, request: gr.Request):
        sid = _session(request)
        d = backend.decrypt(sid, name)
        up = p.done(name, memo, sid, "decrypt", d)
        yield {**up, **p.outcome(name, d, None, False)}  # the private result first
        yield p.comparison(name, d, compare)

    @_guard
    def on_predict(name, smiles, rows, compare, memo, request: gr.Request):
        """All four steps, each card updated as it starts and ends; the comparison last."""
        sid = _session(request)
        item = backend.check_input(name, p.item(name, smiles, rows))
        keys = backend.keys_of(sid, name)
        memo = {"keys": keys, "cards": {"keys": ("reused", None)}} if keys else {}
        up = p.cleared(name, memo, sid, keep=1 if keys else 0)
        steps, results = backend.steps(sid, name, item), {}
        for step in STEPS:
            yield {**up, **p.running(memo, step)}
            _, results[step] = next(steps)
            up = p.done(name, memo, sid, step, results[step])
            up.update({b: gr.update(interactive=False) for b in p.buttons})  # still running
            memo = up[p.memo]
        d = results["decrypt"]
        yield {**up, **p.outcome(name, d, None, False)}
        yield {**p.view(name, memo, sid), **p.comparison(name, d, compare)}

    @_guard
    def on_explain(name, memo, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        return p.explain.run(_session(request), name, memo or {}, progress)

    def chain(trigger, step, fn, inputs):
        start = trigger(lambda memo: p.running(memo or {}, step), p.memo, every, queue=False)
        work = start.then(fn, inputs, every, show_progress="full")
        return work.then(on_refresh, [model, p.memo], every, queue=False).then(None, js=SCROLL)

    model.change(
        on_model, model, [card, p.example, p.compare, p.smiles, p.image, p.rows, p.mol_status, *every]
    )
    p.example.change(on_example, [model, p.example], [p.smiles, p.rows])
    p.smiles.change(on_input, [model, p.smiles, p.memo], [p.image, p.mol_status, *every])
    p.rows.change(on_input, [model, p.smiles, p.memo], [p.image, p.mol_status, *every])
    chain(p.btn["keys"].click, "keys", on_keygen, [model, p.memo])
    chain(p.btn["encrypt"].click, "encrypt", on_encrypt, [model, p.smiles, p.rows, p.memo])
    chain(p.btn["run"].click, "run", on_run, [model, p.memo])
    chain(p.btn["decrypt"].click, "decrypt", on_decrypt, [model, p.compare, p.memo])
    for trigger in (p.predict_btn.click, p.smiles.submit):
        chain(trigger, "keys", on_predict, [model, p.smiles, p.rows, p.compare, p.memo])
    start = p.explain.button.click(lambda memo: p.running(memo or {}, "explain"), p.memo, every, queue=False)
    work = start.then(on_explain, [model, p.memo], [p.explain.out, p.explain.map], show_progress="full")
    work.then(on_refresh, [model, p.memo], every, queue=False)
