"""File times the mount stores come back as they were set, whatever they are.

The epoch itself and times before 1970 (``SOURCE_DATE_EPOCH=0`` builds,
``tar --mtime=@0``, old archives) are times like any other: after a
remount, a crash's recovery, and in another reader of the bucket.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from dgfs.store.memory import MemoryStore
from tests.fsharness import GID, ROOT, UID, home, lookup, mounted, write_file


async def test_a_file_or_directory_touched_to_the_epoch_shows_the_epoch(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``touch -d @0 f`` (``tar --mtime=@0``, ``SOURCE_DATE_EPOCH=0`` builds,
    ``rsync -a`` of such a tree) stores ``mtime: 0`` in S3, but every
    mount reading it shows something else: ``stat`` after a remount (or
    the listing TTL) shows the object's LastModified for a file, the mount
    time for a directory, and a file recovered from the journal after a
    crash even gets the recovery time, which its upload then stores in S3
    for good (before ``parse_mtime_ns`` took its default: a parsed 0 read
    as "absent" where files, directory markers and journal entries are
    read). It shows 1970-01-01 00:00:00, as any other stored time."""
    async with mounted(memory, home(tmp_path, "a")) as m:
        await write_file(m.fs, "f", b"reproducible\n")
        await m.fs.setattr((await lookup(m.fs, "f")).ino, mtime_ns=0)
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await m.fs.setattr(d.ino, mtime_ns=0)
    assert memory.objects["f"].metadata["mtime"] == "0"
    assert memory.objects["d/"].metadata["mtime"] == "0"
    async with mounted(memory, home(tmp_path, "b"), crash=True) as m:
        await write_file(m.fs, "g", b"reproducible\n")  # closed: in the journal
        await m.fs.setattr((await lookup(m.fs, "g")).ino, mtime_ns=0)
    async with mounted(memory, home(tmp_path, "b")) as m:  # recovers g
        shown = {
            "file f": (await lookup(m.fs, "f")).mtime_ns,
            "directory d": (await lookup(m.fs, "d")).mtime_ns,
            "recovered g": (await lookup(m.fs, "g")).mtime_ns,
        }
    assert shown == {"file f": 0, "directory d": 0, "recovered g": 0}


async def test_a_fractional_mtime_before_1970_reads_back_as_it_was_set(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``touch -d '1969-12-31 23:59:59.5 UTC' f`` (mtime -0.5 s): after a
    remount ``stat`` shows 23:59:58.5, a second earlier; -1.25 s would come
    back as -2.75 s. Any pre-1970 time with a fraction is off by up to 2 s,
    so ``rsync -a`` sees the file as changed on every run.

    (Before: the time was split with ``divmod``, which floors, so -0.5 s
    was written ``"-1.5"``, which every reader, dgfs and rclone, takes as
    -1.5 s.) The sign now goes in front of the whole number, as rclone
    writes it."""
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "f", b"old\n")
        await m.fs.setattr((await lookup(m.fs, "f")).ino, mtime_ns=-500_000_000)
    async with mounted(memory, tmp_path) as m:
        shown = (await lookup(m.fs, "f")).mtime_ns
    assert (shown, memory.objects["f"].metadata["mtime"]) == (-500_000_000, "-0.5")
