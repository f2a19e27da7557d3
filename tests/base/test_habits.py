"""The house rules the linters do not check, checked over the source tree.

- No ``assert`` in library code: it vanishes under ``python -O``, so a check that
  matters raises an error of the tree instead.
- No import of a safeshard module inside a function: imports sit at the top, where
  the layers contract (``lint-imports``) sees them, so none can hide an import loop.
  (Optional heavy libraries, torch, numpy, transformers, fsspec, are imported where used.)
- ``print`` and ``exit`` live only in the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import safeshard

SRC = Path(safeshard.__file__).parent
MODULES = sorted(SRC.rglob("*.py"))


def _rel(p: Path) -> str:
    return str(p.relative_to(SRC.parent))


def test_the_tree_is_where_the_tests_look() -> None:
    assert len(MODULES) > 50
    assert {p.parent.name for p in MODULES} >= {"format", "io", "ops", "runtime", "cli"}


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_assert_in_library_code(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    assert found == [], f"{_rel(path)}: assert at lines {found}"


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_safeshard_import_inside_a_function(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.level or (node.module or "").split(".")[0] == "safeshard")
            ) or (
                isinstance(node, ast.Import)
                and any(a.name.split(".")[0] == "safeshard" for a in node.names)
            ):
                found.append(node.lineno)
    assert found == [], f"{_rel(path)}: safeshard imported inside a function at lines {found}"


@pytest.mark.parametrize("path", [p for p in MODULES if "cli" not in p.parts], ids=_rel)
def test_print_and_exit_only_in_the_cli(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Name)
        and n.func.id in ("print", "exit", "quit")
    ]
    found += [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr == "exit" and getattr(n.value, "id", "") == "sys"
    ]
    assert found == [], f"{_rel(path)}: print/exit at lines {found}"
