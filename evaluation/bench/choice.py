"""How well does `molcloak fit` choose a feature set? One inner validation part against K inner folds.

fit's first stage trains one reference network per feature spec and ranks them. This benchmark runs that
stage (`fit.feature_scores`, fit's own code) on the panel's scaffold split for each seed and records, per
feature spec, the FHE-simulated metric on fit's inner validation part (whole scaffold groups, 20 % of the
training molecules), the mean over K inner folds of all the training molecules, and the test metric of
the same network (trained on the training part). For each seed it reports which spec each rule picks
and what that pick scores on the test, next to the best spec on the test (which no rule can know).

    python -m molcloak.evaluation.bench.choice --datasets bace,herg --seeds 0,1,2 --folds 5 \
        --json choice.json --markdown choice.md

The test split is reported here and never used to choose. --json is rewritten after every seed, and a
rerun with the same file skips the seeds it already holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def reference_networks(
    panel, name: str, seed: int, features: list[str], folds: int, groups: str = "balanced"
):
    """fit's first stage on the panel's split (`fit.feature_scores`, every fold): per feature spec, the
    task, the scored candidate, its checkpoint (trained on the training part) and its circuit compiled
    without keys."""
    from molcloak.pipeline.fit import FIT_TRAIN, SearchSpace, feature_scores
    from molcloak.pipeline.workflow import compile_checkpoint

    from .panel import SPLIT, TEST_FRACTION, describe_panel, load_entry

    ds = load_entry(panel, describe_panel(panel)[0][name])
    space = SearchSpace(features=tuple(features), inner_folds=folds, cv_molecules=0, fold_groups=groups)
    for cand, ckpt in feature_scores(ds, space, SPLIT, TEST_FRACTION, seed, FIT_TRAIN):
        yield ds.task, cand, ckpt, compile_checkpoint(ckpt, cand.compile, measure_keys=False)


def score_rows(
    panel, name: str, seed: int, features: list[str], folds: int, groups: str = "balanced"
) -> list[dict]:
    from .frontier import primary

    rows = []
    for task, cand, ckpt, compiled in reference_networks(panel, name, seed, features, folds, groups):
        test = compiled.metrics["fhe_simulate"]
        rows.append(
            {"dataset": name, "seed": seed, "features": cand.features, "folds": folds, "fold_groups": groups,
             "inner_part": cand.valid,
             "cv": cand.cv, "cv_folds": cand.cv_folds, "cv_sizes": cand.cv_sizes, "test": primary(task, test),
             "test_metric": "rmse" if not task.is_classification else "roc_auc", "seconds": cand.seconds,
             "n_inputs": int(np.shape(ckpt.X_test)[1])}
        )  # fmt: skip
    return rows


def richest_tied(rows: list[dict], se_factor: float = 0.0, tolerance: float | None = None) -> dict:
    """Prefer richer features among those the folds cannot tell apart: of the specs whose mean over the inner
    folds is below the best one's by at most `tolerance` (fit's rule), or by at most `se_factor` standard
    errors of their paired fold differences, the one with the most inputs (then the higher mean). The default
    `tolerance` is fit's (`SearchSpace.tolerance`)."""
    if tolerance is None:
        from molcloak.pipeline.fit_space import SearchSpace

        tolerance = SearchSpace().tolerance
    best = max(rows, key=lambda r: r["cv"])
    tied = []
    for r in rows:
        diff = np.subtract(best["cv_folds"], r["cv_folds"])
        se = np.std(diff, ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if np.mean(diff) <= max(tolerance, se_factor * se):
            tied.append(r)
    return max(tied, key=lambda r: (r.get("n_inputs", 0), r["cv"]))


def first_folds(rows: list[dict]) -> list[dict]:
    """`rows` scored as fit scores them (`SearchSpace.cv_molecules`): on the first folds that hold that many
    molecules (all of them on small data, and on rows recorded without fold sizes)."""
    from molcloak.pipeline.fit_space import SearchSpace, folds_needed

    want, out = SearchSpace().cv_molecules, []
    for r in rows:
        n = folds_needed(r["cv_sizes"], want) if r.get("cv_sizes") else len(r["cv_folds"])
        out.append({**r, "cv_folds": r["cv_folds"][:n], "cv": float(np.mean(r["cv_folds"][:n]))})
    return out


RULES = {  # rule -> its pick among one seed's rows (each rule sees the inner scores only, never the test)
    "inner_part": lambda rs: max(rs, key=lambda r: r["inner_part"]),
    "cv": lambda rs: max(rs, key=lambda r: r["cv"]),
    "cv_rich": richest_tied,  # fit's rule (SearchSpace.tolerance) on every fold
    "cv_rich_se": lambda rs: richest_tied(rs, se_factor=1.0),
    "cv_rich_first": lambda rs: richest_tied(first_folds(rs)),  # what fit does
}
RULE_NAMES = {
    "inner_part": "one inner part",
    "cv": "highest fold mean",
    "cv_rich": "richest among ties, every fold",
    "cv_rich_se": "richest within one fold SE",
    "cv_rich_first": "richest among ties, first folds to 2,000 molecules (fit)",
}


def _group(row: dict) -> tuple:
    """(dataset, seed) of a row; the dataset is named with its folds' groups when they are not balanced."""
    groups = row.get("fold_groups", "balanced")
    return (row["dataset"] if groups == "balanced" else f"{row['dataset']} ({groups} folds)", row["seed"])


def summarize(rows: list[dict]) -> list[dict]:
    """Per (dataset, seed): each rule's pick and its test metric, and the best spec on the test."""
    out = []
    for key in dict.fromkeys(_group(r) for r in rows):
        rs = [r for r in rows if _group(r) == key]
        sign = -1 if rs[0]["test_metric"] == "rmse" else 1  # higher is better after the sign
        best = max(rs, key=lambda r: sign * r["test"])
        picks = {rule: pick(rs) for rule, pick in RULES.items()}
        out.append(
            {"dataset": key[0], "seed": key[1], "specs": len(rs), "best_test": best["test"],
             "best_features": best["features"],
             **{f"{rule}_pick": p["features"] for rule, p in picks.items()},
             **{f"{rule}_test": p["test"] for rule, p in picks.items()}}
        )  # fmt: skip
    return out


def markdown(summary: list[dict]) -> str:
    head = " | ".join(f"{RULE_NAMES[r]} picks | its test" for r in RULES)
    lines = [f"| dataset | seed | {head} | best on test |", "|---|---|" + "---|---|" * len(RULES) + "---|"]
    for s in summary:
        picks = " | ".join(f"`{s[f'{r}_pick']}` | {s[f'{r}_test']:.3f}" for r in RULES)
        lines.append(f"| {s['dataset']} | {s['seed']} | {picks} | {s['best_test']:.3f} |")
    for name in dict.fromkeys(s["dataset"] for s in summary):
        mine = [s for s in summary if s["dataset"] == name]
        means = " | ".join(f" | {np.mean([s[f'{r}_test'] for s in mine]):.3f}" for r in RULES)
        lines.append(
            f"| {name} | mean of {len(mine)} | {means} | {np.mean([s['best_test'] for s in mine]):.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from .frontier import panel_arguments

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    panel_arguments(ap, "bace,herg")
    ap.add_argument(
        "--features", action="append", help="feature spec (repeatable; default: fit's candidates)"
    )
    ap.add_argument("--folds", type=int, default=5, help="inner folds (fit --inner-folds; at least 2)")
    ap.add_argument(
        "--fold-groups",
        default="balanced",
        choices=("auto", "balanced", "rare"),
        help="scaffold groups the folds validate on: all (balanced), the smallest, like the test's (rare), or "
        "rare when one group would fill half a balanced fold (auto, fit's default)",
    )
    ap.add_argument("--json", type=Path, required=True, help="results file (rewritten; a rerun resumes)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    from molcloak.pipeline import quiet  # noqa: F401  (first: dependency noise is not the user's concern)
    from molcloak.pipeline.errors import MolcloakError
    from molcloak.pipeline.fit_space import DEFAULT_FEATURE_CANDIDATES

    from .frontier import int_list, panel_folder

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    try:
        panel = panel_folder(args.panel, datasets)
        if args.folds < 2:
            raise MolcloakError(f"--folds {args.folds}: compare with at least 2 inner folds, e.g. 5")
    except MolcloakError as exc:  # one line and exit 2, as the CLI does
        ap.exit(2, f"error: {exc}\n")
    features = args.features or list(DEFAULT_FEATURE_CANDIDATES)
    seeds = int_list(ap, args.seeds, "--seeds")
    out = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": []}
    command = "python -m molcloak.evaluation.bench.choice " + " ".join(argv or sys.argv[1:])
    out["commands"] = [*out.get("commands", []), command]
    done = {(r["dataset"], r["seed"], r["folds"], r.get("fold_groups", "balanced")) for r in out["rows"]}
    for name in datasets:
        for seed in seeds:
            if (name, seed, args.folds, args.fold_groups) in done:
                continue
            out["rows"] += score_rows(panel, name, seed, features, args.folds, args.fold_groups)
            out["summary"] = summarize(out["rows"])
            args.json.write_text(json.dumps(out, indent=1))
            if args.markdown:
                args.markdown.write_text(markdown(out["summary"]))
            print(json.dumps(out["summary"][-1]), flush=True)


if __name__ == "__main__":
    main()
