"""Which tree may import which: ``dgfs`` imports neither tests nor benchmarks;
``testsupport`` (what both share) imports neither; benchmarks never import
tests (what they share belongs in testsupport)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "dgfs": ("tests", "benchmarks", "testsupport"),
    "testsupport": ("tests", "benchmarks"),
    "benchmarks": ("tests",),
}


def _imported(path: Path) -> set[str]:
    """The top-level packages ``path`` imports, wherever in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.partition(".")[0])
    return names


@pytest.mark.parametrize("tree", sorted(FORBIDDEN))
def test_a_tree_imports_only_what_it_may(tree: str) -> None:
    files = sorted((ROOT / tree).rglob("*.py"))
    assert files
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in _imported(path) & set(FORBIDDEN[tree])
    }
    assert not wrong, "\n".join(sorted(wrong))
