"""One file, several processes at once: close, unlink, chmod, truncate and
a second open for writing, racing the file's journal commit and upload.
The kernel sends FLUSH and RELEASE without the inode lock, so each of
these interleavings happens on a real mount; each test failed before its
fix (a close failing with ENOENT or hanging, a chmod lost after a crash,
a truncate lost, half a file stored as its directory's reference)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from dgfs.errors import TransientError
from dgfs.fs.filesystem import FsOptions
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from tests.fsharness import (
    OPTIONS,
    ROOT,
    GatedCommitJournal,
    Mount,
    bucket,
    close,
    create,
    flush_outcome,
    let_tasks_run,
    lookup,
    mounted,
    started,
    write_file,
)

pytestmark = pytest.mark.timeout(30)


async def test_close_racing_an_unlink_of_the_same_file_succeeds(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Process P closes a file it wrote (flush: journal commit in a worker
    thread) while process Q unlinks it (the kernel does not serialize
    FUSE_FLUSH with UNLINK). close() must return 0: POSIX close after an
    unlink succeeds, and SEMANTICS.md says close fails only on ENOSPC/EIO of
    the journal."""
    GatedCommitJournal.gate = threading.Event()
    GatedCommitJournal.gate.set()
    outcome: dict[str, object] = {}
    try:
        async with (
            mounted(memory, tmp_path, journal_type=GatedCommitJournal) as m,
            trio.open_nursery() as nursery,
        ):
            fh = await create(m.fs, "a", b"being written\n")
            GatedCommitJournal.gate.clear()

            flushed = await started(
                lambda: flush_outcome(m.fs, fh, outcome), nursery
            )  # in journal.commit, gated
            await m.fs.unlink(ROOT, "a")  # takes the entry out of the journal
            GatedCommitJournal.gate.set()
            await flushed.wait()
            await m.fs.release(fh)
        assert outcome["flush"] == 0, f"close() failed with {outcome['flush']}"
        assert bucket(memory) == {}
    finally:
        GatedCommitJournal.gate.set()


async def test_sync_upload_close_racing_an_unlink_returns(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """With ``-o sync_upload`` the last writer's close waits for the upload
    (wait_uploaded: hurry, then staged.wait_changed()). Process Q unlinks the
    file while P closes it: the unlink holds uploads (``hold``) while it
    deletes the object in S3, the worker taking P's upload waits for that,
    then finds the node unlinked and returns without notifying. Nobody ever
    notifies P's waiter: close(2) hangs for good."""
    options = FsOptions(upload_delay=0.5, retry_delay=2.0, sync_upload=True)
    async with mounted(faulty, tmp_path, options) as m, trio.open_nursery() as nursery:
        await write_file(m.fs, "a", b"version 1\n")  # stored (sync_upload)
        node = await lookup(m.fs, "a")
        fh = (await m.fs.open(node.ino, os.O_WRONLY)).fh
        await m.fs.write(fh, 0, b"VERSION 2\n")
        held = faulty.hang("delete_many")
        unlinked = await started(lambda: m.fs.unlink(ROOT, "a"), nursery)
        await held.reached.wait()  # the unlink deletes in S3, uploads held
        closed = await started(lambda: m.fs.flush(fh), nursery)  # P's close
        while not (node.staged is not None and node.staged.is_committed):
            await trio.to_thread.run_sync(time.sleep, 0.01)  # its journal commit lands
        await let_tasks_run()
        assert not closed.is_set()
        held.release()
        await let_tasks_run()
        mock_clock.jump(3600)  # an hour later: still waiting
        await let_tasks_run()
        try:
            assert unlinked.is_set()
            assert closed.is_set(), "close() (flush with sync_upload) never returns"
        finally:
            nursery.cancel_scope.cancel()


async def test_a_file_reopened_for_writing_within_the_upload_delay_is_not_uploaded_half_done(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``echo header > d/app.zip; long_cmd >> d/app.zip``: the first close
    queues the upload (upload_delay); the second command opens the file
    again and is still appending when the delay ends. ``_upload`` never
    looks at ``node.writers`` again: it uploads the staging file as it is
    on disk, half of what the second command writes, while a handle that may
    write is open. SEMANTICS.md: "A file is uploaded once the last handle that
    may write to it is closed ... half a file must not reach S3 (the first
    file of a directory becomes its reference for good)"."""
    from tests.fsharness import GID, RELEASES, UID

    full = RELEASES[0][1]
    head, middle = full[:4096], full[: len(full) // 2]
    async with mounted(memory, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await write_file(m.fs, "app.zip", head, d.ino)  # echo header > d/app.zip
        node = await lookup(m.fs, "app.zip", d.ino)
        fh = (await m.fs.open(node.ino, os.O_WRONLY | os.O_APPEND)).fh  # long_cmd >> d/app.zip
        await m.fs.write(fh, len(head), middle[len(head) :])  # half of it so far
        mock_clock.jump(OPTIONS.upload_delay)  # the first close's upload comes due
        await let_tasks_run()
        uploaded_while_open = {k: len(v) for k, v in bucket(memory).items() if k != "d/"}
        await m.fs.write(fh, len(middle), full[len(middle) :])
        await close(m.fs, fh)
    final = {k: len(v) for k, v in bucket(memory).items() if k != "d/"}
    assert uploaded_while_open in ({}, {"d/app.zip": len(head)}), (
        f"uploaded while a writer was open: {uploaded_while_open} (file: {len(full)} bytes;"
        f" after the close: {final})"
    )


async def test_a_chmod_during_a_close_survives_a_crash(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """P closes ``a`` (flush: ``commit`` takes ``node.posix_metadata()``, then
    writes the manifest in a worker thread); Q's chmod 600 arrives meanwhile
    (FUSE_FLUSH does not hold the inode lock). ``carries_attributes`` finds
    the staging file not committed yet and says the commit will carry the
    mode, but the commit already took the old one. chmod returned; a crash
    before the upload recovers the file with mode 644 (SEMANTICS.md: on a
    file not uploaded yet the journal entry changes too, so a crash keeps
    them)."""
    GatedCommitJournal.gate = threading.Event()
    GatedCommitJournal.gate.set()
    try:
        async with (
            mounted(memory, tmp_path, journal_type=GatedCommitJournal, crash=True) as m,
            trio.open_nursery() as nursery,
        ):
            fh = await create(m.fs, "a", b"data\n")
            node = await lookup(m.fs, "a")
            GatedCommitJournal.gate.clear()
            flushed = await started(lambda: m.fs.flush(fh), nursery)  # commit gated
            await m.fs.setattr(node.ino, mode=0o600)  # chmod returns
            GatedCommitJournal.gate.set()
            await flushed.wait()  # close() returned
            await m.fs.release(fh)
            await let_tasks_run()  # the upload is still in its delay: then a crash
        async with mounted(memory, tmp_path) as m:
            assert m.recovered == 1
            node = await m.fs.getattr((await lookup(m.fs, "a")).ino)
            assert oct(node.mode) == oct(0o600)
    finally:
        GatedCommitJournal.gate.set()


async def test_a_truncate_racing_the_release_of_the_last_reader_takes_effect(
    memory: MemoryStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``a`` was written and uploaded while a reader (``cat a``) had it open:
    its staging file stays, settled, for that handle. ``truncate -s 5 a``
    (no handle of its own) finds that staging file writable and cuts it in
    a worker thread; meanwhile the reader closes (FUSE_RELEASE takes no
    inode lock): ``released`` -> ``_settle`` sees no handle left and the
    staging file "settled" (the truncate has not counted its version yet),
    drops it and retires it. The truncate lands in the retired file, its
    ``commit`` finds ``node.staged`` None: truncate(2) returned 0, stat says
    5 bytes, but reads and S3 keep the old content."""
    gate = threading.Event()
    real_ftruncate = os.ftruncate

    def gated_ftruncate(fd: int, length: int) -> None:
        if length == 5:
            gate.wait(timeout=20)
        real_ftruncate(fd, length)

    monkeypatch.setattr(os, "ftruncate", gated_ftruncate)
    data = b"0123456789abcdef\n"
    try:
        async with mounted(memory, tmp_path) as m, trio.open_nursery() as nursery:
            await write_file(m.fs, "a", data)
            node = await lookup(m.fs, "a")
            reader = await m.fs.open(node.ino, os.O_RDONLY)  # cat a
            assert await m.fs.read(reader.fh, 0, 100) == data
            mock_clock.jump(OPTIONS.upload_delay)
            await m.fs.wait_idle()  # uploaded; the staging file stays for the reader
            assert bucket(memory) == {"a": data}
            truncated = await started(lambda: m.fs.setattr(node.ino, size=5), nursery)
            await m.fs.release(reader.fh)  # cat exits
            gate.set()
            await truncated.wait()  # truncate(2) returned
            size = (await m.fs.getattr(node.ino)).size
            content = await _read(m, node.ino)
            mock_clock.jump(OPTIONS.upload_delay)
            await m.fs.wait_idle()
        assert (size, content, bucket(memory)) == (5, data[:5], {"a": data[:5]})
    finally:
        gate.set()


async def _read(m: Mount, ino: int) -> bytes:
    handle = await m.fs.open(ino, os.O_RDONLY)
    try:
        return await m.fs.read(handle.fh, 0, 1 << 20)
    finally:
        await m.fs.release(handle.fh)


async def test_close_racing_a_rename_over_the_file_returns_0(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """P closes ``b`` (flush: journal commit in a worker thread) while Q runs
    ``mv a b`` (a stored in S3). The rename keeps a copy for P's handle and
    takes b's entry out of the journal (``lost_name(kept=True)``) right after
    the S3 copy, but marks b unlinked only at its very end (``nodes.move``).
    The commit, resuming in between, finds neither ``node.unlinked`` nor
    ``staged.is_retired``: close() fails with ENOENT. The commit message says
    this race ("or a rename replaced it") returns 0."""
    GatedCommitJournal.gate = threading.Event()
    GatedCommitJournal.gate.set()
    outcome: dict[str, object] = {}
    try:
        async with (
            mounted(faulty, tmp_path, journal_type=GatedCommitJournal) as m,
            trio.open_nursery() as nursery,
        ):
            await write_file(m.fs, "a", b"file a\n")
            mock_clock.jump(OPTIONS.upload_delay)
            await m.fs.wait_idle()
            assert bucket(memory) == {"a": b"file a\n"}
            fh = await create(m.fs, "b", b"being written\n")
            GatedCommitJournal.gate.clear()

            flushed = await started(
                lambda: flush_outcome(m.fs, fh, outcome), nursery
            )  # in journal.commit, gated
            held = faulty.hang("delete", key="a")  # the rename's delete of the old name
            renamed = await started(lambda: m.fs.rename(ROOT, "a", ROOT, "b", 0), nursery)
            await held.reached.wait()  # copied; b's entry is out of the journal
            GatedCommitJournal.gate.set()
            await flushed.wait()
            held.release()
            await renamed.wait()
            await m.fs.release(fh)
        assert outcome["flush"] == 0, f"close() failed with {outcome['flush']}"
        assert bucket(memory) == {"b": b"file a\n"}
    finally:
        GatedCommitJournal.gate.set()


async def test_an_fsync_long_ago_does_not_let_a_later_upload_take_half_a_file(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``StagedFile.is_hurried`` is ``_hurry.is_set()``, and ``_hurry`` is
    never cleared: one fsync on a staging file makes every later upload of
    it "hurried". So a program that fsyncs, writes on and closes, followed
    by ``cmd >> f`` (the case test_one_file_at_once fixed), has no upload
    delay and no writer check: the worker waits for cmd's write to land and
    stores it while cmd still has the file open."""
    from tests.fsharness import GID, UID

    full = bytes(i % 251 for i in range(200_000))  # stored direct: sizes tell
    head, middle = full[:4096], full[: len(full) // 2]
    async with mounted(memory, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        fh = await create(m.fs, "app.bin", head, d.ino)
        await m.fs.fsync(fh)  # stored: head
        await m.fs.write(fh, len(head), full[len(head) : 8192])  # writes on
        await m.fs.flush(fh)
        await m.fs.release(fh)  # close: queued, "hurried" since the fsync
        node = await lookup(m.fs, "app.bin", d.ino)
        fh2 = (await m.fs.open(node.ino, os.O_WRONLY | os.O_APPEND)).fh  # cmd >> d/app.bin
        await m.fs.write(fh2, 8192, middle[8192:])  # half of what cmd writes
        await let_tasks_run()  # no clock jump: the upload delay is not even over
        while_open = len(bucket(memory).get("d/app.bin", b""))
        await m.fs.write(fh2, len(middle), full[len(middle) :])
        await m.fs.flush(fh2)
        await m.fs.release(fh2)
    assert while_open in (len(head), 8192), (
        f"stored {while_open} bytes while a writer was open (closed: 8192; file: {len(full)})"
    )


async def test_an_fsync_whose_upload_lost_a_race_never_waits_out_the_upload_delay(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path
) -> None:
    """A race lost to another writer is "redone at once, fsync waiting on"
    (upload_failures). With the hurry ended as the upload started, the redo
    of an fsync'ed upload whose writer is still open waited out the whole
    upload delay: every race lost cost the fsync an upload delay. The hurry
    now lasts until the upload lands. Real clock."""
    import trio

    from dgfs.errors import WriteConflict
    from dgfs.fs.filesystem import FsOptions
    from tests.fsharness import bucket, close, create, mounted

    options = FsOptions(upload_delay=30.0, retry_delay=2.0)
    faulty.fail("upload", key="a.txt", times=1, error=WriteConflict, after=True)
    async with mounted(faulty, tmp_path, options) as m:
        fh = await create(m.fs, "a.txt", b"contested\n")
        with trio.move_on_after(5) as waited:
            await m.fs.fsync(fh)
        assert not waited.cancelled_caught, "fsync still waiting after 5 s (upload_delay is 30 s)"
        await close(m.fs, fh)
    assert bucket(memory) == {"a.txt": b"contested\n"}


@pytest.mark.expected_log(r"upload of a.bin failed \(injected")
async def test_a_failed_fsync_does_not_let_its_retry_store_half_a_file_while_open(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """fsync's upload fails transiently: fsync reports EIO and returns (nobody
    waits any more), the program writes on (the staging file still takes
    writes in RETRY_WAIT). The hurry was kept until an upload landed, so the
    retry went with the writer open and stored the file mid-write: the half
    file the writer check exists to keep out of S3. It ends with the
    failure the fsync heard now."""
    faulty = FaultyStore(memory)
    faulty.fail("upload", key="a.bin", times=1)
    full = bytes(i % 251 for i in range(200_000))
    head, half = full[:4096], full[:100_000]
    async with mounted(faulty, tmp_path) as m:
        fh = await create(m.fs, "a.bin", head)
        with pytest.raises(TransientError):
            await m.fs.fsync(fh)  # EIO: fsync is done waiting
        await m.fs.write(fh, len(head), half[len(head) :])  # writes on, half so far
        mock_clock.jump(OPTIONS.retry_delay + OPTIONS.upload_delay + 1)
        await let_tasks_run()
        while_open = len(bucket(memory).get("a.bin", b""))
        await m.fs.write(fh, len(half), full[len(half) :])
        await m.fs.flush(fh)
        await m.fs.release(fh)
    assert bucket(memory)["a.bin"] == full
    assert while_open == 0, f"stored {while_open} bytes while a writer was open (file: {len(full)})"
