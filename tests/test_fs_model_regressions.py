"""Divergences the in-process model test (tests/test_fs_model.py) found, each
shrunk to a deterministic test on ``tests/fsharness.py``'s helpers.

Each failed before its fix (a test marked ``xfail(strict=True)`` would
describe a bug not fixed yet, and the model's ``KNOWN_BUGS`` would keep it
clear of that bug meanwhile).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
import trio.testing

from dgfs.errors import DgfsError, FsError
from dgfs.fs.journal import JournalEntry
from dgfs.store import memory as memory_module
from dgfs.store.faulty import Fault, FaultyStore
from dgfs.store.memory import MemoryStore
from tests.fsharness import (
    GID,
    OPTIONS,
    RELEASES,
    ROOT,
    UID,
    GatedCommitJournal,
    Mount,
    assert_absent,
    bucket,
    close,
    create,
    journal_entries,
    let_tasks_run,
    lookup,
    mounted,
    open_for_rewrite,
    read_file,
    readdir,
    rename,
    started,
    write_file,
    write_until_held,
)

pytestmark = pytest.mark.timeout(30)


async def test_fsync_of_a_file_unlinked_while_open_returns(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """fsync() of a file unlinked while open hung for good.

    ``a`` was closed (committed, its upload queued in its delay) and opened
    again; ``unlink`` keeps the open handle's copy and takes the entry out
    of the journal, but the staged file still "needs upload". fsync then
    hurries that upload and waits for it to change state; the worker takes
    it, sees the node unlinked and returns without a word (``_upload``), so
    the waiter is never woken: the fsync never returns (on a real mount the
    process hangs in fsync(2)).
    """
    async with mounted(memory, tmp_path) as m, trio.open_nursery() as nursery:
        await write_file(m.fs, "a", b"version 1\n")
        node = await lookup(m.fs, "a")
        fh = (await m.fs.open(node.ino, os.O_RDWR)).fh
        await m.fs.unlink(ROOT, "a")
        synced = await started(lambda: m.fs.fsync(fh), nursery)
        for _ in range(10):  # worker-thread calls settle
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        try:
            assert synced.is_set(), "fsync of the unlinked file is still waiting"
        finally:
            nursery.cancel_scope.cancel()
            await close(m.fs, fh)
    assert bucket(memory) == {}


@pytest.mark.expected_log(r"retrying in")
@pytest.mark.parametrize("how", ["unlink", "rename"])
async def test_a_file_whose_upload_reply_was_lost_leaves_no_object_behind(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    how: str,
) -> None:
    """The old name came back after a remount.

    ``a``'s PUT reached S3 but its reply was lost (``after=True``): the
    upload counts as failed and waits for its retry, so neither
    ``node.stored`` nor ``staged.was_uploaded`` says S3 holds it. ``unlink``
    then deletes nothing in S3, and ``rename`` only rewrites the journal
    entry: the object stays under ``a`` and shows again after a remount (or
    a crash), the unlinked file back from the dead or the renamed one in
    two places.
    """
    faulty.fail("upload", key="a", after=True)
    async with mounted(faulty, tmp_path) as m:
        await write_file(m.fs, "a", b"stored, reply lost\n")
        mock_clock.jump(OPTIONS.upload_delay)
        await faulty.wait_calls("upload", 1)
        await trio.testing.wait_all_tasks_blocked()  # the failure is recorded, a retry waits
        assert bucket(memory) == {"a": b"stored, reply lost\n"}
        if how == "unlink":
            await m.fs.unlink(ROOT, "a")
        else:
            await rename(m.fs, "a", "b")
        await assert_absent(m.fs, "a")
        mock_clock.jump(OPTIONS.retry_delay)  # the retry comes due; the unmount drains
    expected = {} if how == "unlink" else {"b": b"stored, reply lost\n"}
    assert bucket(memory) == expected
    async with mounted(memory, tmp_path) as m:
        await assert_absent(m.fs, "a")


@pytest.mark.expected_log(r"lost its data")  # the symptom, asserted below
async def test_attributes_of_a_file_unlinked_while_open_write_no_journal_manifest(
    memory: MemoryStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """fchmod (or futimens, or ftruncate: the kernel sends the mtime with it)
    of a file unlinked while open: ``carries_attributes`` sees a committed
    staging file and writes its manifest again, though ``unlink`` took the
    entry (manifest and data) out of the journal. A crash then leaves a
    manifest without data, which the next mount reports as an ERROR
    ("lost its data; dropping the manifest")."""
    async with mounted(memory, tmp_path, crash=True) as m:
        await write_file(m.fs, "a", b"data\n")  # committed, its upload in its delay
        node = await lookup(m.fs, "a")
        fh = (await m.fs.open(node.ino, os.O_RDWR)).fh
        await m.fs.unlink(ROOT, "a")
        assert journal_entries(m.journal_dir) == []
        await m.fs.setattr(node.ino, mode=0o600)  # fchmod through the open handle
        assert await m.fs.read(fh, 0, 100) == b"data\n"
        leftover = journal_entries(m.journal_dir)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="dgfs"):
        async with mounted(memory, tmp_path) as m:
            await assert_absent(m.fs, "a")
    assert leftover == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("how", ["unlink", "rename"])
async def test_a_recovered_file_leaves_no_older_version_behind(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock, how: str
) -> None:
    """After a crash, an unlinked file came back with its older content.

    ``a`` is in S3 (version 1); version 2 is closed (committed) and the
    mount dies before uploading it. The next mount adopts the journal entry
    as a new node with ``stored`` None: it does not know that S3 holds
    version 1. ``unlink`` then removes the entry and deletes nothing in S3,
    so version 1 is back after the next remount; ``rename`` moves only the
    entry, leaving version 1 under the old name. (An ``rmdir`` of the
    directory then fails with ENOTEMPTY too.)
    """
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "a", b"version 1\n")
    async with mounted(memory, tmp_path, crash=True) as m:
        await write_file(m.fs, "a", b"version 2\n")  # committed; the clock stands still
    async with mounted(memory, tmp_path) as m:
        assert m.recovered == 1
        if how == "unlink":
            await m.fs.unlink(ROOT, "a")
        else:
            await rename(m.fs, "a", "b")
        await assert_absent(m.fs, "a")
    assert bucket(memory) == ({} if how == "unlink" else {"b": b"version 2\n"})
    async with mounted(memory, tmp_path) as m:
        await assert_absent(m.fs, "a")


async def test_an_upload_failing_after_its_file_was_rewritten_leaves_no_stale_entry(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """An acknowledged write lost after a clean remount.

    Version 1's upload is in flight when ``open(O_TRUNC)`` writes version 2
    into a new staging file (the old one is left to retire itself when it
    lands, ``_superseded``). The upload then fails transiently: ``_retry``
    waits and finds ``node.staged`` is another file, so nothing happens,
    and nothing retires version 1's entry either. Version 2 is stored and
    the unmount is clean, yet the journal still holds version 1: the next
    mount recovers it and uploads it over version 2. (After a crash instead,
    both entries name the same key and the older may win.)
    """
    held = faulty.hang("upload", key="a")
    faulty.fail("upload", key="a")  # the same, first upload: held, then failing
    async with mounted(faulty, tmp_path) as m:
        await write_until_held(m.fs, "a", b"version 1\n", held, mock_clock)
        node = await lookup(m.fs, "a")
        handle = await m.fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
        await m.fs.write(handle.fh, 0, b"version 2\n")
        await close(m.fs, handle.fh)
        held.release()
        for _ in range(10):  # the upload fails
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        mock_clock.jump(OPTIONS.retry_delay)
    assert bucket(memory) == {"a": b"version 2\n"}
    assert journal_entries(m.journal_dir) == []
    async with mounted(memory, tmp_path) as m:
        assert await read_file(m.fs, "a") == b"version 2\n"
    assert bucket(memory) == {"a": b"version 2\n"}


@pytest.mark.parametrize("target", ["open", "closed"])
async def test_a_rename_failing_in_s3_keeps_the_file_it_would_replace(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    target: str,
) -> None:
    """rename(a, b) fails (a transient S3 error on the server-side copy; for a
    delta moved to another directory, on storing it there): POSIX says
    nothing changed. But ``_rename_file`` first disposed of ``b``'s local
    content: kept only for its open handles (its journal entry removed) or
    discarded. An ``open`` ``b`` then fails fsync and close with ENOENT
    (the journal commit finds no data file), and so does the unmount's
    release of it; a ``closed`` ``b``, committed but not uploaded yet, is
    gone: its acknowledged content is lost.
    """
    async with mounted(faulty, tmp_path) as m:
        await write_file(m.fs, "a", b"source\n")
        mock_clock.jump(OPTIONS.upload_delay)
        await m.fs.wait_idle()  # a is in S3
        fh = await create(m.fs, "b", b"target\n")
        if target == "closed":
            await close(m.fs, fh)  # committed, its upload in its delay
        faulty.fail("copy", key="a")
        with pytest.raises(DgfsError):
            await rename(m.fs, "a", "b")
        if target == "open":
            await m.fs.fsync(fh)
            await close(m.fs, fh)
        assert await read_file(m.fs, "b") == b"target\n"
        assert await read_file(m.fs, "a") == b"source\n"
    assert bucket(memory) == {"a": b"source\n", "b": b"target\n"}


class _OneSecond:
    """``datetime`` for the memory store: every write in the same second."""

    @staticmethod
    def now(tz: object = None) -> datetime:
        return datetime(2030, 1, 1, tzinfo=UTC)


async def test_a_file_renamed_over_one_with_the_same_bytes_shows_its_own_mode(
    memory: MemoryStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``a`` and ``b`` hold the same bytes; ``chmod 600 a``, then ``mv b a``
    within the second: S3's ``a`` has b's mode (644), but the next listing
    finds the row the chmod cached for ``a`` at that ETag and second (the
    version a row is kept for) and shows 600, until ``a`` changes again (a
    remount with the disk attribute cache too, docs/SEMANTICS.md allows it
    only for another mount's change)."""
    monkeypatch.setattr(memory_module, "datetime", _OneSecond)
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "a", b"same\n")
        await write_file(m.fs, "b", b"same\n")
        mock_clock.jump(OPTIONS.upload_delay)
        await m.fs.wait_idle()
        await m.fs.setattr((await lookup(m.fs, "a")).ino, mode=0o600)
        await rename(m.fs, "b", "a")
        mock_clock.jump(3600)  # attributes come from a new listing
        node = await m.fs.getattr((await lookup(m.fs, "a")).ino)
        assert node.mode == 0o644


@pytest.mark.parametrize("target", [None, "open", "closed", "stored"])
async def test_rename_of_a_file_not_closed_yet_moves_it(
    memory: MemoryStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    target: str | None,
) -> None:
    """write a temporary file, rename it into place, then close it: the rename
    failed with ENOENT, whatever it replaced (nothing; a file open, closed
    but not uploaded, or in S3).

    ``_rename_file`` moves a journal entry only for a staging file with a
    committed version; one never committed (created, written, not closed)
    takes the branch for files whose acknowledged content is in S3, and
    ``Core.rename`` finds no object: ``NotFound``, so ENOENT. (Found by the
    model at c894ae0.)
    """
    async with mounted(memory, tmp_path) as m:
        if target == "open":
            await create(m.fs, "a", b"old a\n")
        elif target is not None:
            await write_file(m.fs, "a", b"old a\n")
            if target == "stored":
                mock_clock.jump(OPTIONS.upload_delay)
                await m.fs.wait_idle()
        fh = await create(m.fs, "x", b"new\n")
        await rename(m.fs, "x", "a")
        await close(m.fs, fh)
        assert await read_file(m.fs, "a") == b"new\n"
        await assert_absent(m.fs, "x")
    assert bucket(memory) == {"a": b"new\n"}


@pytest.mark.expected_log(r"lost its data")  # the symptom, asserted below
async def test_a_directory_rename_writes_no_manifest_for_a_file_unlinked_while_open(
    memory: MemoryStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``d/a`` is closed (committed), opened again and unlinked: its entry
    leaves the journal and the handle keeps a copy. ``mv d e`` then calls
    ``follow_rename`` for every staged node under ``d``, this one included
    (``wait_subtree`` goes by path and does not skip unlinked nodes), and
    writes its manifest back: a crash leaves a manifest without data, an
    ERROR at the next mount. (The chmod path to the same mistake was fixed
    in 14c0f88.)
    """
    async with mounted(memory, tmp_path, crash=True) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await write_file(m.fs, "a", b"data\n", parent=d.ino)
        node = await lookup(m.fs, "a", d.ino)
        fh = (await m.fs.open(node.ino, os.O_RDONLY)).fh
        await m.fs.unlink(d.ino, "a")
        await rename(m.fs, "d", "e")
        assert await m.fs.read(fh, 0, 100) == b"data\n"
        leftover = journal_entries(m.journal_dir)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="dgfs"):
        async with mounted(memory, tmp_path) as m:
            await assert_absent(m.fs, "a")
    assert leftover == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("how", ["fsync", "reader"])
async def test_rename_of_an_open_file_already_uploaded_keeps_its_content(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock, how: str
) -> None:
    """``mv a b`` lost the file: its bytes were in S3, and after the rename
    neither name held anything (a remount shows no ``b``).

    While a handle is open the staging file stays after its upload lands
    (settled, ``needs_upload`` false). ``_rename_file`` takes any committed
    staging file for "the newest version is local": it deletes the object
    under the old name and moves the journal entry, but no upload follows,
    as nothing new was committed; at the last close the staging file goes
    and the content with it. ``fsync``: written, fsync'd (so acknowledged in
    S3) and renamed before the close; ``reader``: closed and uploaded while
    another process reads it.
    """
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "a", b"version 1\n")
        node = await lookup(m.fs, "a")
        if how == "fsync":
            handle = await m.fs.open(node.ino, os.O_RDWR)
            await m.fs.write(handle.fh, 0, b"version 2\n")
            await m.fs.fsync(handle.fh)
            expected = b"version 2\n"
        else:
            handle = await m.fs.open(node.ino, os.O_RDONLY)
            mock_clock.jump(OPTIONS.upload_delay)
            await m.fs.wait_idle()
            expected = b"version 1\n"
        await rename(m.fs, "a", "b")
        await close(m.fs, handle.fh)
        assert await read_file(m.fs, "b") == expected
    assert bucket(memory) == {"b": expected}


async def test_fsync_returns_when_an_upload_starts_during_its_commit(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """fsync() hung for good.

    ``a`` is closed (committed, its upload queued), opened again and written
    (in the same staging file: the upload has not started). fsync commits;
    while the journal makes the commit durable (a worker thread), the
    queued upload comes due and starts, storing the version committed
    before. fsync's ``_request(despite_writers=True)`` finds it uploading
    and queues nothing; when it lands, ``_upload_version`` queues the newer
    commit with ``_request(node)``, which waits for the writers to close,
    and the fsyncing handle is one: nothing uploads the version fsync waits
    for. (Found by the model with ``arm_concurrent``.)
    """
    GatedCommitJournal.gate = threading.Event()
    GatedCommitJournal.gate.set()
    try:
        async with mounted(faulty, tmp_path, journal_type=GatedCommitJournal) as m:
            await write_file(m.fs, "a", b"version 1\n")  # committed, queued
            handle = await m.fs.open((await lookup(m.fs, "a")).ino, os.O_RDWR)
            await m.fs.write(handle.fh, 0, b"version 2\n")
            GatedCommitJournal.gate.clear()
            held = faulty.hang("upload", key="a")
            async with trio.open_nursery() as nursery:
                synced = await started(lambda: m.fs.fsync(handle.fh), nursery)  # in commit
                mock_clock.jump(OPTIONS.upload_delay)  # the queued upload starts, held
                await held.reached.wait()
                GatedCommitJournal.gate.set()  # fsync's commit ends: it waits for S3
                await let_tasks_run()
                held.release()  # the older commit's upload lands
                await let_tasks_run()
                try:
                    assert synced.is_set(), "fsync is still waiting"
                finally:
                    nursery.cancel_scope.cancel()
            await close(m.fs, handle.fh)
        assert bucket(memory) == {"a": b"version 2\n"}
    finally:
        GatedCommitJournal.gate.set()


async def test_a_rename_whose_copy_lost_its_reply_leaves_one_name(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``mv a d/b`` returned EIO, yet after a remount (or once the listing
    cache of ``d`` expires) both ``a`` and ``d/b`` showed the file.

    ``Core.rename`` copies, then deletes the source; when the copy reached
    S3 but its reply was lost (the store's own retries exhausted), the error
    went up and nothing removed the copy. Now the rename looks: the copy is
    there, so it goes on and the source goes (the model found it with a
    delta moved to another directory, whose upload there lost its reply).
    """
    async with mounted(faulty, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await write_file(m.fs, "a", b"data\n")
        mock_clock.jump(OPTIONS.upload_delay)
        await m.fs.wait_idle()
        faulty.fail("copy", key="a", after=True)  # copied, the reply lost
        await m.fs.rename(ROOT, "a", d.ino, "b", 0)
    async with mounted(memory, tmp_path) as m:
        assert await read_file(m.fs, "b", (await lookup(m.fs, "d")).ino) == b"data\n"
        with pytest.raises(FsError):
            await lookup(m.fs, "a")


async def test_attributes_changed_during_an_upload_survive_a_crash(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """chmod 600 and touch -d of ``a`` returned while its upload was in
    flight; the mount then died. After recovery ``a`` showed its old mode
    and mtime, for good: the recovered upload stored the journal entry's.

    ``carries_attributes`` answers "the upload picks the attributes up" for
    a file being uploaded, and so writes no manifest: the new attributes
    live only in memory until the upload lands and its follow-up rewrites
    the object's metadata. docs/SEMANTICS.md: "on a file not yet uploaded,
    only the journal entry changes".
    """
    held = faulty.hang("upload", key="a")
    async with mounted(faulty, tmp_path, crash=True) as m:
        await write_until_held(m.fs, "a", b"data\n", held, mock_clock)
        node = await lookup(m.fs, "a")
        await m.fs.setattr(node.ino, mode=0o600, mtime_ns=1_000_000_000_000_000_000)
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        node = await m.fs.getattr((await lookup(m.fs, "a")).ino)
        assert (node.mode, node.mtime_ns) == (0o600, 1_000_000_000_000_000_000)
    assert memory.objects["a"].metadata["mode"] == str(0o100600)


async def test_a_file_moved_over_another_then_on_leaves_no_replaced_copy(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``mv tmp a`` (``tmp`` written, not closed; ``a`` in S3), ``mv a c``,
    close: after a clean unmount the bucket held ``c`` and, back from the
    dead, the old ``a``.

    A rename of a file not closed yet moves only its name and leaves the
    object it replaces in S3 until the new file's upload overwrites it
    (so a crash before that brings the old ``a`` back, never neither). When
    the new file moves on before its upload, nothing removes that object
    any more: the name shows the content the first rename replaced.
    """
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "a", b"old a\n")
        mock_clock.jump(OPTIONS.upload_delay)
        await m.fs.wait_idle()
        fh = await create(m.fs, "tmp", b"new\n")
        await rename(m.fs, "tmp", "a")
        await rename(m.fs, "a", "c")
        await close(m.fs, fh)
        await assert_absent(m.fs, "a")
    assert bucket(memory) == {"c": b"new\n"}
    async with mounted(memory, tmp_path) as m:
        await assert_absent(m.fs, "a")


@pytest.mark.parametrize(
    "where",
    [
        "journal",
        "s3",
    ],
)
async def test_a_crash_after_two_saves_keeps_the_first(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock, where: str
) -> None:
    """Two editor saves of ``a`` (write a temporary file, rename it over
    ``a``, close), the second not closed yet when the mount dies: after
    recovery ``a`` was gone, though the first save was acknowledged by its
    close (the model saw the version before it come back instead).

    The second rename dropped the first save's journal entry (saved, not
    uploaded yet: ``journal``) as it would for any file it replaces, and
    the renamed file had nothing durable. Now a file not closed yet that
    replaces another is committed by the rename (as ext4's auto_da_alloc
    flushes it), so ``a`` shows the second save's bytes as of the rename.
    """
    async with mounted(memory, tmp_path, crash=True) as m:
        await write_file(m.fs, "a", b"version 0\n")
        if where == "s3":
            mock_clock.jump(OPTIONS.upload_delay)
            await m.fs.wait_idle()
        first = await create(m.fs, "tmp1", b"version 1\n")
        await rename(m.fs, "tmp1", "a")
        await close(m.fs, first)  # version 1 acknowledged, its upload in its delay
        await create(m.fs, "tmp2", b"version 2\n")
        await rename(m.fs, "tmp2", "a")  # not closed when the mount dies
    async with mounted(memory, tmp_path) as m:
        assert await read_file(m.fs, "a") == b"version 2\n"


async def test_an_upload_with_the_same_bytes_shows_its_own_mode(
    memory: MemoryStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``a`` (mode 600) is replaced by ``b``, closed but not uploaded yet, with
    the same bytes and mode 644; its upload lands within the second. The
    next listing finds the row cached for ``a`` at that ETag and second and
    shows 600. (14c0f88 refreshed the row after a rename's copy; an upload
    that lands under a name is the same case.)
    """
    monkeypatch.setattr(memory_module, "datetime", _OneSecond)
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "a", b"same\n")
        mock_clock.jump(OPTIONS.upload_delay)
        await m.fs.wait_idle()
        await m.fs.setattr((await lookup(m.fs, "a")).ino, mode=0o600)
        await m.fs.readdir(ROOT, 0, lambda name, node, offset: True)  # a's row is cached
        await write_file(m.fs, "b", b"same\n")
        await rename(m.fs, "b", "a")
        mock_clock.jump(OPTIONS.upload_delay)
        await m.fs.wait_idle()  # b's bytes land under a
        mock_clock.jump(3600)  # attributes come from a new listing
        node = await m.fs.getattr((await lookup(m.fs, "a")).ino)
        assert node.mode == 0o644


async def _superseded_by_a_newer_version(
    m: Mount, held: Fault, mock_clock: trio.testing.MockClock, *, newer: str
) -> int | None:
    """``a``'s version 1 is closed and its upload in flight when ``open(O_TRUNC)``
    writes version 2 (left open or closed); then the upload fails. Version
    1 is not uploaded again (it would land after version 2), but while
    version 2 is not closed it is the file's acknowledged content, kept in
    the journal for a crash."""
    await write_until_held(m.fs, "a", b"version 1\n", held, mock_clock)
    fh: int | None = await open_for_rewrite(m.fs, "a", b"version 2\n")
    if newer == "closed":
        await close(m.fs, fh)
        fh = None
    held.release()
    for _ in range(10):  # the upload fails
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    return fh  # version 2's handle, if left open


@pytest.mark.parametrize("newer", ["open", "closed"])
@pytest.mark.parametrize("how", ["unlink", "rename over, then away"])
async def test_a_name_gone_while_a_superseded_version_is_kept_stays_gone(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    how: str,
    newer: str,
) -> None:
    """Seed 1202 of the model (long mode): after a crash, a file renamed away
    came back under its old name.

    Version 1 of ``a`` waited for the retry of its failed upload,
    superseded by version 2; its journal entry stayed, as the file's
    acknowledged content, until the retry's pause ended and found version
    2 committed. When ``a`` lost its name before that (unlinked, or
    replaced by a rename and then moved on), only version 2's entry went
    with the name: a crash within the pause recovered version 1 under
    ``a``.
    """
    held = faulty.hang("upload", key="a")
    faulty.fail("upload", key="a")
    async with mounted(faulty, tmp_path, crash=True) as m:
        await _superseded_by_a_newer_version(m, held, mock_clock, newer=newer)
        if how == "unlink":
            await m.fs.unlink(ROOT, "a")
        else:
            await write_file(m.fs, "b", b"b\n")
            await rename(m.fs, "b", "a")
            await rename(m.fs, "a", "c")
        await assert_absent(m.fs, "a")
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        await assert_absent(m.fs, "a")
        if how != "unlink":
            assert await read_file(m.fs, "c") == b"b\n"
    assert "a" not in bucket(memory)


@pytest.mark.parametrize("change", ["rename", "chmod"])
async def test_a_superseded_version_kept_for_a_crash_follows_the_file(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    change: str,
) -> None:
    """``mv a c`` or ``chmod 600 a`` while version 1 is kept behind version 2,
    not closed: after a crash version 1 shows, and it must show under
    ``c`` and with mode 600. Its entry stayed as written at its close, so
    ``a`` came back instead of ``c``, or with its old mode."""
    held = faulty.hang("upload", key="a")
    faulty.fail("upload", key="a")
    async with mounted(faulty, tmp_path, crash=True) as m:
        await _superseded_by_a_newer_version(m, held, mock_clock, newer="open")
        if change == "rename":
            await rename(m.fs, "a", "c")
        else:
            await m.fs.setattr((await lookup(m.fs, "a")).ino, mode=0o600)
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        if change == "rename":
            await assert_absent(m.fs, "a")
            assert await read_file(m.fs, "c") == b"version 1\n"
        else:
            assert await read_file(m.fs, "a") == b"version 1\n"
            assert (await m.fs.getattr((await lookup(m.fs, "a")).ino)).mode == 0o600


async def test_a_chmod_while_a_superseded_upload_is_in_flight_never_makes_it_newest(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Found by review of the fix above. Version 1 of ``a`` is in flight,
    version 2 closed (both in the journal, 2 written last). ``chmod``
    rewrote 1's manifest, then 2's: a crash between the two left 1 written
    last, and recovery kept it and dropped 2 (``Journal._newest_per_key``):
    an acknowledged close() undone."""
    held = faulty.hang("upload", key="a")
    async with mounted(faulty, tmp_path, crash=True) as m:
        await write_until_held(m.fs, "a", b"version 1\n", held, mock_clock)
        await close(m.fs, await open_for_rewrite(m.fs, "a", b"version 2\n"))
        node = await lookup(m.fs, "a")
        assert node.staged is not None and node.staged.is_committed and node.superseded
        newest = node.staged.entry_id
        real = m.fs.uploads.versions.journal.write_manifest

        def dies_before_the_newest(entry: JournalEntry) -> None:
            if entry.entry_id == newest:
                raise OSError(errno.EIO, "the process died here")  # nothing after it runs
            real(entry)

        m.fs.uploads.versions.journal.write_manifest = dies_before_the_newest  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await m.fs.setattr(node.ino, mode=0o600)
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        assert await read_file(m.fs, "a") == b"version 2\n"


@pytest.mark.expected_log(r"retrying in")
async def test_an_upload_failing_while_the_newer_version_is_staged_keeps_the_older_one(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Found by review. ``open(O_TRUNC)`` of ``a`` while version 1's upload is
    in flight; the upload fails while the journal makes the new staging
    file in a thread (for a write(), while the whole file is copied).
    ``_stage`` then found version 1 waiting for its retry, not uploading,
    and retired it: its entry left the journal although version 2 was not
    closed, and a crash lost version 1, whose close() had returned."""
    held = faulty.hang("upload", key="a")
    faulty.fail("upload", key="a")
    async with mounted(faulty, tmp_path, crash=True) as m, trio.open_nursery() as nursery:
        await write_until_held(m.fs, "a", b"version 1\n", held, mock_clock)
        real = m.fs.uploads.versions.journal.new_staging
        gate = threading.Event()

        def slow_new_staging() -> tuple[str, Path]:
            gate.wait(10)
            return real()

        m.fs.uploads.versions.journal.new_staging = slow_new_staging  # type: ignore[method-assign]
        node = await lookup(m.fs, "a")
        rewritten = await started(lambda: m.fs.open(node.ino, os.O_WRONLY | os.O_TRUNC), nursery)
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        held.release()  # the upload fails meanwhile; its retry waits
        for _ in range(5):
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        gate.set()
        await rewritten.wait()  # left open when the mount dies
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        assert await read_file(m.fs, "a") == b"version 1\n"


async def test_a_rename_after_a_superseded_upload_whose_reply_was_lost_leaves_no_old_name(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Found by review. Version 1 of ``a`` is stored but the reply is lost
    (the mount sees a failure) while version 2, open, superseded it. ``mv a
    c`` took the branch of a file with nothing in S3 and deleted nothing:
    ``a`` stayed in the bucket for good."""
    held = faulty.hang("upload", key="a")
    faulty.fail("upload", key="a", after=True)
    async with mounted(faulty, tmp_path) as m:
        fh = await _superseded_by_a_newer_version(m, held, mock_clock, newer="open")
        assert fh is not None
        assert "a" in bucket(memory)  # stored, though the mount heard a failure
        await rename(m.fs, "a", "c")
        await close(m.fs, fh)
    assert bucket(memory) == {"c": b"version 2\n"}


async def test_a_newer_version_whose_close_fails_leaves_the_superseded_one(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Version 2's close() fails (ENOSPC in the journal) after version 1's
    upload failed: version 1 stays the file's content, kept in the journal
    at unmount (which must not wait for it) and stored by the next mount."""
    held = faulty.hang("upload", key="a")
    faulty.fail("upload", key="a")
    async with mounted(faulty, tmp_path) as m:
        fh = await _superseded_by_a_newer_version(m, held, mock_clock, newer="open")
        assert fh is not None

        def full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "no space")

        m.fs.uploads.versions.journal.commit = full  # type: ignore[method-assign]
        with pytest.raises(FsError):
            await m.fs.flush(fh)
        with pytest.raises(FsError):
            await m.fs.release(fh)
        with trio.fail_after(5):
            await m.fs.wait_idle()
        assert m.fs.uploads.leftovers().kept == 1
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        assert await read_file(m.fs, "a") == b"version 1\n"
    assert bucket(memory) == {"a": b"version 1\n"}


async def test_a_chmod_while_a_superseded_version_is_in_flight_survives_its_landing(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Found by review. ``chmod 600 a`` while version 1 is in flight and
    version 2 open: version 1 landed with the old mode and was retired with
    no follow-up, so a crash before version 2's close showed mode 644."""
    held = faulty.hang("upload", key="a")
    async with mounted(faulty, tmp_path, crash=True) as m:
        await write_until_held(m.fs, "a", b"version 1\n", held, mock_clock)
        await open_for_rewrite(m.fs, "a", b"version 2\n")
        await m.fs.setattr((await lookup(m.fs, "a")).ino, mode=0o600)
        held.release()
        await let_tasks_run()
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        assert await read_file(m.fs, "a") == b"version 1\n"
        assert (await m.fs.getattr((await lookup(m.fs, "a")).ino)).mode == 0o600


@pytest.mark.expected_log(r"failed for good")
async def test_a_commit_during_the_quarantine_of_a_superseded_version_keeps_it_in_failed(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Found by review. Version 1, superseded by version 2 (open), is refused
    for good and moved to failed/ in a thread; version 2's close meanwhile
    removed version 1's entry from the journal, so failed/ ended up empty
    although the log said the data was kept there (and the move could fail
    with FileNotFoundError in the upload worker)."""
    held = faulty.hang("upload", key="a")
    faulty.fail("upload", key="a", transient=False)
    async with mounted(faulty, tmp_path) as m:
        await write_until_held(m.fs, "a", b"version 1\n", held, mock_clock)
        fh = await open_for_rewrite(m.fs, "a", b"version 2\n")
        node = await lookup(m.fs, "a")
        real = m.fs.uploads.versions.journal.quarantine
        gate = threading.Event()

        def slow_quarantine(entry_id: str) -> Path:
            gate.wait(10)
            return real(entry_id)

        m.fs.uploads.versions.journal.quarantine = slow_quarantine  # type: ignore[method-assign]
        held.release()
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        await close(m.fs, fh)  # version 2 committed while version 1 is being moved
        gate.set()
        await let_tasks_run()
        assert node.superseded == []
        assert sorted(p.suffix for p in (m.journal_dir / "failed").iterdir()) == [".data", ".json"]
    assert bucket(memory) == {"a": b"version 2\n"}


@pytest.mark.parametrize("newer", ["open", "closed"])
async def test_fsync_returns_when_its_upload_fails_after_an_o_trunc_superseded_it(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    newer: str,
) -> None:
    """A process writes ``a`` and fsyncs it; the upload is in flight when
    another open(O_TRUNC) writes version 2 (a new staging file), and then
    fails. The fsync waited on version 1's state, which nothing changed
    again: it hung for good (the process blocked in fsync(2) held the writer
    that kept version 2 from uploading). Now the failed superseded upload
    wakes it, and it finds nothing of its own left to store."""
    held = faulty.hang("upload", key="a")
    faulty.fail("upload", key="a")  # the same, first upload: held, then failing
    async with mounted(faulty, tmp_path) as m, trio.open_nursery() as nursery:
        fh1 = await create(m.fs, "a", b"version 1\n")
        synced = await started(lambda: m.fs.fsync(fh1), nursery)
        await held.reached.wait()
        fh2 = await open_for_rewrite(m.fs, "a", b"version 2\n")
        if newer == "closed":
            await close(m.fs, fh2)
        held.release()  # version 1's upload fails
        await let_tasks_run()
        mock_clock.jump(3600)  # every delay and retry pause is long over
        await let_tasks_run()
        try:
            assert synced.is_set(), "fsync is still waiting"
        finally:
            nursery.cancel_scope.cancel()
        if newer == "open":
            await close(m.fs, fh2)
        await close(m.fs, fh1)
    assert bucket(memory) == {"a": b"version 2\n"}


async def _readable(m: Mount, *names: str) -> dict[str, bytes]:
    """The content of each of ``names`` that the mount shows."""
    found = {}
    for name in names:
        with contextlib.suppress(FsError):  # ENOENT: not there
            found[name] = await read_file(m.fs, name)
    return found


#: ``mv x a`` over a file ``a`` not uploaded yet, after a crash or a failure
#: midway: done, not done, or (a server-side copy) both names hold x.
NEW_OR_OLD_OR_BOTH = (
    {"a": b"X content\n"},
    {"x": b"X content\n", "a": b"old a\n"},
    {"x": b"X content\n", "a": b"X content\n"},
)


async def test_crash_after_renaming_a_stored_file_over_a_pending_one_keeps_the_moved_file(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``x`` is in S3; ``a`` is closed (journal), its upload still in its delay.
    ``mv x a``: the rename copied x to a and deleted x, and only then
    dropped a's journal entry. A crash in between (here: right after S3
    deleted x) recovered a's entry and uploaded it over the copy: x's
    content was under neither name. a's entry now goes between the copy
    and the delete."""
    async with mounted(faulty, tmp_path, crash=True) as m, trio.open_nursery() as nursery:
        fh = await create(m.fs, "x", b"X content\n")
        await m.fs.fsync(fh)  # x in S3
        await close(m.fs, fh)
        await write_file(m.fs, "a", b"old a\n")  # committed, upload in its delay
        held = faulty.hang("delete", key="x", after=True)  # x deleted; then the process dies
        await started(lambda: rename(m.fs, "x", "a"), nursery)
        await held.reached.wait()
        assert bucket(memory) == {"a": b"X content\n"}
        nursery.cancel_scope.cancel()  # the process dies here
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        names = await _readable(m, "x", "a")
    assert names in NEW_OR_OLD_OR_BOTH, names


async def test_a_rename_failing_after_its_delete_keeps_the_moved_file(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """No crash needed. ``x`` is in S3, ``a`` closed and not uploaded yet.
    ``mv x a``: the rename copies x to a, deletes x, then HEADs a to return
    what it stored; that HEAD fails (a transient error after the store's
    retries). rename() used to return EIO with a's journal entry and queued
    upload still there: once the rename's hold ended the upload stored a's
    old bytes over the copy, in a running mount."""
    async with mounted(faulty, tmp_path) as m:
        fh = await create(m.fs, "x", b"X content\n")
        await m.fs.fsync(fh)  # x in S3
        await close(m.fs, fh)
        await write_file(m.fs, "a", b"old a\n")  # committed, upload in its delay
        faulty.fail("head", key="a")  # the HEAD after the delete of x
        with pytest.raises(DgfsError):
            await rename(m.fs, "x", "a")
        mock_clock.jump(OPTIONS.upload_delay)
        await m.fs.wait_idle()
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        names = await _readable(m, "x", "a")
    assert names in NEW_OR_OLD_OR_BOTH, names


@pytest.mark.parametrize("change", ["new file", "rewrite"])
async def test_a_file_closed_during_its_directorys_rename_does_not_bring_the_old_name_back(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    change: str,
) -> None:
    """``mv d e`` copies d's objects one by one. While it does, a file of
    ``d`` is closed: a new ``d/c``, or ``d/a`` rewritten with open(O_TRUNC).
    Its close commits it to the journal under ``d/...``; its upload waits
    for the rename. The rename rewrote the entries of the files it found
    before the copy began, so this one kept its ``d/`` key: a crash after
    ``mv d e`` returned brought ``d`` back, and ``e`` lacked the file (new
    file) or showed its older version (rewrite). Entries now follow the
    name once the rename has moved the nodes (``JournaledVersions.names_moved``)."""
    async with mounted(faulty, tmp_path, crash=True) as m, trio.open_nursery() as nursery:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        fh = await create(m.fs, "a", b"A1\n", parent=d.ino)
        await m.fs.fsync(fh)  # d/a in S3
        await close(m.fs, fh)
        held = faulty.hang("copy", key="d/a")
        renamed = await started(lambda: rename(m.fs, "d", "e"), nursery)
        await held.reached.wait()
        if change == "new file":
            await write_file(m.fs, "c", b"C\n", parent=d.ino)  # close() returned 0
            expected = {"e/a": b"A1\n", "e/c": b"C\n"}
        else:
            a = await lookup(m.fs, "a", d.ino)
            fh = (await m.fs.open(a.ino, os.O_WRONLY | os.O_TRUNC)).fh
            await m.fs.write(fh, 0, b"A2\n")
            await close(m.fs, fh)  # close() returned 0
            expected = {"e/a": b"A2\n"}
        held.release()
        await renamed.wait()  # mv d e returned
        await assert_absent(m.fs, "d")
        nursery.cancel_scope.cancel()  # the process dies before the upload
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        await m.fs.wait_idle()  # the recovered entries stored
    assert {k: v for k, v in bucket(memory).items() if not k.endswith("/")} == expected


async def test_a_file_renamed_while_its_close_is_committed_is_recovered_under_the_new_name(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``close(x)`` is writing x's journal entry (in a thread) when ``mv x y``
    runs and returns: the rename found no committed entry to rewrite, and
    the commit then wrote one under ``x``. It follows the name when the
    commit ends (``UploadPipeline.commit``); a crash after both returned
    recovers the file as ``y``."""
    GatedCommitJournal.gate = threading.Event()
    GatedCommitJournal.gate.set()
    try:
        async with (
            mounted(memory, tmp_path, crash=True, journal_type=GatedCommitJournal) as m,
            trio.open_nursery() as nursery,
        ):
            fh = await create(m.fs, "x", b"X1\n")
            GatedCommitJournal.gate.clear()
            closed = await started(lambda: close(m.fs, fh), nursery)  # in its commit
            await rename(m.fs, "x", "y")
            GatedCommitJournal.gate.set()
            await closed.wait()
            nursery.cancel_scope.cancel()  # the process dies before the upload
    finally:
        GatedCommitJournal.gate.set()
    async with mounted(memory, tmp_path) as m:
        await m.fs.wait_idle()
    assert bucket(memory) == {"y": b"X1\n"}


async def test_a_file_replaced_by_a_rename_whose_reply_was_lost_stays_gone(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Found by the deep model (tests/test_fs_model.py, seed 7608; not deep
    specific): an empty ``d/x.zip`` (stored direct) was replaced by
    ``rename y.whl d/x.zip`` (a delta in another directory: rebuilt and
    stored as ``d/x.zip.delta``), whose upload reached S3 but lost its
    reply; the rename returned 0. ``d/x.zip`` was then renamed to ``d/a``,
    and after a clean remount ``d/x.zip`` was back: the empty file the
    first rename had replaced (POSIX: it is gone for good)."""
    async with mounted(faulty, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        # Trio time moves only here: a clock that jumps while xdelta3 runs
        # (the rename rebuilds y.zip) would pass its time limit at once.
        await write_file(m.fs, "x.zip", b"", d.ino)  # direct: too small for a delta
        await write_file(m.fs, "y.zip", RELEASES[0][1])  # y.zip.delta beside the root's reference
        mock_clock.jump(OPTIONS.upload_delay)
        await m.fs.wait_idle()
        faulty.fail("upload", key="d/x.zip.delta", after=True)
        await m.fs.rename(ROOT, "y.zip", d.ino, "x.zip", 0)
        await m.fs.rename(d.ino, "x.zip", d.ino, "z.zip", 0)
    async with mounted(memory, tmp_path) as m:
        assert sorted(await readdir(m.fs, "d")) == ["z.zip"]
        assert await read_file(m.fs, "z.zip", (await lookup(m.fs, "d")).ino) == RELEASES[0][1]
