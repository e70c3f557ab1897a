"""Report rendering shared by the audit, explain and screen reports: one list of blocks -> Markdown and
self-contained HTML (PNG figures embedded, RDKit SVG drawings inlined).

A block is a tuple: ("h1" | "h2" | "h3", text), ("p", text), ("img", PNG path relative to the report
directory, alt text), ("svg", SVG path relative to the report directory, alt text) or
("table", header cells, rows of cells)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np


def json_default(o):
    """`json.dumps(..., default=json_default)`: numpy scalars as Python numbers."""
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o)}")


def render_markdown(blocks: list[tuple]) -> str:
    """The blocks as Markdown; figures are linked by their relative paths."""
    lines = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + rest[0], ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind in ("img", "svg"):
            lines += [f"![{rest[1]}]({rest[0]})", ""]
        else:
            header, rows = rest
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
    return "\n".join(lines)


def render_html(blocks: list[tuple], out: Path, title: str = "molcloak audit") -> str:
    """The blocks as one self-contained HTML page: PNG figures (read from `out`, the report directory)
    embedded as data URLs, SVG drawings inlined."""
    e = html.escape
    parts = [
        (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse;margin:.5em 0}"
            "td,th{border:1px solid #bbb;padding:.2em .5em;text-align:right}img{max-width:100%}</style></head><body>"
        )
    ]
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{e(rest[0])}</p>")
        elif kind == "svg":  # drawn by RDKit in this process: inlined as vector graphics
            svg = (out / rest[0]).read_text()
            parts.append("<p>" + svg[svg.index("<svg") :] + "</p>")
        elif kind == "img":
            data = base64.b64encode((out / rest[0]).read_bytes()).decode()
            parts.append(f"<p><img alt='{e(rest[1])}' src='data:image/png;base64,{data}'></p>")
        else:
            header, rows = rest
            parts.append(
                "<table><tr>"
                + "".join(f"<th>{e(h)}</th>" for h in header)
                + "</tr>"
                + "".join(
                    "<tr>" + "".join(f"<td>{e(c.replace('**', ''))}</td>" for c in row) + "</tr>"
                    for row in rows
                )
                + "</table>"
            )
    return "\n".join(parts + ["</body></html>"])
