"""``FileSystem`` in-process, without the kernel: the upload pipeline, deterministically.

Each test mounts a ``FileSystem`` (tests/fsharness.py: wired the way ``dgfs.mount`` wires one, a
``Core`` over the store, a journal, upload workers in a nursery, journal
recovery, ``wait_idle`` at unmount) and drives it through its POSIX-level
methods, on a ``MemoryStore`` or a ``FaultyStore`` around one. Nothing
waits on real time: ``autojump_clock`` makes upload and retry delays free,
``mock_clock`` stands still so an upload waits in its delay for as long as
a test needs (``jump`` lets it come due), ``idle_jump_clock`` measures what
the code waited for, and ``FaultyStore`` holds an upload in flight until
the test lets it go (``Fault.reached`` says when it is held).

Files are small text, so the store holds each one directly under its key:
a test can compare the bucket with what it expects, byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from dgfs.errors import (
    DgfsError,
    FsError,
    StoreError,
    TransientError,
    WriteConflict,
    errno_of,
)
from dgfs.format import StoredFile
from dgfs.fs import journal as journal_module
from dgfs.fs.entries import NodeKind
from dgfs.fs.filesystem import FileSystem, FsOptions
from dgfs.fs.journal import Journal, JournalEntry
from dgfs.fs.nodes import Node, NodeTable
from dgfs.fs.readers import PlainReader, Reader
from dgfs.fs.upload_failures import RACES_REDONE_AT_ONCE
from dgfs.store.base import ObjectStore
from dgfs.store.faulty import FaultyStore, Operation
from dgfs.store.memory import MemoryStore
from tests.fsharness import (
    GID,
    OPTIONS,
    ROOT,
    UID,
    assert_absent,
    bucket,
    close,
    create,
    journal_entries,
    lookup,
    mounted,
    open_for_rewrite,
    read_file,
    rename,
    started,
    write_file,
    write_until_held,
)
from testsupport.releases import ReleaseSeries

# A deadlock would hang (mock_clock) or spin (autojump_clock) until the suite's 300 s.
pytestmark = pytest.mark.timeout(30)

# --- the fault-injecting store itself -------------------------------------------------


async def test_faulty_store_acts_on_the_chosen_calls_only(
    memory: MemoryStore, faulty: FaultyStore
) -> None:
    """nth/times/key select calls; the rest reach the wrapped store untouched."""
    second = faulty.fail("put_bytes", nth=2, times=2, key="k")
    await faulty.put_bytes("other", b"0", {})  # another key: not counted by the fault
    await faulty.put_bytes("k", b"1", {})
    for _ in range(2):
        with pytest.raises(TransientError, match="injected"):
            await faulty.put_bytes("k", b"2", {})
    await faulty.put_bytes("k", b"3", {})
    assert (second.hits, faulty.count("put_bytes"), faulty.count("put_bytes", "k")) == (2, 5, 4)
    assert bucket(memory) == {"other": b"0", "k": b"3"}

    faulty.fail("delete", transient=False, after=True)  # done, then reported as failed
    with pytest.raises(StoreError) as exc:
        await faulty.delete("k")
    assert not isinstance(exc.value, TransientError)
    assert "k" not in memory.objects

    held = faulty.hang("head")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(faulty.head, "other")
        await held.reached.wait()
        assert faulty.count("head") == 1
        held.release()
        await faulty.wait_calls("head", 1)


# --- the plain path -------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True], ids=["memory", "faulty-no-faults"])
async def test_closed_file_is_stored_and_reads_back(
    memory: MemoryStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    wrapped: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dgfs")
    store: ObjectStore = FaultyStore(memory) if wrapped else memory
    data = b"hello, dgfs\n" * 10
    async with mounted(store, tmp_path) as m:
        await write_file(m.fs, "a.txt", data)
        assert await read_file(m.fs, "a.txt") == data  # from the journal, before the upload
    assert bucket(memory) == {"a.txt": data}
    # One INFO line per upload, for operators.
    uploaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("uploaded ")]
    assert uploaded and "a.txt: direct, 120 -> 120 bytes (ratio 1.000)" in uploaded[0]
    assert journal_entries(m.journal_dir) == []
    async with mounted(store, tmp_path) as m:
        assert await read_file(m.fs, "a.txt") == data  # from the store
        assert (await m.fs.getattr((await lookup(m.fs, "a.txt")).ino)).size == len(data)


# --- names changing under an upload ---------------------------------------------------


@pytest.mark.parametrize("after", [False, True], ids=["before-store-write", "after-store-write"])
async def test_rename_while_the_upload_is_in_flight(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    after: bool,
) -> None:
    """The object ends up under the new name only, whichever side of the PUT the rename hits."""
    held = faulty.hang("upload", key="a.txt", after=after)
    async with mounted(faulty, tmp_path) as m, trio.open_nursery() as nursery:
        await write_file(m.fs, "a.txt", b"moving\n")
        await held.reached.wait()
        renamed = await started(lambda: rename(m.fs, "a.txt", "b.txt"), nursery)
        held.release()
        await renamed.wait()
        await assert_absent(m.fs, "a.txt")
        await m.fs.wait_idle()
        assert await read_file(m.fs, "b.txt") == b"moving\n"
    assert bucket(memory) == {"b.txt": b"moving\n"}
    assert journal_entries(m.journal_dir) == []


async def test_rename_before_the_upload_starts_uploads_under_the_new_name(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Still in its delay (the clock stands still), the upload follows the rename."""
    async with mounted(faulty, tmp_path) as m:
        await write_file(m.fs, "a.txt", b"early\n")
        await rename(m.fs, "a.txt", "b.txt")
        assert faulty.count("upload") == 0
    assert bucket(memory) == {"b.txt": b"early\n"}
    assert faulty.count("upload", "a.txt") == 0


async def test_no_upload_starts_while_a_rename_runs(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Log rotation: append to a stored file, rename it while the removal of
    its older, stored version is held.

    The new version's upload comes due during the rename; it must not go
    to the old name (where the rename is taking the object away from).
    """
    async with mounted(faulty, tmp_path) as m, trio.open_nursery() as nursery:
        fh = await create(m.fs, "a.txt", b"line 1\n")
        await m.fs.fsync(fh)
        await m.fs.release(fh)
        node = await lookup(m.fs, "a.txt")
        fh = (await m.fs.open(node.ino, os.O_WRONLY)).fh
        await m.fs.write(fh, 7, b"line 2\n")
        await close(m.fs, fh)
        uploads_before = faulty.count("upload", "a.txt")

        held = faulty.hang("delete_many", key="a.txt")
        renamed = await started(lambda: rename(m.fs, "a.txt", "b.txt"), nursery)
        await held.reached.wait()
        await trio.sleep(10 * OPTIONS.upload_delay)  # the upload comes due (trio time)
        await trio.testing.wait_all_tasks_blocked()
        assert faulty.count("upload", "a.txt") == uploads_before
        held.release()
        await renamed.wait()
    assert bucket(memory) == {"b.txt": b"line 1\nline 2\n"}
    assert faulty.count("upload", "a.txt") == uploads_before


@pytest.mark.parametrize("after", [False, True], ids=["before-store-write", "after-store-write"])
async def test_unlink_while_the_upload_is_in_flight(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    after: bool,
) -> None:
    """Nothing of the file is left in the store or the journal, and a new file
    of the same name is safe from the old upload."""
    held = faulty.hang("upload", key="a.txt", after=after)
    uploads_left: list[int] = []

    async def unlink() -> None:
        await m.fs.unlink(ROOT, "a.txt")
        # Landing later, the old upload would delete what a successor stored.
        uploads_left.append(faulty.in_flight("upload", "a.txt"))

    async with mounted(faulty, tmp_path) as m, trio.open_nursery() as nursery:
        await write_file(m.fs, "a.txt", b"short-lived\n")
        await held.reached.wait()
        unlinked = await started(unlink, nursery)
        held.release()
        await unlinked.wait()
        assert uploads_left == [0]
        await assert_absent(m.fs, "a.txt")
        await m.fs.wait_idle()
        assert bucket(memory) == {}
        assert journal_entries(m.journal_dir) == []

        fh = await create(m.fs, "a.txt", b"successor\n")
        await m.fs.fsync(fh)
        await close(m.fs, fh)
    assert bucket(memory) == {"a.txt": b"successor\n"}


async def test_unlink_before_the_upload_starts_uploads_nothing(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with mounted(faulty, tmp_path) as m:
        await write_file(m.fs, "a.txt", b"never stored\n")
        await m.fs.unlink(ROOT, "a.txt")
        await assert_absent(m.fs, "a.txt")
        assert journal_entries(m.journal_dir) == []
    assert faulty.count("upload") == 0
    assert bucket(memory) == {}


# --- a newer version while one is uploading --------------------------------------------


@pytest.mark.parametrize(
    "new_lands_first",
    [
        pytest.param(False, id="old-lands-first"),
        pytest.param(True, id="fsync-while-the-old-is-in-flight"),
    ],
)
async def test_newer_version_supersedes_an_upload_in_flight(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    new_lands_first: bool,
) -> None:
    """Rewritten after close while the first upload is held: the store ends with the newest.

    The clock stands still, so the new version's upload starts only when
    the test says: once the old PUT is done (unmount), or on fsync, which
    must wait for the old PUT: a new version's PUT that overtook it would
    be overwritten by the old one when it lands.
    """
    held = faulty.hang("upload", key="a.txt")  # the first upload only
    async with mounted(faulty, tmp_path) as m:
        await write_until_held(m.fs, "a.txt", b"version 1\n", held, mock_clock)
        fh = await open_for_rewrite(m.fs, "a.txt", b"version 2\n")
        if new_lands_first:
            synced = trio.Event()

            async def sync() -> None:
                await m.fs.fsync(fh)
                synced.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sync)
                await trio.testing.wait_all_tasks_blocked()
                assert not synced.is_set() and faulty.in_flight("upload") == 1
                held.release()
            assert bucket(memory) == {"a.txt": b"version 2\n"}  # fsync said so
        await close(m.fs, fh)
        held.release()
        await faulty.wait_calls("upload", faulty.count("upload"))  # every PUT so far is done
        await m.fs.wait_idle()
        assert bucket(memory) == {"a.txt": b"version 2\n"}
        assert await read_file(m.fs, "a.txt") == b"version 2\n"
    assert journal_entries(m.journal_dir) == []
    async with mounted(memory, tmp_path) as m:
        assert await read_file(m.fs, "a.txt") == b"version 2\n"


class GatedJournal(Journal):
    """A journal whose manifest writes wait (in their worker thread) until ``gate`` is set."""

    gate = threading.Event()

    def write_manifest(self, entry: JournalEntry) -> None:
        self.gate.wait(timeout=20)
        super().write_manifest(entry)


async def test_chmod_while_the_upload_settles_leaves_no_orphan_manifest(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """chmod of a file whose upload starts, lands and settles while the chmod
    records the new mode in the journal (a slow disk)."""
    GatedJournal.gate = threading.Event()
    GatedJournal.gate.set()
    try:
        async with mounted(faulty, tmp_path, journal_type=GatedJournal) as m:
            await write_file(m.fs, "a.txt", b"data\n")
            node = await lookup(m.fs, "a.txt")
            GatedJournal.gate.clear()
            async with trio.open_nursery() as nursery:
                chmod = await started(lambda: m.fs.setattr(node.ino, mode=0o600), nursery)
                await faulty.wait_calls("upload", 1)
                await trio.testing.wait_all_tasks_blocked()
                assert journal_entries(m.journal_dir) == []  # uploaded, settled, retired
                GatedJournal.gate.set()
                await chmod.wait()
        assert bucket(memory) == {"a.txt": b"data\n"}
        assert journal_entries(m.journal_dir) == []
    finally:
        GatedJournal.gate.set()


async def test_chmod_and_utime_of_a_directory_show_in_its_parents_listing(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A listing of the parent (readdir) shows a directory's new mode and mtime,
    not the ones its cached listing entry had from mkdir (found by the model test)."""
    mtime_ns = 1_000_000_000_123_456_789

    async def listed(fs: FileSystem) -> dict[str, tuple[int, int]]:
        seen: dict[str, tuple[int, int]] = {}

        def reply(name: str, node: Node, offset: int) -> bool:
            seen[name] = (node.mode, node.mtime_ns)
            return True

        await fs.readdir(ROOT, 0, reply)
        return seen

    async with mounted(memory, tmp_path) as m:
        await listed(m.fs)  # the root's listing is cached from now on
        node = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await m.fs.setattr(node.ino, mode=0o700, mtime_ns=mtime_ns)
        assert (await listed(m.fs))["d"] == (0o700, mtime_ns)
        got = await m.fs.getattr(node.ino)
        assert (got.mode, got.mtime_ns) == (0o700, mtime_ns)
    async with mounted(memory, tmp_path) as m:  # from the marker after a remount
        assert (await listed(m.fs))["d"] == (0o700, mtime_ns)


async def test_files_in_a_renamed_directory_are_found_under_their_new_keys(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """After a directory rename, a file below it that the mount already knew
    is read (and rewritten in place) from its new key, not its old one
    (found by the model test: ftruncate gave EIO, "d/f is missing")."""
    async with mounted(memory, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await write_file(m.fs, "f", b"0123456789\n", parent=d.ino)
    async with mounted(memory, tmp_path) as m:  # a fresh cache: the bytes come from S3
        d = await lookup(m.fs, "d")
        f = await lookup(m.fs, "f", parent=d.ino)
        await rename(m.fs, "d", "e")
        await m.fs.setattr(f.ino, size=4)  # keeps the first 4 bytes: reads them first
        assert await read_file(m.fs, "f", parent=d.ino) == b"0123"
    assert bucket(memory)["e/f"] == b"0123"
    assert "d/f" not in bucket(memory)


async def test_chmod_and_utime_of_a_listed_file_outlive_its_cached_listing(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """The metadata rewrite keeps the object's ETag; the next LIST after the
    listing TTL must not bring back the mode and mtime of the HEAD cached
    before it (found by the model test: a utime was undone a second later)."""
    options = FsOptions(upload_delay=0.0, listing_ttl=0.01)  # real time: TTLCache's clock
    mtime_ns = 1_000_000_000_123_456_789
    async with mounted(memory, tmp_path, options) as m:
        await write_file(m.fs, "a.txt", b"data\n")
        await m.fs.wait_idle()
        await trio.sleep(0.05)
        await m.fs.readdir(ROOT, 0, lambda name, node, offset: True)  # HEADs a.txt
        node = await lookup(m.fs, "a.txt")
        await m.fs.setattr(node.ino, mode=0o600, mtime_ns=mtime_ns)
        await trio.sleep(0.05)
        got = await m.fs.getattr(node.ino)  # from a new LIST (and the attribute cache)
        assert (got.mode, got.mtime_ns) == (0o600, mtime_ns)


@pytest.mark.parametrize("how", ["truncate", "open-trunc"])
async def test_truncate_without_a_handle_while_the_upload_comes_due(
    memory: MemoryStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """truncate(path), or open(O_TRUNC) before its handle exists, of a file whose
    upload is queued, the upload coming due while the staging file is being
    truncated (a slow disk): no handle keeps that staging file, so an upload
    landing then retired it (found by the model test: setattr and write
    failed with EBADF, the new size or content was lost)."""
    gate = threading.Event()
    real_ftruncate = os.ftruncate

    def slow_ftruncate(fd: int, size: int) -> None:
        gate.wait(timeout=20)
        real_ftruncate(fd, size)

    expected = b"0123" if how == "truncate" else b"new\n"
    try:
        async with mounted(memory, tmp_path) as m:
            await write_file(m.fs, "a.txt", b"0123456789\n")
            node = await lookup(m.fs, "a.txt")
            monkeypatch.setattr(os, "ftruncate", slow_ftruncate)

            async def change() -> None:
                if how == "truncate":
                    await m.fs.setattr(node.ino, size=4)
                    return
                handle = await m.fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
                await m.fs.write(handle.fh, 0, b"new\n")
                await close(m.fs, handle.fh)

            async with trio.open_nursery() as nursery:
                changed = await started(change, nursery)
                mock_clock.jump(OPTIONS.upload_delay)  # the upload is due
                for _ in range(50):  # let it run, if it may (a worker thread counts as blocked)
                    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                gate.set()
                await changed.wait()
            assert (await m.fs.getattr(node.ino)).size == len(expected)
        assert bucket(memory) == {"a.txt": expected}
    finally:
        gate.set()


class SlowRemoveJournal(Journal):
    """A journal whose ``remove`` deletes, then waits (in its worker thread) for ``gate``."""

    gate = threading.Event()

    def remove(self, entry_id: str) -> None:
        super().remove(entry_id)
        self.gate.wait(timeout=20)


async def test_unlink_of_an_open_file_starts_no_upload_of_its_removed_entry(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """unlink of a file whose upload is queued and that a handle keeps open:
    while unlink takes the entry out of the journal (a slow disk), the upload
    comes due; it must not start on the removed staging file (found by the
    model test: "upload of b failed (No such file or directory ...)")."""
    SlowRemoveJournal.gate = threading.Event()
    SlowRemoveJournal.gate.set()
    try:
        async with mounted(memory, tmp_path, journal_type=SlowRemoveJournal) as m:
            await write_file(m.fs, "a.txt", b"queued\n")
            handle = await m.fs.open((await lookup(m.fs, "a.txt")).ino, os.O_RDWR)
            SlowRemoveJournal.gate.clear()
            async with trio.open_nursery() as nursery:
                unlinked = await started(lambda: m.fs.unlink(ROOT, "a.txt"), nursery)
                await trio.sleep(OPTIONS.upload_delay * 2)  # the upload came due meanwhile
                SlowRemoveJournal.gate.set()
                await unlinked.wait()
            await m.fs.write(handle.fh, 0, b"still ")
            assert await m.fs.read(handle.fh, 0, 100) == b"still \n"
            await close(m.fs, handle.fh)
            await assert_absent(m.fs, "a.txt")
        assert bucket(memory) == {}
    finally:
        SlowRemoveJournal.gate.set()


# --- failures ---------------------------------------------------------------------------


def _enospc(message: str) -> OSError:
    return OSError(errno.ENOSPC, message)


@pytest.mark.expected_log(r"retrying in")
@pytest.mark.parametrize(
    ("operation", "error", "after"),
    [
        ("upload", TransientError, False),
        ("upload", TransientError, True),  # stored, but the reply was lost
        ("head", TransientError, False),  # the put's look for an older delta to remove
        ("upload", _enospc, False),  # the local disk, not the store
    ],
    ids=["upload", "upload-reply-lost", "head", "enospc"],
)
async def test_transient_failure_is_retried_until_it_succeeds(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    idle_jump_clock: trio.testing.MockClock,
    operation: Operation,
    error: Callable[[str], BaseException],
    after: bool,
) -> None:
    """Three failures, then success; each attempt ``retry_delay`` after the last."""
    # The put HEADs a.txt.delta once per attempt (the other form, to remove).
    key = "a.txt.delta" if operation == "head" else None
    failing = faulty.fail(operation, times=3, error=error, after=after, key=key)
    async with mounted(faulty, tmp_path) as m:
        await write_file(m.fs, "a.txt", b"eventually\n")
        await m.fs.wait_idle()
        assert failing.hits == 3
    attempts = [c.at for c in faulty.log if c.operation == "upload" and "a.txt" in c.keys]
    assert len(attempts) == 4
    assert min(b - a for a, b in itertools.pairwise(attempts)) >= OPTIONS.retry_delay
    assert bucket(memory) == {"a.txt": b"eventually\n"}
    assert journal_entries(m.journal_dir) == []


@pytest.mark.expected_log(r"retrying in")
async def test_fsync_reports_a_transient_failure_and_the_upload_goes_on(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    faulty.fail("upload", key="a.txt")
    async with mounted(faulty, tmp_path) as m:
        fh = await create(m.fs, "a.txt", b"later\n")
        with pytest.raises(DgfsError) as exc:
            await m.fs.fsync(fh)
        assert errno_of(exc.value) == errno.EIO
        await close(m.fs, fh)
    assert bucket(memory) == {"a.txt": b"later\n"}


@pytest.mark.parametrize(
    "races",
    [
        RACES_REDONE_AT_ONCE,  # no warning either: nothing failed
        pytest.param(RACES_REDONE_AT_ONCE + 1, marks=pytest.mark.expected_log(r"fsync sees EIO")),
    ],
)
async def test_fsync_waits_while_races_lost_to_another_writer_are_redone(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    races: int,
) -> None:
    """Another writer undid this upload (``WriteConflict``): it is redone at
    once, and fsync() waits for it; only a race lost once more than
    RACES_REDONE_AT_ONCE in a row counts as a failure (fsync sees EIO, the
    upload pauses, then goes on)."""
    faulty.fail("upload", key="a.txt", times=races, error=WriteConflict, after=True)
    async with mounted(faulty, tmp_path) as m:
        fh = await create(m.fs, "a.txt", b"contested\n")
        if races <= RACES_REDONE_AT_ONCE:
            await m.fs.fsync(fh)
            assert faulty.count("upload", "a.txt") == races + 1
        else:
            with pytest.raises(DgfsError) as exc:
                await m.fs.fsync(fh)
            assert errno_of(exc.value) == errno.EIO
            assert faulty.count("upload", "a.txt") == races
        await close(m.fs, fh)
    assert bucket(memory) == {"a.txt": b"contested\n"}
    assert journal_entries(m.journal_dir) == []


@pytest.mark.parametrize("rewriter", ["closed", "open"])
async def test_a_race_lost_by_a_version_rewritten_meanwhile_never_comes_back(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    rewriter: str,
) -> None:
    """Version 1's upload loses a race to another writer (``WriteConflict``)
    after version 2 replaced it (open with O_TRUNC). Redoing "at once"
    queued version 2 (or, its writer open, nothing) and left version 1's
    journal entry behind: the next mount uploaded it over version 2.
    Found by review; version 1 was kept only until version 2 is committed."""
    held = faulty.hang("upload", key="a.txt", after=True)
    faulty.fail("upload", key="a.txt", error=WriteConflict, after=True)
    async with mounted(faulty, tmp_path) as m:
        await write_file(m.fs, "a.txt", b"version 1\n")
        await held.reached.wait()
        fh = await open_for_rewrite(m.fs, "a.txt", b"version 2\n")
        if rewriter == "closed":
            await close(m.fs, fh)
        held.release()
        await faulty.wait_calls("upload", 1)
        if rewriter == "open":
            await trio.sleep(10 * OPTIONS.retry_delay)
            assert faulty.count("upload", "a.txt") == 1  # version 1 waits, not redone
            await close(m.fs, fh)
    assert bucket(memory) == {"a.txt": b"version 2\n"}
    assert journal_entries(m.journal_dir) == []
    async with mounted(memory, tmp_path) as m:
        assert m.recovered == 0
        assert await read_file(m.fs, "a.txt") == b"version 2\n"


@pytest.mark.expected_log(r"failed for good")
@pytest.mark.parametrize("reported_by", ["fsync", "close"])
async def test_permanent_failure_keeps_the_file_in_failed(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    reported_by: str,
) -> None:
    """Not retried, not dropped: moved to the journal's failed/, and the writer is told."""
    faulty.fail("upload", key="a.txt", transient=False)
    options = FsOptions(upload_delay=0.5, retry_delay=2.0, sync_upload=reported_by == "close")
    async with mounted(faulty, tmp_path, options) as m:
        fh = await create(m.fs, "a.txt", b"precious\n")
        with pytest.raises(DgfsError) as exc:
            if reported_by == "fsync":
                await m.fs.fsync(fh)
            else:
                await m.fs.flush(fh)
        assert errno_of(exc.value) == errno.EIO
        await m.fs.release(fh)
    assert faulty.count("upload") == 1
    assert bucket(memory) == {}
    assert journal_entries(m.journal_dir) == []
    failed = m.journal_dir / "failed"
    (kept,) = failed.glob("*.data")
    assert kept.read_bytes() == b"precious\n"
    assert '"a.txt"' in kept.with_suffix(".json").read_text()

    async with mounted(memory, tmp_path) as m:  # the next mount leaves failed/ alone
        assert m.recovered == 0
    assert bucket(memory) == {}
    assert kept.read_bytes() == b"precious\n"


@pytest.mark.parametrize(
    ("made", "key"),
    [
        (lambda fs: fs.mkdir(ROOT, "d", 0o755, UID, GID), "d/"),
        (lambda fs: fs.symlink(ROOT, "d", b"target", UID, GID), "d"),
        (lambda fs: fs.mknod(ROOT, "d", 0o600 | 0o010000, 0, UID, GID), "d"),
    ],
    ids=["mkdir", "symlink", "mkfifo"],
)
async def test_an_entry_whose_object_could_not_be_stored_is_not_there(
    faulty: FaultyStore,
    tmp_path: Path,
    made: Callable[[FileSystem], Awaitable[Node]],
    key: str,
) -> None:
    """mkdir, symlink and mknod are in S3 once they return: one whose PUT
    fails for good reports it, and the name stays free. Before, a mkdir
    left its node behind, and ``stat d`` showed a directory S3 never held
    (taken for one made here and still empty) until a remount."""
    async with mounted(faulty, tmp_path) as m:
        faulty.fail("put_bytes", key=key, transient=False, times=None)
        with pytest.raises(DgfsError):
            await made(m.fs)
        await assert_absent(m.fs, "d")


# --- unmount and crash ------------------------------------------------------------------


async def test_unmount_drains_every_pending_upload_without_waiting_for_delays(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """More files than workers, all still in their delay when the unmount starts."""
    files = {f"f{i}.txt": f"file {i}\n".encode() for i in range(OPTIONS.upload_workers + 3)}
    start = trio.current_time()
    async with mounted(memory, tmp_path) as m:
        for name, data in files.items():
            await write_file(m.fs, name, data)
        assert bucket(memory) == {}  # the clock stands still: none came due
    assert bucket(memory) == files
    assert trio.current_time() == start
    assert journal_entries(m.journal_dir) == []


async def test_unmount_uploads_a_closed_file_whose_release_never_came(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """close() committed it, but the kernel's RELEASE (sent asynchronously) had not
    arrived when the unmount began: the unmount still uploads it."""
    async with mounted(memory, tmp_path) as m:
        fh = await create(m.fs, "a.txt", b"closed\n")
        await m.fs.flush(fh)  # close(2) ends here; release(fh) never comes
    assert bucket(memory) == {"a.txt": b"closed\n"}
    assert journal_entries(m.journal_dir) == []


async def test_crash_leaves_committed_files_to_the_next_mount(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Closed files survive a crash (queued, mid-upload, renamed); an unclosed one was never
    promised and is not brought back."""
    held = faulty.hang("upload", key="b.txt")
    async with mounted(faulty, tmp_path, crash=True) as m:
        await write_until_held(m.fs, "b.txt", b"uploading\n", held, mock_clock)
        # Queued now, these wait for their delay for good (the clock stands still).
        await write_file(m.fs, "a.txt", b"queued\n")
        await write_file(m.fs, "c.txt", b"renamed\n")
        await rename(m.fs, "c.txt", "d.txt")
        await create(m.fs, "e.txt", b"still open\n")
    assert bucket(memory) == {}
    faulty.clear()

    async with mounted(faulty, tmp_path) as m:
        assert m.recovered == 3
        assert await read_file(m.fs, "d.txt") == b"renamed\n"  # before its upload
        await assert_absent(m.fs, "e.txt")
    assert bucket(memory) == {"a.txt": b"queued\n", "b.txt": b"uploading\n", "d.txt": b"renamed\n"}
    assert journal_entries(m.journal_dir) == []


# --- POSIX details ------------------------------------------------------------------


async def test_directory_times_follow_its_entries_until_set_explicitly(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mounted(memory, tmp_path) as m:
        fs = m.fs
        d = await fs.mkdir(ROOT, "d", 0o755, UID, GID)
        times: list[tuple[int, int]] = []

        async def changed(op: Callable[[], Awaitable[object]]) -> None:
            before = (d.mtime_ns, d.ctime_ns)
            await op()
            node = await fs.getattr(d.ino)
            assert node.mtime_ns > before[0] and node.ctime_ns > before[1]
            times.append((node.mtime_ns, node.ctime_ns))

        await changed(lambda: write_file(fs, "f", b"x", parent=d.ino))
        await changed(lambda: fs.mknod(d.ino, "fifo", 0o600 | 0o010000, 0, UID, GID))
        await changed(lambda: fs.rename(d.ino, "f", d.ino, "g", 0))
        await changed(lambda: fs.unlink(d.ino, "g"))
        await changed(lambda: fs.symlink(d.ino, "l", b"target", UID, GID))
        # A listing that shows the stored (older) mtime does not take it back.
        autojump_clock.jump(3600)
        assert (await fs.getattr(d.ino)).mtime_ns == times[-1][0]
        # Set explicitly, the stored time holds.
        await fs.setattr(d.ino, mtime_ns=1_000_000_000)
        autojump_clock.jump(3600)
        assert (await fs.getattr(d.ino)).mtime_ns == 1_000_000_000


async def test_names_longer_than_255_bytes_are_enametoolong(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mounted(memory, tmp_path) as m:
        for op in (
            lambda: m.fs.lookup(ROOT, "é" * 128),
            lambda: m.fs.mkdir(ROOT, "x" * 256, 0o755, UID, GID),
            lambda: create(m.fs, "x" * 256, b""),
        ):
            with pytest.raises(FsError) as exc:
                await op()
            assert exc.value.errno == errno.ENAMETOOLONG
        await write_file(m.fs, "x" * 255, b"fits")
        assert await read_file(m.fs, "x" * 255) == b"fits"


async def test_a_name_whose_s3_key_would_pass_1024_bytes_is_enametoolong(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mounted(memory, tmp_path) as m:
        parent = ROOT
        for depth in range(4):  # 4 levels of 250 bytes: 1,003 bytes of key so far
            parent = (await m.fs.mkdir(parent, f"{depth}" * 250, 0o755, UID, GID)).ino
        with pytest.raises(FsError) as exc:
            await m.fs.mkdir(parent, "x" * 20, 0o755, UID, GID)
        assert exc.value.errno == errno.ENAMETOOLONG
        await m.fs.mkdir(parent, "x" * 14, 0o755, UID, GID)  # 1,018 + ".delta" fits


async def test_device_numbers_and_explicit_atimes_outlive_the_listing_ttl_and_a_remount(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rdev = os.makedev(8, 1)
    async with mounted(memory, tmp_path) as m:
        dev = await m.fs.mknod(ROOT, "sda1", 0o660 | 0o060000, rdev, UID, GID)
        await m.fs.setattr(dev.ino, atime_ns=1_500_000_000_250_000_000)
        autojump_clock.jump(3600)  # past the listing TTL: attributes come from the listing
        node = await m.fs.getattr(dev.ino)
        assert (node.rdev, node.atime_ns) == (rdev, 1_500_000_000_250_000_000)
    assert memory.objects["sda1"].metadata["atime"] == "1500000000.25"
    async with mounted(memory, tmp_path) as m:
        node = await lookup(m.fs, "sda1")
        assert node.kind.is_special and node.rdev == rdev
        assert node.atime_ns == 1_500_000_000_250_000_000


async def test_a_reader_walking_a_directory_gets_the_next_deltas_rebuilt_ahead(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Real clock: the rebuilds are xdelta3 processes."""
    releases = list(ReleaseSeries(size=256 << 10).zips(5))
    async with mounted(memory, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        for name, data in releases:
            await write_file(m.fs, name, data, parent=d.ino)
    assert sum(k.endswith(".delta") for k in memory.objects) == 5
    async with mounted(memory, tmp_path) as m:  # a new cache: every delta is cold
        d = await lookup(m.fs, "rel")
        names = [name for name, _ in releases]
        m.fs.prefetch.ahead = 2
        assert await read_file(m.fs, names[1], d.ino) == releases[1][1]
        assert m.fs.prefetch.started == 0  # one open of a file in the middle is no walk yet
        assert await read_file(m.fs, names[0], d.ino) == releases[0][1]
        assert m.fs.prefetch.started == 0  # nor one going backwards
        assert await read_file(m.fs, names[1], d.ino) == releases[1][1]
        # A walk: the next two are rebuilt (one may be cached already: the
        # directory's reference is whichever upload won, and it is cached).
        assert m.fs.prefetch.started >= 1
        cache = m.fs.core.cache
        shas = [hashlib.sha256(data).hexdigest() for _, data in releases]
        with trio.fail_after(20):
            while not (cache.contains(shas[2]) and cache.contains(shas[3])):
                await trio.sleep(0.05)
        hits_before = cache.telemetry.snapshot().cache_hits
        assert await read_file(m.fs, names[2], d.ino) == releases[2][1]
        assert cache.telemetry.snapshot().cache_hits == hits_before + 1
        # Read from the rebuild's plain copy, checked by the cache as it took
        # it, not decrypted back out of the cache (docs/benchmarks.md).
        node = await lookup(m.fs, names[3], d.ino)
        handle = await m.fs.open(node.ino, os.O_RDONLY)
        try:
            assert await m.fs.read(handle.fh, 0, 1 << 20) == releases[3][1]
            assert isinstance(m.fs.handles.get(handle.fh).reader, PlainReader)
        finally:
            await m.fs.release(handle.fh)


async def test_reads_of_one_handle_side_by_side_open_one_reader(
    memory: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: the kernel sends a handle's reads side by side
    (read-ahead); each first read of a cold file opened its own reader, and
    all but the last leaked (a descriptor of the cache entry or plain copy)."""
    releases = list(ReleaseSeries(size=256 << 10).zips(2))
    async with mounted(memory, tmp_path) as m:
        for name, data in releases:
            await write_file(m.fs, name, data)
    async with mounted(memory, tmp_path) as m:  # a new cache: cold
        opened = 0
        real_reader = m.fs.content.reader

        async def counting_reader(
            stored: StoredFile, *, report: bool = True, etag: str | None = None
        ) -> Reader:
            nonlocal opened
            opened += 1
            return await real_reader(stored, report=report, etag=etag)

        monkeypatch.setattr(m.fs.content, "reader", counting_reader)
        name, data = releases[1]
        handle = await m.fs.open((await lookup(m.fs, name)).ino, os.O_RDONLY)
        got: dict[int, bytes] = {}

        async def read_at(offset: int) -> None:
            got[offset] = await m.fs.read(handle.fh, offset, 128 << 10)

        async with trio.open_nursery() as nursery:
            for offset in (0, 128 << 10):
                nursery.start_soon(read_at, offset)
        await m.fs.release(handle.fh)
        assert opened == 1
        assert got[0] + got[128 << 10] == data


async def test_a_directory_renamed_over_a_removed_name_keeps_its_own_attributes(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Found by the model test: the removed ``b``'s marker attributes, still
    remembered, were shown for the directory renamed to ``b``."""
    async with mounted(memory, tmp_path) as m:
        fs = m.fs
        await fs.mkdir(ROOT, "b", 0o700, UID, GID)
        await fs.readdir(ROOT, 0, lambda name, node, offset: True)  # b's marker is read
        await fs.rmdir(ROOT, "b")
        a = await fs.mkdir(ROOT, "a", 0o755, UID, GID)
        await fs.mkdir(a.ino, "sub", 0o750, UID, GID)
        await fs.setattr(a.ino, mtime_ns=1_300_000_000_000_000_000)
        await fs.rename(ROOT, "a", ROOT, "b", 0)
        autojump_clock.jump(3600)  # attributes come from listings again
        b = await fs.getattr((await lookup(fs, "b")).ino)
        assert (b.mode, b.mtime_ns) == (0o755, 1_300_000_000_000_000_000)
        sub = await fs.getattr((await lookup(fs, "sub", b.ino)).ino)
        assert sub.mode == 0o750


async def test_entries_of_a_setgid_directory_take_its_group(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with mounted(memory, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "shared", 0o2775, UID, 4242)
        sub = await m.fs.mkdir(d.ino, "sub", 0o755, UID, GID)
        assert (sub.mode, sub.gid) == (0o2755, 4242)
        handle, f = await m.fs.create(d.ino, "f", 0o644, UID, GID, os.O_WRONLY | os.O_CREAT)
        await m.fs.release(handle.fh)
        assert (f.mode, f.gid) == (0o644, 4242)
        plain = await m.fs.mkdir(ROOT, "plain", 0o755, UID, GID)
        assert (plain.mode, plain.gid) == (0o755, GID)


# --- the staging file has one owner ------------------------------------------------------


class GatedStagingJournal(Journal):
    """A journal whose ``new_staging`` waits (in its worker thread) until ``gate`` is set."""

    gate = threading.Event()
    calls = 0

    def new_staging(self) -> tuple[str, Path]:
        type(self).calls += 1
        if type(self).calls > 1:  # the first staging file (the create) is made at once
            self.gate.wait(timeout=20)
        return super().new_staging()


@pytest.mark.parametrize("how", ["open-trunc", "create-trunc", "truncate-0"])
@pytest.mark.parametrize("other_file", [False, True], ids=["alone", "another-file-opened"])
async def test_an_upload_landing_while_a_truncating_open_stages_closes_only_its_own_file(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    how: str,
    other_file: bool,
) -> None:
    """The model test's flake (EBADF on pwrite, or "content of a" wrong after a remount).

    open(O_TRUNC) (or create over it, or truncate(path, 0)) of a file whose
    upload is in flight needs a new staging file; while the journal makes
    it, the upload lands and settles, which retired (closed) the old staging
    file. ``_stage`` then retired it a
    second time: ``os.close`` of the number the new staging file had just
    been given. Its write failed with EBADF and the bucket ended holding an
    empty file; once another file's staging file took the number
    (``another-file-opened``), the bytes silently went into that file.
    """
    GatedStagingJournal.gate = threading.Event()
    GatedStagingJournal.calls = 0
    held = faulty.hang("upload", key="a.txt", after=True)
    fhs: list[int] = []
    try:
        async with mounted(faulty, tmp_path, journal_type=GatedStagingJournal) as m:
            await write_file(m.fs, "a.txt", b"version 1\n")
            await held.reached.wait()  # stored, the PUT not yet returned

            async def truncating_open() -> None:
                if how == "open-trunc":
                    node = await lookup(m.fs, "a.txt")
                    handle = await m.fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
                elif how == "truncate-0":  # truncate(path, 0), then open
                    node = await lookup(m.fs, "a.txt")
                    await m.fs.setattr(node.ino, size=0)
                    handle = await m.fs.open(node.ino, os.O_WRONLY)
                else:
                    handle, _ = await m.fs.create(
                        ROOT, "a.txt", 0o644, UID, GID, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                    )
                fhs.append(handle.fh)

            async with trio.open_nursery() as nursery:
                opened = await started(truncating_open, nursery)  # waits in new_staging
                held.release()
                await faulty.wait_calls("upload", 1)
                for _ in range(20):  # the first upload lands and settles
                    await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                GatedStagingJournal.gate.set()
                await opened.wait()
            if other_file:
                await write_file(m.fs, "b.txt", b"bbbbbbbbbbbbbbbbbbbb\n")
            await m.fs.write(fhs[0], 0, b"version 2\n")
            await close(m.fs, fhs[0])
            assert await read_file(m.fs, "a.txt") == b"version 2\n"
        expected = {"a.txt": b"version 2\n"}
        if other_file:
            expected["b.txt"] = b"bbbbbbbbbbbbbbbbbbbb\n"
        assert bucket(memory) == expected
        async with mounted(memory, tmp_path) as m:
            assert await read_file(m.fs, "a.txt") == b"version 2\n"
    finally:
        GatedStagingJournal.gate.set()


@pytest.mark.parametrize("io", ["read", "write"])
async def test_an_upload_waits_for_a_write_landing_but_not_for_a_read(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    io: str,
) -> None:
    """A write (or truncation) in a worker thread when the upload starts
    would change the file under the upload's hash: the upload waits for it.
    A read changes nothing, yet uploads waited for reads too, so readers
    whose preads overlapped could hold an upload back for good (found by
    review). Here the staging file's descriptor is in use, its thread call
    waiting for a limiter the test holds."""
    async with mounted(faulty, tmp_path) as m:
        fh = await create(m.fs, "a.txt", b"version 1\n")
        staged = m.fs.get_node((await lookup(m.fs, "a.txt")).ino).staged
        assert staged is not None
        held = trio.CapacityLimiter(1)
        await held.acquire()
        async with trio.open_nursery() as nursery:
            if io == "read":
                nursery.start_soon(staged.pread, 0, 4, held)
            else:
                nursery.start_soon(staged.pwrite, b"version 2", 0, held)
            await trio.testing.wait_all_tasks_blocked()
            synced = await started(lambda: m.fs.fsync(fh), nursery)
            if io == "read":
                with trio.fail_after(60):  # trio time: a hang fails at once
                    await synced.wait()
                assert faulty.count("upload", "a.txt") == 1
            else:
                assert faulty.count("upload", "a.txt") == 0  # waits for the write
            held.release()
        await synced.wait()
        await close(m.fs, fh)
    expected = b"version 1\n" if io == "read" else b"version 2\n"
    assert bucket(memory) == {"a.txt": expected}


@pytest.mark.parametrize("change", ["unlink", "rename", "rename-dir"])
async def test_removed_journal_entries_are_durable_before_s3_loses_the_name(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    """An entry removed when its upload landed was unlinked in the journal
    directory without an fsync of it: after a power loss it came back, and
    the next mount uploaded it again, bringing a deleted (or renamed away)
    file back. Now the directory is fsync'd before the DELETE or copy that
    takes the old name away."""
    events: list[str] = []
    real_fsync_dir = journal_module._fsync_dir

    def fsync_dir(path: Path) -> None:
        events.append(f"fsync {path.name}")
        real_fsync_dir(path)

    monkeypatch.setattr(journal_module, "_fsync_dir", fsync_dir)
    async with mounted(faulty, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await write_file(m.fs, "a.txt", b"stored, then gone\n", parent=d.ino)
        await m.fs.wait_idle()  # uploaded: its journal entry removed
        events.clear()
        held = faulty.hang("delete_many" if change == "unlink" else "copy")
        async with trio.open_nursery() as nursery:
            if change == "unlink":
                nursery.start_soon(m.fs.unlink, d.ino, "a.txt")
            elif change == "rename":
                nursery.start_soon(m.fs.rename, d.ino, "a.txt", d.ino, "b.txt", 0)
            else:
                nursery.start_soon(m.fs.rename, ROOT, "d", ROOT, "e", 0)
            await held.reached.wait()
            assert events == [f"fsync {m.journal_dir.name}"]  # before S3 loses the name
            held.release()
        await m.fs.wait_idle()


# --- a listing fetched across a change of its directory -------------------------------------


async def test_a_listing_fetched_before_a_directory_changed_is_not_cached_after(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A background listing (``list_written_dirs`` lists a directory a mount
    stored many files in) whose LIST went out before the directory was
    renamed away and made anew: its result described the old directory,
    yet it was cached for the new one, which then showed a file it never
    held (for ``listing_ttl``; reading it found no object)."""
    async with mounted(faulty, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await write_file(m.fs, "x", b"old\n", parent=d.ino)
        await m.fs.wait_idle()
        held = faulty.hang("head", key="d/x", after=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: m.fs.ns.listing("d", fresh=True))
            await held.reached.wait()
            await rename(m.fs, "d", "e")
            d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
            held.release()
        with pytest.raises(FsError) as exc:
            await m.fs.lookup(d.ino, "x")
        assert exc.value.errno == errno.ENOENT
        names: list[str] = []
        await m.fs.readdir(d.ino, 0, lambda name, node, offset: names.append(name) or True)
        assert names == []


async def test_a_read_while_an_upload_updates_the_attributes_it_stored_gets_the_new_version(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Version 2's bytes are stored; its upload then writes a chmod made
    meanwhile (a copy onto itself, held here). A handle closed then settled
    the file (its local content went) while the node still described
    version 1's object: a read opened then took version 1's size and SHA-256
    to version 2's object and failed with EIO (found by the real-mount
    model: "xdelta3 decode stopped at ... the limit (dg-file-size)")."""
    async with mounted(faulty, tmp_path) as m, trio.open_nursery() as nursery:
        await write_file(m.fs, "a.txt", b"version 1\n")
        await m.fs.wait_idle()
        node = await lookup(m.fs, "a.txt")
        held = faulty.hang("copy", key="a.txt")  # the follow-up's metadata update
        fh = await open_for_rewrite(m.fs, "a.txt", b"version 2, longer\n")
        await m.fs.flush(fh)
        await m.fs.setattr(node.ino, mode=0o600)  # the upload to come carries it...
        uploading = faulty.hang("upload", key="a.txt", after=True)
        await m.fs.release(fh)
        await uploading.reached.wait()
        await m.fs.setattr(node.ino, mode=0o640)  # ...this one needs the follow-up
        uploading.release()
        await held.reached.wait()
        reader = await m.fs.open(node.ino, os.O_RDONLY)  # and its release settles
        await m.fs.release(reader.fh)
        assert await read_file(m.fs, "a.txt") == b"version 2, longer\n"
        held.release()
        nursery.cancel_scope.cancel()
    assert bucket(memory) == {"a.txt": b"version 2, longer\n"}


async def test_an_upload_never_starts_while_a_write_to_its_staging_file_runs(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closed (its upload queued), opened again and written: the write's
    pwrite was in its worker thread when the upload came due and started.
    The upload hashed the file, then the write changed it, and S3 got bytes
    other than the SHA-256 it recorded (found by the real-mount model, seed
    531: a directory's reference.bin that failed its own SHA-256). Now no
    upload starts at all while the file is open for writing again (unless
    an fsync asks): its close queues it."""
    gate = threading.Event()
    real_pwrite = os.pwrite

    def slow_pwrite(fd: int, data: bytes, offset: int) -> int:
        if data == b"VERSION 2":
            gate.wait(timeout=20)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    held = faulty.hang("upload", key="a.txt")
    try:
        async with mounted(faulty, tmp_path) as m, trio.open_nursery() as nursery:
            await write_file(m.fs, "a.txt", b"version 1")  # queued, in its delay
            node = await lookup(m.fs, "a.txt")
            fh = (await m.fs.open(node.ino, os.O_WRONLY)).fh
            written = await started(lambda: m.fs.write(fh, 0, b"VERSION 2"), nursery)
            mock_clock.jump(OPTIONS.upload_delay)  # the queued upload comes due
            for _ in range(20):
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            gate.set()  # the write lands
            await written.wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            assert faulty.calls["upload"] == 0  # not while the writer is open
            await close(m.fs, fh)
            held.release()
            mock_clock.jump(OPTIONS.upload_delay)  # the close's upload comes due
            await faulty.wait_calls("upload", 1)
            stored = memory.objects["a.txt"]
            assert stored.metadata["dg-file-sha256"] == hashlib.sha256(stored.body).hexdigest()
        assert bucket(memory) == {"a.txt": b"VERSION 2"}
        async with mounted(memory, tmp_path) as m:
            assert await read_file(m.fs, "a.txt") == b"VERSION 2"
    finally:
        gate.set()


@pytest.mark.parametrize("staged", [False, True], ids=["stored", "staged"])
async def test_a_truncate_to_the_same_size_marks_the_times_as_linux_does(
    memory: MemoryStore, tmp_path: Path, staged: bool
) -> None:
    """ext4 and tmpfs mark mtime and ctime on every truncate and ftruncate,
    even to the size the file has; FUSE sends the size alone, so dgfs marks
    them. A file already in S3 once kept the mtime a utime had set (found by
    the real-mount model, seed 1034: utime, remount, ftruncate to the same
    size, rename, and the mount showed 2001)."""
    set_ns = 999_999_999_000_000_000
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "f", b"x" * 300)
        node = await lookup(m.fs, "f")
        await m.fs.setattr(node.ino, mtime_ns=set_ns)
    async with mounted(memory, tmp_path) as m:
        node = await lookup(m.fs, "f")
        assert node.mtime_ns == set_ns
        fh = await open_for_rewrite(m.fs, "f", b"y" * 300) if staged else None
        await m.fs.setattr(node.ino, mtime_ns=set_ns)
        before = time.time_ns()
        await m.fs.setattr(node.ino, size=300)
        assert node.mtime_ns >= before and node.ctime_ns >= before
        if fh is not None:
            await close(m.fs, fh)
    async with mounted(memory, tmp_path) as m:
        node = await lookup(m.fs, "f")
        assert node.mtime_ns >= before
        assert await read_file(m.fs, "f") == (b"y" if staged else b"x") * 300


async def test_a_same_size_truncate_that_brings_its_mtime_copies_the_object_once(
    memory: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SETATTR with the size and the mtime (as the kernel may send for
    ftruncate) marks the times once: one metadata copy, not one for the
    truncate and another for the mtime."""
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "f", b"x" * 300)
    async with mounted(memory, tmp_path) as m:
        node = await lookup(m.fs, "f")
        copies: list[str] = []
        real = m.fs.core.update_metadata

        async def counted(key: str, metadata: dict[str, str]) -> object:
            copies.append(key)
            return await real(key, metadata)

        monkeypatch.setattr(m.fs.core, "update_metadata", counted)
        now = time.time_ns()
        await m.fs.setattr(node.ino, size=300, mtime_ns=now)
        assert copies == ["f"] and node.mtime_ns == now


async def test_a_file_rename_does_not_scan_every_node_of_the_mount(
    memory: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rsync renames each ``.name.XXXXXX`` to ``name``. Looking for the nodes
    below the new name (``NodeTable.under`` walks every path the mount
    knows) is a directory rename's: done for a file too it cost each rename
    O(nodes), an rsync of N files O(N^2)."""
    scanned: list[int] = []
    real_under = NodeTable.under

    def under(self: NodeTable, path: str) -> list[Node]:
        scanned.append(len(self._by_path))
        return real_under(self, path)

    monkeypatch.setattr(NodeTable, "under", under)
    async with mounted(memory, tmp_path) as m:
        table = m.fs.nodes
        for i in range(1000):
            table.new(f"other/f{i}", NodeKind.FILE)
        await write_file(m.fs, ".x.AbCdEf", b"hello\n")
        scanned.clear()
        await rename(m.fs, ".x.AbCdEf", "x")  # rsync's rename of its temp file
    assert sum(scanned) == 0
