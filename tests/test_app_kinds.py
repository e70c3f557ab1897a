"""Defect 6: the app serves every kind of bundle the CLI serves: tabular rows (as a form) and multi-task
molecules (a table of values with units), next to the SMILES models of test_app.py. Real tiny bundles,
a real `molcloak serve` process, real keys."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pandas as pd
import pytest

from molcloak.app import ui
from molcloak.app.backend import AppBackend
from molcloak.app.views import unsupported
from molcloak.pipeline import data, workflow
from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.predict import Simulator
from molcloak.pipeline.tasks import TaskSpec
from molcloak.pipeline.train import TrainConfig

TINY = dict(hidden=[4], weight_bits=2, act_bits=2, input_bits=2)


def _deploy(ds, out, name, **train):
    ckpt = workflow.train_checkpoint(
        ds, model_options=TINY, train_config=TrainConfig(epochs=3, patience=3, seed=0), **train
    )
    workflow.deploy(ckpt, workflow.compile_checkpoint(ckpt, CompileConfig(rounding_bits=None)), out, name)
    return out


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """A tabular bundle (breast-cancer rows), a two-task regression one (logS + kcal/mol) and a fingerprint
    one (descriptors and Morgan bits: its explanations have atom maps), served."""
    from helpers import ServerProcess

    root = tmp_path_factory.mktemp("kinds")
    bundles = {
        "tiny-breast-cancer": _deploy(
            data.load_bundled("breast-cancer"), root / "b" / "tab", "tiny-breast-cancer", model_name="mlp"
        ),
        "tiny-sol-freesolv": _deploy(
            data.load_bundled("sol-freesolv"), root / "b" / "mt", "tiny-sol-freesolv"
        ),
        "tiny-morgan": _deploy(
            data.load_bundled("sol-low"),
            root / "b" / "fp",
            "tiny-morgan",
            features="physchem+morgan:r=1,n=32",
        ),
    }
    server = ServerProcess(root / "b", root / "state")
    b = AppBackend(server.url, root / "app", bundles=bundles)
    yield b, bundles
    b.close()
    server.stop()


def _ids(update: dict) -> dict:
    return {(c.elem_id or type(c).__name__): v for c, v in update.items()}


def _callback(blocks, name):
    return next(fn.fn for fn in blocks.fns.values() if getattr(fn.fn, "__name__", "") == name)


def test_tabular_rows_are_a_form_and_predict_privately(kinds):
    backend, bundles = kinds
    assert set(backend.models) == {"tiny-breast-cancer", "tiny-sol-freesolv", "tiny-morgan"}
    assert not backend.skipped
    assert "rows of 30 numbers" in backend.model_card("tiny-breast-cancer")
    blocks = ui.build_ui(backend)
    request = gr.Request(session_hash="tab")
    shown = _ids(_callback(blocks, "on_model")("tiny-breast-cancer", request))
    assert shown["row-form"]["visible"] is True and shown["smiles"]["visible"] is False
    assert [r[0] for r in shown["row-form"]["value"]] == list(backend.featurizer("tiny-breast-cancer").names)
    caption, row, truth = backend.examples("tiny-breast-cancer")[0]
    assert caption.startswith("test row ") and truth in ("malignant", "benign")
    form = pd.DataFrame(_ids(_callback(blocks, "on_example")("tiny-breast-cancer", "0"))["row-form"])
    shown = {}
    for update in _callback(blocks, "on_predict")("tiny-breast-cancer", "", form, False, {}, request):
        shown.update(_ids(update))
    sim = Simulator(bundles["tiny-breast-cancer"])
    raw, values = sim([row])
    assert (
        f"True value (this is a test-set example the model never trained on): **{truth}**"
        in shown["result-out"]
    )
    labels = sim.task.labels
    assert shown["result-label"]["value"] == pytest.approx(dict(zip(labels, values[0])), abs=1e-9)
    assert shown["logits-out"].count("|") > 4 and f"{raw[0][0]:.4f}" in shown["logits-out"]
    assert "a row of 30 numbers" in shown["encrypt-out"]
    form.iloc[3, 1] = float("nan")
    with pytest.warns(UserWarning, match=r"row: column .* fix"):
        for _ in _callback(blocks, "on_predict")("tiny-breast-cancer", "", form, False, {}, request):
            pass


def test_multitask_values_with_units(kinds):
    backend, bundles = kinds
    blocks = ui.build_ui(backend)
    shown = {}
    for update in _callback(blocks, "on_predict")(
        "tiny-sol-freesolv", "CCCCO", None, True, {}, gr.Request(session_hash="mt")
    ):
        shown.update(_ids(update))
    _, values = Simulator(bundles["tiny-sol-freesolv"])(["CCCCO"])
    result = shown["result-out"]
    assert "| task | predicted | units |" in result
    for v in np.ravel(values[0]):
        assert f"**{v:.2f}**" in result
    assert "logS" in result and "kcal/mol" in result
    assert shown["result-label"]["visible"] is False and "not private" in shown["plain-out"]


def test_a_model_the_page_cannot_enter_is_named_with_the_cli_to_use():
    info = {
        "name": "odd",
        "featurizer": {"kind": "no-such-kind"},
        "task": {"name": "x", "kind": "binary", "target": "y"},
    }
    why = unsupported(info, "http://h:1")
    assert why.startswith("model 'odd' has a featurizer or task this app cannot read (")
    assert why.endswith("use `molcloak predict --server http://h:1 --model odd` instead")


def _predicted(blocks, name, smiles, rows, request) -> dict:
    shown = {}
    for update in _callback(blocks, "on_predict")(name, smiles, rows, False, {}, request):
        shown.update(_ids(update))
    return shown


def test_explain_a_tabular_row_by_its_columns(kinds):
    backend, _ = kinds
    name, request = "tiny-breast-cancer", gr.Request(session_hash="ex-tab")
    blocks = ui.build_ui(backend)
    form = pd.DataFrame(_ids(_callback(blocks, "on_example")(name, "0"))["row-form"])
    shown = _predicted(blocks, name, "", form, request)
    assert "30 input groups + 1" in shown["explain-cost"] and shown["explain-btn"]["interactive"] is True
    out = _ids(_callback(blocks, "on_explain")(name, shown["State"], request, lambda *a, **k: None))
    text, columns = out["explain-out"], backend.featurizer(name).names
    positive = TaskSpec.from_dict(backend.model(name)["task"]).labels[1]
    assert f"#### Why the probability of '{positive}' is " in text and f"towards '{positive}'" in text
    first = text.split("\n- ")[1]
    assert first.split("`")[1] in columns and " (neutral " in first  # a column, its value and its median
    assert out["explain-map"]["visible"] is False


def test_explain_a_fingerprint_model_draws_its_atom_map(kinds):
    from rdkit import Chem

    from molcloak.app import explain

    backend, _ = kinds
    name, smiles, request = "tiny-morgan", "CCOc1ccccc1C(=O)O", gr.Request(session_hash="ex-fp")
    blocks = ui.build_ui(backend)
    shown = _predicted(blocks, name, smiles, None, request)
    n_atoms = Chem.MolFromSmiles(smiles).GetNumAtoms()
    assert f"({10 + n_atoms + 1} input groups + 1" in shown["explain-cost"]  # descriptors, atoms, all atoms
    out = _ids(_callback(blocks, "on_explain")(name, shown["State"], request, lambda *a, **k: None))
    assert out["explain-map"]["visible"] is True and out["explain-map"]["value"].size == (360, 360)
    assert "Atoms (their fingerprint environments off, one at a time): atom " in out["explain-out"]
    result = explain.explain(backend, "ex-fp", name, smiles)
    amap = result["molecules"][0]["atom_map"]
    assert len(amap["weights"]) == n_atoms
    assert sum(amap["weights"]) == pytest.approx(amap["total"], abs=1e-9)  # the map sums to Δ
    assert "the shares sum to " in out["explain-out"]
