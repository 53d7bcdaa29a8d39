"""Every acknowledged write survives a local failure of its upload.

A file whose close() returned is in the journal; what goes wrong while it
is stored — the local disk full while xdelta3 encodes, xdelta3 killed, the
reference's cache entry corrupt, S3 unreachable for minutes — is retried
(with the data kept in the journal) and, when making its delta keeps
failing on this machine, the file is stored whole. Only S3 refusing the
write itself moves an entry to the journal's failed/
(``test_filesystem.py::test_permanent_failure_keeps_the_file_in_failed``).

In-process, as tests/fsharness.py mounts a ``FileSystem``; files are
real release zips, so they are stored as xdelta3 deltas. The clock is
real (xdelta3 is a process) with retry pauses of milliseconds, except for
the S3 outage, which runs on trio's autojump clock.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from dgfs.delta import DeltaEngine
from dgfs.errors import (
    AccessDenied,
    DeltaEngineError,
    FormatError,
    NoSuchBucket,
    NotFound,
    PreconditionFailed,
    StoreError,
    TransientError,
    WriteConflict,
    errno_of,
)
from dgfs.fs.filesystem import FsOptions
from dgfs.fs.upload_failures import RACES_REDONE_AT_ONCE, Next, judge, retry_delay, store_whole
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from tests.fsharness import (
    GID,
    ROOT,
    UID,
    close,
    create,
    journal_entries,
    lookup,
    mounted,
    read_file,
    write_file,
    write_until_held,
)
from testsupport.releases import ReleaseSeries

pytestmark = pytest.mark.timeout(60)

FAST_RETRIES = FsOptions(upload_delay=0.0, retry_delay=0.01)
RELEASES = list(ReleaseSeries(size=512 << 10).zips(3))  # zips of ~250 KB: deltas


class FailingEngine(DeltaEngine):
    """xdelta3 whose encodes fail with ``error`` the first ``times`` runs (None: always)."""

    def __init__(self, error: BaseException, times: int | None) -> None:
        super().__init__()
        self.error = error
        self.times = times
        self.encodes = 0

    async def encode(self, source: Path, target: Path, out: Path) -> int:
        self.encodes += 1
        if self.times is None or self.encodes <= self.times:
            raise self.error
        return await super().encode(source, target, out)


def stored_forms(memory: MemoryStore) -> dict[str, str]:
    """Each release's key in the bucket -> "delta" or "whole"."""
    forms = {}
    for key in memory.objects:
        name = key.removeprefix("rel/").removesuffix(".delta")
        if name.endswith(".zip"):
            forms[name] = "delta" if key.endswith(".delta") else "whole"
    return forms


async def store_releases(
    store: MemoryStore | FaultyStore, tmp_path: Path, engine: DeltaEngine | None = None
) -> Path:
    """Write the first release, then (with ``engine``) the next ones; returns the journal."""
    async with mounted(store, tmp_path, FAST_RETRIES) as m:
        d = await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        name, data = RELEASES[0]
        await write_file(m.fs, name, data, parent=d.ino)
    async with mounted(store, tmp_path, FAST_RETRIES, engine=engine) as m:
        d = await lookup(m.fs, "rel")
        for name, data in RELEASES[1:]:
            await write_file(m.fs, name, data, parent=d.ino)
    return m.journal_dir


async def assert_all_read_back(memory: MemoryStore, tmp_path: Path) -> None:
    async with mounted(memory, tmp_path) as m:  # a fresh cache
        d = await lookup(m.fs, "rel")
        for name, data in RELEASES:
            assert await read_file(m.fs, name, d.ino) == data


def assert_nothing_failed(journal_dir: Path) -> None:
    """Every entry uploaded and gone; none in failed/."""
    assert journal_entries(journal_dir) == []
    assert not (journal_dir / "failed").exists()


@pytest.mark.expected_log(r"upload of rel/.* failed \(.*No space left")
async def test_a_full_disk_while_xdelta3_encodes_is_retried_and_the_delta_stored(
    memory: MemoryStore, tmp_path: Path
) -> None:
    engine = FailingEngine(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), times=1)
    journal_dir = await store_releases(memory, tmp_path, engine)
    assert_nothing_failed(journal_dir)
    assert stored_forms(memory) == {name: "delta" for name, _ in RELEASES}
    await assert_all_read_back(memory, tmp_path)


@pytest.mark.expected_log(r"upload of rel/.* failed \(xdelta3 killed")
async def test_xdelta3_killed_every_time_stores_the_file_whole(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Its delta failed here twice (the OOM killer, say): the third attempt
    stores it whole; nothing goes to failed/, and nothing is lost."""
    engine = FailingEngine(DeltaEngineError("xdelta3 killed by signal 9"), times=None)
    journal_dir = await store_releases(memory, tmp_path, engine)
    assert_nothing_failed(journal_dir)
    assert engine.encodes == 2 * (len(RELEASES) - 1)
    forms = stored_forms(memory)
    assert forms[RELEASES[0][0]] == "delta"  # the reference's zero-diff delta, stored before
    assert [forms[name] for name, _ in RELEASES[1:]] == ["whole"] * (len(RELEASES) - 1)
    await assert_all_read_back(memory, tmp_path)


@pytest.mark.expected_log(r"cache entry .* is corrupt")
async def test_a_corrupt_reference_cache_entry_is_fetched_again(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Reproduced on a real mount before the fix: the next version's upload
    found the reference's cache entry corrupt (4 bytes overwritten), the
    entry went to failed/ and the file was gone after a remount."""
    async with mounted(memory, tmp_path, FAST_RETRIES) as m:
        d = await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        name, data = RELEASES[0]
        await write_file(m.fs, name, data, parent=d.ino)
        await m.fs.wait_idle()
        cache = m.fs.core.cache
        entry = cache._directory / cache._cid(hashlib.sha256(data).hexdigest())
        with open(entry, "r+b") as f:
            f.seek(entry.stat().st_size // 2)
            f.write(b"\xde\xad\xbe\xef")
        for name, data in RELEASES[1:]:
            await write_file(m.fs, name, data, parent=d.ino)
    assert_nothing_failed(m.journal_dir)
    assert stored_forms(memory) == {name: "delta" for name, _ in RELEASES}
    await assert_all_read_back(memory, tmp_path)


@pytest.mark.expected_log(r"upload of a.txt failed \(injected")
async def test_s3_unreachable_for_ten_minutes_loses_nothing(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The first 14 PUTs fail: ten minutes of trio time, as the pauses
    between attempts double from 2 s up to a minute. fsync reports EIO
    meanwhile, and the file is stored as soon as S3 answers again."""
    faulty = FaultyStore(memory)
    faulty.fail("upload", key="a.txt", times=14)
    async with mounted(faulty, tmp_path, FsOptions(upload_delay=0.5, retry_delay=2.0)) as m:
        fh = await create(m.fs, "a.txt", b"kept through the outage\n")
        await close(m.fs, fh)
        node = await lookup(m.fs, "a.txt")
        handle = await m.fs.open(node.ino, os.O_RDONLY)
        await faulty.wait_calls("upload", 3)
        with pytest.raises(TransientError) as exc:  # an attempt still fails after this
            await m.fs.fsync(handle.fh)
        assert errno_of(exc.value) == errno.EIO
        (retrying,) = m.fs.uploads.retrying()  # what dgfs status lists
        assert retrying.path == "a.txt" and retrying.failures >= 3
        assert "injected failure" in retrying.error
        await faulty.wait_calls("upload", 15)
        await m.fs.fsync(handle.fh)
        await m.fs.release(handle.fh)
        assert m.fs.uploads.retrying() == []
        attempts = [c.at for c in faulty.log if c.operation == "upload"]
        assert len(attempts) == 15  # fsync reported the error; it started no extra attempt
        # 2, 4, 8, 16, 32, then 60 s apart at least (the clock may jump further
        # while a worker thread runs, never less).
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert all(gap >= min(2.0 * 2**i, 60.0) for i, gap in enumerate(gaps)), gaps
        assert attempts[-1] - attempts[0] >= 602
    assert memory.objects["a.txt"].body == b"kept through the outage\n"
    assert_nothing_failed(m.journal_dir)


# --- the rules themselves (dgfs/fs/upload_failures.py) ---------------------------------


@pytest.mark.parametrize(
    ("exc", "direct", "races_lost", "expected", "local"),
    [
        (AccessDenied("no"), False, 0, Next.GIVE_UP, False),
        (NoSuchBucket("gone"), False, 0, Next.GIVE_UP, False),
        (StoreError("HTTP 400"), False, 0, Next.GIVE_UP, False),
        (TransientError("HTTP 503"), False, 0, Next.RETRY, False),
        (NotFound("reference gone"), False, 0, Next.RETRY, False),
        (PreconditionFailed("lost the condition"), False, 0, Next.RETRY, False),
        (OSError(errno.ENOSPC, "full"), False, 0, Next.RETRY, True),
        (DeltaEngineError("xdelta3 killed"), False, 0, Next.RETRY, True),
        (FormatError("reserved name"), False, 0, Next.RETRY, True),  # a delta: stored whole next
        (FormatError("reserved name"), True, 0, Next.GIVE_UP, True),  # whole, and still refused
        (WriteConflict("another writer"), False, 0, Next.REDO, False),
        (WriteConflict("another writer"), False, RACES_REDONE_AT_ONCE - 1, Next.REDO, False),
        (WriteConflict("another writer"), False, RACES_REDONE_AT_ONCE, Next.RETRY, False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_a_failed_attempt_is_given_up_redone_or_retried_by_one_rule(
    exc: BaseException, direct: bool, races_lost: int, expected: Next, local: bool
) -> None:
    verdict = judge(exc, direct=direct, races_lost=races_lost)
    assert (verdict.next, verdict.local) == (expected, local)
    assert errno_of(verdict.error) == (exc.errno if isinstance(exc, OSError) else errno_of(exc))


def test_the_pause_doubles_up_to_a_minute_and_local_failures_store_whole() -> None:
    assert [retry_delay(2.0, n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(120.0, 3) == 120.0  # a longer base than the cap is kept
    assert [store_whole(n) for n in range(4)] == [False, False, True, True]


# The fault this test injects is logged (and, once fixed, its retry): expected.
@pytest.mark.expected_log(r"injected failure: copy a a")
async def test_a_chmod_made_during_an_upload_survives_one_failed_metadata_rewrite(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
) -> None:
    """``chmod 600 a; touch -d 2001-09-09 a`` while ``a``'s upload is in
    flight: both return 0 and go into the journal entry. The upload lands;
    its follow-up (a CopyObject of ``a`` onto itself with the new metadata)
    fails once (throttling, a 5xx after the store's own retries). The mount
    logs an ERROR, drops the journal entry and shows 600 until the listing
    expires; after that, and after a clean unmount and remount, ``a`` is
    back to 644 and its upload time, for good. Nothing retries it. It
    should be stored as every other acknowledged change is: retried while
    the mount runs, kept in the journal meanwhile (docs/SEMANTICS.md,
    Durability; chmod "on a file ... being uploaded, the journal entry
    changes too").

    (Before: ``UploadPipeline._follow_up`` caught the failure of
    ``core.update_metadata`` and only logged it, and the file settled,
    its journal entry gone. Now the version counts as not uploaded and is
    stored again with them after the pause.)"""
    held = faulty.hang("upload", key="a")
    async with mounted(faulty, tmp_path) as m:
        await write_until_held(m.fs, "a", b"data\n", held, mock_clock)
        node = await lookup(m.fs, "a")
        await m.fs.setattr(node.ino, mode=0o600, mtime_ns=1_000_000_000_000_000_000)
        faulty.fail("copy", key="a")  # the follow-up's metadata rewrite, once
        held.release()
        mock_clock.autojump_threshold = 0  # through the retry's pause
        await m.fs.wait_idle()
    faulty.clear()
    async with mounted(memory, tmp_path) as m:
        node = await lookup(m.fs, "a")
        shown = (node.mode, node.mtime_ns)
    assert shown == (0o600, 1_000_000_000_000_000_000)
