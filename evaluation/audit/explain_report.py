"""Explanations as files and report blocks: atom-contribution maps (RDKit similarity-map style, PNG and
SVG), bar charts of group contributions and of permutation importance, explain.json/md/html.

`explain_files` draws the figures of an explanation dict, `explain_blocks` turns it into the blocks
`render.render_markdown` / `render.render_html` render; both serve `molcloak explain` and `molcloak audit --explain`.
"""

from __future__ import annotations

import json
from pathlib import Path

from molcloak.pipeline.explain import draw_atom_map, top_atoms, top_groups

from .plots import ci, fmt
from .render import json_default, render_html, render_markdown

TOP = 12  # groups shown per molecule (largest |contribution|)


def _name(mol: dict) -> str:
    return f"row-{mol['id']}"


def explain_files(explain: dict, out: Path) -> dict[str, Path]:
    """Draw every figure of an explanation under out/plots and out/maps; {key: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, Path] = {}
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for mol in explain.get("molecules", []):
        key = _name(mol)
        if "atom_map" in mol and "smiles" in mol:
            (out / "maps").mkdir(parents=True, exist_ok=True)
            png, svg = draw_atom_map(mol["smiles"], mol["atom_map"]["weights"])
            files[f"map-{key}"] = out / "maps" / f"{key}.svg"
            files[f"map-{key}"].write_text(svg)
            (out / "maps" / f"{key}.png").write_bytes(png)
        shown = top_groups(mol["groups"], TOP)
        if shown:
            fig = _bars(
                plt,
                [g["name"] for g in shown],
                [g["contribution"] for g in shown],
                None,
                f"contribution to {mol['output']} (prediction - prediction with the group neutral)",
            )
            files[f"bars-{key}"] = _save(plt, fig, out / "plots" / f"contributions-{key}.png")
    imp = explain.get("importance")
    if imp and imp["groups"]:
        rows = imp["groups"][:20]
        fig = _bars(
            plt,
            [r["name"] for r in rows],
            [r["value"] or 0.0 for r in rows],
            rows,
            f"permutation importance: loss of {imp['metric']} when the group is shuffled (95% CI)",
        )
        files["importance"] = _save(plt, fig, out / "plots" / "importance.png")
    return files


def _bars(plt, names, values, intervals, title):
    fig, ax = plt.subplots(figsize=(8, 1 + 0.35 * len(names)))
    err = None
    if intervals and all(r.get("low") is not None for r in intervals):
        err = [
            [max(v - r["low"], 0) for v, r in zip(values, intervals)],
            [max(r["high"] - v, 0) for v, r in zip(values, intervals)],
        ]
    colors = ["tab:green" if v >= 0 else "tab:red" for v in values]
    ax.barh(names, values, xerr=err, color=colors, capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return fig


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def explain_blocks(explain: dict, files: dict[str, str]) -> list[tuple]:
    """Report blocks (see render.render_markdown) of an explanation; `files`: figure paths relative to the report."""
    cost = explain["cost"]
    b: list[tuple] = [
        ("h2", "Explanations (private, from encrypted runs only)"),
        (
            "p",
            (
                f"Per-molecule attributions by perturbation: each input group replaced by its neutral value "
                f"({explain['neutral']}); contribution = prediction - prediction with the group neutral. "
                f"{cost['molecules']} molecules, {cost['groups']} groups, {cost['encrypted_runs']} encrypted runs "
                f"({cost['skipped_unchanged']} perturbations left the model's input unchanged: contribution 0, not run)."
            ),
        ),
    ]
    for mol in explain["molecules"]:
        key = _name(mol)
        what = mol.get("smiles") or ", ".join(
            f"{k}={v:g}" for k, v in list(mol.get("features", {}).items())[:4]
        )
        pred = ", ".join(f"{k} {v:.3f}" for k, v in mol["prediction"].items())
        b += [
            ("h3", f"row {mol['id']}: {what}"),
            ("p", f"prediction: {pred}; explained output: {mol['output']}."),
        ]
        if f"map-{key}" in files:
            am = mol["atom_map"]
            b += [
                ("svg", files[f"map-{key}"], f"atom map {key}"),
                (
                    "p",
                    (
                        f"Atom map of {am['output']} (green raises it, pink lowers it): the weights sum to "
                        f"{am['total']:+.4f}, the change when every fingerprint environment is off; "
                        f"single-atom occlusions explain {sum(am['occlusion']):+.4f}, the rest "
                        f"({am['unexplained_by_single_atoms']:+.4f}) is shared equally by the atoms."
                    ),
                ),
            ]
        if f"bars-{key}" in files:
            b.append(("img", files[f"bars-{key}"], f"contributions {key}"))
        b.append(
            (
                "table",
                ["group", "kind", "contribution"],
                [[g["name"], g["kind"], f"{g['contribution']:+.4f}"] for g in top_groups(mol["groups"], TOP)],
            )
        )
    imp = explain.get("importance")
    if imp:
        b += [
            ("h2", "Permutation importance"),
            (
                "p",
                (
                    f"{imp['metric']} on {imp['rows']} labelled rows is {fmt(imp['baseline'])}; each group's "
                    f"rows were shuffled ({imp['repeats']} permutation(s), seed {imp['seed']}) and scored "
                    f"encrypted ({imp['encrypted_runs']} runs). Importance = loss of {imp['metric']}; 95% CI "
                    f"from {imp['bootstrap']} paired bootstrap replicates."
                ),
            ),
        ]
        if "importance" in files:
            b.append(("img", files["importance"], "importance"))
        b.append(
            (
                "table",
                ["group", "kind", "model inputs", "importance", "95% CI"],
                [[r["name"], r["kind"], str(r["inputs"]), _signed(r["value"]), ci(r)] for r in imp["groups"]],
            )
        )
    return b


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.4f}"


def write_explain(result: dict, out: Path) -> dict[str, str]:
    """explain.json, explain.md and explain.html (with the figures) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    figures = explain_files(result, out)
    rel = {k: p.relative_to(out).as_posix() for k, p in figures.items()}
    m = result["model"]
    blocks = [
        ("h1", f"Private explanation of model {m['name']}"),
        ("p", f"Model {m['name']} ({m['task']['kind']}) run on ciphertexts at {m['where']} ({m['source']})."),
    ]
    blocks += explain_blocks(result, rel)
    files = {"json": out / "explain.json", "markdown": out / "explain.md", "html": out / "explain.html"}
    files["json"].write_text(json.dumps(result, indent=1, default=json_default))
    files["markdown"].write_text(render_markdown(blocks))
    files["html"].write_text(render_html(blocks, out, "molcloak explain"))
    return {k: str(v) for k, v in {**files, **figures}.items()}


def summary_lines(explain: dict) -> list[str]:
    """The explanation as a person reads it in a terminal."""
    lines = []
    for mol in explain["molecules"]:
        top = top_groups(mol["groups"], 5)
        atoms = top_atoms(mol["groups"], 3)
        parts = ", ".join(f"{g['name']} {g['contribution']:+.3f}" for g in top + atoms)
        lines.append(
            f"row {mol['id']} {mol.get('smiles', '')} {mol['output']}={mol['prediction'][mol['output']]:.3f}: {parts}"
        )
    imp = explain.get("importance")
    if imp:
        best = ", ".join(f"{r['name']} {_signed(r['value'])} {ci(r)}" for r in imp["groups"][:5])
        lines.append(f"permutation importance ({imp['metric']} lost): {best}")
    return lines
