"""Ways of reading a file's bytes for an open handle.

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
import hashlib
import os

import trio

from dgfs.cache import CacheReader
from dgfs.errors import IntegrityError
from dgfs.store.base import ObjectStore

MIN_WINDOW = 1 << 20
MAX_WINDOW = 16 << 20


class Reader(abc.ABC):
    @abc.abstractmethod
    async def read(self, offset: int, size: int) -> bytes: ...

    async def close(self) -> None:
        """Release what the reader holds."""


class StagingReader(Reader):
    def __init__(self, fd: int, limiter: trio.CapacityLimiter) -> None:
        self.fd = fd
        self.limiter = limiter

    async def read(self, offset: int, size: int) -> bytes:
        return await trio.to_thread.run_sync(os.pread, self.fd, size, offset, limiter=self.limiter)


class CachedReader(Reader):
    def __init__(self, reader: CacheReader, limiter: trio.CapacityLimiter) -> None:
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

    async def _fetch(self, start: int, length: int) -> bytes:
        return await self.store.get_range(self.key, start, length)

    async def read(self, offset: int, size: int) -> bytes:
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
        if self._sha is None:
            return
        if offset > self._hashed_upto:
            self._sha = None  # not a sequential reader: cannot verify
            return
        fresh = data[self._hashed_upto - offset :]
        self._sha.update(fresh)
        self._hashed_upto += len(fresh)
        if self._hashed_upto >= self.size and self._sha.hexdigest() != self.expected_sha256:
            self._sha = None
            raise IntegrityError(f"{self.key}: SHA-256 mismatch; refusing to return wrong bytes")
