"""The environment is read in one module, and every variable it reads is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dgfs import environment, sdnotify
from dgfs.crypto import load_cache_key
from dgfs.policy import Policy
from dgfs.runtime import Settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dgfs"


def _reads_of_the_environment(path: Path) -> list[int]:
    """Lines of ``path`` that touch ``os.environ``, ``os.getenv`` or ``os.environb``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv"):
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                found.append(node.lineno)
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(alias.name in ("environ", "environb", "getenv") for alias in node.names)
        ):
            found.append(node.lineno)
    return found


def test_only_dgfs_environment_reads_the_environment() -> None:
    readers = {
        str(path.relative_to(ROOT)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "environment.py" or path.parent != PACKAGE
        if (lines := _reads_of_the_environment(path))
    }
    assert readers == {}, "read the environment through dgfs/environment.py"


def test_every_variable_read_is_in_the_configuration_docs() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", text))
    assert set(environment.VARIABLES) - documented == set()


def test_the_settings_come_from_the_mapping_given() -> None:
    given = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "DG_MAX_RATIO": "0.25",
        "NOTIFY_SOCKET": "@dgfs-test",
    }
    assert Settings.from_env(given).endpoint_url == "http://127.0.0.1:9"
    assert Policy.from_env(given).max_ratio == 0.25
    assert Policy.from_env(given, max_ratio=0.75).max_ratio == 0.75  # an option wins
    assert sdnotify.Notifier(given).address == "\0dgfs-test"
    assert environment.region({"AWS_DEFAULT_REGION": "eu-west-1"}) == "eu-west-1"
    assert environment.region({"AWS_REGION": "us-east-2", "AWS_DEFAULT_REGION": "x"}) == "us-east-2"
    assert environment.zgz({"DGFS_ZGZ": ""}) == ""  # empty: no zgz at all
    assert load_cache_key({}, None) is None


def test_an_unlisted_variable_cannot_be_read() -> None:
    with pytest.raises(AssertionError):
        environment._get("HOME", {})
