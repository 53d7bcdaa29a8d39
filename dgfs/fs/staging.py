"""A staging file: the local content of a file that S3 does not hold yet.

``StagedFile`` is the one owner of a staging file's descriptor. Nobody else
sees the number: reads, writes, truncation and copies go through its
methods, which keep the descriptor open for as long as a worker thread uses
it. ``retire`` (the journal entry is gone: stored, superseded or
discarded) closes it once the last such use ends; ``close`` (shutdown)
closes it at once. After either, the file refuses every use.

Retiring or closing a staging file twice is a bug of its caller: with
``STRICT`` (set by the test suite) it raises ``OwnershipError``; a running
mount logs it with the stack and does nothing, so a second close can never
close a descriptor number that another file has been given since (the cause
of writes that failed with EBADF or landed in another file).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import trio

from dgfs.errors import DgfsError, FsError

log = logging.getLogger(__name__)

#: Ownership bugs raise instead of being logged (the test suite sets it).
STRICT = False


class OwnershipError(RuntimeError):
    """A staging file was retired, closed or used after its owner let it go."""


def _ownership_bug(message: str) -> None:
    if STRICT:
        raise OwnershipError(message)
    log.error("bug: %s", message, stack_info=True)


class Phase(enum.Enum):
    """Where a staged file's upload stands."""

    IDLE = "idle"  # none scheduled: nothing new committed, or a writer still open
    RETRY_WAIT = "retry wait"  # the last attempt failed; the next comes after a pause
    QUEUED = "queued"  # waiting for a worker and for its delay
    UPLOADING = "uploading"  # a worker is storing it
    FAILED = "failed"  # failed for good: the entry is in the journal's failed/


class StagedFile:
    """Local content of a file that S3 does not hold yet (or not this version).

    Every write makes a new version (``generation``); the last one made
    durable in the journal and the last one stored in S3 are recorded, each
    None until it first happens. Only the transitions below change state.
    """

    def __init__(
        self, entry_id: str, path: Path, fd: int, *, committed_as: str | None = None
    ) -> None:
        self.entry_id = entry_id
        self.path = path  # the journal's data file (gone once retired or quarantined)
        # The key its journal manifest names (None until first committed): a
        # rename that overtook a commit finds an entry left under the old name.
        self.journal_key = committed_as
        self._fd: int | None = fd  # None once closed
        self._users = 0  # worker threads using _fd right now (it stays open for them)
        self._writers = 0  # of those, the ones changing the content
        self._writes_done = trio.Event()  # set while no worker thread changes the content
        self._writes_done.set()
        self._generation = 1
        self._committed: int | None = 1 if committed_as is not None else None
        self._uploaded: int | None = None
        self._phase = Phase.IDLE
        self._due = 0.0  # trio time after which a queued upload may start
        self._error: DgfsError | None = None
        self._changed = trio.Event()
        self._hurry = trio.Event()  # set: upload without delay
        self._retired = False  # its journal entry is gone: nothing may write it again
        self._left_journal = False  # its entry went with its name (kept for open handles)
        self._failures = 0  # upload attempts failed in a row (any cause)
        self._local_failures = 0  # of those, failures on this machine (not S3's)
        self._races_lost = 0  # attempts redone in a row: another writer changed the object

    # --- predicates ------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def error(self) -> DgfsError | None:
        """The last upload's error, for fsync() to report (None once retried or committed)."""
        return self._error

    @property
    def is_writable(self) -> bool:
        """Whether new writes may go into this staging file (not being uploaded,
        not moved to failed/); else the next version gets its own."""
        return self._phase not in (Phase.UPLOADING, Phase.FAILED)

    @property
    def is_uploading(self) -> bool:
        return self._phase is Phase.UPLOADING

    @property
    def is_failed(self) -> bool:
        return self._phase is Phase.FAILED

    @property
    def is_committed(self) -> bool:
        """Some version is durable in the journal (a crash does not lose it)."""
        return self._committed is not None

    @property
    def is_dirty(self) -> bool:
        """Written since the last commit."""
        return self._committed is None or self._generation > self._committed

    @property
    def needs_upload(self) -> bool:
        """A committed version is not in S3 yet."""
        if self._committed is None:
            return False
        return self._uploaded is None or self._uploaded < self._committed

    @property
    def was_uploaded(self) -> bool:
        """Some version of it is in S3."""
        return self._uploaded is not None

    @property
    def is_retired(self) -> bool:
        """Forgotten: its journal entry was removed (stored, superseded or discarded)."""
        return self._retired

    @property
    def is_settled(self) -> bool:
        """Everything written is in S3."""
        return self._uploaded is not None and self._uploaded >= self._generation

    # --- transitions -----------------------------------------------------------------

    def retire(self) -> None:
        """Its journal entry is gone: nothing may use it again. The descriptor
        closes once the last read, write or copy using it ends."""
        if self._retired:
            _ownership_bug(f"staging file {self.entry_id} retired twice")
            return
        self._retired = True
        self._hurry.set()  # a worker waiting out its upload delay finds nothing to do
        if self._users == 0:
            self._close_fd()

    def close(self) -> None:
        """The mount stops: close the descriptor now (no worker thread runs)."""
        if self._fd is None:
            if not self._retired:
                _ownership_bug(f"staging file {self.entry_id} closed twice")
            return
        self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # --- using the descriptor ----------------------------------------------------------

    @contextlib.contextmanager
    def _descriptor(self, *, writes: bool = False) -> Iterator[int]:
        """The descriptor, kept open until the block ends even if retired
        meanwhile; ``writes``: the block changes the content."""
        if self._fd is None or self._retired:
            _ownership_bug(f"staging file {self.entry_id} used after it was retired")
            raise FsError(errno.EIO, "staging file is gone")
        if writes and self._writers == 0:
            self._writes_done = trio.Event()
        self._users += 1
        self._writers += writes
        try:
            yield self._fd
        finally:
            self._users -= 1
            self._writers -= writes
            if writes and self._writers == 0:
                self._writes_done.set()
            if self._users == 0 and self._retired:
                self._close_fd()

    @property
    def being_written(self) -> bool:
        """A write or truncation of it runs in a worker thread right now."""
        return self._writers > 0

    async def wait_writes_done(self) -> None:
        """Until no worker thread changes the file (an upload must not start
        while a write it would not see, or only half, is landing; reads,
        however many and however long, do not hold it up)."""
        await self._writes_done.wait()

    async def pread(self, offset: int, size: int, limiter: trio.CapacityLimiter) -> bytes:
        with self._descriptor() as fd:
            return await trio.to_thread.run_sync(os.pread, fd, size, offset, limiter=limiter)

    async def pwrite(self, data: bytes, offset: int, limiter: trio.CapacityLimiter) -> int:
        """Write ``data`` at ``offset``; a new version (``wrote``)."""
        with self._descriptor(writes=True) as fd:
            written = await trio.to_thread.run_sync(os.pwrite, fd, data, offset, limiter=limiter)
        self.wrote()
        return written

    async def truncate(self, size: int, limiter: trio.CapacityLimiter) -> None:
        """Cut or extend to ``size``; a new version (``wrote``)."""
        with self._descriptor(writes=True) as fd:
            await trio.to_thread.run_sync(os.ftruncate, fd, size, limiter=limiter)
        self.wrote()

    async def size(self, limiter: trio.CapacityLimiter) -> int:
        with self._descriptor() as fd:
            return (await trio.to_thread.run_sync(os.fstat, fd, limiter=limiter)).st_size

    async def copy_to(self, dest: Path, limiter: trio.CapacityLimiter) -> None:
        """Copy the content into ``dest``, by descriptor: the path may be gone
        (unlinked while open, moved to failed/)."""
        with self._descriptor() as fd:
            await trio.to_thread.run_sync(_copy_from_fd, fd, dest, limiter=limiter)

    def wrote(self) -> None:
        """The content changed (write, truncate): a new version."""
        self._generation += 1

    def mark_committed(self, generation: int, key: str) -> None:
        self._committed = max(self._committed or 0, generation)
        self._error = None
        self.journal_key = key

    def journaled_as(self, key: str) -> None:
        """Its journal manifest was rewritten to name ``key``."""
        self.journal_key = key

    def mark_queued(self, due: float) -> None:
        assert self._phase is Phase.IDLE
        self._phase = Phase.QUEUED
        self._due = due

    def take(self) -> None:
        """A worker has it: no longer queued (it may find nothing to do)."""
        if self._phase is Phase.QUEUED:
            self._phase = Phase.IDLE

    def start_upload(self) -> int:
        """Uploading now; returns the version being stored."""
        assert self._committed is not None and self._phase is Phase.IDLE
        self._phase = Phase.UPLOADING
        return self._committed

    def landed(self, generation: int) -> None:
        """Version ``generation`` is stored. A hurry was for this upload (its
        retries and redos too): the next waits out its delay, and for its
        writers."""
        self._phase = Phase.IDLE
        self._uploaded = max(self._uploaded or 0, generation)
        if not self._retired:
            self._hurry = trio.Event()
        self._failures = self._local_failures = self._races_lost = 0

    def failed_transiently(self, error: DgfsError, *, local: bool) -> None:
        """The upload failed and will be retried; fsync() waiters hear ``error``.
        ``local``: it failed on this machine (disk, cache, xdelta3), not in S3."""
        self._phase = Phase.RETRY_WAIT
        self._error = error
        # The fsync that hurried it hears the error and stops waiting: the
        # retry waits out its pause and its writers again (an fsync asking
        # once more hurries it again).
        if not self._retired:
            self._hurry = trio.Event()
        self._failures += 1
        self._local_failures += local
        self.notify()

    def lost_race(self) -> None:
        """Another writer changed the object this upload depends on while it
        was stored: nothing failed, so fsync() waiters hear nothing and the
        upload is queued again at once."""
        assert self._phase is Phase.UPLOADING
        self._phase = Phase.IDLE
        self._races_lost += 1

    @property
    def races_lost(self) -> int:
        """Attempts redone in a row because another writer changed the object."""
        return self._races_lost

    @property
    def failures(self) -> int:
        """Upload attempts that failed in a row (0 once one lands)."""
        return self._failures

    @property
    def local_failures(self) -> int:
        """Of ``failures``, those on this machine rather than in S3."""
        return self._local_failures

    def retrying(self) -> None:
        """The pause after a failure is over: it may be queued again."""
        if self._phase is Phase.RETRY_WAIT:
            self._phase = Phase.IDLE
        self._error = None

    def stopped(self) -> None:
        """Its upload ended without landing and is not tried again (a newer
        version replaced it meanwhile)."""
        assert self._phase is Phase.UPLOADING
        self._phase = Phase.IDLE

    def failed_for_good(self, error: DgfsError) -> None:
        """Never retried: the entry goes to failed/ (``notify`` once it is there)."""
        self._phase = Phase.FAILED
        self._error = error

    def hurry(self) -> None:
        """Somebody waits for this upload: no delay."""
        self._hurry.set()

    @property
    def is_hurried(self) -> bool:
        """Somebody waits for its next upload (fsync, a close with
        sync_upload, the unmount): it goes even while a writer has it open."""
        return self._hurry.is_set()

    @property
    def in_journal(self) -> bool:
        """Its entry is still the journal's (not taken out with its name:
        ``left_journal``)."""
        return not self._left_journal

    def left_journal(self) -> None:
        """Its name went and its entry with it; open handles go on using it."""
        self._left_journal = True

    async def wait_due(self) -> None:
        """Until the upload delay is over, or somebody hurries it."""
        with trio.move_on_at(self._due):
            await self._hurry.wait()

    def notify(self) -> None:
        """Wake whoever waits for this file's upload state to change."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()


def _copy_from_fd(src_fd: int, dest: os.PathLike[str]) -> None:
    offset = 0
    with open(dest, "wb") as fout:
        while chunk := os.pread(src_fd, 1 << 20, offset):
            fout.write(chunk)
            offset += len(chunk)
