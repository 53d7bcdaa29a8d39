"""The size limits the project keeps its code to.

A module of one job stays short enough to read at once, and a function
short enough to see whole; when one grows past these, it has grown a
second job, which goes into a part of its own (README.md, "Layout").
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dgfs"
MODULE_LINES = 700
FACADE_LINES = 600  # fs/filesystem.py: the thin facade the FUSE adapter calls
FUNCTION_LINES = 60


def _modules() -> list[Path]:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50  # the walk still finds the package
    return modules


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_over_the_limit() -> None:
    long = {
        str(path.relative_to(PACKAGE)): _lines(path)
        for path in _modules()
        if _lines(path) > MODULE_LINES
    }
    assert not long, f"modules over {MODULE_LINES} lines: {long}"


def test_the_fuse_facade_stays_thin() -> None:
    assert _lines(PACKAGE / "fs" / "filesystem.py") < FACADE_LINES


def test_no_function_is_over_the_limit() -> None:
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)"
        for path in _modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (length := (node.end_lineno or node.lineno) - node.lineno + 1) > FUNCTION_LINES
    ]
    assert not long, "functions over the limit:\n" + "\n".join(long)
