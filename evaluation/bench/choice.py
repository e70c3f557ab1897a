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
rerun with the same file scores only the feature specs it lacks for each seed (with fit's default specs, the
task's wide spec where the seed's training molecules allow it, as fit does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def reference_networks(
    panel,
    name: str,
    seed: int,
    features: list[str],
    folds: int,
    groups: str = "balanced",
    fold_training: str = "refit",
    refit: bool = False,
    ds=None,
):
    """fit's first stage on the panel's split (`fit.feature_scores`, every fold): per feature spec, the
    task, the scored candidate, its checkpoint (trained on the training part), its circuit compiled
    without keys, and (with `refit`) the circuit of the network `fit` would deploy (refitted on the training
    and inner molecules; else None). `ds`: the dataset when the caller has loaded it (`load`)."""
    from molcloak.pipeline.fit import FIT_TRAIN, SearchSpace, feature_scores
    from molcloak.pipeline.workflow import compile_checkpoint

    from .panel import SPLIT, TEST_FRACTION

    ds = ds if ds is not None else load(panel, name)
    space = SearchSpace(
        features=tuple(features),
        inner_folds=folds,
        cv_molecules=0,
        fold_groups=groups,
        fold_training=fold_training,
    )
    for cand, ckpt, final in feature_scores(ds, space, SPLIT, TEST_FRACTION, seed, FIT_TRAIN, refit):
        compiled = compile_checkpoint(ckpt, cand.compile, measure_keys=False)
        refitted = compile_checkpoint(final, cand.compile, measure_keys=False) if final is not None else None
        yield ds.task, cand, ckpt, compiled, refitted


def load(panel, name: str):
    """The panel's dataset `name`, as the panel benchmark loads it."""
    from .panel import describe_panel, load_entry

    return load_entry(panel, describe_panel(panel)[0][name])


def specs_searched(ds, seed: int, features: list[str]) -> tuple[str, ...]:
    """The feature specs fit's first stage scores for `features` on this seed's split of the dataset `ds`: with
    fit's defaults, the task's wide specs that the training molecules allow (`fit.task_space`)."""
    from molcloak.pipeline.fit import SearchSpace, task_space

    from .panel import SPLIT, TEST_FRACTION

    space, _ = task_space(ds, SearchSpace(features=tuple(features)), SPLIT, TEST_FRACTION, seed)
    return space.features


def score_rows(
    panel,
    name: str,
    seed: int,
    features: list[str],
    folds: int,
    groups: str = "balanced",
    fold_training: str = "refit",
    ds=None,
) -> list[dict]:
    """One row per feature spec: its inner scores, and its FHE-simulated test metric trained on the training part
    ("test") and refitted as fit deploys it ("refit_test"). `ds` as in `reference_networks`."""
    from .frontier import primary

    rows = []
    scored = reference_networks(panel, name, seed, features, folds, groups, fold_training, refit=True, ds=ds)
    for task, cand, ckpt, compiled, refitted in scored:
        test, refit_test = compiled.metrics["fhe_simulate"], refitted.metrics["fhe_simulate"]
        rows.append(
            {"dataset": name, "seed": seed, "features": cand.features, "folds": folds, "fold_groups": groups,
             "fold_training": fold_training, "inner_part": cand.valid,
             "cv": cand.cv, "cv_folds": cand.cv_folds, "cv_sizes": cand.cv_sizes, "test": primary(task, test),
             "refit_test": primary(task, refit_test),
             "test_metric": "rmse" if not task.is_classification else "roc_auc", "seconds": cand.seconds,
             "n_inputs": int(np.shape(ckpt.X_test)[1])}
        )  # fmt: skip
    return rows


def richest_tied(rows: list[dict], se_factor: float = 0.0, tolerance: float | None = None) -> dict:
    """Prefer richer features among those the folds cannot tell apart: of the specs whose mean over the inner
    folds is below the best one's by at most `tolerance` (fit's rule), or by at most `se_factor` standard
    errors of their paired fold differences, the one with the most inputs (then the higher mean). The default
    `tolerance` is fit's for the rows' task (`SearchSpace.tie_tolerance`: 0 on regression, whose rows are tested
    by RMSE)."""
    if tolerance is None:
        from molcloak.pipeline.fit_space import SearchSpace

        tolerance = SearchSpace().tie_tolerance("r2" if rows[0].get("test_metric") == "rmse" else "roc_auc")
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
    "cv_rich": richest_tied,  # fit's rule (SearchSpace.tie_tolerance) on every fold
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
    """(dataset, seed) of a row; the dataset is named with its folds' groups when they are not balanced, and with
    their training when it is not "stopped" (the only one before the option; rows without it were stopped)."""
    name, groups = row["dataset"], row.get("fold_groups", "balanced")
    name = name if groups == "balanced" else f"{name} ({groups} folds)"
    training = row.get("fold_training", "stopped")
    return (name if training == "stopped" else f"{name} (folds {training})", row["seed"])


def summarize(rows: list[dict]) -> list[dict]:
    """Per (dataset, seed): each rule's pick and its test metric, and the best spec on the test. The test metric
    is the refitted network's (what fit deploys) when every row has one, else the training part's network's;
    `cv_test_corr` is the rank correlation of the specs' fold means with it (how well the folds rank them)."""
    out = []
    for key in dict.fromkeys(_group(r) for r in rows):
        rs = [r for r in rows if _group(r) == key]
        tk = "refit_test" if all(r.get("refit_test") is not None for r in rs) else "test"
        sign = -1 if rs[0]["test_metric"] == "rmse" else 1  # higher is better after the sign
        best = max(rs, key=lambda r: sign * r[tk])
        picks = {rule: pick(rs) for rule, pick in RULES.items()}
        corr = _rank_corr([r["cv"] for r in rs], [sign * r[tk] for r in rs])
        out.append(
            {"dataset": key[0], "seed": key[1], "specs": len(rs), "test_of": tk, "best_test": best[tk],
             "best_features": best["features"], "cv_test_corr": corr,
             **{f"{rule}_pick": p["features"] for rule, p in picks.items()},
             **{f"{rule}_test": p[tk] for rule, p in picks.items()}}
        )  # fmt: skip
    return out


def _rank_corr(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two lists, ties ranked by their mean rank (None for fewer than 3 values or
    a constant list)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def markdown(summary: list[dict]) -> str:
    """The picks per (dataset, seed) and their means; "test" is the refitted network's where recorded (`test_of`)."""
    head = " | ".join(f"{RULE_NAMES[r]} picks | its test" for r in RULES)
    lines = [
        f"| dataset | seed | test of | folds-test rank corr. | {head} | best on test |",
        "|---|---|---|---|" + "---|---|" * len(RULES) + "---|",
    ]
    for s in summary:
        picks = " | ".join(f"`{s[f'{r}_pick']}` | {s[f'{r}_test']:.3f}" for r in RULES)
        corr = "-" if s.get("cv_test_corr") is None else f"{s['cv_test_corr']:+.2f}"
        of = s.get("test_of", "test")
        lines.append(f"| {s['dataset']} | {s['seed']} | {of} | {corr} | {picks} | {s['best_test']:.3f} |")
    for name in dict.fromkeys(s["dataset"] for s in summary):
        mine = [s for s in summary if s["dataset"] == name]
        means = " | ".join(f" | {np.mean([s[f'{r}_test'] for s in mine]):.3f}" for r in RULES)
        corrs = [s["cv_test_corr"] for s in mine if s.get("cv_test_corr") is not None]
        corr = f"{np.mean(corrs):+.2f}" if corrs else "-"
        best = np.mean([s["best_test"] for s in mine])
        lines.append(f"| {name} | mean of {len(mine)} | | {corr} | {means} | {best:.3f} |")
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
    ap.add_argument(
        "--fold-training",
        default="refit",
        choices=("refit", "stopped"),
        help="how each fold's network is trained (fit's SearchSpace.fold_training): as fit refits what it deploys, "
        "for the epochs the inner part chose (refit, fit's default) or early-stopped on the fold's validation "
        "part (stopped, fit's way until session 31)",
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
    done = {
        (
            r["dataset"],
            r["seed"],
            r["folds"],
            r.get("fold_groups", "balanced"),
            r.get("fold_training", "stopped"),
            r["features"],
        )
        for r in out["rows"]
    }
    how = (args.folds, args.fold_groups, args.fold_training)
    for name in datasets:
        ds = load(panel, name)  # loaded once: the seeds split it, fit's first stage trains on it
        for seed in seeds:
            # a spec is resumed, not the seed: a rerun scores the specs this file lacks, among them a task's
            # wide spec that fit now offers for this seed's training molecules (`fit.task_space`)
            missing = [f for f in specs_searched(ds, seed, features) if (name, seed, *how, f) not in done]
            if not missing:
                continue
            rows = score_rows(panel, name, seed, missing, *how, ds=ds)
            out["rows"] += [r for r in rows if (name, seed, *how, r["features"]) not in done]
            out["summary"] = summarize(out["rows"])
            args.json.write_text(json.dumps(out, indent=1))
            if args.markdown:
                args.markdown.write_text(markdown(out["summary"]))
            print(json.dumps(out["summary"][-1]), flush=True)


if __name__ == "__main__":
    main()
