"""Ways of reading a file's bytes for an open handle.

``StoredContent`` chooses how what S3 holds is read (and copied, when a
file is written again):

- ``StagingReader``: a file with local, not yet uploaded content.
- ``CachedReader``: content materialized in the encrypted cache (deltas,
  and direct files small enough to verify whole on open).
- ``RangeReader``: large direct and foreign objects, by ranged GETs with a
  growing read-ahead window; never downloads the object on open. A reader
  that goes through the file in order gets its SHA-256 checked at the end
  (``IntegrityError`` instead of the final bytes on mismatch).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import trio

from dgfs.cache import CacheEntryReader
from dgfs.core import Core
from dgfs.errors import FormatError, FsError, IntegrityError
from dgfs.format import Kind, StoredFile
from dgfs.store.base import ObjectStore

log = logging.getLogger(__name__)

MIN_WINDOW = 1 << 20
MAX_WINDOW = 16 << 20
# The kernel reads ahead with several requests at once and they reach us in
# any order; pieces beyond the hashed prefix wait here (up to this much).
MAX_HELD_AHEAD = 2 * MAX_WINDOW


class Reader(abc.ABC):
    @abc.abstractmethod
    async def read(self, offset: int, size: int) -> bytes: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the reader holds."""


class StagingReader(Reader):
    def __init__(self, fd: int, limiter: trio.CapacityLimiter) -> None:
        self.fd = fd
        self.limiter = limiter

    async def read(self, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self.fd, size, offset, limiter=self.limiter)


class CachedReader(Reader):
    def __init__(self, reader: CacheEntryReader, limiter: trio.CapacityLimiter) -> None:
        self.reader = reader
        self.limiter = limiter

    async def read(self, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(self.reader.read, offset, size, limiter=self.limiter)

    async def close(self) -> None:
        self.reader.close()


class RangeReader(Reader):
    """Ranged GETs with read-ahead over one object of known size."""

    def __init__(
        self, store: ObjectStore, key: str, size: int, expected_sha256: str | None
    ) -> None:
        self.store = store
        self.key = key
        self.size = size
        self.expected_sha256 = expected_sha256
        self._buf = b""
        self._buf_start = 0
        self._window = MIN_WINDOW
        self._lock = trio.Lock()
        # Sequential verification state.
        self._sha = hashlib.sha256() if expected_sha256 else None
        self._hashed_upto = 0
        self._held: dict[int, bytes] = {}  # offset -> bytes read ahead of _hashed_upto
        self._held_bytes = 0
        # Once the whole file failed its check every later read fails too: the
        # kernel retries a failed read-ahead page with a read of its own.
        self._mismatch: IntegrityError | None = None

    async def _fetch(self, start: int, length: int) -> bytes:
        return await self.store.get_range(self.key, start, length)

    async def read(self, offset: int, size: int) -> bytes:
        if self._mismatch is not None:
            raise self._mismatch
        if offset >= self.size:
            return b""
        size = min(size, self.size - offset)
        async with self._lock:
            end = offset + size
            buf_end = self._buf_start + len(self._buf)
            if not (self._buf_start <= offset and end <= buf_end):
                sequential = offset == buf_end
                self._window = min(self._window * 2, MAX_WINDOW) if sequential else MIN_WINDOW
                length = max(size, self._window)
                self._buf = await self._fetch(offset, length)
                self._buf_start = offset
                if len(self._buf) < min(size, self.size - offset):
                    raise IntegrityError(f"{self.key}: object shorter than recorded")
            start = offset - self._buf_start
            data = self._buf[start : start + size]
            self._verify(offset, data)
            return data

    def _verify(self, offset: int, data: bytes) -> None:
        """Hash what was read, in file order; raise on the read that completes a bad file.

        Reads that arrive ahead of the hashed prefix (the kernel's concurrent
        read-ahead) are held until the gap is filled; a reader that really
        jumps around holds too much and is not verified.
        """
        if self._sha is None or offset + len(data) <= self._hashed_upto:
            return
        if offset > self._hashed_upto:
            if len(data) > len(self._held.get(offset, b"")):
                self._held_bytes += len(data) - len(self._held.get(offset, b""))
                self._held[offset] = data
            if self._held_bytes > MAX_HELD_AHEAD:
                self._sha = None  # not a sequential reader: cannot verify
                self._held.clear()
            return
        self._hash_from(offset, data)
        while self._held:
            start = min(self._held)
            if start > self._hashed_upto:
                break
            piece = self._held.pop(start)
            self._held_bytes -= len(piece)
            self._hash_from(start, piece)
        if self._hashed_upto >= self.size:
            good = self._sha.hexdigest() == self.expected_sha256
            self._sha = None
            self._held.clear()
            if not good:
                self._mismatch = IntegrityError(
                    f"{self.key}: SHA-256 mismatch; refusing to return wrong bytes"
                )
                raise self._mismatch

    def _hash_from(self, offset: int, data: bytes) -> None:
        """Hash the part of ``data`` (read at ``offset``) beyond the hashed prefix."""
        assert self._sha is not None and offset <= self._hashed_upto
        fresh = data[self._hashed_upto - offset :]
        self._sha.update(fresh)
        self._hashed_upto += len(fresh)


class _Reported(Reader):
    """A reader whose integrity failures are reported as ``StoredContent`` does."""

    def __init__(self, inner: Reader, content: StoredContent, stored: StoredFile) -> None:
        self.inner = inner
        self.content = content
        self.stored = stored

    async def read(self, offset: int, size: int) -> bytes:
        with self.content.broken(self.stored):
            return await self.inner.read(offset, size)

    async def close(self) -> None:
        await self.inner.close()


class StoredContent:
    """The original bytes of stored files, for the filesystem.

    Deltas, and direct files with a recorded SHA-256 up to
    ``verify_whole_below`` bytes, are read whole through the cache and
    verified before the first byte is returned; larger direct and foreign
    objects are read by ranges (``RangeReader``).
    """

    def __init__(
        self, core: Core, limiter: trio.CapacityLimiter, *, verify_whole_below: int
    ) -> None:
        self.core = core
        self.limiter = limiter
        self.verify_whole_below = verify_whole_below
        self._reported: set[tuple[str, str | None]] = set()  # broken objects logged

    def _through_cache(self, stored: StoredFile) -> bool:
        small = stored.original_size <= self.verify_whole_below
        return stored.kind is Kind.DELTA or bool(stored.file_sha256 and small)

    async def reader(self, stored: StoredFile) -> Reader:
        """A reader of ``stored`` for one open handle.

        A broken object (see ``broken``) raises ``FsError(EIO)``.
        """
        if not self._through_cache(stored):
            ranges = RangeReader(
                self.core.store, stored.stored_key, stored.original_size, stored.file_sha256
            )
            return _Reported(ranges, self, stored)
        with self.broken(stored):
            entry = await self.core.open_cached(stored)
            if entry.size != stored.original_size:
                entry.close()
                raise IntegrityError(
                    f"{stored.stored_key}: holds {entry.size} bytes where its metadata"
                    f" says {stored.original_size}"
                )
        return CachedReader(entry, self.limiter)

    async def copy(self, stored: StoredFile, key: str, dest: Path) -> None:
        """Write the original bytes of ``stored`` (the file ``key``) to ``dest``, verified."""
        with self.broken(stored):
            if self._through_cache(stored):
                await self.core.export_cached(stored, dest)
                return
            tmp = self.core.scratch_path()  # not beside dest: that is the journal
            try:
                await self.core.get(key, tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def broken(self, stored: StoredFile) -> Iterator[None]:
        """Turn what makes an object unreadable for good into ``EIO``, logged
        once per object and mount: a corrupt or truncated delta, a missing or
        changed reference, bytes that fail their SHA-256 or size, unusable
        metadata. The kernel retries a failed read, a user runs ``cat``
        again: the log says it once, naming the object."""
        try:
            yield
        except (IntegrityError, FormatError) as exc:
            if (stored.stored_key, stored.file_sha256) not in self._reported:
                if len(self._reported) >= 4096:
                    self._reported.clear()  # a crude bound: some lines may repeat
                self._reported.add((stored.stored_key, stored.file_sha256))
                log.error("cannot read %s: %s", stored.stored_key, exc)
            raise FsError(errno.EIO, str(exc)) from None
