"""Combine panel runs made separately (other seeds, other sessions, reruns) into one table.

    python -m molcloak.evaluation.bench.panel_merge panel-s0.json panel-s1.json panel-s2.json \
        --json panel-all.json --markdown panel-all.md

Each input is the `--json` of a `molcloak bench --panel` run. Per dataset and seed, the run of the last
file that has one is kept, except that a run whose molcloak fit failed (`molcloak_error`) never replaces
one that has a model. Means over seeds, the best plaintext reference and the gap are recomputed
(`panel_report.summarize`); every kept run keeps its own command settings, finish time and load average.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from .panel_report import markdown, summarize


def _better(new: dict, old: dict | None) -> bool:
    return old is None or bool(new.get("molcloak")) or not old.get("molcloak")


def merge(results: list[dict], sources: list[str]) -> dict:
    """One panel result from several (see the module docstring)."""
    datasets: dict[str, dict] = {}
    for result, source in zip(results, sources):
        for name, d in result["datasets"].items():
            into = datasets.setdefault(name, {**{k: v for k, v in d.items() if k != "mean"}, "runs": []})
            by_seed = {r["seed"]: r for r in into["runs"]}
            for run in d["runs"]:
                if _better(run, by_seed.get(run["seed"])):
                    by_seed[run["seed"]] = {**run, "source": source}
            into["runs"] = [by_seed[s] for s in sorted(by_seed)]
    for d in datasets.values():
        d["mean"] = summarize(d["runs"], SimpleNamespace(kind=d["task"]))
    first = results[0]
    return {
        "command": "python -m molcloak.evaluation.bench.panel_merge " + " ".join(sources),
        "config": first["config"],
        "panel": first["panel"],
        "split": first["split"],
        "started": min(r["started"] for r in results),
        "finished": max(r.get("finished") or r["started"] for r in results),
        "machine": first["machine"],
        "merged_from": sources,
        "datasets": datasets,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="panel JSON files, lowest priority first")
    p.add_argument("--json", type=Path, help="write the merged result here")
    p.add_argument("--markdown", type=Path, help="write the merged table here")
    a = p.parse_args(argv)
    results = [json.loads(path.read_text()) for path in a.inputs]
    merged = merge(results, [str(path) for path in a.inputs])
    table = markdown(merged)
    if a.json:
        a.json.write_text(json.dumps(merged, indent=1))
    if a.markdown:
        a.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
