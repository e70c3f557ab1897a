"""Attack suite of the FHE server (issue 13, "Checks"): every case of the issue against real
`molcloak serve` processes on loopback, bounded in count and time.

Starts a main server (two models: the bundle and a renamed copy; --max-batch 2; --max-body-mb one key
upload plus 8 MiB) and, when a case needs other options, more servers: tokens with quotas and a budget,
--rate with a short --key-ttl-hours, --job-timeout 0.001, RLIMIT_FSIZE (a full disk), and one to kill -9.
Each case sends a few requests (the largest: chunked bodies of 4x the body limit) and has a time limit.
Writes JSON: the cases ({case, expected, observed, held, seconds, description, figures}), the machine,
the command. Prints a table; exit status 0 if every case held, 1 otherwise.

    python -m molcloak.evaluation.attack_check [--bundles DIR] [--model NAME] [--out attack.json]
                                               [--json] [--cases a,b]

Without --bundles it trains, compiles and deploys a tiny model (10 -> 4 -> 2, 2-bit) in a temporary
directory first. Then `extraction_check` runs with --extraction-n chosen inputs (default 64; two more
servers, about a minute on the tiny model; 0 skips it): figures only, not a case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from molcloak.evaluation.attack import CASES, Context, Outcome
from molcloak.pipeline.errors import ConfigError, MolcloakError, UnknownModelError
from molcloak.pipeline.serving.http_api import find_bundles

TINY_MODEL = "tiny-sol-low"


def build_tiny(out: Path) -> Path:
    """The tests' tiny sol-low classifier (2-bit, exact p_error), deployed to `out`."""
    from molcloak.pipeline import data, workflow
    from molcloak.pipeline.compile import CompileConfig
    from molcloak.pipeline.train import TrainConfig

    ckpt = workflow.train_checkpoint(
        data.load_bundled("sol-low"),
        model_options=dict(hidden=[4], weight_bits=2, act_bits=2, input_bits=2),
        train_config=TrainConfig(epochs=8, patience=8, seed=0),
    )
    compiled = workflow.compile_checkpoint(ckpt, CompileConfig(rounding_bits=None, p_error=2**-40))
    workflow.deploy(ckpt, compiled, out, TINY_MODEL)
    return out


def select(names: list[str] | None):
    if not names:
        return list(CASES)
    known = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(known)}")
    return [known[n] for n in names]


def _run_case(case, ctx: Context, limit: float) -> tuple[Outcome, float]:
    """The case in a thread, waited for at most `limit` seconds; an exception is a case that did not hold."""
    box: dict = {}

    def target():
        try:
            box["outcome"] = case.run(ctx)
        except Exception as exc:  # a crash of the probe, or of the server under it: reported, not raised
            box["outcome"] = Outcome(False, f"error: {type(exc).__name__}: {str(exc)[:200]}")

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True, name=f"case-{case.name}")
    thread.start()
    thread.join(limit)
    seconds = time.monotonic() - start
    if thread.is_alive():
        return Outcome(False, f"not finished within {limit:.0f} s (abandoned)"), seconds
    return box["outcome"], seconds


def run(
    bundle: Path,
    cases: list[str] | None = None,
    work: Path | None = None,
    workers: int = 2,
    time_budget: float = 2400.0,
    start_timeout: float = 240.0,
    extraction_n: int = 0,
    log=None,
) -> dict:
    """Run the selected cases (all by default) against servers of `bundle`; the result as a dict."""
    selected = select(cases)
    work_dir = Path(work or tempfile.mkdtemp(prefix="molcloak-attack-"))
    deadline = time.monotonic() + time_budget
    work_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work_dir))  # a kept directory may hold earlier runs
    ctx = Context(Path(bundle), run_dir, workers=workers, start_timeout=start_timeout)
    rows = []
    try:
        for case in selected:
            left = deadline - time.monotonic()
            if left <= 0:
                outcome, seconds = Outcome(False, "not run: the suite's --time-budget was spent"), 0.0
            else:
                outcome, seconds = _run_case(case, ctx, min(case.limit, left))
            row = {
                "case": case.name,
                "expected": case.expected,
                "observed": outcome.observed,
                "held": outcome.held,
                "seconds": round(seconds, 2),
                "description": case.description,
                "figures": outcome.figures,
            }
            rows.append(row)
            if log:
                log(
                    f"{'held' if outcome.held else 'FAILED':6} {case.name} ({seconds:.1f} s): {outcome.observed}"
                )
        servers = dict(ctx.commands)
    finally:
        ctx.close()
    result = {"model": ctx.model, "cases": rows, "servers": servers, "all_held": all(r["held"] for r in rows)}
    if extraction_n:
        result["extraction"] = _extraction(Path(bundle), extraction_n, workers, start_timeout)
    if work is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


def _extraction(bundle: Path, n: int, workers: int, start_timeout: float) -> dict:
    """`extraction_check.run` with `n` chosen inputs and a budget of a quarter of them (whole batches:
    a batch larger than what is left of a budget is refused whole)."""
    from molcloak.evaluation import extraction_check

    budget = max(extraction_check.BATCH, n // 4 // extraction_check.BATCH * extraction_check.BATCH)
    start = time.monotonic()
    try:
        figures = extraction_check.run(bundle, n, budget, 0, "box", workers, start_timeout)
    except MolcloakError as exc:
        return {"n": n, "error": str(exc)}
    return {"n": n, "seconds": round(time.monotonic() - start, 1), **figures}


def extraction_line(e: dict) -> str:
    if "error" in e:
        return f"extraction check (N={e['n']}): error: {e['error']}"
    raw, budget = e["raw"], e["budget"]
    r2 = lambda x: "-" if x is None else f"{x:.2f}"
    return (
        f"extraction check (N={e['n']}, surrogate fitted on {raw['train']}, {e['seconds']:.0f} s): raw logits "
        f"R² {r2(raw['r2'])}, class agreement {r2(raw.get('class_agreement'))}; "
        f"--max-predictions-per-key {budget['max_predictions_per_key']}: {budget['answered']} answers, "
        f"R² {r2(budget['r2'])}, class agreement {r2(budget.get('class_agreement'))}"
    )


def machine() -> dict:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    return {
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def table(rows: list[dict]) -> str:
    """A Markdown table: case, expected, observed, held."""
    lines = ["| case | expected | observed | held |", "|---|---|---|---|"]
    for r in rows:
        observed = r["observed"].replace("|", "/")
        lines.append(f"| {r['case']} | {r['expected']} | {observed} | {'yes' if r['held'] else '**NO**'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", type=Path, help="a folder of bundles (or one bundle); default: a tiny model")
    ap.add_argument("--model", help="the model to attack (default: the only or first bundle)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of progress and the table")
    ap.add_argument("--cases", help=f"comma-separated subset of: {', '.join(c.name for c in CASES)}")
    ap.add_argument("--workers", type=int, default=2, help="FHE workers of the main server")
    ap.add_argument("--time-budget", type=float, default=2400.0, help="seconds for all cases")
    ap.add_argument("--start-timeout", type=float, default=240.0, help="seconds a server may take to start")
    ap.add_argument(
        "--extraction-n", type=int, default=64, help="chosen inputs of the extraction check (0: skip it)"
    )
    ap.add_argument("--keep", type=Path, help="keep servers' state and logs in this directory")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    tmp = Path(tempfile.mkdtemp(prefix="molcloak-attack-model-"))
    started = datetime.datetime.now(datetime.UTC)
    try:
        if args.bundles:
            found = find_bundles(args.bundles)
            name = args.model or next(iter(found))
            if name not in found:
                raise UnknownModelError(
                    f"model {name!r} is not in {args.bundles}; available: {', '.join(found)}"
                )
            bundle = found[name][0]
        else:
            say("building the tiny model ...")
            bundle = build_tiny(tmp / "bundle")
        names = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
        result = run(
            bundle,
            names,
            work=args.keep,
            workers=args.workers,
            time_budget=args.time_budget,
            start_timeout=args.start_timeout,
            extraction_n=args.extraction_n,
            log=say,
        )
    except MolcloakError as exc:
        print(f"attack_check: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.update(
        bundle=str(args.bundles or "(tiny model built in a temporary directory)"),
        date=started.isoformat(timespec="seconds"),
        seconds=round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1),
        machine=machine(),
        command="python -m molcloak.evaluation.attack_check " + " ".join(argv),
    )
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    held = sum(r["held"] for r in result["cases"])
    stream = sys.stderr if args.json else sys.stdout
    print(table(result["cases"]), file=stream)
    if "extraction" in result:
        print(extraction_line(result["extraction"]), file=stream)
    print(f"{held} of {len(result['cases'])} cases held", file=stream)
    return 0 if result["all_held"] else 1


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # Concrete's atexit hook would turn any status into 0 (see load_check); abandoned cases
