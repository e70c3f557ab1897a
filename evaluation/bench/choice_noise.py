"""How much could a better choice of feature set still gain? A split-half estimate on the panel's test split.

The choice benchmark (`choice.py`) reports, per seed, the best feature set on the test next to each rule's
pick. That "best on the test" is picked with hindsight on the very molecules it is scored on, so it is
optimistic: a panel test split holds 20-70 positives, and five specs' test ROC-AUCs differ by chance about
as much as by merit. Here each test split is cut in two halves, stratified by class, many times. On each cut:

- hindsight: the best spec on half B, scored on half B (what "best on the test" measures);
- half-test chooser: the best spec on half A, scored on half B. It chooses on molecules of the test's own
  distribution that it is not scored on, which no rule inside `fit` can see: the most a better rule can hope for;
- each of `choice.py`'s rules (fit's among them), from the fold scores of a choice JSON (`--scores`), scored
  on half B; and the mean over the specs on half B (a pick at random).

Both directions of every cut are averaged. "hindsight - chooser" is the part of "lost to the choice" that is
test noise; "chooser - fit's rule" what choosing better could still win, at half the test size for the chooser.
The networks are fit's first-stage reference networks, trained on the training part as in `choice.py` (same
seeds, same code), FHE-simulated on the test; binary tasks only.

    python -m molcloak.evaluation.bench.choice_noise --scores evaluation/results/choice_s14.json \\
        --datasets herg,clintox,bace --seeds 0,1,2 --json choice_noise.json --markdown choice_noise.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def test_predictions(panel, name: str, seed: int, features: list[str]) -> dict:
    """Each spec's reference network (fit's first stage on the training part) and its FHE-simulated
    probability of class 1 for every test molecule, with the test labels."""
    from molcloak.pipeline.fit import SearchSpace, feature_scores
    from molcloak.pipeline.metrics import to_predictions
    from molcloak.pipeline.train import TrainConfig
    from molcloak.pipeline.workflow import compile_checkpoint, seeded_numpy

    from .panel import SPLIT, TEST_FRACTION, describe_panel, load_entry

    ds = load_entry(panel, describe_panel(panel)[0][name])
    space = SearchSpace(features=tuple(features), inner_folds=1)  # the folds' scores come from --scores
    preds, y = {}, None
    for cand, ckpt in feature_scores(ds, space, SPLIT, TEST_FRACTION, seed, TrainConfig(patience=30)):
        compiled = compile_checkpoint(ckpt, cand.compile, measure_keys=False)
        with seeded_numpy(0):  # as compile_checkpoint scores the test
            raw = compiled.q_module.forward(ckpt.X_test, fhe="simulate")
        preds[cand.features] = to_predictions(ds.task, raw, ckpt.scaler, cand.compile.output)[:, 1]
        y = np.asarray(ckpt.y_test).ravel().astype(int)
    return {"y": y, "preds": preds}


def halvings(y: np.ndarray, n: int, seed: int = 0):
    """`n` random cuts of the molecules in two halves, stratified by class: (A, B) index arrays."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        a = []
        for cls in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == cls))
            a.append(idx[: len(idx) // 2])
        a = np.sort(np.concatenate(a))
        yield a, np.setdiff1d(np.arange(len(y)), a)


def split_half(y: np.ndarray, preds: dict, picks: dict[str, str], n: int = 200) -> dict:
    """Mean ROC-AUC on half B of: the hindsight pick (best on B), the half-test chooser (best on A), the mean
    spec, and each named pick in `picks` (label -> spec), over `n` cuts in both directions."""
    from sklearn.metrics import roc_auc_score

    specs = list(preds)
    sums = dict.fromkeys(["hindsight", "chooser", "mean_spec", *picks], 0.0)
    count = 0
    for a, b in halvings(y, n):
        for first, second in ((a, b), (b, a)):
            on_a = {s: roc_auc_score(y[first], preds[s][first]) for s in specs}
            on_b = {s: roc_auc_score(y[second], preds[s][second]) for s in specs}
            sums["hindsight"] += max(on_b.values())
            sums["chooser"] += on_b[max(specs, key=on_a.get)]
            sums["mean_spec"] += float(np.mean(list(on_b.values())))
            for label, spec in picks.items():
                sums[label] += on_b[spec]
            count += 1
    return {k: v / count for k, v in sums.items()}


def rule_picks(score_rows: list[dict], name: str, seed: int) -> dict[str, str]:
    """Each rule of `choice.py` on each kind of folds in `score_rows` for (name, seed): "kind/rule" -> spec."""
    from .choice import RULES

    picks = {}
    for kind in dict.fromkeys(r.get("fold_groups", "balanced") for r in score_rows):
        rows = [
            r
            for r in score_rows
            if r["dataset"] == name and r["seed"] == seed and r.get("fold_groups", "balanced") == kind
        ]
        if rows:
            picks.update({f"{kind}/{rule}": pick(rows)["features"] for rule, pick in RULES.items()})
    return picks


def estimate(panel, name: str, seed: int, score_rows: list[dict], n: int) -> dict:
    from molcloak.pipeline.errors import MolcloakError

    from .panel import describe_panel

    task = describe_panel(panel)[0][name].task
    if task != "binary":
        raise MolcloakError(f"dataset {name!r} is {task}: the split-half estimate needs a binary task")
    rows = [r for r in score_rows if r["dataset"] == name and r["seed"] == seed]
    features = list(dict.fromkeys(r["features"] for r in rows))
    if not features:
        raise MolcloakError(f"--scores holds no rows for {name} seed {seed}: run choice.py on it first")
    tp = test_predictions(panel, name, seed, features)
    from sklearn.metrics import roc_auc_score

    full = {s: float(roc_auc_score(tp["y"], p)) for s, p in tp["preds"].items()}
    recorded = {r["features"]: r["test"] for r in rows}  # the same networks' test metric in the choice JSON
    picks = rule_picks(score_rows, name, seed)
    return {
        "dataset": name, "seed": seed, "n_test": len(tp["y"]), "n_positive": int(tp["y"].sum()),
        "halvings": n, "full_test": full,
        "max_diff_to_scores": max(abs(full[s] - recorded[s]) for s in full),
        "picks": picks, "half_b": split_half(tp["y"], tp["preds"], picks, n),
    }  # fmt: skip


def markdown(rows: list[dict]) -> str:
    labels = list(dict.fromkeys(k for r in rows for k in r["picks"]))
    cols = ["hindsight", "chooser", "mean_spec", *labels]
    lines = [
        "| dataset | seeds | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name]
        cells = [
            f"{np.mean([r['half_b'][c] for r in mine]):.3f}" if all(c in r["half_b"] for r in mine) else "-"
            for c in cols
        ]
        lines.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--panel", type=Path, default=None, help="panel folder (default ../shared/data/panel)")
    ap.add_argument("--scores", type=Path, required=True, help="a choice.py JSON: the specs and fold scores")
    ap.add_argument("--datasets", default="herg,clintox,bace", help="comma-separated binary panel datasets")
    ap.add_argument("--seeds", default="0,1,2", help="scaffold-split seeds")
    ap.add_argument("--halvings", type=int, default=200, help="random cuts of each test split (default 200)")
    ap.add_argument("--json", type=Path, required=True, help="results file (rewritten; a rerun resumes)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    from molcloak.pipeline import quiet  # noqa: F401  (first: dependency noise is not the user's concern)
    from molcloak.pipeline.errors import MolcloakError

    from .frontier import int_list, panel_folder

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    seeds = int_list(ap, args.seeds, "--seeds")
    try:
        if args.halvings < 1:
            raise MolcloakError(f"--halvings {args.halvings}: give at least 1, e.g. 200")
        panel = panel_folder(args.panel, datasets)
        score_rows = _score_rows(args.scores)
    except MolcloakError as exc:  # one line and exit 2, as the CLI does
        ap.exit(2, f"error: {exc}\n")
    out = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": []}
    command = "python -m molcloak.evaluation.bench.choice_noise " + " ".join(argv or sys.argv[1:])
    out["commands"] = [*out.get("commands", []), command]
    done = {(r["dataset"], r["seed"]) for r in out["rows"]}
    for name in datasets:
        for seed in seeds:
            if (name, seed) in done:
                continue
            try:
                out["rows"].append(estimate(panel, name, seed, score_rows, args.halvings))
            except MolcloakError as exc:
                ap.exit(2, f"error: {exc}\n")
            args.json.write_text(json.dumps(out, indent=1))
            if args.markdown:
                args.markdown.write_text(markdown(out["rows"]))
            print(json.dumps({k: out["rows"][-1][k] for k in ("dataset", "seed", "half_b")}), flush=True)


def _score_rows(path: Path) -> list[dict]:
    from molcloak.pipeline.errors import MolcloakError

    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MolcloakError(
            f"--scores {path}: not a choice.py results file ({exc}); run python -m "
            "molcloak.evaluation.bench.choice --json FILE first"
        ) from exc
    return rows


if __name__ == "__main__":
    main()
