"""What `molcloak fit`'s inner folds validate on, per panel dataset and seed: no training, fit's own code.

fit chooses among variants cross-validated on inner folds of the training molecules (`Search.cv_folds`: on large
data only the first folds, until they hold `--cv-molecules`). This report shows, for each fold kind, how many
molecules each fold validated on holds and how much of it its largest scaffold group is, next to the test
split's largest group: a fold made of one big series (acyclic molecules, benzenes) scores variants on molecules
the scaffold test never holds.

    python -m molcloak.evaluation.bench.folds --datasets ames,tox21,clintox,herg,bace,lipophilicity --seeds 0 \\
        --json folds.json --markdown folds.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

KINDS = ("auto", "balanced", "rare")


def fold_rows(panel, name: str, seed: int, kinds=KINDS) -> list[dict]:
    """One row per fold kind: the folds fit validates on, each one's size and largest scaffold group."""
    from molcloak.pipeline.fit import FitBudget, SearchSpace
    from molcloak.pipeline.fit_search import Search
    from molcloak.pipeline.pbs_cost import Calibration
    from molcloak.pipeline.splits import murcko_scaffold
    from molcloak.pipeline.train import TrainConfig

    from .panel import SPLIT, TEST_FRACTION, describe_panel, load_entry

    ds = load_entry(panel, describe_panel(panel)[0][name])
    rows = []
    for kind in kinds:
        space = SearchSpace(fold_groups=kind)
        args = (
            ds,
            space,
            FitBudget(),
            SPLIT,
            TEST_FRACTION,
            seed,
            TrainConfig(),
            Calibration(measure=False),
            None,
        )
        search = Search(*args, timed_runs=0)
        split = search.inner_split()
        largest = lambda idx: max(Counter(murcko_scaffold(ds.smiles[i]) for i in idx).values())  # noqa: E731
        folds = search.cv_folds()
        rows.append(
            {"dataset": name, "seed": seed, "fold_groups": kind, "folds_used": search.folds_used,
             "k": space.inner_folds, "n_rows": len(split.train) + len(split.valid),
             "test_largest_group": largest(split.test), "validated": [len(f.valid) for f in folds],
             "largest_group": [largest(f.valid) for f in folds]}
        )  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | seed | --fold-groups | folds used | training + inner part | folds validated on: molecules "
        "(largest scaffold group) | test's largest group |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        folds = ", ".join(f"{n:,} ({g:,})" for n, g in zip(r["validated"], r["largest_group"]))
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['fold_groups']} | {r['folds_used']} | {r['n_rows']:,} | "
            f"{len(r['validated'])} of {r['k']}: {folds} | {r['test_largest_group']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from .frontier import panel_arguments

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    panel_arguments(ap, "ames,tox21,clintox,herg,bace,lipophilicity", "0")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    from molcloak.pipeline import quiet  # noqa: F401  (first: dependency noise is not the user's concern)

    from .frontier import int_list, panel_or_exit

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    panel, seeds = panel_or_exit(ap, args.panel, datasets), int_list(ap, args.seeds, "--seeds")
    rows = [r for name in datasets for seed in seeds for r in fold_rows(panel, name, seed)]
    table = markdown(rows)
    command = "python -m molcloak.evaluation.bench.folds " + " ".join(argv or sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    if args.markdown:
        args.markdown.write_text(f"`{command}`\n\n{table}")
    print(table, end="")


if __name__ == "__main__":
    main()
