"""Private explanations: perturbations against RDKit and the featurizer, attributions from real encrypted
runs against Concrete's simulation, atom maps, permutation importance, and the privacy of the wire."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ServerProcess
from test_audit import Counting, Recorder, synthetic_rows, synthetic_tabular, tabular_csv
from typer.testing import CliRunner

from molcloak.evaluation.audit.engine import AuditConfig, run_audit
from molcloak.evaluation.audit.explain import ExplainConfig, ExplainOptions, run_explain
from molcloak.evaluation.audit.report import write_reports
from molcloak.pipeline.attributions import ALL_ATOMS, Featurization
from molcloak.pipeline.cli import app
from molcloak.pipeline.errors import RemoteError
from molcloak.pipeline.featurize import FeaturizerSpec
from molcloak.pipeline.metrics import to_predictions
from molcloak.pipeline.predict import LocalBackend
from molcloak.pipeline.serving.http_client import RemoteModel

MOLECULES = ["CCOc1ccccc1C(=O)O", "CC(C)CN", "O=C1CCCN1", "c1ccncc1", "CCCCCCO", "OCC(O)CO", "CC#N", "ClCCl"]
TOKEN = "explain-token"


def _simulate(compiled, task, X, scaler=None) -> np.ndarray:
    """Predictions of feature rows by Concrete's simulation (equal to FHE with the tests' exact rounding)."""
    return to_predictions(task, compiled.q_module.forward(np.asarray(X), fhe="simulate"), scaler)


# ---------------------------------------------------------------- perturbations (no FHE)


def test_featurization_reproduces_transform_and_neutral_values():
    spec = FeaturizerSpec.parse("physchem+rdkit2d:scale=quantile+morgan_count:r=1,n=64+select:k=60")
    spec = spec.fit(MOLECULES * 3)
    feat = Featurization(spec)
    raw = feat.raw(MOLECULES)
    assert np.array_equal(feat.features(raw), spec.transform(MOLECULES))  # the featurizer's own steps
    neutral = feat.neutral()
    assert np.array_equal(neutral[:10], spec.descriptor_medians[:10])  # physchem: the training median
    q = np.flatnonzero([bool(k) for k in spec.knots])
    assert np.array_equal(neutral[q], [spec.knots[j][32] for j in q])  # quantile columns: the training median
    assert np.all(neutral[10 + 217 :] == 0)  # fingerprint columns: off
    groups = feat.column_groups()
    kept = set(spec.select.names)
    assert {g.name for g, _ in groups if g.kind == "descriptor"} <= kept
    assert [g.name for g, _ in groups if g.kind == "fingerprint"] == ["morgan_count:r=1,n=64"]
    # a descriptor group set to its neutral value changes that model input only
    g, cols = next((g, c) for g, c in groups if g.kind == "descriptor" and raw[0, c[0]] != neutral[c[0]])
    row = raw[0].copy()
    row[cols] = neutral[cols]
    changed = np.flatnonzero(feat.features(row[None])[0] != feat.features(raw[:1])[0])
    assert list(changed) == list(feat.inputs_of(cols)) and cols[0] < 10  # a physchem column: standardized
    standardized = (neutral[cols] - np.asarray(spec.mean)[cols]) / np.asarray(spec.std)[cols]
    assert feat.features(row[None])[0][changed] == pytest.approx(standardized, abs=1e-6)  # its median's


def test_a_maps_inputs_are_one_importance_group_and_the_kept_parts_keep_their_positions():
    """rff mixes every column it maps into each of its N inputs: permutation importance permutes them together; the
    bits kept after it are the inputs that follow, and each molecule's descriptors are still perturbed one by one."""
    spec = FeaturizerSpec.parse("physchem:scale=quantile+rff:n=8+morgan:r=2,n=16").fit(MOLECULES * 3)
    feat = Featurization(spec)
    groups = feat.input_groups()
    assert [(g.name, list(i)) for g, i in groups] == [
        ("rff:n=8 of physchem:scale=quantile", list(range(8))),
        ("morgan:r=2,n=16", list(range(8, 24))),
    ]
    raw = feat.raw(MOLECULES)
    bits = raw.copy()
    bits[:, 10:] = 0  # the kept bits off: only the inputs after the map's change
    changed = np.flatnonzero((feat.features(bits) != feat.features(raw)).any(axis=0))
    assert set(changed) <= set(range(8, 24)) and len(changed)
    assert sum(g.kind == "descriptor" for g, _ in feat.column_groups()) == 10  # per-molecule attributions


@pytest.mark.parametrize("smiles", ["CCOc1ccccc1C(=O)O", "CC(C)CN"])
def test_atom_groups_clear_the_bits_rdkit_similarity_maps_clears(smiles):
    from rdkit import Chem
    from rdkit.Chem.Draw import SimilarityMaps

    spec = FeaturizerSpec.parse("physchem+morgan:r=2,n=64").fit(MOLECULES)
    feat = Featurization(spec)
    raw = feat.raw([smiles])[0]
    groups = feat.molecule_groups(smiles)
    mol = Chem.MolFromSmiles(smiles)
    atoms = [(g, f) for g, f in groups if g.kind == "atom"]
    assert [g.atom for g, _ in atoms] == list(range(mol.GetNumAtoms()))
    for g, perturb in atoms:
        oracle = SimilarityMaps.GetMorganFingerprint(mol, atomId=g.atom, radius=2, fpType="bv", nBits=64)
        assert np.array_equal(perturb(raw)[10:], np.array(list(oracle), dtype=float)), g.name
        assert np.array_equal(perturb(raw)[:10], raw[:10])  # descriptors untouched
    everything = next(f for g, f in groups if g.name == ALL_ATOMS)
    assert np.all(everything(raw)[10:] == 0)


def test_count_fingerprint_atoms_lose_their_environments():
    spec = FeaturizerSpec.parse("morgan_count:r=1,n=32+atompair_count:n=32+torsion_count:n=32").fit(MOLECULES)
    feat = Featurization(spec)
    raw = feat.raw(["CCOc1ccccc1C(=O)O"])[0]
    groups = feat.molecule_groups("CCOc1ccccc1C(=O)O")
    for g, perturb in groups:
        out = perturb(raw)
        assert np.all(out <= raw) and (g.kind != "atom" or out.sum() < raw.sum())
    assert np.all(next(f for g, f in groups if g.name == ALL_ATOMS)(raw) == 0)


# ---------------------------------------------------------------- attributions with real FHE


def test_explain_cli_attributes_to_the_one_column_the_model_uses(tmp_path_factory, tmp_path):
    ckpt, compiled, bundle = synthetic_tabular(tmp_path_factory)
    X, y = synthetic_rows(16, 5)
    X[:3, 1] = [1.8, -1.6, 2.2]  # far from b's neutral value (its training median), so b decides these rows
    y = (X[:, 1] > 0).astype(int)
    path = tabular_csv(tmp_path / "rows.csv", X, y)
    args = ["explain", "--bundle", bundle, "--input", path, "--target-col", "y", "--molecules", "3"]
    args += ["--bootstrap", "200", "--out", tmp_path / "ex", "--key-dir", tmp_path / "keys", "--json"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["cost"] == {
        "groups": 9,
        "molecules": 3,
        "encrypted_runs": res["cost"]["encrypted_runs"],
        "skipped_unchanged": 9 + 3 - res["cost"]["encrypted_runs"],
    }
    neutral = ckpt.featurizer.neutral_raw()
    for mol, x in zip(res["molecules"], X[:3]):
        by = {g["name"]: g["contribution"] for g in mol["groups"]}
        assert max(by, key=lambda k: abs(by[k])) == "b" and abs(by["b"]) > 0.2
        p = _simulate(compiled, ckpt.task, ckpt.featurizer.transform(x[None]))[0, 1]
        xb = x.copy()
        xb[1] = neutral[1]
        pb = _simulate(compiled, ckpt.task, ckpt.featurizer.transform(xb[None]))[0, 1]
        assert by["b"] == pytest.approx(p - pb, abs=1e-12)  # decrypted FHE runs equal the simulation
        assert mol["output"] == "pos"
    imp = {g["name"]: g for g in res["importance"]["groups"]}
    assert res["importance"]["metric"] == "roc_auc" and res["importance"]["encrypted_runs"] == 3 * 16
    assert imp["b"]["value"] > 0 and imp["b"]["low"] > 0 and res["importance"]["groups"][0]["name"] == "b"
    assert abs(imp["a"]["value"]) < imp["b"]["value"] and abs(imp["c"]["value"]) < imp["b"]["value"]
    html = (tmp_path / "ex" / "explain.html").read_text()
    assert "Permutation importance" in html and "data:image/png;base64," in html


@pytest.fixture(scope="module")
def tiny_morgan(tmp_path_factory):
    """sol-low on Morgan bits (r=1, 32 bits) -> 4 -> 2, 2 bits, exact rounding: a fingerprint model."""
    from conftest import EXACT_P_ERROR, TINY, TINY_TRAIN

    from molcloak.pipeline import data, workflow
    from molcloak.pipeline.compile import CompileConfig

    ckpt = workflow.train_checkpoint(
        data.load_bundled("sol-low"), "morgan:r=1,n=32", model_options=TINY, train_config=TINY_TRAIN
    )
    compiled = workflow.compile_checkpoint(ckpt, CompileConfig(rounding_bits=None, p_error=EXACT_P_ERROR))
    bundle = tmp_path_factory.mktemp("morgan") / "bundle"
    workflow.deploy(ckpt, compiled, bundle, "tiny-morgan")
    return ckpt, compiled, bundle


def test_audit_explain_draws_atom_maps_that_sum_to_the_fingerprint_contribution(tiny_morgan, tmp_path):
    from rdkit import Chem
    from rdkit.Chem.Draw import SimilarityMaps

    ckpt, compiled, bundle = tiny_morgan
    by_size = sorted(range(len(ckpt.smiles_test)), key=lambda i: (len(ckpt.smiles_test[i]), i))
    small = [i for i in by_size if ckpt.y_test[i] == 0][:2] + [i for i in by_size if ckpt.y_test[i] == 1][:2]
    small = sorted(small, key=lambda i: -len(ckpt.smiles_test[i]))  # the explained molecule has most atoms
    lines = ["smiles,truth"] + [
        f"{ckpt.smiles_test[i]},{ckpt.task.labels[int(ckpt.y_test[i])]}" for i in small
    ]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    config = AuditConfig(tmp_path / "t.csv", tmp_path / "audit", "truth", bootstrap=50, explain=1)
    report = run_audit(config, LocalBackend(bundle, tmp_path / "keys"))
    mol = report["explain"]["molecules"][0]
    smiles = mol["smiles"]
    rdmol = Chem.MolFromSmiles(smiles)
    x = ckpt.featurizer.transform([smiles])
    p = _simulate(compiled, ckpt.task, x)[0, 1]
    rows = [
        np.array(list(SimilarityMaps.GetMorganFingerprint(rdmol, atomId=a, radius=1, fpType="bv", nBits=32)))
        for a in range(rdmol.GetNumAtoms())
    ]
    expected = p - _simulate(compiled, ckpt.task, np.array(rows, dtype=np.float32))[:, 1]
    amap = mol["atom_map"]
    assert amap["occlusion"] == pytest.approx(
        expected.tolist(), abs=1e-12
    )  # RDKit's occlusion, run encrypted
    total = p - _simulate(compiled, ckpt.task, np.zeros_like(x))[0, 1]
    assert amap["total"] == pytest.approx(total, abs=1e-12)
    assert sum(amap["weights"]) == pytest.approx(total, abs=1e-9)  # the map sums to the prediction difference
    imp = report["explain"]["importance"]
    assert [g["name"] for g in imp["groups"]] == ["morgan:r=1,n=32"] and imp["encrypted_runs"] == 4
    files = write_reports(report, tmp_path / "audit")
    svg = (tmp_path / "audit" / "maps" / f"row-{mol['id']}.svg").read_text()
    assert "<svg" in svg and (tmp_path / "audit" / "maps" / f"row-{mol['id']}.png").stat().st_size > 1000
    html = (tmp_path / "audit" / "report.html").read_text()
    assert "<svg" in html and "Atom map of low" in html and "Permutation importance" in html
    assert "maps/row-" in (tmp_path / "audit" / "report.md").read_text() and "json" in files


def test_cli_audit_explain_without_importance(tiny_morgan, tmp_path):
    ckpt, _, bundle = tiny_morgan
    lines = ["smiles,truth", "CCO,low", "CCCCCCCCCCCC,not low"]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    args = ["audit", "--bundle", bundle, "--test-set", tmp_path / "t.csv", "--target-col", "truth"]
    args += ["--out", tmp_path / "a", "--key-dir", tmp_path / "keys", "--bootstrap", "20", "--explain", "1"]
    result = CliRunner().invoke(app, [str(a) for a in args + ["--no-importance"]])
    assert result.exit_code == 0, result.output
    assert "per-molecule attributions: 4 encrypted runs" in result.output  # the cost, printed first
    assert "row 1 CCO low=" in result.output and "atom 0 C" in result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert "importance" not in report["explain"] and report["explain"]["cost"]["groups"] == 4
    assert "<svg" in (tmp_path / "a" / "report.html").read_text()


# ---------------------------------------------------------------- resuming an interrupted explanation


def _same(result: dict) -> dict:
    """An explanation without its timing (seconds, sessions)."""
    return {k: v for k, v in result.items() if k not in ("seconds", "sessions")}


def test_explain_resumes_after_interruptions_running_each_batch_once(tmp_path_factory, tmp_path):
    _, _, bundle = synthetic_tabular(tmp_path_factory)
    X, y = synthetic_rows(6, 3)
    path = tabular_csv(tmp_path / "rows.csv", X, y)
    options, keys = ExplainOptions(molecules=2, bootstrap=50, batch_size=2), tmp_path / "keys"
    whole = Counting(LocalBackend(bundle, keys))
    expected = run_explain(ExplainConfig(tmp_path / "whole", input=path, target_col="y"), options, whole)
    assert whole.rows == 2 + 2 * 3 + 6 + 3 * 6  # attributions, predictions, importance: 16 batches of 2
    config = ExplainConfig(tmp_path / "ex", input=path, target_col="y")
    first = Counting(LocalBackend(bundle, keys), fail_at=3)  # Ctrl-C during the 3rd batch
    with pytest.raises(
        KeyboardInterrupt, match=r"^interrupted; 4 encrypted runs are done and saved in .*ex; rerun"
    ):
        run_explain(config, options, first)
    lost = lambda: RemoteError("the server went away")  # noqa: E731
    second = Counting(LocalBackend(bundle, keys), fail_at=4, fail=lost)
    with pytest.raises(RemoteError, match=r"went away; 10 encrypted runs are done and saved .* to resume$"):
        run_explain(config, options, second)
    progress = []
    third = Counting(LocalBackend(bundle, keys))
    result = run_explain(config, options, third, lambda *p: progress.append(p))
    assert (first.rows, second.rows, third.rows) == (4, 6, whole.rows - 10)  # nothing run twice
    assert _same(result) == _same(expected)  # the same attributions and importance as without interruption
    assert [s["rows_scored"] for s in result["sessions"]] == [4, 6, whole.rows - 10]
    assert progress[0] == (0, 8, "attributions") and progress[1][:2] == (2, 8)  # saved batches count as done
    # a batch cut short by a crash mid-write is dropped and run again
    runs = tmp_path / "ex" / "explain-runs.jsonl"
    text = runs.read_text()
    last = text.splitlines()[-1]
    runs.write_text(text[: -len(last) // 2])
    fourth = Counting(LocalBackend(bundle, keys))
    assert _same(run_explain(config, options, fourth)) == _same(expected)
    assert fourth.rows == len(json.loads(last)["raw"]) == 2 and runs.read_text() == text


def test_cli_explain_refuses_other_inputs_or_model_in_its_directory_until_restart(tmp_path_factory, tmp_path):
    from molcloak.pipeline import workflow

    ckpt, compiled, bundle = synthetic_tabular(tmp_path_factory)
    other_model = tmp_path / "other-bundle"
    workflow.deploy(ckpt, compiled, other_model, "tiny-syn-2")
    X, y = synthetic_rows(4, 4)
    path = tabular_csv(tmp_path / "rows.csv", X, y)
    out, runs = tmp_path / "ex", tmp_path / "ex" / "explain-runs.jsonl"

    def run(model=bundle, *extra):
        args = ["explain", "--bundle", model, "--input", path, "--molecules", "1", "--out", out]
        return CliRunner().invoke(
            app, [str(a) for a in [*args, "--key-dir", tmp_path / "keys", "--json", *extra]]
        )

    first = run()
    assert first.exit_code == 0, first.output
    saved = runs.read_text()
    again = run()  # everything saved: nothing runs, the same explanation
    assert again.exit_code == 0 and runs.read_text() == saved
    assert _same(json.loads(again.stdout)) == _same(json.loads(first.stdout))
    path.write_text(path.read_text().replace("r0,", "r0x,"))
    for refused, what in [(run(), "--input file content"), (run(other_model), "model")]:
        assert refused.exit_code == 2, refused.output
        [line] = [x for x in refused.output.splitlines() if x.strip()]
        assert f"{what} (was " in line and line.endswith("pass --restart to start over"), line
    assert runs.read_text() == saved
    restarted = run(other_model, "--restart")
    assert restarted.exit_code == 0, restarted.output
    res = json.loads(restarted.stdout)
    assert [s["rows_scored"] for s in res["sessions"]] == [4] and res["model"]["name"] == "tiny-syn-2"
    assert len(runs.read_text().splitlines()) == len(saved.splitlines())  # the start over ran all again


def test_audit_explain_resumes_its_encrypted_runs_in_the_audit_directory(tmp_path_factory, tmp_path):
    _, _, bundle = synthetic_tabular(tmp_path_factory)
    X, y = synthetic_rows(6, 5)
    path = tabular_csv(tmp_path / "rows.csv", X, y)
    config = AuditConfig(path, tmp_path / "audit", "y", bootstrap=50, batch_size=2, explain=1)
    first = Counting(
        LocalBackend(bundle, tmp_path / "keys"), fail_at=6
    )  # 3 audit batches, 2 attribution ones
    with pytest.raises(
        KeyboardInterrupt, match="6 of 6 rows are scored; for the explanation, 3 encrypted runs are done"
    ):
        run_audit(config, first)
    second = Counting(LocalBackend(bundle, tmp_path / "keys"))
    report = run_audit(config, second)
    assert (first.rows, second.rows) == (6 + 3, 3 * 6)  # the rerun runs the importance only
    assert report["explain"]["importance"]["encrypted_runs"] == 18 and len(report["timing"]["sessions"]) == 1
    third = Counting(LocalBackend(bundle, tmp_path / "keys"))
    assert run_audit(config, third)["explain"] == report["explain"] and third.rows == 0


def test_saved_runs_count_only_the_batches_this_explanation_asks_for(tmp_path):
    """An audit directory keeps the batches of an earlier `--explain`/`--seed`: an interruption message
    must not count them as this explanation's."""
    from molcloak.evaluation.resume import BatchCache

    old = BatchCache(tmp_path / "runs.jsonl")
    old["earlier"], old["shared"] = [[0.1], [0.2], [0.3]], [[0.4]]
    cache = BatchCache(tmp_path / "runs.jsonl")
    assert cache.runs == 0 and cache.get("other") is None
    assert cache.get("shared") == [[0.4]] and cache.runs == 1  # read back: this explanation's
    cache["new"] = np.array([[1.0], [2.0]])
    assert cache.runs == 3 and len(BatchCache(tmp_path / "runs.jsonl").saved) == 3
    assert (
        cache.done()
        == "3 encrypted runs are done (3 earlier ones are kept too, for a rerun that asks for them)"
    )


# ---------------------------------------------------------------- privacy of the wire


@pytest.mark.slow
def test_explain_sends_only_ciphertexts_and_evaluation_keys(tmp_path_factory, tmp_path):
    import shutil

    ckpt, _, bundle = synthetic_tabular(tmp_path_factory)
    root = tmp_path_factory.mktemp("explain-served")
    shutil.copytree(bundle, root / "bundles" / "syn")
    (root / "token").write_text(TOKEN)
    server = ServerProcess(root / "bundles", root / "state", root / "token")
    try:
        X, y = synthetic_rows(5, 9)
        path = tabular_csv(tmp_path / "secret.csv", X, y)
        recorder = Recorder()
        backend = RemoteModel(server.url, "tiny-syn", root / "keys", TOKEN, transport=recorder)
        config = ExplainConfig(tmp_path / "ex", input=path, target_col="y")
        res = run_explain(config, ExplainOptions(molecules=1, bootstrap=50), backend)
        wire = b"\n".join(f"{m} {p}".encode() + json.dumps(h).encode() + b for m, p, h, b in recorder.sent)
        log = server.log.read_bytes()
    finally:
        server.stop()
    assert {(m, p) for m, p, _, _ in recorder.sent} <= {
        ("GET", "/models"),
        ("GET", "/models/tiny-syn/client"),
        ("POST", "/keys"),
        ("POST", "/predict"),
    }
    for _m, p, _, body in recorder.sent:
        if p == "/predict":
            assert set(json.loads(body)) == {"model", "key_id", "ciphertexts", "client_fingerprint"}
        elif p == "/keys":
            assert body == backend.client.evaluation_keys()
    feat = Featurization(backend.client.featurizer)
    secrets = [b"secret.csv", backend.client.key_path.read_bytes()]
    for x in X:
        secrets.append(f"{x[0]!r},{x[1]!r},{x[2]!r}".encode())  # the cells as the CSV holds them
        rows = [feat.features(x[None])[0]] + [
            feat.features(f(x)[None])[0] for _, f in feat.molecule_groups(None)
        ]
        secrets += [r.tobytes() for r in rows] + [r.astype(np.float64).tobytes() for r in rows]
    numbers = [g["contribution"] for mol in res["molecules"] for g in mol["groups"]]
    numbers += [v for mol in res["molecules"] for v in mol["prediction"].values()]
    numbers += [g["value"] for g in res["importance"]["groups"]]
    secrets += [repr(v).encode() for v in numbers if len(repr(v)) >= 8]  # decrypted results
    assert res["importance"]["encrypted_runs"] == 3 * 5 and len(res["molecules"]) == 1
    assert [s for s in secrets if s in wire] == []
    server_side = b"".join(p.read_bytes() for p in (root / "state").rglob("*") if p.is_file()) + log
    assert [s for s in secrets if s in server_side] == []


def test_server_reference_ciphertexts_fit_a_fingerprint_models_inputs(tiny_morgan):
    """`molcloak serve` encrypts reference rows at start-up; a Morgan-bits circuit takes non-negative inputs
    only (random normal rows made it refuse to start)."""
    from molcloak.pipeline.serving.executor import reference_ciphertexts

    cts = reference_ciphertexts(tiny_morgan[2])
    assert len(cts) == 8 and len({len(c) for c in cts}) == 1
