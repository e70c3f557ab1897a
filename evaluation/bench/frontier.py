"""Fixed-configuration sweep on the panel: what each feature spec, network and teacher gives on the test.

`molcloak fit` chooses on an inner validation part, so its panel rows mix two effects: how good a
configuration is and how well the search picked it. This sweep removes the second: every
configuration in a grid (feature spec x hidden widths x teacher) is trained, compiled and scored on
the same scaffold test split for each seed, and its circuit is timed. It measures the frontier
(`evaluation/PERFORMANCE.md`), and whether distillation (`--teacher rf`) lifts a student at equal
cost: the two arms share features, network, seed and split.

    python -m molcloak.evaluation.bench.frontier --datasets bace,herg --seeds 0,1,2 \
        --features physchem:scale=quantile --features rdkit2d:scale=quantile+select:k=32 \
        --hidden 16 --teacher none,rf --json frontier.json --markdown frontier.md

The test split is reported here and never used to choose anything. Timings: median of 3 encrypted
runs of one molecule on the compiled circuit, each followed by the load gauge's reference circuit
(`latency.LoadGauge`); the JSON keeps raw, load factor and normalized figures. --json is rewritten
after every configuration, and a rerun with the same file skips the rows it already holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

# fit's first-stage rounding (bits, exactness); p_error comes from --p-error (fit's default when not given)
COMPILE = (5, "approximate")
OLD_P_ERROR = 1e-6  # rows written before p_error was recorded were compiled at it


def primary(task, metrics: dict) -> float:
    """The panel's metric: ROC-AUC (mean over tasks for multi-label), RMSE for regression."""
    from .panel_report import primary_metric

    return float(metrics.get(primary_metric(task), float("nan")))


def panel_folder(panel: Path | None, datasets: list[str]) -> Path:
    """The panel folder (default ../shared/data/panel), checked to hold `datasets` (MolcloakError otherwise)."""
    from molcloak.pipeline.errors import MolcloakError

    from .panel import default_panel_dir, describe_panel

    panel = panel or default_panel_dir()
    unknown = sorted(set(datasets) - set(describe_panel(panel)[0]))
    if unknown:
        raise MolcloakError(f"--datasets {','.join(unknown)}: not in the panel {panel}")
    return panel


def run_one(
    ds, X, spec, sp, network, teacher, soft, seed, gauge, float_only: bool, p_error: float | None
) -> dict:
    from molcloak.pipeline.compile import CompileConfig
    from molcloak.pipeline.fit import FIT_TRAIN
    from molcloak.pipeline.latency import time_circuit
    from molcloak.pipeline.workflow import compile_checkpoint, train_on_features

    start = time.perf_counter()
    train = dataclasses.replace(FIT_TRAIN, seed=seed, teacher=teacher)
    hidden, weight_bits, act_bits = network
    options = {"hidden": list(hidden), "weight_bits": weight_bits, "act_bits": act_bits}
    ckpt = train_on_features(ds, spec, X, sp, "mlp", options, train, soft_train=soft)
    if float_only:  # what the network reaches at this width and these bits, before any circuit
        return {"float": primary(ds.task, ckpt.metrics["float"]), "fhe_simulate": None,
                "inputs": int(spec.width), "pbs": None, "max_bits": None, "key_mb": None, "run_ms": None,
                "load_factor": None, "normalized_ms": None, "float_only": True,
                "seconds": time.perf_counter() - start}  # fmt: skip
    compiled = compile_checkpoint(ckpt, CompileConfig(*COMPILE, p_error), measure_keys=True)
    timing = time_circuit(compiled.q_module, X[sp.test], 3, gauge)
    stats = compiled.stats
    return {
        "p_error": p_error,
        "float": primary(ds.task, compiled.metrics["float"]),
        "fhe_simulate": primary(ds.task, compiled.metrics["fhe_simulate"]),
        "inputs": int(spec.width),
        "pbs": stats.pbs_count,
        "max_bits": stats.max_bit_width,
        "key_mb": stats.serialized_evaluation_key_bytes / 1e6,
        "run_ms": timing.seconds * 1e3,
        "load_factor": timing.load_factor,
        "normalized_ms": timing.normalized_s * 1e3,
        "seconds": time.perf_counter() - start,
    }


def sweep(args, out: dict, save) -> None:
    from molcloak.pipeline.latency import LoadGauge
    from molcloak.pipeline.pbs_cost import Calibration
    from molcloak.pipeline.teacher import teacher_outputs
    from molcloak.pipeline.workflow import featurized

    from .panel import SPLIT, TEST_FRACTION, describe_panel, load_entry

    entries, _ = describe_panel(args.panel)
    gauge = LoadGauge(Calibration())
    fields = ("dataset", "seed", "features", "hidden", "weight_bits", "act_bits", "teacher")
    mine = [
        r for r in out["rows"] if bool(r.get("float_only")) == args.float_only
    ]  # a float row is not a circuit's
    old = {"weight_bits": 3, "act_bits": 3}  # what rows written before a setting varied were run with
    p = None if args.float_only else args.p_error  # a float row has no circuit
    done = {json.dumps([r.get(f, old.get(f)) for f in fields] + [row_p_error(r)]) for r in mine}
    for name in args.datasets:
        ds = load_entry(args.panel, entries[name])
        for seed in args.seeds:
            soft: dict = {}  # teacher kind -> its out-of-bag outputs on this seed's training rows
            for features in args.features:
                spec, X, sp = featurized(ds, features, SPLIT, TEST_FRACTION, seed)
                networks = [(h, w, a) for h in args.hidden for w in args.weight_bits for a in args.act_bits]
                for hidden, bits, act in networks:
                    for teacher in args.teacher:
                        key = [name, seed, features, list(hidden), bits, act, teacher]
                        if json.dumps(key + [p]) in done:
                            continue
                        if teacher != "none" and teacher not in soft:
                            soft[teacher] = teacher_outputs(ds, sp.train, teacher, seed)
                        row = run_one(
                            ds, X, spec, sp, (hidden, bits, act), None if teacher == "none" else teacher,
                            soft.get(teacher), seed, gauge, args.float_only, p,
                        )  # fmt: skip
                        row.update(zip(fields, key))
                        out["rows"].append(row)
                        print(json.dumps(row), flush=True)
                        save()


def row_p_error(row: dict) -> float | None:
    """The p_error a row's circuit was compiled with (None: a float row, no circuit)."""
    return None if row.get("float_only") else row.get("p_error", OLD_P_ERROR)


def summarize(rows: list[dict]) -> list[dict]:
    """Means over seeds per (dataset, features, hidden, weight bits, activation bits, teacher)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (
            r["dataset"],
            r["features"],
            tuple(r["hidden"]),
            r.get("weight_bits", 3),
            r.get("act_bits", 3),
            r["teacher"],
            bool(r.get("float_only")),
            row_p_error(r),
        )
        groups.setdefault(key, []).append(r)
    first: dict = {}  # datasets and feature specs in the order they were run; teachers grouped per network
    for r in rows:
        first.setdefault(("d", r["dataset"]), len(first)), first.setdefault(("f", r["features"]), len(first))
    order = lambda k: (first["d", k[0]], first["f", k[1]], k[6], *k[2:5], k[5] != "none", k[5], -(k[7] or 0))  # noqa: E731
    table = []
    for (dataset, features, hidden, weight_bits, act_bits, teacher, float_only, p_error), rs in sorted(
        groups.items(), key=lambda g: order(g[0])
    ):
        mean = {k: _mean([r[k] for r in rs]) for k in ("float", "fhe_simulate", "normalized_ms")}
        table.append(
            {"dataset": dataset, "features": features, "hidden": list(hidden), "weight_bits": weight_bits,
             "act_bits": act_bits, "teacher": teacher, "float_only": float_only, "p_error": p_error,
             "seeds": sorted(r["seed"] for r in rs), **mean, "inputs": rs[0]["inputs"],
             "pbs": rs[0]["pbs"], "max_bits": _max([r["max_bits"] for r in rs]),
             "key_mb": _max([r["key_mb"] for r in rs])}
        )  # fmt: skip
    return table


def _mean(values: list) -> float | None:  # None: not measured (--float-only rows)
    return None if any(v is None for v in values) else float(np.mean(values))


def _max(values: list):
    return None if any(v is None for v in values) else max(values)


def _cell(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(table: list[dict]) -> str:
    lines = [
        "| dataset | features | hidden | w bits | act bits | teacher | seeds | float | FHE-sim | inputs | PBS | bits | keys MB | ms (normalized) | p_error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['dataset']} | `{t['features']}` | {','.join(map(str, t['hidden']))} | {t['weight_bits']} | {t['act_bits']} | {t['teacher']} | "
            f"{','.join(map(str, t['seeds']))} | {t['float']:.3f} | {_cell(t['fhe_simulate'], '.3f')} | {t['inputs']} | "
            f"{_cell(t['pbs'], 'd')} | {_cell(t['max_bits'], 'd')} | {_cell(t['key_mb'], '.1f')} | {_cell(t['normalized_ms'], '.0f')} | {_cell(t['p_error'], 'g')} |"
        )
    return "\n".join(lines) + "\n"


def panel_arguments(ap: argparse.ArgumentParser, datasets: str, seeds: str = "0,1,2") -> None:
    """The options every panel script takes: --panel, --datasets (default `datasets`) and --seeds."""
    ap.add_argument("--panel", type=Path, default=None, help="panel folder (default ../shared/data/panel)")
    ap.add_argument("--datasets", default=datasets, help="comma-separated panel datasets")
    ap.add_argument("--seeds", default=seeds, help="scaffold-split seeds, e.g. 0,1,2")


def panel_or_exit(ap: argparse.ArgumentParser, panel: Path | None, datasets: list[str]) -> Path:
    """`panel_folder`, or one line and exit 2 (as the CLI does) when the folder lacks a dataset."""
    from molcloak.pipeline.errors import MolcloakError

    try:
        return panel_folder(panel, datasets)
    except MolcloakError as exc:
        ap.exit(2, f"error: {exc}\n")


def int_list(ap: argparse.ArgumentParser, text: str, flag: str) -> list[int]:
    """`text` ("3,4") as integers, or one line and exit 2 naming the flag and the value (as the CLI does)."""
    from molcloak.pipeline.errors import ConfigError
    from molcloak.pipeline.runconfig import int_list as parse

    try:
        return parse(text, flag)
    except ConfigError as exc:
        ap.exit(2, f"error: {exc}\n")


def p_error(ap: argparse.ArgumentParser, text: str | None) -> float | None:
    """--p-error as one probability (fit's first-stage default when not given), or one line and exit 2."""
    from molcloak.pipeline.compile import DEFAULT_P_ERROR
    from molcloak.pipeline.errors import ConfigError
    from molcloak.pipeline.runconfig import p_error_list

    try:
        values = p_error_list(text) if text is not None else [DEFAULT_P_ERROR]
    except ConfigError as exc:
        ap.exit(2, f"error: {exc}\n")
    if len(values) != 1:
        ap.exit(2, f"error: --p-error {text!r}: give one value, e.g. 0.05 (run again for another)\n")
    if values[0] is None:
        ap.exit(2, "error: --p-error default: give a probability, e.g. 1e-6 (Concrete's 2^-40 is 9.1e-13)\n")
    return values[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    panel_arguments(ap, "bace,clintox,herg")
    ap.add_argument("--features", action="append", help="feature spec (repeatable)")
    ap.add_argument(
        "--hidden", action="append", default=None, help="hidden widths, e.g. 16 or 16,16 (repeatable)"
    )
    ap.add_argument("--weight-bits", default="3", help="weight bit widths, e.g. 3,4")
    ap.add_argument("--act-bits", default="3", help="activation bit widths, e.g. 3,4")
    ap.add_argument("--teacher", default="none,rf", help="none, rf or rf-both (comma-separated)")
    ap.add_argument(
        "--p-error",
        default=None,
        help="error probability per PBS of every circuit (default: fit's, 1e-6; no circuit with --float-only)",
    )
    ap.add_argument(
        "--float-only",
        action="store_true",
        help="train and score the float network only (no circuit, no timing): what a width or bit width "
        "can reach, e.g. --hidden 64 --weight-bits 8, before paying for it in PBS",
    )
    ap.add_argument(
        "--json", type=Path, required=True, help="results file (rewritten; a rerun resumes from it)"
    )
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table of means here")
    args = ap.parse_args(argv)
    from molcloak.pipeline import quiet  # noqa: F401  (first: dependency noise is not the user's concern)
    from molcloak.pipeline.errors import MolcloakError

    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    try:
        args.panel = panel_folder(args.panel, args.datasets)
    except MolcloakError as exc:  # one line and exit 2, as the CLI does
        ap.exit(2, f"error: {exc}\n")
    args.seeds = int_list(ap, args.seeds, "--seeds")
    args.features = args.features or ["physchem:scale=quantile"]
    args.hidden = [int_list(ap, w, "--hidden") for w in (args.hidden or ["16"])]
    args.weight_bits = int_list(ap, args.weight_bits, "--weight-bits")
    args.act_bits = int_list(ap, args.act_bits, "--act-bits")
    args.teacher = [t.strip() for t in args.teacher.split(",")]
    args.p_error = p_error(ap, args.p_error)
    out = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": []}
    command = "python -m molcloak.evaluation.bench.frontier " + " ".join(argv or sys.argv[1:])
    out["commands"] = [*out.get("commands", []), command]  # every run that added rows to this file

    def save() -> None:
        out["summary"] = summarize(out["rows"])
        args.json.write_text(json.dumps(out, indent=1))
        if args.markdown:
            args.markdown.write_text(markdown(out["summary"]))

    sweep(args, out, save)
    save()


if __name__ == "__main__":
    main()
