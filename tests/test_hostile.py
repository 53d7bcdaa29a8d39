"""Buckets dgfs did not write, in-process: garbled metadata, odd names, lying deltas.

Every object is seeded straight into a ``MemoryStore``, as another tool
(or a vandal) could have written it; the filesystem core must list every
directory, show or skip each name by the rules of docs/SEMANTICS.md
("Buckets dgfs did not write"), refuse broken content with EIO, and never
overwrite or remove an object it does not show as the file being changed.
The same inputs through a real mount: tests/test_mount_hostile.py.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest

from dgfs import format as fmt
from dgfs.errors import FsError
from dgfs.fs.filesystem import FileSystem
from dgfs.fs.nodes import Node
from dgfs.store.memory import MemoryStore
from tests.test_core import flip_byte, make_core, write
from tests.test_filesystem import ROOT, lookup, mounted, read_file, write_file
from tests.releases import ReleaseSeries

pytestmark = pytest.mark.timeout(60)


# --- metadata values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("uid", "1000", 1000),
        ("uid", "0", 0),
        ("uid", "-1", None),
        ("uid", str(2**40), None),
        ("uid", str(2**32 - 1), None),  # (uid_t)-1: "no owner"
        ("uid", str(2**32 - 2), 2**32 - 2),
        ("gid", "abc", None),
        ("gid", "", None),
        ("gid", " 12 ", 12),
        ("gid", "1_000", None),
        ("gid", "1e3", None),
        ("mode", str(0o100644), 0o100644),
        ("mode", "0644", 0o644),  # rclone: octal with a leading zero
        ("mode", "0o755", 0o755),
        ("mode", "644", 644),  # decimal, as s3fs writes (a strange but valid mode)
        ("mode", "zzz", None),
        ("mode", "-5", None),
        ("mode", str(2**70), None),
        ("mode", str(0o200644), None),  # beyond 16 bits
        ("mode", str(0o030644), None),  # a file type that does not exist
        ("mode", "09", None),  # not octal
    ],
)
def test_out_of_range_ids_and_modes_count_as_absent(key: str, raw: str, expected: int | None) -> None:
    assert fmt.parse_int_meta({key: raw}, key) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1700000000", 1_700_000_000 * 10**9),
        ("1700000000.5", 1_700_000_000_500_000_000),
        ("-100", -100 * 10**9),  # before 1970: kept
        ("-1.5", -1_500_000_000),
        ("yesterday", None),
        ("nan", None),
        ("inf", None),
        ("-1.-5", None),
        ("1.5e3", None),
        (str(10**30), None),  # beyond what a stat carries
        (str(2**63 // 10**9 + 1), None),
        ("", None),
    ],
)
def test_garbled_or_huge_mtime_counts_as_absent(raw: str, expected: int | None) -> None:
    assert fmt.parse_mtime_ns({"mtime": raw}) == expected


BAD_METADATA = {
    "uid-neg": {"uid": "-1"},
    "uid-big": {"uid": str(2**40)},
    "uid-abc": {"uid": "abc"},
    "gid-neg": {"gid": "-1"},
    "mode-garbage": {"mode": "zzz"},
    "mode-dir": {"mode": str(0o40700)},  # a directory's mode on a file
    "mode-huge": {"mode": str(2**70)},
    "mode-neg": {"mode": "-5"},
    "mtime-garbage": {"mtime": "yesterday"},
    "mtime-neg": {"mtime": "-100"},
    "mtime-huge": {"mtime": str(10**30)},
}


async def test_one_bad_object_never_breaks_a_listing(tmp_path: Path) -> None:
    """Bad values are ignored (the mount's defaults show); every name is listed."""
    store = MemoryStore()
    for name, meta in BAD_METADATA.items():
        await store.put_bytes(f"m/{name}", b"data", meta)
    await store.put_bytes("m/good", b"data", {"uid": "4242", "mode": str(0o100600)})
    await store.put_bytes("m/sub/", b"", {"uid": "-1", "mode": str(0o100600), "mtime": "x"})
    async with mounted(store, tmp_path) as m:
        names = await readdir(m.fs, "m")
        assert sorted(names) == sorted([*BAD_METADATA, "good", "sub"])
        good = names["good"]
        assert (good.uid, good.mode) == (4242, 0o600)
        for name in ("uid-neg", "uid-big", "uid-abc"):
            assert names[name].uid == os.getuid()
        assert names["gid-neg"].gid == os.getgid()
        for name in ("mode-garbage", "mode-huge", "mode-neg"):
            assert names[name].mode == 0o644  # 0666 & ~umask
        # A mode whose file type contradicts the object: the object decides
        # (a file), the permission bits are taken.
        assert (names["mode-dir"].kind.type_bits, names["mode-dir"].mode) == (stat.S_IFREG, 0o700)
        assert names["mtime-neg"].mtime_ns == -100 * 10**9
        for name in ("mtime-garbage", "mtime-huge"):
            assert 0 < names[name].mtime_ns < 2**63  # LastModified
        sub = names["sub"]
        assert (sub.kind.type_bits, sub.uid, sub.mode) == (stat.S_IFDIR, os.getuid(), 0o600)
        assert await read_file(m.fs, "uid-neg", names["uid-neg"].parent_ino) == b"data"


async def readdir(fs: FileSystem, path: str) -> dict[str, Node]:
    """name -> node of every entry of the directory ``path`` (slash-separated, from the root)."""
    ino = ROOT
    for part in filter(None, path.split("/")):
        ino = (await lookup(fs, part, ino)).ino
    found: dict[str, Node] = {}

    def reply(name: str, node: Node, offset: int) -> bool:
        node.parent_ino = ino  # type: ignore[attr-defined]  # for the test's reads
        found[name] = node
        return True

    await fs.readdir(ino, 0, reply)
    return found
