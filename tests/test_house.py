"""The package's shape: layered subpackages without import cycles, short functions, few parameters."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from .conftest import ROOT

SRC = ROOT / "src" / "vlm_autoquant"
# The layers, bottom up: a module may import only from its own layer or the ones below.
LAYERS = (
    "core",
    "tracking_store",
    "tracking",
    "model",
    "search",
    "plan",
    "run",
    "exporter",
    "api",
    "cli",
    "__init__",
)
# Functions that still take more than 6 parameters (to become argument objects): the list may
# only shrink.


def _layer(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_layers(path: Path) -> set[str]:
    """The layers a module imports from, counting the imports made inside functions."""
    depth = len(path.relative_to(SRC).parts) - 1
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        up = node.level - 1
        assert up <= depth, f"{path}: import above the package"
        parts = list(path.relative_to(SRC).parts[: depth - up]) + (node.module or "").split(".")
        parts = [p for p in parts if p]
        names = [parts[0]] if parts else [a.name for a in node.names]
        out |= {n for n in names if n in LAYERS}
    return out


def test_every_import_points_down_the_layers():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        me = _layer(path)
        for other in _imported_layers(path):
            if LAYERS.index(other) > LAYERS.index(me):
                wrong.append(f"{path.relative_to(SRC)} imports {other}")
    assert not wrong


def _module_imports(path: Path) -> set[Path]:
    """The package's own modules `path` imports (a name that is a module counts as one)."""
    depth = len(path.relative_to(SRC).parts) - 1
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = SRC.joinpath(
            *path.relative_to(SRC).parts[: depth - node.level + 1], *(node.module or "").split(".")
        )
        found = [_module(base / a.name) for a in node.names]
        if not all(found):  # a name defined in base itself: base is imported
            found.append(_module(base))
        out |= {f for f in found if f is not None and f != path}
    return out


def _module(target: Path) -> Path | None:
    for f in (target.with_suffix(".py"), target / "__init__.py"):
        if f.is_file():
            return f
    return None


def test_no_module_imports_itself_through_others():
    graph = {p: _module_imports(p) for p in SRC.rglob("*.py")}
    done: set[Path] = set()

    def visit(p: Path, path: tuple[Path, ...]) -> None:
        assert p not in path, " -> ".join(str(x.relative_to(SRC)) for x in (*path, p))
        if p not in done:
            for q in graph[p]:
                visit(q, (*path, p))
            done.add(p)

    for p in sorted(graph):
        visit(p, ())


def test_functions_are_short_and_take_few_parameters():
    long, wide = [], set()
    for path in sorted(SRC.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = fn.args
            n = (
                len(a.posonlyargs)
                + len(a.args)
                + len(a.kwonlyargs)
                + bool(a.vararg)
                + bool(a.kwarg)
                - (bool(a.args) and a.args[0].arg in ("self", "cls"))
            )
            where = f"{path.relative_to(SRC).as_posix()}:{fn.name}"
            if fn.end_lineno - fn.lineno + 1 > 50:
                long.append(where)
            if n > 6:
                wide.add(where)
    assert not long, long
    assert not wide, sorted(wide)


def _uncommented_inner_imports(text: str) -> list[int]:
    """Lines of the imports made inside functions that carry no comment on any of their lines."""
    commented = {
        t.start[0] for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT
    }
    found = set()
    for fn in ast.walk(ast.parse(text)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                if not set(range(node.lineno, (node.end_lineno or node.lineno) + 1)) & commented:
                    found.add(node.lineno)
    return sorted(found)


def test_an_inner_import_says_why_it_is_not_at_the_top():
    """An import inside a function keeps a cheap path cheap, and its line says which."""
    bare = [
        f"{path.relative_to(SRC).as_posix()}:{line}"
        for path in sorted(SRC.rglob("*.py"))
        for line in _uncommented_inner_imports(path.read_text())
    ]
    assert not bare, bare


def test_the_inner_import_check_sees_a_bare_one():
    text = (
        "import os\n\n"
        "def f():\n"
        "    import json  # json: a reason\n"
        "    from torch import (  # torch: a reason\n"
        "        nn,\n"
        "    )\n"
        "    import re\n\n"
        "    def g():\n"
        "        from pathlib import Path\n"
    )
    assert _uncommented_inner_imports(text) == [8, 11]
