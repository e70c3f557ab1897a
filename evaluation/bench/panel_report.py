"""The panel's bookkeeping and report: progress estimates, resumable runs, means over seeds, markdown."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from molcloak.pipeline.fit_space import (
    CLASSIFICATION_FEATURE_CANDIDATES,
    DEFAULT_FEATURE_CANDIDATES,
    REGRESSION_FEATURE_CANDIDATES,
)

from .references import LABELS, RANDOM_FORESTS, REFERENCES

# ---------------------------------------------------------------- progress (rough seconds on 2 cores)


class Work:
    """Progress in estimated seconds, so that the bar's rate gives an honest ETA: training dominates,
    then the random forests (per task), the descriptors and the encrypted runs."""

    def __init__(self, config, entries, on_progress):
        self.config, self.on_progress = config, on_progress or (lambda _s, _d, _t: None)
        self.size = {e.name: _rows(Path(config.folder) / e.file) for e in entries}
        self.tasks = {e.name: len(e.targets) for e in entries}
        self.featurized: set[str] = set()
        self.done = 0.0
        self.total = sum(
            self._features(e.name) + len(config.run_seeds) * self._per_seed(e.name) for e in entries
        )

    def _features(self, name: str) -> float:
        return 0.012 * self.size[name] if "references" in self.config.models else 0.0

    def cost(self, name: str, kind: str) -> float:
        n, c = self.size[name], self.config
        if kind == "ref":
            return 0.0025 * n * self.tasks[name] * max(c.n_trees / 500, 0.2)
        if kind == "fit":
            return 0.16 * n + 15
        if kind == "row":
            return 0.2
        if kind == "xgb":
            return 10.0 if c.quick else 40.0
        return 0.0

    def _n_rows(self, name: str) -> int:
        n_test = round(0.2 * self.size[name])
        s = self.config.n_sample
        return n_test if s is None else min(s, n_test)

    def _per_seed(self, name: str) -> float:
        models, total = self.config.models, 0.0
        if "references" in models:
            total += len(REFERENCES) * self.cost(name, "ref")
        if "molcloak" in models or "cml-xgb" in models:
            total += self.cost(name, "fit")
        if "molcloak" in models:
            total += self._n_rows(name) * self.cost(name, "row")
        if "cml-xgb" in models:
            total += self.cost(name, "xgb")
        return total

    def _advance(self, amount: float, status: str) -> None:
        self.done = min(self.total, self.done + amount)
        self.on_progress(status, self.done, self.total)

    def ticker(self, entry, seed: int):
        def tick(status: str, kind: str) -> None:
            amount = self.cost(entry.name, kind)
            if kind == "features" and entry.name not in self.featurized:
                self.featurized.add(entry.name)
                amount = self._features(entry.name)
            self._advance(amount, f"{entry.name} seed {seed}: {status}")

        self.on_progress(f"{entry.name} seed {seed}: starting", self.done, self.total)
        return tick

    def skip(self, entry, seed: int) -> None:
        amount = self._per_seed(entry.name)
        if entry.name not in self.featurized:
            self.featurized.add(entry.name)
            amount += self._features(entry.name)
        self._advance(amount, f"{entry.name} seed {seed}: resumed")

    def finish(self) -> None:
        self.done = self.total
        self.on_progress("done", self.total, self.total)


def _rows(path: Path) -> int:
    with open(path, "rb") as f:
        return max(1, sum(1 for _ in f) - 1)


# ---------------------------------------------------------------- resuming


PARTS = ("references", "molcloak", "cml_xgb")  # a run's parts, each resumable on its own
# runs at this p_error have no p_error in their resume key (they predate it): a fixed value, not fit's default
KEYLESS_P_ERROR = 1e-6


def file_digest(path: Path) -> str:
    """A dataset file's identity in run keys: its content, not its place or time (a fresh checkout of the same
    panel, or a copy elsewhere, reuses earlier runs; an edited file does not). Keys before session 20 held the
    path, size and modification time, so no run of a fresh machine could reuse them. (Hashing the largest panel
    file, hiv.csv, takes milliseconds.)"""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_key(config, entry, seed: int, part: str | None = None) -> str:
    """What one run's numbers depend on (`part`: what that part of the run depends on only); an earlier
    run or part with the same key is reused. The references do not depend on molcloak's settings, so a
    `--models molcloak` run reuses the references of an earlier `--models references` run."""
    parts = {"entry": entry.to_dict(), "file": file_digest(Path(config.folder) / entry.file), "seed": seed}
    if part == "references":
        parts["trees"] = config.n_trees
    else:
        parts.update(sample=config.n_sample, budget_ms=config.budget_ms, quick=config.quick)
        if getattr(config, "latency_check", "raw") != "raw":  # earlier runs checked raw timings
            parts["latency_check"] = config.latency_check
        if getattr(config, "teacher", None):  # runs without a teacher keep their earlier keys
            parts["teacher"] = config.teacher
        if getattr(config, "p_error", KEYLESS_P_ERROR) != KEYLESS_P_ERROR:  # so do runs at 1e-6 (session 13's
            parts["p_error"] = config.p_error  # 0.05 runs were made without this key: they are not reused)
        if getattr(config, "fold_groups", "balanced") != "balanced":  # runs before the option: balanced folds
            parts["fold_groups"] = config.fold_groups
        if getattr(config, "scoring", "simulate") != "simulate":  # runs before the option: simulated
            parts["scoring"] = config.scoring
        if getattr(config, "round_outputs", False):  # runs before the option: exact outputs
            parts["round_outputs"] = True
        if getattr(config, "fit_features", ()):  # runs before the option: fit's default specs only
            parts["fit_features"] = list(config.fit_features)
        if getattr(config, "patience_steps", None) is not None:  # runs before the option: patience in epochs
            parts["patience_steps"] = config.patience_steps
        if getattr(config, "fold_training", "stopped") != "stopped":  # runs before the option: stopped folds
            parts["fold_training"] = config.fold_training
        if not getattr(
            config, "quick", False
        ):  # the feature specs fit tries by default: a run made with other
            parts["fit_candidates"] = list(DEFAULT_FEATURE_CANDIDATES)  # defaults is not reused (session 31)
            if entry.task == "regression":  # and those a regression search adds (session 37): classification
                parts["fit_regression_candidates"] = list(REGRESSION_FEATURE_CANDIDATES)  # keys are unchanged
            else:  # and those a classification search adds (session 40), run with the server's fast path
                parts["fit_classification_candidates"] = list(CLASSIFICATION_FEATURE_CANDIDATES)
            # since session 42 each only on at least as many training molecules as inputs (`extra_offered`)
            parts["fit_extra_offered"] = "inputs <= training molecules"
        if part is None:
            parts.update(trees=config.n_trees, models=sorted(config.models))
        else:  # molcloak, cml_xgb (on molcloak's features)
            parts.update(part=part, fit_minutes=config.fit_minutes)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def reusable_runs(previous: dict | None, config) -> dict[str, dict]:
    """Earlier runs by run key, and earlier run parts by part key."""
    if not previous:
        return {}
    done = {}
    for ds in previous.get("datasets", {}).values():
        for run in ds.get("runs", []):
            if not isinstance(run, dict):
                continue
            if "key" in run:
                done[run["key"]] = run
            for part, key in (run.get("part_keys") or {}).items():
                if run.get(part) is not None:
                    done[key] = {k: run[k] for k in (part, *PART_EXTRAS.get(part, ())) if k in run}
    return done


PART_EXTRAS = {"references": ("imputation", "feature_seconds")}  # run fields that belong to a part


# ---------------------------------------------------------------- result parts


def machine() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in ("molcloak", "concrete-ml", "concrete-python", "torch", "scikit-learn", "rdkit", "xgboost"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "node": platform.node(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_at_start": list(os.getloadavg()),
        "versions": versions,
    }


def primary_metric(task) -> str:
    return "rmse" if task.kind == "regression" else "roc_auc"


def dataset_header(entry, ds) -> dict:
    return {
        "entry": entry.to_dict(),
        "task": ds.task.kind,
        "metric": primary_metric(ds.task),
        "n_molecules": len(ds),
        "n_skipped_rows": len(ds.problems),
        "skipped_rows": [p.skipped() for p in ds.problems[:50]],
        "runs": [],
    }


def _keys(task) -> tuple[str, ...]:
    return ("rmse", "r2") if task.kind == "regression" else ("roc_auc",)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _mean_metrics(dicts: list[dict | None], keys: tuple[str, ...]) -> dict | None:
    dicts = [d for d in dicts if d]
    if not dicts:
        return None
    return {k: _mean(d.get(k) for d in dicts) for k in keys}


def summarize(runs: list[dict], task) -> dict:
    """Means over seeds: molcloak's metrics and costs, each reference, the best plaintext and the gap."""
    keys, primary = _keys(task), primary_metric(task)
    better = min if primary == "rmse" else max
    out: dict = {"metric": primary, "seeds": [r["seed"] for r in runs]}
    ours = [r["molcloak"] for r in runs if r.get("molcloak")]
    runs_ours = [r for r in runs if r.get("molcloak")]
    if ours:
        ex = [r.get("fhe_execute") or {} for r in ours]
        measured = [(r.get("fit") or {}).get("measured") or {} for r in ours]
        normalized = [m["normalized_run_s"] for m in measured if m.get("normalized_run_s") is not None]
        out["molcloak"] = {
            **{
                k: _mean_metrics([r["metrics"].get(k) for r in ours], keys) for k in ("float", "fhe_simulate")
            },
            "fhe_execute": _mean_metrics([e.get("metrics") for e in ex], keys),
            "fhe_execute_molecules": sum(e.get("n_molecules", 0) for e in ex),
            "latency_median_s": _mean((e.get("latency") or {}).get("median_s") for e in ex),
            # fit's final timing of the same circuit divided by the machine's load factor in that minute
            # (runs made before the load gauge existed have none)
            "latency_normalized_s": _mean(normalized),
            "latency_normalized_seeds": len(normalized),
            "keygen_s": _mean(e.get("keygen_s") for e in ex),
            "evaluation_key_bytes": _mean(
                e.get("evaluation_key_bytes") or r["circuit"].get("serialized_evaluation_key_bytes")
                for e, r in zip(ex, ours)
            ),
            "pbs": _mean(r["pbs"] for r in ours),
            "max_bits": max(r["max_bits"] for r in ours),
        }
    refs = {
        name: _mean_metrics([(r.get("references") or {}).get(name, {}).get("metrics") for r in runs], keys)
        for name in REFERENCES
    }
    refs = {k: v for k, v in refs.items() if v and v.get(primary) is not None}
    if refs:
        out["references"] = refs
        for field, names in (("best_reference", list(refs)), ("best_random_forest", RANDOM_FORESTS)):
            names = [n for n in names if n in refs]
            if names:
                best = better(names, key=lambda n: refs[n][primary])
                out[field] = {"name": best, "label": LABELS[best], primary: refs[best][primary]}
    xgb = [r["cml_xgb"] for r in runs if r.get("cml_xgb") and not r["cml_xgb"].get("skipped")]
    if xgb:
        out["cml_xgb"] = {
            "fhe_simulate": _mean_metrics([x["metrics"].get("fhe_simulate") for x in xgb], keys),
            "latency_median_s": _mean(x["latency"].get("median_s") for x in xgb),
        }
    if ours and "best_reference" in out:
        m = out["molcloak"]
        # the references are scored on the whole test split: so is the gap, FHE-executed when every test
        # molecule was executed, else FHE-simulated
        everything = all(e.get("n_molecules") == r["n_test"] for e, r in zip(ex, runs_ours))
        order = ("fhe_execute", "fhe_simulate", "float") if everything else ("fhe_simulate", "float")
        vs = next(k for k in order if m[k] and m[k][primary] is not None)
        value, best = m[vs][primary], out["best_reference"][primary]
        out["gap"] = {"vs": vs, "difference": value - best, "relative": value / best - 1 if best else None}
    return out


# ---------------------------------------------------------------- the table


def _cell(m: dict | None, primary: str) -> str:
    if not m or m.get(primary) is None:
        return "-"
    if primary == "rmse":
        return f"{m['rmse']:.3f} (R² {m['r2']:.2f})" if m.get("r2") is not None else f"{m['rmse']:.3f}"
    return f"{m[primary]:.3f}"


def _num(v, digits: int, div: float = 1.0) -> str:
    return "-" if v is None else f"{v / div:.{digits}f}"


def _normalized(ours: dict) -> str:
    n = ours.get("latency_normalized_seeds")
    return f"{ours['latency_normalized_s']:.3f} ({n})" if n else "-"


def _gap(gap: dict | None, primary: str) -> str:
    if not gap:
        return "-"
    sim = " (sim)" if gap["vs"] != "fhe_execute" else ""
    if primary == "rmse":
        return f"{gap['relative']:+.0%} RMSE{sim}" if gap["relative"] is not None else "-"
    return f"{gap['difference']:+.3f}{sim}"


COLUMNS = (
    "dataset", "task (metric)", "test mols", "seeds", "molcloak float", "FHE-sim", "FHE-exec (n)",
    "RF ECFP4", "RF RDKit2D", "RF both", "linear", "best plaintext", "gap", "latency s",
    "normalized s (seeds)", "keygen s", "keys MB", "PBS", "max bits",
)  # fmt: skip


def markdown(result: dict) -> str:
    """One row per dataset: means over seeds (FHE-exec n = molecules executed over all seeds)."""
    xgb = any("cml_xgb" in d.get("mean", {}) for d in result["datasets"].values())
    cols = COLUMNS + (("CML XGB sim", "XGB latency s") if xgb else ())
    m = result["machine"]
    end = m.get("load_avg_at_end")
    lines = [
        f"`{result['command']}`  ",
        f"{result['started']} - {result.get('finished', '(unfinished)')}, {m['node']}, {m['cpus']} cores, "
        f"load average {m['load_avg_at_start'][0]:.1f} at start, {f'{end[0]:.1f}' if end else '?'} at end; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for name, d in result["datasets"].items():
        s, primary = d.get("mean") or {}, d["metric"]
        ours, refs = s.get("molcloak") or {}, s.get("references") or {}
        runs = d["runs"]
        best = s.get("best_reference")
        exec_n = ours.get("fhe_execute_molecules")
        cells = [
            name,
            f"{d['task']} ({'RMSE' if primary == 'rmse' else 'ROC-AUC'})",
            str(runs[0]["n_test"]) if runs else "-",
            ",".join(map(str, s.get("seeds", []))),
            _cell(ours.get("float"), primary),
            _cell(ours.get("fhe_simulate"), primary),
            _cell(ours.get("fhe_execute"), primary) + (f", n={exec_n}" if exec_n else ""),
            *(_cell(refs.get(r), primary) for r in REFERENCES),
            f"{best[primary]:.3f} ({best['label']})" if best else "-",
            _gap(s.get("gap"), primary),
            _num(ours.get("latency_median_s"), 3),
            _normalized(ours),
            _num(ours.get("keygen_s"), 2),
            _num(ours.get("evaluation_key_bytes"), 1, 1e6),
            _num(ours.get("pbs"), 0),
            str(ours.get("max_bits", "-")),
        ]
        if xgb:
            x = s.get("cml_xgb") or {}
            cells += [_cell(x.get("fhe_simulate"), primary), _num(x.get("latency_median_s"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "Means over the seeds of the scaffold split (test fraction 0.2). molcloak: "
        + (_source(result) or "not run")
        + "; FHE-exec on the n molecules executed over all seeds (all test molecules, or a seeded sample). "
        "Gap: molcloak's FHE-executed metric minus the best plaintext reference's, on the whole test split "
        "(regression: RMSE relative); (sim) = FHE-simulated, when only a sample was executed. "
        "Latency: median server-side run of one encrypted molecule, as measured (raw); normalized: fit's "
        "final timing of the same circuit divided by the machine's load factor in the same minute "
        "(`latency.LoadGauge`; mean over the seeds that have it), the estimate for a quiet machine.",
    ]
    runs = [r for d in result["datasets"].values() for r in d["runs"]]
    resumed = sum(bool(r.get("resumed")) for r in runs)
    if resumed:
        notes.append(
            f"{resumed} of {len(runs)} runs were resumed from an earlier JSON of the same settings; "
            "each run records its own finish time and load average there."
        )
    left = result["panel"].get("left_out") or {}
    if left:
        notes.append("Not in the table: " + "; ".join(f"{f} ({why})" for f, why in left.items()) + ".")
    return "\n".join(lines + notes) + "\n"


def _source(result: dict) -> str | None:
    """How molcloak's models were made; per dataset when merged runs differ (e.g. one distilled)."""
    sources = {
        name: sorted({r["molcloak"]["source"] for r in d["runs"] if r.get("molcloak")})
        for name, d in result["datasets"].items()
    }
    distinct = sorted({s for v in sources.values() for s in v})
    if len(distinct) <= 1:
        return distinct[0] if distinct else None
    base = os.path.commonprefix(distinct).rstrip("; ")  # e.g. "molcloak fit (...)"; the rest per dataset
    extra = {name: [x[len(base) :].strip("; ") for x in v] for name, v in sources.items()}
    return (
        base
        + "; "
        + ", ".join(
            f"{name}: {' / '.join(e or 'no teacher' for e in v)}" for name, v in extra.items() if any(v)
        )
    )


def front(candidates: list[dict]) -> list[dict]:
    """The variants no other variant beats on both validation metric and latency (timed when timed),
    fastest first."""

    def latency(c):  # normalized to a quiet machine when the search measured the load factor
        timed = c.get("run_normalized_s") if c.get("load_factor") else c.get("run_s")
        return timed if timed is not None else c["predicted_s"]

    pool = sorted(
        (c for c in candidates if c.get("valid") is not None and np.isfinite(c["valid"])),
        key=lambda c: (latency(c), -c["valid"]),
    )
    kept, best = [], -np.inf
    for c in pool:
        if c["valid"] > best:
            kept.append(c)
            best = c["valid"]
    return kept


def frontier_markdown(result: dict) -> str:
    """Per dataset and seed: the front `molcloak fit` explored (validation metric against latency), with
    the chosen variant marked and its test metrics; empty when no molcloak run holds a search."""
    lines = []
    for name, d in result["datasets"].items():
        for run in d["runs"]:
            fit = (run.get("molcloak") or {}).get("fit")
            if not fit:
                continue
            chosen = fit["chosen"]["label"]
            lines += [
                "",
                f"**{name}, seed {run['seed']}**: {fit['n_candidates']} variants"
                + (", stopped by the time cap" if fit.get("stopped_early") else "")
                + (f", inner folds: {fit['folds_used']}" if fit.get("folds_used") else "")
                + f"; chosen `{chosen}`{_final_timing(fit)}",
                "",
                "| features | network, compile | valid | valid float | inner folds (molecules) | PBS | max bits "
                "| keys MB | timed ms | load | normalized ms | predicted ms |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            rows = front(fit["candidates"])
            if chosen not in {c["label"] for c in rows}:
                rows.append(fit["chosen"])
            for c in rows:
                features, _, rest = c["label"].partition(" ")
                mark = " (chosen)" if c["label"] == chosen else ""
                lines.append(
                    f"| `{features}` | {rest}{mark} | {c['valid']:.3f} | {c['float_valid']:.3f} | {_folds(c)} | {c['pbs']} | "
                    f"{c['max_bits']} | {c['evaluation_key_bytes'] / 1e6:.0f} | {_num(_ms(c.get('run_s')), 0)} | "
                    f"{_load(c.get('load_factor'))} | {_num(_ms(c.get('run_normalized_s')), 0)} | "
                    f"{_num(_ms(c['predicted_s']), 0)} |"
                )
    if not lines:
        return ""
    return "\n".join(["", "### The front `molcloak fit` explored (inner validation part)", *lines]) + "\n"


def _folds(c: dict) -> str:
    """'0.853 (2,316)': the mean over the inner folds the choice compared, and the molecules they hold."""
    if c.get("cv") is None:
        return "-"
    sizes = c.get("cv_sizes")
    return f"{c['cv']:.3f}" + (f" ({sum(sizes):,})" if sizes else f" ({len(c.get('cv_folds', []))} folds)")


def _load(factor: float | None) -> str:
    return "-" if factor is None else f"{factor:.1f}x"


def _final_timing(fit: dict) -> str:
    """'; final timing 312 ms, load factor 1.6x -> 195 ms normalized (budget checked normalized)'."""
    m = fit.get("measured") or {}
    if m.get("median_run_s") is None:
        return ""
    text = f"; final timing {m['median_run_s'] * 1e3:.0f} ms"
    if m.get("load_factor") is not None and fit.get("latency_check") == "normalized":
        text += f", load factor {m['load_factor']:.1f}x -> {m['normalized_run_s'] * 1e3:.0f} ms normalized"
    return text + f" (budget checked {fit.get('latency_check', 'raw')})"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or not np.isfinite(seconds) else seconds * 1e3
