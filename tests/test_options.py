"""The mount options' one table (dgfs/cli/options.py) against what it feeds:
docs/configuration.md, ``mount.dgfs``, the other commands' flags."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from dgfs.cli import options
from dgfs.cli.mount import build_config
from dgfs.errors import ConfigError
from dgfs.mount_helper import translate

CONFIGURATION = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _documented() -> dict[str, tuple[str | None, str]]:
    """docs/configuration.md's option table: name -> (value name, default)."""
    text = CONFIGURATION.read_text()
    section = text.split("## Mount options")[1].split("\n## ")[0]
    rows: dict[str, tuple[str | None, str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        default = cells[1].replace("`", "")
        for spec in re.findall(r"`([^`]+)`", cells[0]):
            name, sep, metavar = spec.replace("\\|", "|").partition("=")
            rows[name] = (metavar if sep else None, default)
    return rows


def test_configuration_md_documents_every_option_as_the_table_says() -> None:
    documented = _documented()
    assert list(documented) == [option.name for option in options.OPTIONS]
    for option in options.OPTIONS:
        assert documented[option.name] == (option.metavar, option.default), option.name


def test_a_documented_number_default_is_the_real_default() -> None:
    plain, _, _ = build_config("bucket", "/mnt/x", [])
    for option in options.OPTIONS:
        if re.fullmatch(r"[\d.]+[KMG]?", option.default):
            config, _, _ = build_config("bucket", "/mnt/x", [f"{option.name}={option.default}"])
            assert config == plain, option.name


def test_mount_helper_passes_every_option_but_rw_to_dgfs() -> None:
    for option in options.OPTIONS:
        item = option.name if option.metavar is None else f"{option.name}=1"
        expected = [] if option.name == "rw" else ["-o", item]
        assert translate(["b", "/m", "-o", f"_netdev,{item}"]) == ["mount", "b", "/m", *expected]


def test_mount_help_lists_every_option() -> None:
    text = options.help_text()
    for option in options.OPTIONS:
        spec = option.name if option.metavar is None else f"{option.name}={option.metavar}"
        assert f"  {spec} " in text, spec


def test_flags_go_through_the_options_parsers(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    options.add_flags(parser, options.S3_GROUP)
    options.add_flags(parser, options.CACHE_GROUP)
    options.add_flag(parser, "max_ratio")
    args = parser.parse_args(
        ["--endpoint-url", "http://h:1", "--cache-size", "1G", "--cache-dir", str(tmp_path)]
        + ["--max-ratio", "0.25", "--region", "r1"]
    )
    settings = options.settings_from_args(args)
    config, _, _ = build_config(
        "bucket",
        "/mnt/x",
        [f"endpoint=http://h:1,cache_size=1G,cache_dir={tmp_path},max_ratio=0.25,region=r1"],
    )
    assert settings == config.settings  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="option --max-ratio needs a number"):
        options.settings_from_args(parser.parse_args(["--max-ratio", "half"]))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("nosuch", r"unknown option 'nosuch' \(see dgfs mount --help\)"),
        ("ro=1", "option ro takes no value"),
        ("uid", r"option uid needs a value \(uid=...\)"),
        ("umask=9", "option umask needs a octal number, got '9'"),
        ("deltas=fast", "option deltas must be 'dg' or 'deep', not 'fast'"),
    ],
)
def test_bad_options_are_named(given: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("bucket", "/mnt/x", [given])


def test_clamped_and_owner_options() -> None:
    config, level, foreground = build_config(
        "bucket", "/mnt/x", ["uid=7,umask=7777,upload_workers=0,listing_ttl=-1,foreground"]
    )
    fs = config.fs_options  # type: ignore[attr-defined]
    assert (fs.uid, fs.force_owner, fs.umask, fs.upload_workers, fs.listing_ttl) == (
        7,
        True,
        0o777,
        1,
        0.0,
    )
    assert (level, foreground) == (None, True)
