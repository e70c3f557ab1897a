"""The layers of DESIGN.md, checked on the import graph of the source tree (every import, lazy ones too).

core (molcloak.pipeline, flat)  <-  serving (molcloak.pipeline.serving)  <-  app, evaluation  <-  cli
models: pure network definitions, imported by the core, importing nothing of molcloak.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "pipeline": "molcloak.pipeline",
    "models": "molcloak.models",
    "app": "molcloak.app",
    "evaluation": "molcloak.evaluation",
}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return subs or [target]


def _imports(module: str, path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out |= set(_resolve(module, path, node))
    return {_owner(name) for name in out if name.startswith("molcloak.")} - {None, module}


def _owner(name: str) -> str | None:
    """The project module an imported name lives in (`molcloak.pipeline.data.Dataset` -> its module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def layer(module: str) -> str:
    for prefix, name in (
        ("molcloak.pipeline.serving", "serving"),
        ("molcloak.pipeline.cli", "cli"),
        ("molcloak.pipeline", "core"),
        ("molcloak.models", "models"),
        ("molcloak.app", "app"),
        ("molcloak.evaluation", "evaluation"),
    ):
        if module == prefix or module.startswith(prefix + "."):
            return name
    raise AssertionError(module)


ALLOWED = {  # layer -> layers it may import (besides itself)
    "models": set(),
    "core": {"models"},
    "serving": {"core"},
    "app": {"core", "serving"},
    "evaluation": {"core", "serving"},
    "cli": {"core", "serving", "models", "app", "evaluation"},
}


def test_the_tree_has_the_layers():
    layers = {layer(m) for m in MODULES}
    assert layers == set(ALLOWED)
    assert len(MODULES) > 40  # the walk found the source tree


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    bad = sorted(
        m for m in GRAPH[module] if layer(m) != layer(module) and layer(m) not in ALLOWED[layer(module)]
    )
    assert not bad, (
        f"{module} ({layer(module)}) imports {bad}; {layer(module)} may import only {sorted(ALLOWED[layer(module)])}"
    )


def test_no_import_cycles():
    """No module reaches itself through imports (lazy imports inside functions count too)."""
    cycles = []
    for start in sorted(GRAPH):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in GRAPH.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join(trail + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:10])


def test_modules_stay_small():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 500}
    assert not big, f"modules over 500 lines: {big}; split them where a second concept lives"


def test_every_exception_class_lives_in_errors():
    from molcloak.pipeline import errors

    elsewhere = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases
            ):
                if module != errors.__name__:
                    elsewhere.append(f"{module}.{node.name}")
    assert not elsewhere, f"exception classes outside pipeline/errors.py: {elsewhere}"


def test_the_checker_sees_cycles_and_lazy_imports(tmp_path):
    """The graph builder itself: a relative lazy import inside a function is an edge."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from .bundle import Checkpoint\n    from . import networks\n")
    assert _imports("molcloak.pipeline.x", path) == {"molcloak.pipeline.bundle", "molcloak.pipeline.networks"}
