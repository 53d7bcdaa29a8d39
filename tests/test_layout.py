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


def test_the_rest_of_dgfs_uses_deep_mode_through_its_interface() -> None:
    """Outside dgfs/deep/, only the names deep/__init__.py exports are used."""
    import dgfs.deep

    wrong = []
    for path in sorted((ROOT / "dgfs").rglob("*.py")):
        if path.parent.name == "deep":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wrong += [
                    f"{path.relative_to(ROOT)} imports {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("dgfs.deep.")
                ]
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("dgfs.deep.")
            ):
                wrong.append(f"{path.relative_to(ROOT)} imports {node.module}")
            elif isinstance(node, ast.ImportFrom) and node.module == "dgfs.deep":
                wrong += [
                    f"{path.relative_to(ROOT)} imports dgfs.deep.{alias.name}"
                    for alias in node.names
                    if alias.name not in dgfs.deep.__all__
                ]
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "deep"
                and node.attr not in dgfs.deep.__all__
            ):
                wrong.append(f"{path.relative_to(ROOT)} uses deep.{node.attr}")
    assert not wrong, "\n".join(wrong)
