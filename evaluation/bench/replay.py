"""Replay one variant exactly as `molcloak fit` trains, compares and deploys it, without the search around it.

A question such as "is the kernel machine better distilled from rf-both?" needs fit's own code on the panel's
split, not a lookalike: train on the inner part and score there (what stages 1-2 rank on), train and score on
the inner folds (what the final choice compares), refit on every training molecule (what `fit` deploys) and
FHE-simulate the whole test split. This runs exactly that (`fit_search.Search`) for one variant (feature spec,
network options, teacher and, with --distill, the teacher's weight in the loss) per dataset and seed:

    python -m molcloak.evaluation.bench.replay --datasets tox21 --seeds 0,1,2 \
        --features rdkit2d:scale=quantile+rff:n=2048 \
        --options '{"hidden": [], "weight_bits": 4, "act_bits": 3, "input_bits": 3}' --teacher rf-both \
        --json replay.json --markdown replay.md

Each row holds the inner validation metric ("valid", and the inner folds' mean "cv": ROC-AUC, or R² for
regression, as `fit` chooses), the refitted model's float and FHE-simulated test metric (the panel's: ROC-AUC or
RMSE, "test_metric"), the circuit's inputs, PBS count and widest integer, and the seconds taken.
--json is rewritten after every row and a rerun skips the rows it holds, so variants run one after another
accumulate in one file, and --markdown tables their means over the seeds. The test split is reported here and
never used to choose. --time also times each variant's circuit on the inner part as `fit`'s search does ("run_ms";
on a quiet machine only). Run it alone: a tox21 row with a teacher takes about 7.5 minutes, lipophilicity's 5.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .frontier import int_list, panel_arguments, panel_or_exit, primary

# a variant; with the seed, a row's identity
FIELDS = ("dataset", "features", "options", "teacher", "distill")


def replay(
    panel,
    name: str,
    seed: int,
    features: str | None,
    options: dict,
    teacher: str | None,
    distill: float | None = None,
    timed: bool = False,
) -> dict:
    """One row: `fit`'s search state on the panel's split of `name` for `seed`, the variant scored on the inner
    part and the inner folds, refitted and compiled as `fit` deploys it, and scored on the test split. `distill`:
    the teacher's weight in the loss (None: fit's, `TrainConfig.distill`). `timed`: the circuit timed on the inner
    part as `fit`'s search times every variant (`run_ms`, and the machine's load factor then)."""
    from molcloak.pipeline.fit import FIT_TRAIN, FitBudget, SearchSpace
    from molcloak.pipeline.fit_search import Search
    from molcloak.pipeline.latency import TIMED_RUNS
    from molcloak.pipeline.pbs_cost import Calibration
    from molcloak.pipeline.workflow import compile_checkpoint

    from .panel import SPLIT, TEST_FRACTION, describe_panel, load_entry
    from .panel_report import primary_metric

    start = time.perf_counter()
    ds = load_entry(panel, describe_panel(panel)[0][name])
    space = SearchSpace(teachers=(teacher,))  # validates the teacher's name
    train = dataclasses.replace(FIT_TRAIN, seed=seed)
    if distill is not None:
        train = dataclasses.replace(train, distill=distill)  # validates the weight
    search = Search(
        ds, space, FitBudget(), SPLIT, TEST_FRACTION, seed, train, Calibration(measure=False), None,
        timed_runs=TIMED_RUNS if timed else 0, refit=True,
    )  # fmt: skip
    filled = {**space.start_for(features), **options}  # options left out: fit's first network for the spec
    cand = search.evaluate(features, filled, space.first_compile, "replay", teacher)
    if not np.isfinite(cand.valid):
        raise RuntimeError(
            f"{name} seed {seed}: {cand.label} has no score on the inner part (not compiled, or a class missing)"
        )
    search.cross_validate(cand)
    compiled = compile_checkpoint(search.final(cand), cand.compile, measure_keys=False)
    l2 = search.trained[cand.trained].train_info["final"].get("l2")
    return {
        "dataset": name, "seed": seed, "features": features, "options": options, "teacher": teacher, "distill": distill,
        "network": cand.options, "metric": search.metric, "test_metric": primary_metric(ds.task),
        "valid": cand.valid, "cv": cand.cv, "cv_folds": cand.cv_folds,
        "test_float": primary(ds.task, compiled.metrics["float"]),
        "test_sim": primary(ds.task, compiled.metrics["fhe_simulate"]),
        "l2": l2, "n_inputs": cand.n_inputs, "pbs": cand.pbs, "max_bits": cand.max_bits,
        "run_ms": None if cand.run_s is None else cand.run_s * 1e3, "load_factor": cand.load_factor,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def identity(row: dict) -> str:
    return json.dumps([row.get(k) for k in FIELDS], sort_keys=True)  # rows from before "distill": None


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant (in the order first run): the seeds and the means of the inner and test scores."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(identity(row), []).append(row)
    table = []
    for members in groups.values():
        first = members[0]
        mean = {k: _mean([r[k] for r in members]) for k in ("valid", "cv", "test_float", "test_sim")}
        table.append({**{k: first.get(k) for k in FIELDS}, "seeds": [r["seed"] for r in members], **mean})
    return table


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def markdown(table: list[dict]) -> str:
    lines = [
        "| dataset | features | options | teacher (weight) | seeds | inner part | inner folds | test, float | test, FHE-sim (ROC-AUC or RMSE) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in table:
        options = json.dumps(r["options"], sort_keys=True)
        seeds = ",".join(map(str, r["seeds"]))
        lines.append(
            f"| {r['dataset']} | {r['features']} | `{options}` | {_teacher(r)} | {seeds} | "
            f"{cell(r['valid'])} | {cell(r['cv'])} | {cell(r['test_float'])} | {cell(r['test_sim'])} |"
        )
    return "\n".join(lines) + "\n"


def _teacher(row: dict) -> str:
    if not row["teacher"]:
        return "none"
    return row["teacher"] if row.get("distill") is None else f"{row['teacher']} ({row['distill']:g})"


def _distill(
    ap: argparse.ArgumentParser, weight: float | None, teacher: str | None, teachers
) -> float | None:
    """--distill checked (one line and exit 2 when wrong); fit's own weight is stored as None, as when it is left
    out, so that both name one variant."""
    from molcloak.pipeline.fit import FIT_TRAIN

    if weight is None:
        return None
    if teacher is None:
        ap.exit(
            2, f"error: --distill {weight:g} weighs a teacher; add --teacher, one of {', '.join(teachers)}\n"
        )
    if not 0 <= weight < 1:
        ap.exit(
            2, f"error: --distill {weight:g}: give a weight 0 <= w < 1 (the labels get 1 - w), e.g. 0.5\n"
        )
    return None if weight == FIT_TRAIN.distill else weight


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    panel_arguments(ap, "tox21")
    ap.add_argument("--features", required=True, help="the variant's feature spec, as fit's --features")
    ap.add_argument(
        "--options",
        default="{}",
        help='the network options as JSON, e.g. \'{"hidden": [16], "weight_bits": 3}\' (options left out: those '
        "of fit's first network for the spec, e.g. no hidden layer and 4-bit weights for an rff map)",
    )
    ap.add_argument("--teacher", default="none", help="none, rf or rf-both")
    ap.add_argument(
        "--distill",
        type=float,
        default=None,
        help="the teacher's weight in the loss, 0 <= w < 1 (default: fit's, 0.5; the labels get 1 - w)",
    )
    ap.add_argument(
        "--time",
        action="store_true",
        help="also time the circuit on the inner part, as fit's search does (run_ms in the row; run it alone)",
    )
    ap.add_argument("--json", type=Path, required=True, help="results file (rewritten; a rerun resumes)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table of means here")
    args = ap.parse_args(argv)
    from molcloak.pipeline import quiet  # noqa: F401  (first: dependency noise is not the user's concern)
    from molcloak.pipeline.errors import MolcloakError
    from molcloak.pipeline.teacher import TEACHERS

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    panel = panel_or_exit(ap, args.panel, datasets)
    seeds = int_list(ap, args.seeds, "--seeds")
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        ap.exit(
            2, f"error: --options {args.options!r} is not JSON ({exc.msg}); e.g. '{{\"hidden\": [16]}}'\n"
        )
    if not isinstance(options, dict):
        ap.exit(2, f"error: --options {args.options!r}: give a JSON object, e.g. '{{\"hidden\": [16]}}'\n")
    teacher = None if args.teacher == "none" else args.teacher
    if teacher is not None and teacher not in TEACHERS:
        ap.exit(2, f"error: --teacher {args.teacher}: choose one of {', '.join(TEACHERS)} or none\n")
    distill = _distill(ap, args.distill, teacher, TEACHERS)
    out = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": []}
    command = "python -m molcloak.evaluation.bench.replay " + shlex.join(argv or sys.argv[1:])
    out["commands"] = [*out.get("commands", []), command]
    done = {(identity(r), r["seed"]) for r in out["rows"]}

    def save() -> None:
        out["summary"] = summarize(out["rows"])
        args.json.write_text(json.dumps(out, indent=1))
        if args.markdown:
            args.markdown.write_text(markdown(out["summary"]))

    for name in dict.fromkeys(datasets):
        for seed in dict.fromkeys(seeds):
            variant = {
                "dataset": name, "features": args.features, "options": options, "teacher": teacher,
                "distill": distill,
            }  # fmt: skip
            if (identity(variant), seed) in done:
                continue
            try:
                row = replay(panel, name, seed, args.features, options, teacher, distill, args.time)
            except (MolcloakError, RuntimeError) as exc:  # one line and exit 2, as the CLI does; rows kept
                save()
                ap.exit(2, f"error: {exc}\n")
            out["rows"].append(row)
            done.add((identity(variant), seed))
            save()
            print(f"{name} seed {seed}: inner {row['valid']:.3f}, test (FHE-simulated) {row['test_sim']:.3f}")
    save()


if __name__ == "__main__":
    main()
