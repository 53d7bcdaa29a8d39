"""Where the core's local work happens: scratch files, CPU-bound jobs,
downloads, xdelta3 and the content cache.

``Workbench`` makes the scratch directory and keeps it private (whoever
chose it removes it), and owns the limiter that CPU-bound jobs of the
core share (hashing, expanding, re-deflating), the one that long searches
over untrusted bytes take instead (``search``), and ``proxy_key``, the
only secret ``download`` needs. It holds the tools every job of the core
uses: the content cache, the xdelta3 engine and the expansion limits. The
core's parts (references, rebuilds, puts) each hold the one workbench and
create nothing of these themselves.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import trio

from dgfs import deep, proxymeta
from dgfs.cache import ContentCache
from dgfs.delta import DeltaEngine
from dgfs.errors import DgfsError, IntegrityError
from dgfs.hashing import FileDigest, digest_file
from dgfs.policy import SNIFF_BYTES
from dgfs.proxycrypt import ProxyKey, decrypt_in_place
from dgfs.store.base import ObjectHead, ObjectStore

_T = TypeVar("_T")


class Workbench:
    """Scratch files, the CPU limiter and object downloads, shared by the core's parts."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        scratch_dir: Path,
        cache: ContentCache,
        engine: DeltaEngine,
        limits: deep.ExpansionLimits,
        cpu_limiter: trio.CapacityLimiter | None = None,
        proxy_key: ProxyKey | None = None,
    ) -> None:
        self.scratch_dir = scratch_dir
        scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(scratch_dir, 0o700)
        self.store = store
        self.cache = cache
        # xdelta3, run under its own memory and process limits.
        self.engine = engine
        # Bounds on expanding files and on rebuilding objects (docs/SECURITY.md).
        self.limits = limits
        # deltaglider_proxy's key, for objects it encrypted (``download``).
        self.proxy_key = proxy_key
        self.cpu_limiter = cpu_limiter or trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        # Jobs of ``cpu`` running or waiting for a token, and tokens lent
        # (``spare_core``): written by the trio thread, read by lenders'.
        self.cpu_jobs = 0
        self.cores_lent = 0
        # One search at a time, apart from the CPU limiter: a hostile object's
        # search (minutes, up to expand_time) holds no token other reads need.
        self.search_limiter = trio.CapacityLimiter(1)

    def scratch_path(self, suffix: str = "") -> Path:
        """A new, empty, private temp file in the scratch dir."""
        fd, name = tempfile.mkstemp(dir=self.scratch_dir, suffix=suffix)
        os.close(fd)
        return Path(name)

    @contextlib.asynccontextmanager
    async def scratch(self, suffix: str = "") -> AsyncIterator[Path]:
        """``scratch_path``, removed when the block ends."""
        path = self.scratch_path(suffix)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    async def cpu(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)`` in a worker thread, under the CPU limiter."""
        self.cpu_jobs += 1
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.cpu_limiter)
        finally:
            self.cpu_jobs -= 1

    def spare_core(self) -> _Loan | None:
        """From a worker thread (``cpu``): a CPU token taken now if one is free
        and no job waits for one; None if not, or if not called from a worker
        thread of this run."""
        loan = _Loan(self)
        try:
            loan.trio_token = trio.from_thread.run_sync(loan.take)
        except (trio.WouldBlock, RuntimeError):  # none free; the trio thread itself
            return None
        return loan

    async def search(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)`` in a worker thread under the search limiter: for jobs
        whose cost whoever wrote the bucket chooses (the stock gzip recovery),
        which queue behind one another, never in front of other reads."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.search_limiter)

    async def into_cache(self, sha256: str, path: Path, wrong: Callable[[], DgfsError]) -> bool:
        """Put the plain file ``path`` into the cache as content ``sha256``; raises
        ``wrong()`` if its bytes are not that. True if the cache read it and
        found it so; False if the content was cached meanwhile by another and
        ``path`` was not read (nothing is known of its bytes then)."""
        try:
            return (await self.cpu(self.cache.take_file, sha256, path))[1]
        except IntegrityError:
            raise wrong() from None

    async def cpu_int(self, fn: Callable[..., int], *args: object) -> int:
        result = await self.cpu(fn, *args)
        assert isinstance(result, int)
        return result

    async def digest(self, path: Path) -> FileDigest:
        """SHA-256, size and sniffable head of a local file (in a worker thread)."""
        result = await self.cpu(digest_file, path, SNIFF_BYTES)
        assert isinstance(result, FileDigest)
        return result

    async def download(self, key: str, dest: Path) -> ObjectHead:
        """The object ``key``'s bytes in ``dest``, as the file they hold: a body
        deltaglider_proxy encrypted is decrypted (``ProxyDecryptError`` without
        the key, or when it fails authentication; never its ciphertext)."""
        head = await self.store.download(key, dest)
        scheme = proxymeta.proxy_encryption(head.metadata)
        if scheme is not None:
            await self.cpu(
                functools.partial(
                    decrypt_in_place,
                    dest,
                    scheme=scheme,
                    key=self.proxy_key,
                    key_id=proxymeta.proxy_key_id(head.metadata),
                    what=key,
                )
            )
        return head


class _Loan:
    """A CPU token of ``bench`` lent to a search ahead (``dgfs.deep.ahead.Loan``)."""

    def __init__(self, bench: Workbench) -> None:
        self._bench = bench
        self.trio_token: trio.lowlevel.TrioToken | None = None

    def take(self) -> trio.lowlevel.TrioToken:
        """In the trio thread: the token, or ``trio.WouldBlock``."""
        self._bench.cpu_limiter.acquire_on_behalf_of_nowait(self)
        self._bench.cores_lent += 1
        return trio.lowlevel.current_trio_token()

    def wanted(self) -> bool:
        bench = self._bench  # ints the trio thread writes: a snapshot is enough
        return bench.cpu_jobs + bench.cores_lent > bench.cpu_limiter.total_tokens

    def give_back(self) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._give_back, trio_token=self.trio_token)

    def _give_back(self) -> None:
        self._bench.cores_lent -= 1
        self._bench.cpu_limiter.release_on_behalf_of(self)
