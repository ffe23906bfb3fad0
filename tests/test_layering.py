"""The package's import graph: no cycles, libraries below stages, no underscore names across modules.

Parsed from the source (every ``import`` statement, at module level or inside a function), so a lazy
import that would close a cycle or break the layering fails here too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mfdetr"

# what each top-level part may import (besides itself); "cli" is the top and nothing imports it
LIBRARIES = frozenset({"errors", "utils", "data", "detectors", "ops", "model", "cache"})
ALLOWED = {
    "__init__": set(),
    "__main__": {"cli"},
    "errors": set(),
    "utils": {"errors"},
    "data": {"errors", "utils"},
    "ops": {"errors", "utils"},
    "detectors": {"errors", "utils", "data"},
    "model": {"errors", "utils", "ops", "detectors"},  # never cache/
    "cache": {"errors", "utils", "detectors"},
    "extract": set(LIBRARIES),
    "train": set(LIBRARIES),
    "evaluate": set(LIBRARIES),
    "pipeline": set(LIBRARIES) | {"extract", "train", "evaluate"},
    "cli": set(LIBRARIES) | {"extract", "train", "evaluate", "pipeline"},
}
for _deps in ALLOWED.values():
    _deps.add("__init__")  # mfdetr.__version__


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every mfdetr import of a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "mfdetr"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "mfdetr":
                continue
            names = [a.name for a in node.names]
            # `from pkg import submodule` is an import of the submodule
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in known]
            if subs:
                out += [(s, [], node.lineno) for s in subs]
                names = [n for n in names if f"{mod}.{n}" not in known]
                if not names:
                    continue
            out.append((mod, names, node.lineno))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_cycle(graph):
    edges = {m: {t for t, _, _ in imps if t in graph and t != m} for m, imps in graph.items()}
    # a package __init__ re-exporting its own submodules is the package's face, not a dependency
    for m in edges:
        if (PKG.parent / m.replace(".", "/") / "__init__.py").exists():
            edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layering(graph):
    bad = []
    for m, imps in graph.items():
        src = _part(m)
        for t, _, line in imps:
            dst = _part(t)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{m}:{line} imports {t} ({src} may not import {dst})")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules(graph):
    bad = [
        f"{m}:{line} imports {n} from {t}"
        for m, imps in graph.items()
        for t, names, line in imps
        if t != m
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def test_the_rules_can_fail(tmp_path, monkeypatch):
    """The checker itself: a planted cycle, a layering break and a private import are all caught."""
    pkg = tmp_path / "mfdetr"
    (pkg / "model").mkdir(parents=True)
    (pkg / "cache").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "cache" / "__init__.py").write_text("")
    (pkg / "model" / "a.py").write_text("from mfdetr.cache.b import _x\n")
    (pkg / "cache" / "b.py").write_text("import mfdetr.model.a\n_x = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    mods = _modules()
    g = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycle(g)
    with pytest.raises(AssertionError, match="model may not import cache"):
        test_layering(g)
    with pytest.raises(AssertionError, match="imports _x"):
        test_no_private_names_across_modules(g)
