"""The Gradio page: five visible steps of one private prediction, or one "Predict privately" button.

Callbacks are thin: they call `AppBackend` (the client side) and format what it returns. Every
molcloak error becomes a `gr.Error` message in the page; the app keeps working.
"""

from __future__ import annotations

import functools

import gradio as gr

from molcloak.pipeline.errors import MolcloakError

from .backend import AppBackend

INTRO = """
# molcloak: a private prediction you can watch
Your molecule is featurized and **encrypted in this app** (the client) with a secret key made for
your browser session. The FHE server gets only **evaluation keys** and **ciphertexts**, runs the whole
network on them (TFHE, programmable bootstrapping: no round trips, no approximations) and returns an
encrypted answer that only your secret key can open. The server never sees the SMILES, the features
or the prediction; you never see the model's weights.
"""

PRIVACY = {
    "keys": "The secret key stays in this session's key folder on the app's machine; "
    "only the evaluation keys (which cannot decrypt) were uploaded.",
    "encrypt": "This ciphertext is **all the server will get** about your molecule.",
    "run": "The server computed on ciphertexts only; its answer is encrypted too.",
    "decrypt": "Decrypted here with your secret key: the first and only place this prediction exists in the clear.",
}


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def _guard(fn):
    """Show molcloak errors in the page (gr.Error), never a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MolcloakError as exc:
            raise gr.Error(str(exc), title="molcloak") from None

    return wrapper


def fmt_keys(k: dict) -> str:
    return (
        f"**Keys ready.** Key generation {k['keygen_seconds']:.2f} s · evaluation keys "
        f"{k['evaluation_key_bytes'] / 1e6:.1f} MB uploaded in {k['upload_seconds']:.2f} s · "
        f"server key id `{k['key_id'][:12]}…`\n\n{PRIVACY['keys']}"
    )


def fmt_encrypt(e: dict) -> str:
    return (
        f"**Encrypted** `{e['smiles']}` in {e['seconds'] * 1e3:.0f} ms: ciphertext of **{e['bytes']:,} bytes** "
        f"(sha256 `{e['sha256']}`).\n\n```\n{e['hex']}\n```\n{PRIVACY['encrypt']}"
    )


def fmt_run(r: dict) -> str:
    return (
        f"**Computed in FHE on the server** in **{r['server_seconds']:.2f} s** (round trip "
        f"{r['round_trip_seconds']:.2f} s) · encrypted answer of {r['bytes']:,} bytes\n\n```\n{r['hex']}\n```\n"
        f"{PRIVACY['run']}"
    )


def fmt_result(d: dict, model: str) -> str:
    return (
        f"## {d['text']}\n`{d['smiles']}` · model **{model}** · raw outputs "
        f"{', '.join(f'{v:.4f}' for v in _as_list(d['raw']))}\n\n{PRIVACY['decrypt']}"
    )


def fmt_plain(d: dict) -> str:
    return (
        f"Plaintext, same quantized model (owner's weights, FHE simulation in the clear, **not private**): "
        f"**{d['text']}**; raw outputs {', '.join(f'{v:.4f}' for v in _as_list(d['raw']))}"
    )


def _as_list(v):
    return v if isinstance(v, list) else [v]


def build_ui(backend: AppBackend) -> gr.Blocks:
    names = list(backend.models)
    first = names[0]

    def example_choices(name: str) -> list[tuple[str, str]]:
        return [(f"{smi}  ({caption})", smi) for smi, caption in backend.examples(name)]

    def on_model(name: str):
        return (
            backend.model_card(name),
            gr.update(choices=example_choices(name), value=None),
            gr.update(visible=backend.can_compare(name)),
            *_cleared(),
        )

    def on_smiles(smiles: str):
        if not (smiles or "").strip():
            return None, ""
        try:
            return backend.draw(smiles), f"✓ `{smiles.strip()}` parsed by RDKit"
        except MolcloakError as exc:
            return None, f"⚠ {exc}"

    @_guard
    def on_keygen(name, request: gr.Request):
        return fmt_keys(backend.keygen(_session(request), name)), "", "", ""

    @_guard
    def on_encrypt(name, smiles, request: gr.Request):
        return fmt_encrypt(backend.encrypt(_session(request), name, smiles)), "", ""

    @_guard
    def on_run(name, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        progress(0.1, desc="running the network on ciphertexts on the server")
        return fmt_run(backend.run(_session(request), name)), ""

    @_guard
    def on_decrypt(name, compare, request: gr.Request):
        d = backend.decrypt(_session(request), name)
        return fmt_result(d, name), _plain(name, d["smiles"], compare)

    @_guard
    def on_predict(name, smiles, compare, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        r = backend.predict(_session(request), name, smiles, on_step=lambda f, desc: progress(f, desc=desc))
        return (
            fmt_keys(r["keys"]),
            fmt_encrypt(r["encrypt"]),
            fmt_run(r["run"]),
            fmt_result(r["decrypt"], name),
            _plain(name, r["decrypt"]["smiles"], compare),
        )

    def _plain(name, smiles, compare) -> str:
        return fmt_plain(backend.plaintext(name, smiles)) if compare and backend.can_compare(name) else ""

    def _cleared():
        return "", "", "", "", ""

    def on_unload(request: gr.Request):
        backend.end_session(_session(request))

    with gr.Blocks(title="molcloak: private molecular property prediction", analytics_enabled=False) as ui:
        gr.Markdown(INTRO)
        with gr.Row():
            model = gr.Dropdown(names, value=first, label="Model", elem_id="model", scale=1)
            card = gr.Markdown(backend.model_card(first), elem_id="model-card")
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown("### 1. Molecule")
                example = gr.Dropdown(
                    label="Example molecules from the test set",
                    elem_id="examples",
                    value=None,
                    choices=example_choices(first),
                )
                smiles = gr.Textbox(label="SMILES", placeholder="e.g. CCO", elem_id="smiles")
                mol_status = gr.Markdown(elem_id="mol-status")
            image = gr.Image(
                label="Molecule (RDKit)",
                type="pil",
                height=260,
                interactive=False,
                elem_id="mol-image",
                scale=1,
            )
        with gr.Row():
            predict_btn = gr.Button("Predict privately (all steps)", variant="primary", elem_id="predict-btn")
            compare = gr.Checkbox(
                label="also show the plaintext prediction of the same quantized model (owner only)",
                value=False,
                visible=backend.can_compare(first),
                elem_id="compare",
            )
        with gr.Row():
            keygen_btn = gr.Button("2. Generate keys", elem_id="keygen-btn")
            encrypt_btn = gr.Button("3. Encrypt", elem_id="encrypt-btn")
            run_btn = gr.Button("4. Run in FHE on the server", elem_id="run-btn")
            decrypt_btn = gr.Button("5. Decrypt", elem_id="decrypt-btn")
        keys_out = gr.Markdown(elem_id="keys-out")
        ct_out = gr.Markdown(elem_id="ct-out")
        run_out = gr.Markdown(elem_id="run-out")
        result_out = gr.Markdown(elem_id="result-out")
        plain_out = gr.Markdown(elem_id="plain-out")

        outputs = [keys_out, ct_out, run_out, result_out, plain_out]
        model.change(on_model, model, [card, example, compare, *outputs])
        example.change(lambda s: s or gr.update(), example, smiles)
        smiles.change(on_smiles, smiles, [image, mol_status])
        keygen_btn.click(on_keygen, model, [keys_out, ct_out, run_out, result_out])
        encrypt_btn.click(on_encrypt, [model, smiles], [ct_out, run_out, result_out])
        run_btn.click(on_run, model, [run_out, result_out])
        decrypt_btn.click(on_decrypt, [model, compare], [result_out, plain_out])
        predict_btn.click(on_predict, [model, smiles, compare], outputs)
        ui.unload(on_unload)
    return ui
