"""How much could a better choice of feature set still gain? A split-half estimate on the panel's test split.

The choice benchmark (`choice.py`) reports, per seed, the best feature set on the test next to each rule's
pick. That "best on the test" is picked with hindsight on the very molecules it is scored on, so it is
optimistic: the minority class of a panel test split holds 23-120 molecules, and five specs' test ROC-AUCs
differ by chance about as much as by merit. Here each test split is cut in two class-stratified halves, many
times. On each cut:

- hindsight: the best spec on half B, scored on half B (what "best on the test" measures);
- half-test chooser: the best spec on half A, scored on half B. It chooses on molecules of the test's own
  distribution that it is not scored on, which no rule inside `fit` sees. A reference point, not a bound: a
  rule that sees more molecules (fit's folds) can beat it;
- each of `choice.py`'s rules (fit's among them), from the fold scores of a choice JSON (`--scores`), scored
  on half B; and the mean over the specs on half B (a pick at random).

Both directions of every cut are averaged. "hindsight - chooser" estimates how optimistic hindsight is (at
half the test size); "chooser - rule" how far a rule is from choosing on test-like molecules. The networks
are fit's first-stage reference networks, trained on the training part by `choice.reference_networks`
(choice.py's code and seeds), FHE-simulated on the test; binary tasks only.

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
    from .choice import reference_networks

    preds, y = {}, None
    for _task, cand, ckpt, compiled, _ in reference_networks(panel, name, seed, features, folds=1):
        preds[cand.features] = compiled.test_predictions["fhe_simulate"][:, 1]  # what the choice JSON scored
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
    """Each rule of `choice.py` on each kind of folds in `score_rows` for (name, seed): "kind/rule" -> spec (kind:
    the folds' groups, with " refit" for refit folds; "kind K folds/rule" when the rows hold several fold counts)."""
    from .choice import RULES

    mine = [r for r in score_rows if r["dataset"] == name and r["seed"] == seed]
    run_of = lambda r: (  # noqa: E731  (fold groups, folds' training: rows without it were stopped, fold count)
        r.get("fold_groups", "balanced")
        + ("" if r.get("fold_training", "stopped") == "stopped" else " refit"),
        r["folds"],
    )
    runs = list(dict.fromkeys(run_of(r) for r in mine))
    picks = {}
    for kind, folds in runs:
        rows = [r for r in mine if run_of(r) == (kind, folds)]
        label = kind if sum(k == kind for k, _ in runs) == 1 else f"{kind} {folds} folds"
        picks.update({f"{label}/{rule}": pick(rows)["features"] for rule, pick in RULES.items()})
    return picks


def estimate(panel, name: str, seed: int, score_rows: list[dict], n: int, scores: str = "") -> dict:
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
    counts = np.bincount(tp["y"], minlength=2)
    if counts.min() < 2:  # each half needs both classes for a ROC-AUC
        raise MolcloakError(
            f"{name} seed {seed}: the test split holds {counts[0]} negatives and {counts[1]} positives; "
            "halves need at least 2 of each: use a larger dataset"
        )
    from sklearn.metrics import roc_auc_score

    full = {s: float(roc_auc_score(tp["y"], p)) for s, p in tp["preds"].items()}
    recorded = {}  # the same networks' test metric in every run of the choice JSON
    for r in rows:
        recorded.setdefault(r["features"], []).append(r["test"])
    picks = rule_picks(score_rows, name, seed)
    return {
        "dataset": name, "seed": seed, "n_test": len(tp["y"]), "n_positive": int(tp["y"].sum()),
        "halvings": n, "scores": scores, "full_test": full,
        "max_diff_to_scores": max(abs(full[s] - t) for s in full for t in recorded[s]),
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
    from .frontier import panel_arguments

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    panel_arguments(ap, "herg,clintox,bace")  # binary datasets
    ap.add_argument("--scores", type=Path, required=True, help="a choice.py JSON: the specs and fold scores")
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
        if not datasets:
            raise MolcloakError(
                f"--datasets {args.datasets!r}: name at least one binary panel dataset, e.g. herg"
            )
        panel = panel_folder(args.panel, datasets)
        score_rows = _score_rows(args.scores)
        out = _previous(args.json)
    except MolcloakError as exc:  # one line and exit 2, as the CLI does
        ap.exit(2, f"error: {exc}\n")
    command = "python -m molcloak.evaluation.bench.choice_noise " + " ".join(argv or sys.argv[1:])
    out["commands"] = [*out.get("commands", []), command]
    scores = str(args.scores)
    done = {(r["dataset"], r["seed"], r.get("halvings"), r.get("scores")) for r in out["rows"]}
    for name in datasets:
        for seed in seeds:
            if (name, seed, args.halvings, scores) in done:
                continue
            try:
                out["rows"].append(estimate(panel, name, seed, score_rows, args.halvings, scores))
            except MolcloakError as exc:
                ap.exit(2, f"error: {exc}\n")
            args.json.write_text(json.dumps(out, indent=1))
            if args.markdown:
                args.markdown.write_text(markdown(out["rows"]))
            print(json.dumps({k: out["rows"][-1][k] for k in ("dataset", "seed", "half_b")}), flush=True)


SCORE_FIELDS = ("dataset", "seed", "features", "folds", "cv", "cv_folds", "inner_part", "test")


def _score_rows(path: Path) -> list[dict]:
    from molcloak.pipeline.errors import MolcloakError

    fix = "run python -m molcloak.evaluation.bench.choice --json FILE first"
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MolcloakError(f"--scores {path}: not a choice.py results file ({exc}); {fix}") from exc
    for i, row in enumerate(rows if isinstance(rows, list) else [None]):
        missing = [f for f in SCORE_FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise MolcloakError(f"--scores {path}: row {i} lacks {', '.join(missing)}; {fix}")
    return rows


def _previous(path: Path) -> dict:
    """The results of an earlier run in `path` (to resume), or a new file."""
    from molcloak.pipeline.errors import MolcloakError

    if not path.is_file():
        return {"rows": []}
    try:
        out = json.loads(path.read_text())
        if not isinstance(out.get("rows"), list):
            raise ValueError("no list of rows")
    except (OSError, ValueError, AttributeError) as exc:
        raise MolcloakError(
            f"--json {path}: not a results file of this benchmark ({exc}); give a new path to start afresh"
        ) from exc
    return out


if __name__ == "__main__":
    main()
