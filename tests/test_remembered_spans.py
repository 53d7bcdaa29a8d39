"""Verdicts on compressed spans outlive the process that proved them
(``dgfs.deep.remember``), only where they still hold, and a damaged file of
them costs one log line, never a wrong verdict."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgfs import deep
from dgfs.deep import remember
from dgfs.deep.deflate import DeflateParams
from dgfs.deep.search import _UNREPRODUCIBLE, VERIFIED_SPANS
from dgfs.runtime import S3Location, Settings, open_core
from testsupport.releases import write_series


@pytest.fixture(autouse=True)
def empty_memo() -> Iterator[None]:
    """Each test starts as a new process does: nothing remembered."""
    VERIFIED_SPANS.clear()
    remember.keep_in(None)
    remember._puts_known = VERIFIED_SPANS.puts
    yield
    VERIFIED_SPANS.clear()
    remember.keep_in(None)


@pytest.fixture
def releases(tmp_path: Path) -> list[Path]:
    """Two zips of one project: most members deflated alike in both."""
    return write_series(tmp_path / "releases", 2, size=1 << 20)


def expand(src: Path, work: Path) -> deep.ExpandStats:
    return deep.expand_file(src, work / (src.name + ".dgx"), scratch_dir=work)


def test_a_later_process_inflates_what_an_earlier_one_proved(
    releases: list[Path], tmp_path: Path
) -> None:
    first = expand(releases[0], tmp_path)
    assert first.streams_inflated > 10 and first.streams_remembered == 0
    assert remember.save(tmp_path) == len(VERIFIED_SPANS.snapshot()) > 10
    VERIFIED_SPANS.clear()  # a new process
    assert expand(releases[1], tmp_path).streams_remembered == 0  # nothing known: all searched
    VERIFIED_SPANS.clear()
    assert remember.load(tmp_path) > 10
    again = expand(releases[1], tmp_path)
    assert again.streams_remembered > 10  # the members both releases share
    # And what it builds rebuilds to the very bytes.
    digest, _ = deep.rebuild_file(
        tmp_path / (releases[1].name + ".dgx"), tmp_path / "out", tmp_path
    )
    assert (tmp_path / "out").read_bytes() == releases[1].read_bytes()
    assert digest


def test_every_kind_of_verdict_comes_back_as_it_was(tmp_path: Path) -> None:
    verdicts = {
        bytes([1]) * 32: DeflateParams(9),
        bytes([2]) * 32: DeflateParams(6, 9, 15, 1),
        bytes([3]) * 32: 9,
        bytes([4]) * 32: _UNREPRODUCIBLE,
    }
    for key, verdict in verdicts.items():
        VERIFIED_SPANS.put(key, verdict, 256)
    assert remember.save(tmp_path) == 4
    assert stat.S_IMODE(os.stat(tmp_path / remember.FILE_NAME).st_mode) == 0o600
    VERIFIED_SPANS.clear()
    assert remember.load(tmp_path) == 4
    assert dict(VERIFIED_SPANS.snapshot()) == verdicts
    assert [p.name for p in tmp_path.iterdir()] == [remember.FILE_NAME]  # no temporary left


def test_nothing_new_proven_writes_nothing(tmp_path: Path) -> None:
    VERIFIED_SPANS.put(bytes(32), DeflateParams(9), 256)
    assert remember.save(tmp_path) == 1
    (tmp_path / remember.FILE_NAME).unlink()
    assert remember.save(tmp_path) == 0
    assert not (tmp_path / remember.FILE_NAME).exists()


def test_a_save_keeps_what_another_process_saved_meanwhile(tmp_path: Path) -> None:
    VERIFIED_SPANS.put(b"a" * 32, DeflateParams(9), 256)
    remember.save(tmp_path)  # the other process
    VERIFIED_SPANS.clear()
    VERIFIED_SPANS.put(b"b" * 32, DeflateParams(6), 256)  # this one, which loaded nothing
    assert remember.save(tmp_path) == 2
    VERIFIED_SPANS.clear()
    assert remember.load(tmp_path) == 2
    assert dict(VERIFIED_SPANS.snapshot()) == {
        b"a" * 32: DeflateParams(9),
        b"b" * 32: DeflateParams(6),
    }


def test_verdicts_of_another_zlib_or_zgz_are_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A span zlib 1.2 reproduced need not be one the next zlib does, and a
    span zgz could not reproduce may be one a newly installed zgz can."""
    VERIFIED_SPANS.put(bytes(32), DeflateParams(9), 256)
    remember.save(tmp_path)
    VERIFIED_SPANS.clear()
    monkeypatch.setattr(remember, "binding", lambda: b"zlib 9.9.9; zgz none")
    with caplog.at_level(logging.INFO, logger="dgfs.deep.remember"):
        assert remember.load(tmp_path) == 0
    assert VERIFIED_SPANS.snapshot() == []
    assert "made with another zlib or zgz" in caplog.text


def _saved(tmp_path: Path) -> bytes:
    VERIFIED_SPANS.put(b"k" * 32, DeflateParams(9), 256)
    VERIFIED_SPANS.put(b"g" * 32, 6, 256)
    remember.save(tmp_path)
    VERIFIED_SPANS.clear()
    return (tmp_path / remember.FILE_NAME).read_bytes()


DAMAGE = {
    "cut in a record": lambda body: body[:-3],
    "unknown record kind": lambda body: body[:-2] + b"\x07" + body[-1:],
    "GNU level 0": lambda body: body[:-1] + b"\x00",
    "deflate params out of range": lambda body: body.replace(
        DeflateParams(9).pack(), b"\x0a\x08\x0f\x00"
    ),
    "another magic": lambda body: b"X" + body[1:],
    "cut in the header": lambda body: body[: len(remember.MAGIC) + 1],
    "too large": lambda body: body + bytes(remember.MAX_BYTES),
}


@pytest.mark.expected_log("is not usable")
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_not_used_at_all(tmp_path: Path, damage: str) -> None:
    path = tmp_path / remember.FILE_NAME
    path.write_bytes(DAMAGE[damage](_saved(tmp_path)))
    assert remember.load(tmp_path) == 0
    assert VERIFIED_SPANS.snapshot() == []


async def test_a_core_keeps_the_verdicts_of_its_cache_dir_and_loads_them_when_first_needed(
    tmp_path: Path,
) -> None:
    settings = Settings(endpoint_url="http://127.0.0.1:9", cache_dir=tmp_path / "cache")
    async with open_core(S3Location("bucket"), settings, check_bucket=False) as core:
        root = core.cache.directory.parent
        VERIFIED_SPANS.put(b"p" * 32, DeflateParams(9), 256)  # proven while it runs
    assert (root / remember.FILE_NAME).exists()
    VERIFIED_SPANS.clear()
    async with open_core(S3Location("bucket"), settings, check_bucket=False):
        assert VERIFIED_SPANS.snapshot() == []  # a command that expands nothing reads nothing
        remember.ensure_loaded()  # what an expansion does first
        assert dict(VERIFIED_SPANS.snapshot()) == {b"p" * 32: DeflateParams(9)}
        remember.ensure_loaded()  # once
        assert len(VERIFIED_SPANS.snapshot()) == 1


def test_an_expansion_loads_the_kept_verdicts_first(releases: list[Path], tmp_path: Path) -> None:
    expand(releases[0], tmp_path)
    remember.save(tmp_path)
    VERIFIED_SPANS.clear()
    remember.keep_in(tmp_path)  # as open_core does
    assert expand(releases[1], tmp_path).streams_remembered > 10
