"""Ways of reading a file's bytes for an open handle.

``StoredContent`` chooses how what S3 holds is read (and copied, when a
file is written again):

- ``CachedReader``: content materialized in the encrypted cache (deltas,
  and direct files small enough to verify whole on open).
- ``PlainReader``: the same content from a plain copy the cache checked as
  it took it, kept beside it for a while (a file just rebuilt, a
  directory's reference): no decryption.
- ``RangeReader``: large direct and foreign objects, by ranged GETs with a
  growing read-ahead window; never downloads the object on open. A reader
  that goes through the file in order gets its SHA-256 checked at the end
  (``IntegrityError`` instead of the final bytes on mismatch).
- ``StreamReader``: a large delta not cached yet, served while xdelta3
  writes it, checked the same way; a reader that leaves file order waits
  for the verified cached copy instead.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import functools
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import trio

from dgfs import format as fmt
from dgfs.cache import CacheEntryReader
from dgfs.core import Core
from dgfs.errors import FormatError, FsError, IntegrityError, NotFound, PreconditionFailed
from dgfs.format import Kind, StoredFile
from dgfs.rebuild import RebuildStream
from dgfs.store.base import ObjectHead, ObjectStore

log = logging.getLogger(__name__)

MIN_WINDOW = 1 << 20
MAX_WINDOW = 16 << 20
# The kernel reads ahead with several requests at once and they reach us in
# any order; pieces beyond the hashed prefix wait here (up to this much).
MAX_HELD_AHEAD = 2 * MAX_WINDOW
# How often a reader waiting for a rebuild looks again (xdelta3 writes 8 MiB
# at a time, ~20 ms apart).
STREAM_POLL = 0.005


class Reader(abc.ABC):
    @abc.abstractmethod
    async def read(self, offset: int, size: int) -> bytes: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the reader holds."""


class CachedReader(Reader):
    def __init__(self, reader: CacheEntryReader, limiter: trio.CapacityLimiter) -> None:
        self.reader = reader
        self.limiter = limiter

    async def read(self, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(self.reader.read, offset, size, limiter=self.limiter)

    async def close(self) -> None:
        self.reader.close()


class PlainReader(Reader):
    """Verified plain bytes kept beside the cache (``Core.open_plain``)."""

    def __init__(self, fd: int, limiter: trio.CapacityLimiter) -> None:
        self.fd = fd
        self.limiter = limiter

    async def read(self, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self.fd, size, offset, limiter=self.limiter)

    async def close(self) -> None:
        os.close(self.fd)


class RangeReader(Reader):
    """Ranged GETs with read-ahead over one object of known size."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        size: int,
        expected_sha256: str | None,
        etag: str | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.size = size
        self.expected_sha256 = expected_sha256
        # Every range comes from one version of the object (If-Match): the
        # check of its bytes holds for a reader that seeks back after it, or
        # after another writer replaced the object. Unknown (the mount's own
        # upload): asked once, at the first read.
        self._etag = etag
        self._buf = b""
        self._buf_start = 0
        self._window = MIN_WINDOW
        self._lock = trio.Lock()
        self._check = InOrderCheck(key, size, expected_sha256)

    async def pin(self) -> None:
        """Before the first read: the object is still the version listed (its
        ETag), else ``IntegrityError`` (replaced since it was listed: the
        caller lists again, as for any file opened after another writer
        replaced it); gone, ``NotFound``. An ETag unknown (the mount's own
        upload, a store that lists none) is asked for here."""
        head = await self.store.head(self.key)
        changed = self._etag and head.etag and head.etag != self._etag
        if changed and not await self._same_content_relabelled(head):
            raise IntegrityError(f"{self.key} was replaced since it was listed")
        self._etag = head.etag or None

    async def _fetch(self, start: int, length: int) -> bytes:
        try:
            if not self._etag:  # (unknown, or a store that lists none)
                self._etag = (await self.store.head(self.key)).etag or None
            try:
                return await self.store.get_range(self.key, start, length, if_match=self._etag)
            except PreconditionFailed:
                if not await self._same_content_relabelled(await self.store.head(self.key)):
                    raise IntegrityError(
                        f"{self.key} was replaced while it was read; open it again"
                    ) from None
            return await self.store.get_range(self.key, start, length, if_match=self._etag)
        except NotFound:
            # Removed by another writer: the open file's bytes are gone (EIO,
            # as a replacement), not a missing name (ENOENT) for a program
            # that holds the file open.
            raise IntegrityError(f"{self.key} was removed while it was read") from None

    async def _same_content_relabelled(self, head: ObjectHead) -> bool:
        """After its ETag changed: whether the object holds the same file, its
        metadata rewritten (chmod, chown, touch copy it onto itself, and S3
        gives the copy a new ETag): the same size and recorded SHA-256. Then
        the reader goes on with the new ETag. A file with no SHA-256 recorded
        (another tool's) cannot be told from a replacement of its size: it is one."""
        if self.expected_sha256 is None:
            return False
        recorded = fmt.meta_sha256(head.metadata)
        if head.size != self.size or recorded != self.expected_sha256:
            return False
        self._etag = head.etag or None
        return True

    async def read(self, offset: int, size: int) -> bytes:
        self._check.raise_if_failed()
        if offset >= self.size:
            return b""
        size = min(size, self.size - offset)
        async with self._lock:
            self._check.raise_if_failed()  # (a read that waited for the one that failed)
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
            self._check.add(offset, data)
            return data


class InOrderCheck:
    """The SHA-256 of a file checked as it is read, for readers that cannot
    verify it before the first byte (large objects read by ranges, a rebuild
    served while it is written).

    ``add`` raises ``IntegrityError`` on the read that completes a file whose
    hash is wrong, and every later ``add``/``raise_if_failed`` too.
    """

    def __init__(self, name: str, size: int, expected_sha256: str | None) -> None:
        self.name = name
        self.size = size
        self.expected_sha256 = expected_sha256
        self._sha = hashlib.sha256() if expected_sha256 else None
        self._hashed_upto = 0
        self._held: dict[int, bytes] = {}  # offset -> bytes read ahead of _hashed_upto
        self._held_bytes = 0
        # Once the whole file failed its check every later read fails too: the
        # kernel retries a failed read-ahead page with a read of its own.
        self._mismatch: IntegrityError | None = None
        #: The reads left file order (more held ahead than MAX_HELD_AHEAD): no check.
        self.gave_up = False

    def is_ahead(self, offset: int) -> bool:
        """Whether a read at ``offset`` would leave the reader's order behind."""
        return offset > self._hashed_upto + MAX_HELD_AHEAD

    def raise_if_failed(self) -> None:
        if self._mismatch is not None:
            raise self._mismatch

    def add(self, offset: int, data: bytes) -> None:
        """Hash what was read, in file order; raise on the read that completes a bad file.

        Reads that arrive ahead of the hashed prefix (the kernel's concurrent
        read-ahead) are held until the gap is filled; a reader that really
        jumps around holds too much and is not verified.
        """
        self.raise_if_failed()
        if self._sha is None or offset + len(data) <= self._hashed_upto:
            return
        if offset > self._hashed_upto:
            if len(data) > len(self._held.get(offset, b"")):
                self._held_bytes += len(data) - len(self._held.get(offset, b""))
                self._held[offset] = data
            if self._held_bytes > MAX_HELD_AHEAD:
                self._sha = None  # not a sequential reader: cannot verify
                self._held.clear()
                self.gave_up = True
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
                    f"{self.name}: SHA-256 mismatch; refusing to return wrong bytes"
                )
                raise self._mismatch

    def _hash_from(self, offset: int, data: bytes) -> None:
        """Hash the part of ``data`` (read at ``offset``) beyond the hashed prefix."""
        assert self._sha is not None and offset <= self._hashed_upto
        fresh = data[self._hashed_upto - offset :]
        self._sha.update(fresh)
        self._hashed_upto += len(fresh)


class StreamReader(Reader):
    """A delta served while its rebuild writes it (``dgfs.rebuild.RebuildStream``).

    A read waits until xdelta3 has written its bytes; what is read is
    hashed in file order (``InOrderCheck``), so the read that completes a
    file with the wrong SHA-256 fails, as with ``RangeReader``. xdelta3
    itself checks each window it decodes (VCDIFF's Adler-32) of a file
    larger than ``dgfs.rebuild.CHECKED_WHOLE_UP_TO`` (the default
    ``verify_whole_below``: only such files are streamed). A read that
    leaves file order (``unzip`` going to the end first, a reader far
    ahead of the hashed part) is served from the cached copy instead, once
    the rebuild has verified it there: bytes out of order are never served
    unchecked.
    """

    def __init__(
        self,
        fd: int,
        stream: RebuildStream,
        stored: StoredFile,
        open_cached: Callable[[], Awaitable[Reader]],
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.fd = fd
        self.stream = stream
        self.name = stored.stored_key
        self.size = stored.original_size
        self._check = InOrderCheck(stored.stored_key, self.size, stored.file_sha256)
        self._open_cached = open_cached
        self._cached: Reader | None = None
        # Reads of one handle come side by side (the kernel's read-ahead):
        # one of them opens the cached reader, the others wait for it.
        self._opening = trio.Lock()
        self.limiter = limiter

    async def read(self, offset: int, size: int) -> bytes:
        self._check.raise_if_failed()
        if self._cached is None and (self._check.gave_up or self._check.is_ahead(offset)):
            async with self._opening:
                if self._cached is None:
                    self._cached = await self._open_cached()
        if self._cached is not None:
            return await self._cached.read(offset, size)
        if offset >= self.size:
            return b""
        size = min(size, self.size - offset)
        await self._written(offset + size)
        data = await trio.to_thread.run_sync(os.pread, self.fd, size, offset, limiter=self.limiter)
        if len(data) != size:
            raise IntegrityError(f"{self.name}: rebuilt shorter than recorded")
        self._check.add(offset, data)
        return data

    async def _written(self, end: int) -> None:
        """Wait until the rebuild has written the bytes up to ``end``."""
        stream = self.stream
        while not stream.complete:
            if stream.error is not None:
                if isinstance(stream.error, (IntegrityError, FormatError)):
                    raise stream.error  # unreadable for good: logged once (_unreadable)
                # Stopped by a local error (a full disk, a killed xdelta3) that
                # its owner logged once: this handle's reads fail with EIO
                # without another line; opening the file again rebuilds it.
                raise FsError(errno.EIO, f"{self.name}: its rebuild stopped") from None
            if os.fstat(self.fd).st_size >= end:
                return
            await trio.sleep(STREAM_POLL)

    async def close(self) -> None:
        os.close(self.fd)
        if self._cached is not None:
            await self._cached.close()


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
    verified before the first byte is returned (from a verified plain copy
    beside the cache when one is kept: ``PlainReader``); larger direct and
    foreign objects are read by ranges (``RangeReader``).
    """

    def __init__(
        self,
        core: Core,
        limiter: trio.CapacityLimiter,
        *,
        verify_whole_below: int,
        background: Callable[[StoredFile], trio.Event | None] | None = None,
    ) -> None:
        self.core = core
        self.limiter = limiter
        self.verify_whole_below = verify_whole_below
        # Starts a rebuild in the background; returns an event set when it is
        # over (None: cannot, then deltas are served once cached).
        self.background = background
        self._reported: set[tuple[str, str | None]] = set()  # broken objects logged

    def _through_cache(self, stored: StoredFile) -> bool:
        """Whether ``stored`` is read whole (and verified) through the cache, not
        by ranges: deltas, small files with a SHA-256, and whatever
        deltaglider_proxy encrypted (ranges of it would be ciphertext). A
        direct file whose object is not the size its metadata records is
        read whole too: an encrypted body known from metadata kept before
        its marker was (a directory index an older dgfs wrote) is then
        decrypted from a fresh download, or refused."""
        small = stored.original_size <= self.verify_whole_below
        return (
            stored.kind is Kind.DELTA
            or bool(stored.file_sha256 and small)
            or stored.encryption is not None
            or (stored.kind is Kind.DIRECT and stored.stored_size != stored.original_size)
        )

    async def reader(
        self, stored: StoredFile, *, report: bool = True, etag: str | None = None
    ) -> Reader:
        """A reader of ``stored`` for one open handle.

        A broken object (see ``broken``) raises ``FsError(EIO)``; without
        ``report``, the error that found it broken.
        """
        if not self._through_cache(stored):
            ranges = RangeReader(
                self.core.store, stored.stored_key, stored.original_size, stored.file_sha256, etag
            )
            with self.broken(stored, report=report):
                await ranges.pin()
            return _Reported(ranges, self, stored)
        if self._streamable(stored):
            streamed = await self._streamed(stored)
            if streamed is not None:
                assert stored.file_sha256 is not None
                self.core.cache.lookup(stored.file_sha256)  # this reader's use: a miss
                return _Reported(streamed, self, stored)
        return await self._cached_reader(stored, report=report)

    async def _cached_reader(self, stored: StoredFile, *, report: bool = True) -> Reader:
        """Through the cache; from a verified plain copy beside it when one
        is kept (rebuilt or fetched lately: no decryption)."""
        plain = self._plain_reader(stored)
        if plain is not None:
            assert stored.file_sha256 is not None
            self.core.cache.lookup(stored.file_sha256)  # this reader's use, as open() counts it
            return plain
        with self.broken(stored, report=report):
            entry = await self.core.open_cached(stored)
            if entry.size != stored.original_size:
                entry.close()
                raise IntegrityError(
                    f"{stored.stored_key}: holds {entry.size} bytes where its metadata"
                    f" says {stored.original_size}"
                )
        try:
            plain = self._plain_reader(stored)  # rebuilt for this reader
        except BaseException:
            entry.close()
            raise
        if plain is not None:
            entry.close()
            return plain
        return CachedReader(entry, self.limiter)

    def _plain_reader(self, stored: StoredFile) -> PlainReader | None:
        if stored.file_sha256 is None:
            return None
        fd = self.core.open_plain(stored.file_sha256)
        if fd is None:
            return None
        if os.fstat(fd).st_size != stored.original_size:
            os.close(fd)  # the cache's own check then says what is wrong
            return None
        return PlainReader(fd, self.limiter)

    def _streamable(self, stored: StoredFile) -> bool:
        """A delta large enough to be verified as it is read (like a direct file
        that size), not cached yet, and rebuilt by xdelta3 (not a deep delta,
        not the reference itself)."""
        return (
            self.background is not None
            and stored.kind is Kind.DELTA
            and not stored.deep
            and stored.original_size > self.verify_whole_below
            and stored.file_sha256 is not None
            and stored.file_sha256 != stored.ref_sha256
            and not self.core.cache.contains(stored.file_sha256)
        )

    async def _streamed(self, stored: StoredFile) -> StreamReader | None:
        """A reader of ``stored`` served while it is rebuilt; None when the cached
        path is the way: rebuilt already, failed (that path reports why), or a
        stock gzip delta, whose output xdelta3 may write twice."""
        assert self.background is not None and stored.file_sha256 is not None
        done = self.background(stored)  # or joins the rebuild running already
        if done is None:
            return None
        while True:
            stream = self.core.rebuild_stream(stored.file_sha256)
            if stream is not None and stream.writing and stream.error is None:
                # Opened now, while the rebuild still holds the file: its end
                # unlinks it, and this descriptor keeps it readable.
                fd = os.open(stream.path, os.O_RDONLY | os.O_CLOEXEC)
                opener = functools.partial(self._cached_reader, stored)
                return StreamReader(fd, stream, stored, opener, self.limiter)
            if done.is_set():
                return None
            await trio.sleep(STREAM_POLL)

    async def copy(self, stored: StoredFile, key: str, dest: Path, *, report: bool = True) -> None:
        """Write the original bytes of ``stored`` (the file ``key``) to ``dest``,
        verified (``report`` as for ``reader``)."""
        with self.broken(stored, report=report):
            if self._through_cache(stored):
                await self.core.export_cached(stored, dest)
                return
            tmp = self.core.scratch_path()  # not beside dest: that is the journal
            try:
                await self.core.get(key, tmp)
                if (copied := tmp.stat().st_size) != stored.original_size:
                    # Another tool's file (no SHA-256 to check) replaced meanwhile.
                    raise IntegrityError(
                        f"{key}: holds {copied} bytes where it was listed with"
                        f" {stored.original_size}"
                    )
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def broken(self, stored: StoredFile, *, report: bool = True) -> Iterator[None]:
        """Turn what makes an object unreadable for good into ``EIO``, logged
        once per object and mount: a corrupt or truncated delta, a missing or
        changed reference, bytes that fail their SHA-256 or size, unusable
        metadata. The kernel retries a failed read, a user runs ``cat``
        again: the log says it once, naming the object. Without ``report``
        the error passes as it is (the caller first asks whether the object
        was replaced, and calls ``reported`` if not)."""
        try:
            yield
        except (IntegrityError, FormatError) as exc:
            if not report:
                raise
            raise self.reported(stored, exc) from None

    def reported(self, stored: StoredFile, exc: IntegrityError | FormatError) -> FsError:
        """``exc`` logged (once per object and mount) and turned into ``EIO``."""
        if (stored.stored_key, stored.file_sha256) not in self._reported:
            if len(self._reported) >= 4096:
                self._reported.clear()  # a crude bound: some lines may repeat
            self._reported.add((stored.stored_key, stored.file_sha256))
            log.error("cannot read %s: %s", stored.stored_key, exc)
        return FsError(errno.EIO, str(exc))
