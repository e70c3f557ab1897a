"""`molcloak bench --panel`: two tiny panel files made here, real compilation, keys and encryption."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from molcloak.evaluation.bench import panel, panel_report, references
from molcloak.pipeline import data
from molcloak.pipeline.cli import app
from molcloak.pipeline.errors import ConfigError, FeaturizerError


def _tiny_panel(folder, n=180):
    """sol-low as a binary file (with one invalid and one duplicate SMILES), sol-logs as a regression file,
    an undescribed CSV, and the panel.json describing the first two."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    low = data.load_bundled("sol-low")
    pick = rng.choice(len(low), n, replace=False)
    rows = [(low.smiles[i], int(low.y[i])) for i in pick]
    rows += [("C1CC", 1), rows[0]]  # reported and skipped, like any user's file
    pd.DataFrame(rows, columns=["SMILES", "low"]).to_csv(folder / "sol_low.csv", index=False)
    logs = data.load_bundled("sol-logs")
    pick = rng.choice(len(logs), n, replace=False)
    frame = pd.DataFrame({"smiles": [logs.smiles[i] for i in pick], "logS": logs.y[pick]})
    frame.drop_duplicates("smiles").to_csv(folder / "sol_logs.csv", index=False)
    (folder / "notes.csv").write_text("smiles,whatever\nCCO,1\n")
    (folder / "panel.json").write_text(
        json.dumps(
            {
                "sol_low": {
                    "file": "sol_low.csv",
                    "smiles_col": "SMILES",
                    "targets": ["low"],
                    "task": "binary",
                },
                "sol_logs": {"file": "sol_logs.csv", "targets": "logS", "task": "regression"},
            }
        )
    )
    return folder


def test_describe_panel_builtin_table_and_panel_json(tmp_path):
    for name in ("bace", "tox21", "hiv"):
        (tmp_path / f"{name}.csv").write_text("smiles\n")
    (tmp_path / "panel.json").write_text(
        json.dumps({"datasets": {"bace": {"targets": "pIC50", "task": "regression"}, "tox21": None}})
    )
    entries, left_out = panel.describe_panel(tmp_path)
    assert list(entries) == ["bace"] and entries["bace"].targets == ("pIC50",)
    assert entries["bace"].task == "regression" and entries["bace"].file == "bace.csv"
    assert "throughput" in left_out["hiv.csv"] and "panel.json" in left_out["tox21.csv"]
    assert panel.BUILTIN["tox21"].task == "multilabel" and len(panel.BUILTIN["tox21"].targets) == 12


def test_panel_config_refuses_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="at least 200"):
        panel.PanelConfig(str(tmp_path), sample=50)
    assert panel.PanelConfig(str(tmp_path), sample=50, quick=True).n_sample == 50
    with pytest.raises(ConfigError, match="choose from"):
        panel.PanelConfig(str(tmp_path), models=("molcloak", "svm"))
    (tmp_path / "panel.json").write_text('{"x": {"task": "ranking", "targets": "y"}}')
    with pytest.raises(ConfigError, match="needs targets"):
        panel.describe_panel(tmp_path)
    (tmp_path / "panel.json").unlink()
    for name, size in (("bace", 30), ("clintox", 20), ("herg", 50), ("ames", 10)):
        (tmp_path / f"{name}.csv").write_text("smiles,Y\n" + "C\n" * size)
    entries, _ = panel.describe_panel(tmp_path)
    quick = panel.PanelConfig(str(tmp_path), quick=True)
    assert [e.name for e in quick.select(entries)] == ["herg", "bace"] and quick.run_seeds == (0,)
    (tmp_path / "herg.csv").unlink()
    entries, _ = panel.describe_panel(tmp_path)
    assert [e.name for e in quick.select(entries)] == ["ames", "clintox"]  # the two smallest files
    assert list(panel.sample_positions(10, 4, 0)) == list(panel.sample_positions(10, 4, 0))
    assert len(panel.sample_positions(10, None, 0)) == 10


def test_latency_check_is_part_of_the_molcloak_key_only(tmp_path, monkeypatch):
    """A run whose budget was checked on raw timings is not reused for a normalized one; the references are."""
    (tmp_path / "bace.csv").write_text("smiles,Class\nC,1\n")
    entry = panel.describe_panel(tmp_path)[0]["bace"]
    norm, raw = panel.PanelConfig(str(tmp_path)), panel.PanelConfig(str(tmp_path), latency_check="raw")
    key = lambda config, part: panel_report.run_key(config, entry, 0, part)  # noqa: E731
    assert key(norm, "molcloak") != key(raw, "molcloak") and key(norm, "references") == key(raw, "references")
    assert "--latency-check raw" in panel.command_line(raw) and "--latency-check" not in panel.command_line(
        norm
    )
    taught = panel.PanelConfig(str(tmp_path), teacher="rf")  # distillation: another molcloak run
    assert key(taught, "molcloak") != key(norm, "molcloak") and key(taught, "references") == key(
        norm, "references"
    )
    assert "--teacher rf" in panel.command_line(taught)
    with pytest.raises(ConfigError, match="--teacher svm: choose one of rf, rf-both, auto or none"):
        panel.PanelConfig(str(tmp_path), teacher="svm")
    # fit's p_error: a run at another one is another molcloak run (the default keeps earlier runs' keys)
    loose = panel.PanelConfig(str(tmp_path), p_error=0.05)
    assert key(loose, "molcloak") != key(norm, "molcloak") and key(loose, "references") == key(
        norm, "references"
    )
    assert "--p-error 0.05" in panel.command_line(loose) and "--p-error" not in panel.command_line(norm)
    with pytest.raises(ConfigError, match="--p-error 1.5: use a probability per bootstrap in"):
        panel.PanelConfig(str(tmp_path), p_error=1.5)
    # fit's inner folds on the smallest scaffold groups: another molcloak run (balanced keeps earlier runs' keys;
    # auto, the default since session 20, is another run too)
    rare = panel.PanelConfig(str(tmp_path), fold_groups="rare")
    assert key(rare, "molcloak") != key(norm, "molcloak") and key(rare, "references") == key(
        norm, "references"
    )
    assert "--fold-groups rare" in panel.command_line(rare) and "--fold-groups" not in panel.command_line(
        norm
    )
    assert (
        panel.molcloak_space(rare).fold_groups == "rare" and panel.molcloak_space(norm).fold_groups == "auto"
    )
    balanced = panel.PanelConfig(str(tmp_path), fold_groups="balanced")
    assert key(balanced, "molcloak") not in {key(norm, "molcloak"), key(rare, "molcloak")}
    assert "--fold-groups balanced" in panel.command_line(balanced)
    with pytest.raises(ConfigError, match="--fold-groups tail: choose auto, balanced or rare"):
        panel.PanelConfig(str(tmp_path), fold_groups="tail")
    # fit's rounded outputs: another molcloak run (exact outputs keep earlier runs' keys)
    rounded = panel.PanelConfig(str(tmp_path), round_outputs=True)
    assert key(rounded, "molcloak") != key(norm, "molcloak") and key(rounded, "references") == key(
        norm, "references"
    )
    assert "--round-outputs" in panel.command_line(rounded) and "--round" not in panel.command_line(norm)
    assert panel.molcloak_space(rounded).round_outputs and not panel.molcloak_space(norm).round_outputs
    # fit's scoring: the clear pass (the default since session 24) is another molcloak run than the simulated
    # one, which keeps the keys of the runs made before the option (they were all simulated)
    simulated = panel.PanelConfig(str(tmp_path), scoring="simulate")
    assert key(simulated, "molcloak") != key(norm, "molcloak") and key(simulated, "references") == key(
        norm, "references"
    )
    fields = {k: v for k, v in dataclasses.asdict(simulated).items() if k != "scoring"}
    legacy = SimpleNamespace(
        **fields, n_sample=simulated.n_sample, n_trees=simulated.n_trees
    )  # before the option
    assert key(legacy, "molcloak") == key(simulated, "molcloak")
    assert "--scoring simulate" in panel.command_line(simulated) and "--scoring" not in panel.command_line(
        norm
    )
    assert (
        panel.molcloak_space(simulated).scoring == "simulate"
        and panel.molcloak_space(norm).scoring == "clear"
    )
    with pytest.raises(ConfigError, match="--scoring 'exact': use one of clear, simulate"):
        panel.PanelConfig(str(tmp_path), scoring="exact")
    # fit's fold training: refit (the default since session 31) is another molcloak run than stopped, which keeps
    # the keys of the runs made before the option (their folds were all stopped)
    stopped = panel.PanelConfig(str(tmp_path), fold_training="stopped")
    assert key(stopped, "molcloak") != key(norm, "molcloak") and key(stopped, "references") == key(
        norm, "references"
    )
    fields = {k: v for k, v in dataclasses.asdict(stopped).items() if k != "fold_training"}
    legacy = SimpleNamespace(
        **fields, n_sample=stopped.n_sample, n_trees=stopped.n_trees
    )  # before the option
    assert key(legacy, "molcloak") == key(stopped, "molcloak")
    assert "--fold-training stopped" in panel.command_line(stopped)
    assert "--fold-training" not in panel.command_line(norm)
    assert panel.molcloak_space(stopped).fold_training == "stopped"
    assert panel.molcloak_space(norm).fold_training == "refit"
    with pytest.raises(ConfigError, match="--fold-training 'early': use one of stopped, refit"):
        panel.PanelConfig(str(tmp_path), fold_training="early")
    # fit's default feature specs: a run made with other defaults (before session 31: six) is not reused
    before = key(norm, "molcloak")
    monkeypatch.setattr(panel_report, "DEFAULT_FEATURE_CANDIDATES", panel.SearchSpace().features[:6])
    assert key(norm, "molcloak") != before and key(norm, "references") == key(stopped, "references")
    monkeypatch.undo()
    # the specs a regression search adds (session 37): a regression run made before them is not reused, while
    # classification keys stay as they were
    (tmp_path / "lipophilicity.csv").write_text("smiles,exp\nC,1.0\n")
    lipo = panel.describe_panel(tmp_path)[0]["lipophilicity"]
    lipo_key = lambda config: panel_report.run_key(config, lipo, 0, "molcloak")  # noqa: E731
    regression_before = lipo_key(norm)
    monkeypatch.setattr(panel_report, "REGRESSION_FEATURE_CANDIDATES", ())
    assert lipo_key(norm) != regression_before and key(norm, "molcloak") == before
    monkeypatch.undo()
    # feature specs fit tries besides its defaults: another molcloak run, in the command, after the defaults
    kernel = panel.PanelConfig(str(tmp_path), fit_features=("rdkit2d:scale=quantile+rff:n=1024",))
    assert key(kernel, "molcloak") != key(norm, "molcloak") and key(kernel, "references") == key(
        norm, "references"
    )
    assert "--fit-features rdkit2d:scale=quantile+rff:n=1024" in panel.command_line(kernel)
    defaults = panel.molcloak_space(norm).features
    assert panel.molcloak_space(kernel).features == defaults + ("rdkit2d:scale=quantile+rff:n=1024",)
    # a default, given again: tried once
    again = panel.PanelConfig(str(tmp_path), fit_features=(defaults[-1],))
    assert panel.molcloak_space(again).features == defaults
    with pytest.raises(FeaturizerError, match="rff must appear once in .*, after the parts it maps"):
        panel.PanelConfig(str(tmp_path), fit_features=("rff:n=8+physchem",))
    # a patience in optimizer steps: another molcloak run, handed to fit's training (runs without it keep their keys)
    patient = panel.PanelConfig(str(tmp_path), patience_steps=1000)
    assert key(patient, "molcloak") != key(norm, "molcloak") and key(patient, "references") == key(
        norm, "references"
    )
    assert "--patience-steps 1000" in panel.command_line(patient) and "--patience" not in panel.command_line(
        norm
    )
    assert (
        patient.train.patience_steps == 1000
        and patient.train.patience == 30
        and norm.train.patience_steps is None
    )
    assert panel.PanelConfig(str(tmp_path), quick=True, patience_steps=1000).train.epochs == 80
    with pytest.raises(ConfigError, match="--patience-steps 0: use a positive count of optimizer steps"):
        panel.PanelConfig(str(tmp_path), patience_steps=0)


def test_p_error_lists_keep_each_value_once_and_refuse_what_is_not_a_probability():
    from molcloak.pipeline.runconfig import p_error_list

    assert p_error_list("0.05, 5e-2,default,1e-6") == [0.05, None, 1e-6]  # 'default': Concrete's 2^-40
    for bad in ("0", "1", "nan", "x"):
        with pytest.raises(ConfigError, match=f"--p-error '{bad}' is neither a probability in \\(0, 1\\)"):
            p_error_list(bad)
    with pytest.raises(ConfigError, match="--p-error needs at least one value"):
        p_error_list(" , ")


def test_references_impute_failed_descriptors_with_training_median():
    feats = references.molecule_features(["CCO", "c1ccccc1O", "CCN", "[H+]"])
    assert feats.ecfp4.shape == (4, 2048) and feats.rdkit2d.shape[1] == len(feats.descriptor_names)
    assert np.isnan(feats.rdkit2d[3]).any()  # SPS fails on [H+]
    train, test, report = references.impute(feats.rdkit2d[:3], feats.rdkit2d[3:])
    assert np.isfinite(test).all() and report["imputed_test_values"] >= 1


def test_bench_panel_quick_through_the_cli(tmp_path):
    folder = _tiny_panel(tmp_path / "panel")
    out_json, out_md = tmp_path / "panel-result.json", tmp_path / "panel.md"
    res = CliRunner().invoke(
        app, ["bench", "--panel", str(folder), "--quick", "--json", str(out_json), "--markdown", str(out_md)]
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out_json.read_text())
    assert set(result["datasets"]) == {"sol_low", "sol_logs"} and "--quick" in result["command"]
    assert "notes.csv" in result["panel"]["left_out"]
    assert result["machine"]["versions"]["concrete-ml"] and result["machine"]["load_avg_at_start"]
    low = result["datasets"]["sol_low"]
    assert low["n_skipped_rows"] == 2 and "could not be parsed" in " ".join(low["skipped_rows"])
    for name, d in result["datasets"].items():
        (run,) = d["runs"]  # --quick: one seed
        assert run["seed"] == 0 and run["n_test"] > 0
        assert set(run["references"]) == set(references.REFERENCES)
        ours = run["molcloak"]
        ex = ours["fhe_execute"]
        assert ex["n_molecules"] == panel.QUICK_SAMPLE == len(ex["run_s"]) == ex["latency"]["n_runs"]
        assert (
            ex["keygen_s"] > 0
            and ex["evaluation_key_bytes"] > 1e6
            and ours["pbs"] > 0
            and ours["max_bits"] > 0
        )
        # fold ties: the richest features on classification, the higher fold mean on regression (SearchSpace)
        assert ours["fit"]["tolerance"] == (0.005 if name == "sol_low" else 0.0)
        mean = d["mean"]
        if name == "sol_low":
            for m in [*(r["metrics"] for r in run["references"].values()), ours["metrics"]["fhe_simulate"]]:
                assert 0.5 < m["roc_auc"] <= 1
            assert 0 <= ex["metrics"].get("roc_auc", 0.5) <= 1 and mean["metric"] == "roc_auc"
        else:
            for m in [*(r["metrics"] for r in run["references"].values()), ours["metrics"]["fhe_simulate"]]:
                assert 0 < m["rmse"] < 2.5 and m["r2"] > 0
            assert ex["metrics"]["rmse"] > 0 and mean["metric"] == "rmse"
        assert mean["best_reference"]["name"] in references.REFERENCES and "gap" in mean
        assert mean["molcloak"]["fhe_execute_molecules"] == panel.QUICK_SAMPLE
    table = out_md.read_text()
    assert "| sol_low |" in table and "| sol_logs |" in table and "RF ECFP4" in table and "max bits" in table
    main, _, explored = table.partition("### The front `molcloak fit` explored")
    assert main.rstrip() in res.output  # the table is also printed; the fronts only go to the file
    assert "**sol_low, seed 0**" in explored and "(chosen)" in explored
    # which inner folds chose: recorded in the JSON and named in the front's heading
    folds_used = result["datasets"]["sol_low"]["runs"][0]["molcloak"]["fit"]["folds_used"]
    assert folds_used in ("scaffold, rare", "scaffold, balanced", "random")
    assert f"inner folds: {folds_used};" in explored
    ours = result["datasets"]["sol_low"]["runs"][0]["molcloak"]
    assert ours["fit"]["chosen"]["run_s"] > 0 and ours["config"]["features"] == "physchem:scale=quantile"
    # the final timing: raw, the load factor of that minute and the normalized figure the budget was checked on
    final = ours["fit"]["measured"]
    assert ours["fit"]["latency_check"] == "normalized" and final["load_factor"] >= 1
    assert final["normalized_run_s"] == pytest.approx(final["median_run_s"] / final["load_factor"])
    assert "load factor" in explored and "| load | normalized ms |" in explored
    chosen = ours["fit"]["chosen"]  # what the choice compared: the inner folds' mean, on how many molecules
    assert (
        len(chosen["cv_sizes"]) == 2 and f"| {chosen['cv']:.3f} ({sum(chosen['cv_sizes']):,}) |" in explored
    )

    # a rerun with the same settings resumes every run from the JSON
    res = CliRunner().invoke(app, ["bench", "--panel", str(folder), "--quick", "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    again = json.loads(out_json.read_text())
    assert all(r.get("resumed") for d in again["datasets"].values() for r in d["runs"])
    assert "2 of 2 runs were resumed" in res.output

    # other settings for molcloak (a budget): the references do not depend on it and are reused per part
    res = CliRunner().invoke(
        app,
        ["bench", "--panel", str(folder), "--quick", "--models", "references", "--json", str(out_json)],
    )
    assert res.exit_code == 0, res.output
    refs_only = json.loads(out_json.read_text())
    for name, d in refs_only["datasets"].items():
        (run,) = d["runs"]
        assert run["resumed_parts"] == ["references"] and "molcloak" not in run
        assert run["references"] == result["datasets"][name]["runs"][0]["references"]


def test_bench_panel_errors_are_one_line(tmp_path):
    folder = _tiny_panel(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--panel", str(folder), "--datasets", "nope", "--quick"])
    assert res.exit_code == 2 and "nope" in res.output and "sol_low" in res.output
    res = runner.invoke(app, ["bench", "--seeds", "0,1"])
    assert res.exit_code == 2 and "--seeds only apply to --panel" in res.output
    res = runner.invoke(app, ["bench", "--panel", str(folder), "--task", "sol-low"])
    assert res.exit_code == 2 and "do not apply with --panel" in res.output
    res = runner.invoke(app, ["bench", "--panel", str(folder), "--quick", "--p-error", "2"])
    assert res.exit_code == 2 and "--p-error 2: use a probability per bootstrap" in res.output
    res = runner.invoke(app, ["bench", "--p-error", "0.05"])
    assert res.exit_code == 2 and "--p-error only apply to --panel" in res.output
    res = runner.invoke(app, ["bench", "--panel", str(folder), "--quick", "--fold-groups", "small"])
    assert res.exit_code == 2 and "--fold-groups small: choose auto, balanced or rare" in res.output


def _panel_result(seed_runs: list[dict], started: str) -> dict:
    return {
        "command": "molcloak bench --panel",
        "config": {},
        "panel": {},
        "split": "scaffold",
        "started": started,
        "finished": started,
        "machine": {"node": "n", "cpus": 2, "load_avg_at_start": [0.1], "versions": {}},
        "datasets": {"herg": {"task": "binary", "metric": "roc_auc", "runs": seed_runs, "mean": {}}},
    }


def _seed_run(seed: int, auc: float | None, ref: float) -> dict:
    ours = None
    if auc is not None:
        ours = {
            "metrics": {"float": {"roc_auc": auc}, "fhe_simulate": {"roc_auc": auc}},
            "fhe_execute": {"metrics": {"roc_auc": auc}, "n_molecules": 10, "latency": {"median_s": 0.1}},
            "circuit": {},
            "pbs": 16,
            "max_bits": 8,
            "fit": {"measured": {"median_run_s": 0.2, "normalized_run_s": 0.1 if seed else None}},
            "source": "molcloak fit",
        }
    refs = {"rf_both": {"metrics": {"roc_auc": ref}}}
    return {"seed": seed, "n_test": 10, "molcloak": ours, "references": refs}


def test_panel_merge_keeps_the_last_run_with_a_model_per_seed():
    from molcloak.evaluation.bench.panel_merge import merge

    first = _panel_result([_seed_run(0, 0.80, 0.90), _seed_run(1, 0.70, 0.86)], "2026-11-30 10:00")
    rerun = _panel_result([_seed_run(1, 0.84, 0.86), _seed_run(2, None, 0.88)], "2026-11-30 12:00")
    merged = merge([first, rerun], ["a.json", "b.json"])
    runs = merged["datasets"]["herg"]["runs"]
    assert [(r["seed"], r["source"]) for r in runs] == [(0, "a.json"), (1, "b.json"), (2, "b.json")]
    mean = merged["datasets"]["herg"]["mean"]
    assert mean["molcloak"]["fhe_simulate"]["roc_auc"] == pytest.approx((0.80 + 0.84) / 2)
    assert mean["best_reference"]["roc_auc"] == pytest.approx((0.90 + 0.86 + 0.88) / 3)
    # the normalized latency: fit's final timing / load factor, over the seeds that measured it
    assert (
        mean["molcloak"]["latency_normalized_s"] == 0.1 and mean["molcloak"]["latency_normalized_seeds"] == 1
    )
    assert "| 0.100 | 0.100 (1) |" in panel_report.markdown(merged)
    merged["datasets"]["herg"]["runs"][1]["molcloak"]["source"] += "; distilled from teacher rf"
    assert "molcloak: molcloak fit; herg: no teacher / distilled from teacher rf;" in panel_report.markdown(
        merged
    )
    failed_later = _panel_result([_seed_run(0, None, 0.90)], "2026-11-30 13:00")
    again = merge([first, failed_later], ["a.json", "c.json"])  # a failed fit never replaces a model
    assert again["datasets"]["herg"]["runs"][0]["source"] == "a.json"


def test_frontier_sweep_scores_both_arms_and_resumes(tmp_path, capsys):
    """The fixed-configuration sweep: one row per (dataset, seed, features, network, teacher), real
    compilation and timing; a rerun with the same JSON skips what it holds."""
    from molcloak.evaluation.bench import frontier

    folder = _tiny_panel(tmp_path / "panel", n=120)
    out = tmp_path / "frontier.json"
    args = [
        "--panel",
        str(folder),
        "--datasets",
        "sol_low",
        "--seeds",
        "0",
        "--hidden",
        "4",
        "--act-bits",
        "4",
    ]
    args += ["--teacher", "none,rf", "--json", str(out), "--markdown", str(tmp_path / "f.md")]
    frontier.main(args)
    rows = json.loads(out.read_text())["rows"]
    assert [r["teacher"] for r in rows] == ["none", "rf"]
    for r in rows:
        assert r["dataset"] == "sol_low" and r["inputs"] == 10 and r["pbs"] == 4 and r["act_bits"] == 4
        assert 0.5 <= r["fhe_simulate"] <= 1 and r["run_ms"] > 0 and r["load_factor"] >= 1
        assert r["p_error"] == 1e-6  # fit's first-stage compile settings, recorded
    table = (tmp_path / "f.md").read_text()
    assert "| sol_low | `physchem:scale=quantile` | 4 | 3 | 4 | rf | 0 |" in table
    capsys.readouterr()
    frontier.main(args)  # resumes: nothing left to run
    assert capsys.readouterr().out == "" and len(json.loads(out.read_text())["rows"]) == 2
    # --float-only: the same networks trained and scored without a circuit, as rows of their own
    frontier.main([*args, "--float-only"])
    rows = json.loads(out.read_text())["rows"]
    floats = [r for r in rows if r.get("float_only")]
    assert len(rows) == 4 and len(floats) == 2 and all(r["pbs"] is None for r in floats)
    assert [r["float"] for r in floats] == [r["float"] for r in rows[:2]]  # the same seeded training
    assert "| sol_low | `physchem:scale=quantile` | 4 | 3 | 4 | rf | 0 | " in (tmp_path / "f.md").read_text()
    assert "| - | 10 | - | - | - | - |" in (tmp_path / "f.md").read_text()
    with pytest.raises(SystemExit) as bad:  # one line and exit 2, not a traceback
        frontier.main([*args[:-2], "--act-bits", "x"])
    assert bad.value.code == 2 and "--act-bits 'x' is not a comma-separated list" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        frontier.main([*args, "--p-error", "0.05,1e-6"])
    assert bad.value.code == 2 and "--p-error '0.05,1e-6': give one value" in capsys.readouterr().err


def test_choice_rules_prefer_the_richer_spec_only_when_the_folds_cannot_tell_them_apart():
    from molcloak.evaluation.bench.choice import RULES, richest_tied

    lean = {"features": "lean", "cv": 0.85, "cv_folds": [0.80, 0.90], "n_inputs": 10}
    # richer but worse on every fold; richer and within one standard error of the paired fold differences
    steady = {"features": "rich", "cv": 0.835, "cv_folds": [0.79, 0.88], "n_inputs": 100}
    noisy = {"features": "rich", "cv": 0.84, "cv_folds": [0.82, 0.86], "n_inputs": 100}
    close = {"features": "rich", "cv": 0.847, "cv_folds": [0.81, 0.884], "n_inputs": 100}  # within 0.005
    assert richest_tied([lean, steady], se_factor=1.0)["features"] == "lean"
    assert richest_tied([lean, noisy], se_factor=1.0)["features"] == "rich"
    assert RULES["cv_rich"]([lean, noisy])["features"] == "lean"  # fit's rule: the tolerance alone
    assert RULES["cv_rich"]([lean, close])["features"] == "rich" and RULES["cv"]([lean, close]) is lean
    assert richest_tied([lean])["features"] == "lean"
    # regression rows (tested by RMSE): fit's tolerance is 0, the higher fold mean wins the same near-tie
    assert RULES["cv_rich"]([{**r, "test_metric": "rmse"} for r in (lean, close)])["features"] == "lean"
    # fit's rule on large data: the first folds that hold SearchSpace.cv_molecules (2,000) molecules; here the
    # first fold (2,100 molecules) alone, where the rich spec ties; on all folds the lean one leads by 0.01
    first = {"features": "rich", "cv": 0.84, "cv_folds": [0.798, 0.882], "n_inputs": 100}
    big = [{**r, "cv_sizes": [2100, 2100]} for r in (lean, first)]
    assert RULES["cv_rich"](big)["features"] == "lean"
    assert RULES["cv_rich_first"](big)["features"] == "rich"
    assert RULES["cv_rich_first"]([lean, first])["features"] == "lean"  # no sizes recorded: every fold


def test_choice_benchmark_scores_each_spec_on_the_inner_part_the_folds_and_the_test(tmp_path, capsys):
    """fit's first stage on the panel split: every spec gets its inner-part metric, the mean over the inner
    folds (really trained and simulated on each), and its test metric trained on the training part and refitted
    as fit deploys it; each rule's pick is reported against the best refitted one on the test; a rerun skips what
    the file holds and scores only a spec it lacks, a run with the other fold training adds its own rows; bad
    options are one line and exit 2."""
    from molcloak.evaluation.bench import choice

    folder = _tiny_panel(tmp_path / "panel", n=120)
    out = tmp_path / "choice.json"
    args = ["--panel", str(folder), "--datasets", "sol_logs", "--seeds", "0", "--folds", "2"]
    args += ["--features", "physchem:scale=quantile", "--features", "physchem", "--json", str(out)]
    choice.main([*args, "--markdown", str(tmp_path / "c.md")])
    result = json.loads(out.read_text())
    rows, (summary,) = result["rows"], result["summary"]
    assert [r["features"] for r in rows] == ["physchem:scale=quantile", "physchem"]
    for r in rows:
        assert len(r["cv_folds"]) == 2 and np.isclose(r["cv"], np.mean(r["cv_folds"]))
        assert r["test_metric"] == "rmse" and r["test"] > 0 and np.isfinite(r["inner_part"])
        assert r["refit_test"] > 0 and r["fold_training"] == "refit"
    assert summary["test_of"] == "refit_test"
    assert summary["best_test"] == min(r["refit_test"] for r in rows)  # RMSE: lower is better
    assert summary["cv_pick"] == max(rows, key=lambda r: r["cv"])["features"]
    assert summary["cv_rich_pick"] in {r["features"] for r in rows} and all(r["n_inputs"] > 0 for r in rows)
    assert "| sol_logs (folds refit) | mean of 1 |" in (tmp_path / "c.md").read_text()
    capsys.readouterr()
    choice.main(args)  # resumes: nothing left to run
    assert capsys.readouterr().out == "" and len(json.loads(out.read_text())["rows"]) == 2
    choice.main([*args, "--features", "morgan:r=2,n=64"])  # resumes per spec: only the new one is scored
    result = json.loads(out.read_text())
    assert result["rows"][:2] == rows and [r["features"] for r in result["rows"][2:]] == ["morgan:r=2,n=64"]
    assert result["summary"][0]["specs"] == 3
    choice.main([*args, "--fold-training", "stopped"])  # fit's folds before session 31: rows of their own
    result = json.loads(out.read_text())
    assert [r["fold_training"] for r in result["rows"]] == ["refit"] * 3 + ["stopped"] * 2
    assert [s["dataset"] for s in result["summary"]] == ["sol_logs (folds refit)", "sol_logs"]
    with pytest.raises(SystemExit) as exc:
        choice.main([*args, "--folds", "1"])
    assert exc.value.code == 2 and "--folds 1: compare with at least 2" in capsys.readouterr().err


def test_choice_rank_correlation_is_spearmans_with_ties_averaged():
    from molcloak.evaluation.bench.choice import _rank_corr

    assert _rank_corr([0.1, 0.2, 0.3], [3.0, 5.0, 9.0]) == pytest.approx(1.0)
    assert _rank_corr([0.1, 0.2, 0.3], [9.0, 5.0, 3.0]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert _rank_corr([0.5, 0.5, 0.9], [1.0, 2.0, 3.0]) == pytest.approx(0.8660254)
    assert _rank_corr([0.1, 0.2], [1.0, 2.0]) is None and _rank_corr([0.5] * 3, [1.0, 2.0, 3.0]) is None


def test_split_half_scores_each_pick_on_the_other_half():
    """On every stratified cut, the hindsight pick is the best on half B, the chooser picks on half A: a
    perfect spec wins both; between two specs that are each right on one half, hindsight is optimistic."""
    from molcloak.evaluation.bench import choice_noise

    y = np.array([0] * 10 + [1] * 4)
    for a, b in choice_noise.halvings(y, 5):  # stratified halves of the classes, covering every molecule
        assert y[a].sum() == 2 and sorted([*a, *b]) == list(range(14))
    rng = np.random.default_rng(1)
    preds = {"perfect": y + 0.1 * rng.random(14), "noise": rng.random(14)}
    half = choice_noise.split_half(y, preds, {"fit": "noise"}, n=20)
    assert half["hindsight"] == half["chooser"] == 1.0 and half["fit"] < 1.0
    assert half["mean_spec"] == pytest.approx((1.0 + half["fit"]) / 2)
    y = np.array([0, 0, 1, 1] * 5)
    odd = {"even": np.where(np.arange(20) % 2 == 0, y, 1 - y), "odd": np.where(np.arange(20) % 2, y, 1 - y)}
    half = choice_noise.split_half(y, {k: v + 0.0 for k, v in odd.items()}, {}, n=20)
    assert half["hindsight"] > half["chooser"] and half["hindsight"] >= half["mean_spec"]


def test_choice_noise_scores_the_same_networks_on_test_halves(tmp_path, capsys):
    """The split-half estimate retrains fit's first-stage networks (the same seeds and code as the choice
    benchmark: the same full-test metric), and on every cut the hindsight pick beats or ties any other pick;
    the mean spec lies between the worst and best; bad options are one line and exit 2."""
    from molcloak.evaluation.bench import choice, choice_noise

    folder = _tiny_panel(tmp_path / "panel", n=120)
    scores, out = tmp_path / "choice.json", tmp_path / "noise.json"
    args = ["--panel", str(folder), "--datasets", "sol_low", "--seeds", "0"]
    specs = ["--features", "physchem:scale=quantile", "--features", "physchem"]
    choice.main([*args, *specs, "--folds", "2", "--json", str(scores)])
    capsys.readouterr()
    choice_noise.main([*args, "--scores", str(scores), "--halvings", "20", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["full_test"]) == {"physchem:scale=quantile", "physchem"}
    # the choice JSON's networks, equal up to 0.004-0.017 between processes on panel test splits (more on
    # these 24 test molecules, where one swapped pair of predictions moves the ROC-AUC by about 0.01)
    assert row["max_diff_to_scores"] < 0.1
    summary = json.loads(scores.read_text())["summary"][0]  # the rules pick as the choice benchmark does
    assert row["picks"]["balanced refit/cv_rich_first"] == summary["cv_rich_first_pick"]
    half = row["half_b"]
    assert half["hindsight"] >= max(half["chooser"], half["mean_spec"], half["balanced refit/cv_rich"])
    assert 0.5 < half["mean_spec"] <= half["hindsight"] and row["n_positive"] > 0
    capsys.readouterr()
    choice_noise.main([*args, "--scores", str(scores), "--halvings", "20", "--json", str(out)])
    assert capsys.readouterr().out == "" and len(json.loads(out.read_text())["rows"]) == 1  # resumed
    with pytest.raises(SystemExit) as bad:
        choice_noise.main([*args, "--scores", str(tmp_path / "none.json"), "--json", str(out)])
    assert bad.value.code == 2 and "not a choice.py results file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        choice_noise.main(
            [*args[:3], "sol_logs", "--seeds", "0", "--scores", str(scores), "--json", str(out)]
        )
    assert bad.value.code == 2 and "needs a binary task" in capsys.readouterr().err


def test_fold_report_shows_what_the_inner_folds_validate_on(tmp_path, capsys):
    """`python -m molcloak.evaluation.bench.folds` (no training): per fold kind, the folds fit validates on, each
    one's size and largest scaffold group. sol-low's big series (acyclic molecules, benzenes) fill balanced folds
    nearly alone, so auto gives rare folds, where every group is smaller than a fold's share."""
    from molcloak.evaluation.bench import folds

    panel_dir = _tiny_panel(tmp_path / "panel", n=400)
    rows = {r["fold_groups"]: r for r in folds.fold_rows(panel_dir, "sol_low", 0)}
    assert (
        rows["auto"]["folds_used"] == "scaffold, rare"
        and rows["auto"]["validated"] == rows["rare"]["validated"]
    )
    balanced, rare = rows["balanced"], rows["rare"]
    assert sum(balanced["validated"]) == balanced["n_rows"] > sum(rare["validated"]) > 0
    assert balanced["largest_group"][0] > balanced["validated"][0] / 2  # one series makes the first fold
    assert (
        max(rare["largest_group"]) <= rare["n_rows"] / 2 / rare["k"]
        and rows["auto"]["test_largest_group"] >= 1
    )
    out = tmp_path / "folds.md"
    folds.main(["--panel", str(panel_dir), "--datasets", "sol_low", "--markdown", str(out)])
    assert (
        "| sol_low | 0 | auto | scaffold, rare |" in capsys.readouterr().out
        and "bench.folds" in out.read_text()
    )
    with pytest.raises(SystemExit) as exc:
        folds.main(["--panel", str(panel_dir), "--datasets", "nope"])
    assert exc.value.code == 2 and "--datasets nope: not in the panel" in capsys.readouterr().err


def test_run_keys_follow_the_files_content_not_its_place_or_time(tmp_path):
    """A copy of the panel elsewhere (a fresh checkout: another path, another modification time) reuses earlier
    runs; a changed file does not."""
    import os
    import shutil

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bace.csv").write_text("smiles,Class\nC,1\nCC,0\n")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    os.utime(tmp_path / "b" / "bace.csv", (1, 1))
    keys = {}
    for name in ("a", "b"):
        config = panel.PanelConfig(str(tmp_path / name))
        entry = panel.describe_panel(config.folder)[0]["bace"]
        keys[name] = [
            panel_report.run_key(config, entry, 0, part) for part in (None, "references", "molcloak")
        ]
    assert keys["a"] == keys["b"]
    (tmp_path / "b" / "bace.csv").write_text("smiles,Class\nC,1\nCC,1\n")
    os.utime(tmp_path / "b" / "bace.csv", (1, 1))
    config = panel.PanelConfig(str(tmp_path / "b"))
    changed = panel_report.run_key(config, panel.describe_panel(config.folder)[0]["bace"], 0, "references")
    assert changed != keys["a"][1]


@pytest.mark.slow
def test_replay_scores_one_variant_as_fit_does_and_resumes(tmp_path, capsys):
    """`bench.replay`: one variant (a kernel machine distilled from rf) trained on fit's inner part, scored on the
    inner folds, refitted and FHE-simulated on the test split; a rerun skips the rows it holds."""
    from molcloak.evaluation.bench import replay

    folder = _tiny_panel(tmp_path / "panel", n=180)
    out, md = tmp_path / "replay.json", tmp_path / "replay.md"
    options = '{"hidden": [], "weight_bits": 3, "act_bits": 3, "input_bits": 3}'
    args = ["--panel", str(folder), "--datasets", "sol_low", "--seeds", "0", "--features", "physchem:scale=quantile",
            "--options", options, "--teacher", "rf", "--json", str(out), "--markdown", str(md)]  # fmt: skip
    replay.main(args)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["teacher"] == "rf" and row["metric"] == row["test_metric"] == "roc_auc"
    assert row["pbs"] == 0 and row["network"]["hidden"] == [] and row["network"]["weight_bits"] == 3
    assert 0.5 < row["valid"] <= 1 and 0.5 < row["test_sim"] <= 1 and row["n_inputs"] == 10
    assert len(row["cv_folds"]) == 5 and row["cv"] == pytest.approx(np.mean(row["cv_folds"]))
    assert "| sol_low | physchem:scale=quantile |" in md.read_text() and "rf |" in md.read_text()
    replay.main(args)  # resumed: nothing new to run
    saved = json.loads(out.read_text())
    assert saved["rows"] == [row] and len(saved["commands"]) == 2
    assert '--options \'{"hidden": [],' in saved["commands"][0]  # quoted: the command runs as recorded
    assert "sol_low seed 0: inner" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        replay.main([*args[:8], "--options", "[16]", "--json", str(out)])
    assert exc.value.code == 2 and "--options '[16]': give a JSON object" in capsys.readouterr().err
    # the teacher's weight is part of the variant: a new row
    replay.main([*args, "--distill", "0.9", "--time"])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and rows[0] == row and rows[1]["distill"] == 0.9
    assert row["run_ms"] is None and rows[1]["run_ms"] > 0  # timed as fit's search times a variant
    assert (rows[1]["valid"], rows[1]["test_float"]) != (row["valid"], row["test_float"])
    assert "| rf (0.9) |" in md.read_text() and "| rf |" in md.read_text()
    replay.main([*args, "--distill", "0.5"])  # fit's own weight: the first variant, nothing new to run
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 2
    saved["rows"][0].pop("distill")  # a row written before the option resumes as fit's weight
    out.write_text(json.dumps(saved))
    replay.main(args)
    assert len(json.loads(out.read_text())["rows"]) == 2 and "| rf |" in md.read_text()
    with pytest.raises(SystemExit) as exc:
        replay.main([*args[:12], "--distill", "1", "--json", str(out)])
    assert exc.value.code == 2 and "--distill 1: give a weight 0 <= w < 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        replay.main([*args[:10], "--distill", "0.3", "--json", str(out)])
    assert exc.value.code == 2 and "--distill 0.3 weighs a teacher; add --teacher" in capsys.readouterr().err
