"""The app's client side and callbacks, against a real `molcloak serve` child process and tiny bundles."""

from __future__ import annotations

import stat

import gradio as gr
import numpy as np
import psutil
import pytest

from molcloak.app import ui
from molcloak.app.backend import AppBackend, excerpt
from molcloak.app.launcher import start_server
from molcloak.pipeline.errors import InvalidSmilesError, MolcloakError, StepError
from molcloak.pipeline.metrics import describe
from molcloak.pipeline.predict import Simulator

SMILES = "CC(=O)Oc1ccccc1C(=O)O"


@pytest.fixture(scope="module")
def served(tiny_binary, tiny_regression, tmp_path_factory):
    """Both tiny bundles behind one real server process, and the local bundle paths (owner view)."""
    root = tmp_path_factory.mktemp("app-bundles")
    bundles = {}
    for (_, _, bundle), name in ((tiny_binary, "tiny-sol-low"), (tiny_regression, "tiny-sol-logs")):
        (root / name).symlink_to(bundle, target_is_directory=True)
        bundles[name] = bundle
    server = start_server(root, tmp_path_factory.mktemp("app-state"), workers=2)
    yield server, bundles
    children = psutil.Process(server.process.pid).children(recursive=True)  # FHE workers
    assert children
    server.stop()  # SIGTERM to `molcloak serve` only: it must stop its workers itself
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"FHE workers outlived the server: {alive}"


@pytest.fixture(scope="module")
def backend(served, tmp_path_factory):
    """One backend (and one comparison child) for the module: every test uses its own session ids, and
    the oldest sessions are evicted as later tests open theirs (max_sessions=2)."""
    server, bundles = served
    root = tmp_path_factory.mktemp("app")
    b = AppBackend(server.url, root / "app", token=server.token, bundles=bundles, max_sessions=2)
    yield b
    b.close()


@pytest.fixture(scope="module")
def simulators(served):
    return {name: Simulator(path) for name, path in served[1].items()}


def test_models_cards_and_examples(backend):
    assert set(backend.models) == {"tiny-sol-low", "tiny-sol-logs"}
    card = backend.model_card("tiny-sol-low")
    assert "not low / low" in card and "roc_auc" in card and "programmable bootstraps" in card
    assert "rmse" in backend.model_card("tiny-sol-logs")
    examples = backend.examples("tiny-sol-low", n=6)
    assert len(examples) == 6
    assert {truth for _, _, truth in examples} == {"low", "not low"}  # both classes shown
    assert all(caption.endswith(f"(test set, true: {truth})") for caption, _, truth in examples)
    with pytest.raises(MolcloakError, match="model 'nope' is not served; pick one of"):
        backend.model_card("nope")


def test_invalid_smiles_is_a_readable_error(backend):
    with pytest.raises(InvalidSmilesError, match=r"SMILES 'C1CC\(' could not be parsed by RDKit"):
        backend.check_smiles("C1CC(")
    with pytest.raises(InvalidSmilesError, match="no SMILES given"):
        backend.draw("  ")
    assert backend.draw("CCO", size=200).size == (200, 200)


def test_steps_in_order_match_the_simulation(backend, simulators, served):
    name = "tiny-sol-low"
    with pytest.raises(StepError, match=r"generate keys first \(step 1\)"):
        backend.encrypt("s1", name, SMILES)
    keys = backend.keygen("s1", name)
    assert keys["evaluation_key_bytes"] > 1000 and len(keys["key_id"]) == 32
    secret = next((backend.sessions_dir / "s1" / "keys").glob("*/keys.bin"))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(StepError, match=r"encrypt an input .* first \(step 2\)"):
        backend.run("s1", name)
    with pytest.raises(InvalidSmilesError):
        backend.encrypt("s1", name, "not a smiles")
    enc = backend.encrypt("s1", name, SMILES)
    assert enc["bytes"] > 100 and enc["hex"].startswith("bytes ")
    with pytest.raises(StepError, match=r"first \(step 3\)"):
        backend.decrypt("s1", name)
    run = backend.run("s1", name)
    assert run["server_seconds"] > 0 and run["bytes"] > 100
    result = backend.decrypt("s1", name)
    raw, _ = simulators[name]([SMILES])
    np.testing.assert_allclose(result["raw"], raw[0], rtol=0, atol=1e-9)  # FHE == simulation (p_error 2^-40)
    assert result["text"].split(" (")[0] in ("low", "not low")
    plain = backend.plaintext(name, SMILES)
    assert plain["text"] == result["text"]


def test_one_button_regression_and_second_session(backend, simulators):
    name = "tiny-sol-logs"
    r = backend.predict("s2", name, "CCCCO")
    _, values = simulators[name](["CCCCO"])
    assert r["decrypt"]["values"] == pytest.approx(float(values[0]), abs=1e-9)
    assert r["decrypt"]["text"].endswith("logS")
    again = backend.predict("s2", name, "CCO")  # keys reused within the session
    assert again["keys"]["key_id"] == r["keys"]["key_id"]


def test_old_sessions_are_cleaned_up_with_their_server_keys(backend):
    name = "tiny-sol-low"
    ids = {sid: backend.keygen(sid, name)["key_id"] for sid in ("a", "b", "c")}  # max_sessions=2
    assert set(backend.session_ids) == {"b", "c"}
    assert not (backend.sessions_dir / "a").exists()
    r = backend.session("b").remotes[name].request("DELETE", f"/keys/{ids['a']}")
    assert r.status_code == 404  # the server forgot session a's evaluation keys
    ended = backend.cleanup(now=10**12)  # everything is past its TTL
    assert set(ended) == {"b", "c"} and backend.session_ids == []
    assert list(backend.sessions_dir.iterdir()) == []


def test_excerpt_is_short():
    data = bytes(range(256)) * 4
    assert excerpt(data).startswith("bytes 496-527 of 1024: ")
    assert excerpt(b"\x01\x02") == "01 02"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bundle", "no/such/bundle"], "no bundle at 'no/such/bundle'; run `molcloak demo` first"),
        (["--bundle", "x", "--server", "http://127.0.0.1:9"], "pass either --bundle"),
        (["--server", "http://127.0.0.1:9"], "cannot reach the FHE server at http://127.0.0.1:9"),
    ],
)
def test_app_cli_errors_are_one_line(args, message, tmp_path):
    from typer.testing import CliRunner

    from molcloak.pipeline.cli import app

    result = CliRunner().invoke(app, ["app", *args, "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


# ---------------------------------------------------------------- the page's callbacks


def _callback(blocks: gr.Blocks, name: str):
    for fn in blocks.fns.values():
        if getattr(fn.fn, "__name__", "") == name:
            return fn.fn
    raise AssertionError(f"no callback {name}")


def _ids(update: dict) -> dict:
    """{elem_id: value} of a callback's {component: value} answer (State by its class name)."""
    return {(c.elem_id or type(c).__name__): v for c, v in update.items()}


def _drain(gen) -> dict:
    """Every update a generator callback yields, merged (what the page shows once it ends)."""
    shown: dict = {}
    for update in gen:
        shown.update(_ids(update))
    return shown


def _predict(blocks, name, item, compare, memo, request):
    smiles, rows = (item, None) if isinstance(item, str) else ("", item)
    return _drain(_callback(blocks, "on_predict")(name, smiles, rows, compare, memo, request))


def test_comparison_from_a_page_thread_never_hides_the_private_result(backend, simulators):
    """Defect 1: the plaintext comparison used to compile in Gradio's worker thread and fail with
    `'_thread._local' object has no attribute 'stack'`, losing the private result."""
    import threading

    blocks = ui.build_ui(backend)
    shown, errors = {}, []

    def page_thread():  # Gradio runs callbacks in worker threads like this one
        try:
            shown.update(_predict(blocks, "tiny-sol-low", SMILES, True, {}, gr.Request(session_hash="t1")))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=page_thread)
    t.start()
    t.join()
    assert not errors, errors
    _, values = simulators["tiny-sol-low"]([SMILES])
    label = simulators["tiny-sol-low"].task.labels[int(np.argmax(values[0]))]
    assert f"aqueous solubility class (Huuskonen): **{label}**" in shown["result-out"]
    assert "not private" in shown["plain-out"] and label in shown["plain-out"]
    assert "rounds exactly" in shown["result-out"] and "8 simulated runs" in shown["result-out"]
    assert shown["result-label"]["value"].keys() == {"low", "not low"}
    assert "| low |" in shown["logits-out"]
    assert "Evaluation keys" in shown["server-out"] and "Secret key" in shown["here-out"]


def test_a_broken_comparison_is_reported_next_to_the_private_result(served, tmp_path, simulators):
    import shutil

    server, bundles = served
    broken = tmp_path / "broken"
    shutil.copytree(bundles["tiny-sol-low"], broken)
    (broken / "owner" / "checkpoint.json").write_text("{}")  # the owner's weights cannot be loaded
    b = AppBackend(server.url, tmp_path / "app", token=server.token, bundles={"tiny-sol-low": broken})
    try:
        shown = _predict(ui.build_ui(b), "tiny-sol-low", SMILES, True, {}, gr.Request(session_hash="x"))
    finally:
        b.close()
    _, values = simulators["tiny-sol-low"]([SMILES])
    assert shown["decrypt-out"].endswith(f"**{describe(simulators['tiny-sol-low'].task, values[0])}**.")
    assert "aqueous solubility class" in shown["result-out"]
    assert shown["plain-out"].startswith("The plaintext comparison is unavailable (the owner's model")
    assert "the private result above is complete" in shown["plain-out"]


def test_results_of_an_old_input_go_away_and_reused_keys_are_not_new(backend):
    """Defects 3 and 4: a changed input clears the ciphertext and results (run/decrypt cannot use the old
    ones); a second prediction says it reuses the session's keys instead of reprinting the keygen line."""
    blocks = ui.build_ui(backend)
    request = gr.Request(session_hash="d3")
    first = _predict(blocks, "tiny-sol-low", "CCCCCCCCCCCCCCCCCC(=O)O", False, {}, request)
    assert first["keys-out"].startswith("New keys in") and "done in" in first["keys-state"]
    memo = first["State"]
    encrypted = _ids(
        _callback(blocks, "on_encrypt")("tiny-sol-low", "CCCCCCCCCCCCCCCCCC(=O)O", None, memo, request)
    )
    cleared = _ids(_callback(blocks, "on_input")("tiny-sol-low", "OCC(O)CO", encrypted["State"], request))
    assert cleared["result-out"] == "" and cleared["encrypt-out"] == "" and cleared["run-out"] == ""
    assert cleared["run-btn"]["interactive"] is False and cleared["encrypt-btn"]["interactive"] is True
    assert "pending" in cleared["run-state"] and "done" in cleared["keys-state"]
    with pytest.warns(UserWarning, match=r"encrypt an input for model 'tiny-sol-low' first"):
        assert _callback(blocks, "on_run")("tiny-sol-low", cleared["State"], request) == {}
    again = _predict(blocks, "tiny-sol-low", "OCC(O)CO", False, cleared["State"], request)
    assert again["keys-out"].startswith("Using the keys this session made earlier")
    assert "New keys" not in again["keys-out"] and "reused" in again["keys-state"]
    assert "`OCC(O)CO`" in again["result-out"]


def test_ui_callbacks_and_errors(backend):
    blocks = ui.build_ui(backend)
    request = gr.Request(session_hash="browser1")
    with pytest.warns(UserWarning, match="could not be parsed by RDKit"):  # a toast titled "molcloak"
        assert (
            _drain(_callback(blocks, "on_predict")("tiny-sol-low", "C1CC(", None, False, {}, request)) == {}
        )
    with pytest.warns(UserWarning, match="generate keys first"):
        _callback(blocks, "on_encrypt")("tiny-sol-logs", SMILES, None, {}, gr.Request(session_hash="fresh"))
    shown = _ids(_callback(blocks, "on_input")("tiny-sol-low", "c1ccccc1", {}, request))
    assert shown["mol-image"] is not None and shown["mol-status"].startswith("✓")
    shown = _ids(_callback(blocks, "on_input")("tiny-sol-low", "c1cccc", {}, request))
    assert shown["mol-image"] is None and "could not be parsed" in shown["mol-status"]
    regression = _predict(blocks, "tiny-sol-logs", "CCCCO", False, {}, request)
    assert regression["result-out"].startswith("### aqueous solubility (Huuskonen, logS): **")
    assert regression["result-out"].split("**")[1].endswith(" logS")
    assert regression["result-label"]["visible"] is False


def test_batch_tab_predicts_a_csv_like_the_cli(backend, simulators, tmp_path):
    from molcloak.app.batch import run_batch

    csv = tmp_path / "mols.csv"
    csv.write_text(f"name,smiles\naspirin,{SMILES}\nbad,C1CC(\nbutanol,CCCCO\n")
    seen = []
    status, rows, out = run_batch(
        backend, "batch1", "tiny-sol-low", str(csv), "smiles", lambda i, n: seen.append((i, n))
    )
    assert seen == [(1, 3), (2, 3)] and "2 of 3 rows predicted privately" in status
    _, values = simulators["tiny-sol-low"]([SMILES, "CCCCO"])
    labels = [simulators["tiny-sol-low"].task.labels[int(np.argmax(v))] for v in values]
    assert [r.get("prediction", "") for r in rows] == [labels[0], "", labels[1]]
    assert "molecule 2" in rows[1]["error"] and "could not be parsed" in rows[1]["error"]
    assert out.read_text().splitlines()[0] == "index,smiles,prediction,value,error"
    assert out.parent == backend.sessions_dir / "batch1"  # deleted with the session
    with pytest.raises(MolcloakError, match="column 'smi' not found"):
        run_batch(backend, "batch1", "tiny-sol-low", str(csv), "smi")


# ---------------------------------------------------------------- the explain view


def test_explain_view_attributes_from_encrypted_runs(backend, simulators):
    """The explain panel: its cost before it starts, progress, then contributions in the chemist's terms,
    each equal to the owner's simulation of f(x) - f(x with the descriptor at its neutral value)."""
    import re

    from molcloak.app import explain
    from molcloak.pipeline.attributions import Featurization
    from molcloak.pipeline.metrics import to_predictions

    name, request = "tiny-sol-low", gr.Request(session_hash="ex1")
    blocks = ui.build_ui(backend)
    with pytest.warns(UserWarning, match="predict an input first"):
        assert _callback(blocks, "on_explain")(name, {}, request, lambda *a, **k: None) == {}
    shown = _predict(blocks, name, SMILES, False, {}, request)
    runs = int(re.search(r"costs \*\*(\d+) encrypted runs\*\*", shown["explain-cost"]).group(1))
    assert shown["explain-btn"]["interactive"] is True
    assert shown["explain-btn"]["value"].startswith(f"Explain privately ({runs} encrypted runs, about ")
    seen = []
    out = _ids(
        _callback(blocks, "on_explain")(
            name, shown["State"], request, lambda f, desc="": seen.append((f, desc))
        )
    )
    assert (
        seen[0] == (0, "explaining")
        and seen[-1][0] == 1
        and f"{runs} of {runs} encrypted runs" in seen[-1][1]
    )
    text = out["explain-out"]
    assert "#### Why the probability of 'low' is " in text and "towards 'low'" in text
    assert "logP (Crippen) (`MolLogP`) = " in text and out["explain-map"]["visible"] is False
    assert f"{runs} encrypted runs in " in text and "only ciphertexts" in text

    sim = simulators[name]
    result = explain.explain(backend, "ex1", name, SMILES)
    feat = Featurization(sim.checkpoint.featurizer)
    raw, neutral = feat.raw([SMILES])[0], feat.neutral()

    def low(rows):
        raws = sim.compiled.q_module.forward(feat.features(np.asarray(rows)), fhe="simulate")
        return to_predictions(sim.task, raws, sim.checkpoint.scaler)[:, 1]

    mol, names = result["molecules"][0], sim.checkpoint.featurizer.raw_names
    p = low(raw[None])[0]
    assert mol["prediction"]["low"] == pytest.approx(p, abs=1e-9) and mol["output"] == "low"
    assert result["cost"]["encrypted_runs"] == runs and len(mol["groups"]) == 10
    for g in mol["groups"]:
        row = raw.copy()
        row[names.index(g["name"])] = neutral[names.index(g["name"])]
        assert g["contribution"] == pytest.approx(p - low(row[None])[0], abs=1e-9), g["name"]
    top = max(mol["groups"], key=lambda g: abs(g["contribution"]))
    assert text.split("\n- ")[1].startswith(explain.PHYSCHEM[top["name"]])  # listed first
    assert f"**{top['contribution']:+.3f}** towards 'low'" in text
