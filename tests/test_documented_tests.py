"""The tests the docs cite exist, and every promise of docs/SEMANTICS.md cites one.

A page saying ``tests/test_x.py::test_y`` proves a claim is only worth
something while ``test_y`` is there: a renamed or removed test must take
the citation with it. docs/SEMANTICS.md is the contract of the mount, so
each of its statements (a paragraph, a list item, a table row) names the
test that proves it, or the benchmark that measures it.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
CITATION = re.compile(r"tests/([\w/]+\.py)::(\w+)")
SEMANTICS = ROOT / "docs" / "SEMANTICS.md"
# A statement cites a test, a benchmark, or one of these checks by hand.
PROOF = re.compile(r"tests/\w+\.py|benchmarks/\w+\.py")


@functools.cache
def _defined_tests(path: Path) -> frozenset[str]:
    """The test functions (module level or in classes) that ``path`` defines."""
    tree = ast.parse(path.read_text())
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    )


def _citations() -> list[tuple[str, str, str]]:
    found = {
        (page.relative_to(ROOT).as_posix(), m.group(1), m.group(2))
        for page in PAGES
        for m in CITATION.finditer(page.read_text())
    }
    return sorted(found)


def test_the_docs_cite_tests() -> None:
    assert len(_citations()) > 100  # the pattern still finds the citations


def test_every_cited_test_module_exists() -> None:
    """A bare ``tests/x.py`` (no test named) must exist too."""
    missing = sorted(
        f"{page.relative_to(ROOT)}: {m.group(0)}"
        for page in PAGES
        for m in re.finditer(r"tests/[\w/]+\.py", page.read_text())
        if not (ROOT / m.group(0)).is_file()
    )
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("page,module,name", _citations())
def test_every_cited_test_exists(page: str, module: str, name: str) -> None:
    path = ROOT / "tests" / module
    assert path.is_file(), f"{page} cites tests/{module}, which does not exist"
    assert name in _defined_tests(path), f"{page} cites tests/{module}::{name}, not defined there"


def _statements(text: str) -> list[str]:
    """The statements of a page: table rows (not headers or rules), list items
    and paragraphs; headings, fenced blocks and a paragraph that only leads
    into what follows (ending in ':' or a bold title alone) are not."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    statements: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip().splitlines()
        if not lines or lines[0].startswith("#"):
            continue
        if lines[0].startswith("|"):
            rows = [line for line in lines[2:] if line.startswith("|")]  # after header and rule
            statements.extend(rows)
            continue
        items = re.split(r"\n(?=\s*(?:[-*]|\d+\.) )", "\n".join(lines))
        statements.extend(items)
    return [s for s in statements if not re.fullmatch(r"\*\*[^*]+\*\*|.*:\s*", s.strip(), re.S)]


def test_every_semantics_statement_cites_its_proof() -> None:
    uncited = [s[:120] for s in _statements(SEMANTICS.read_text()) if not PROOF.search(s)]
    assert not uncited, "statements of docs/SEMANTICS.md that cite no test:\n" + "\n".join(uncited)
