"""The reference pool: objects fetched into the cache, and plain copies of
references for xdelta3.

``ReferencePool`` owns the decrypted copies of recently used references
(xdelta3 needs a plain file) and who is using each: bounded by ``slots``,
an entry in use is never removed, and ``close`` removes them all.
Concurrent fetches of one content share one download.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator
from pathlib import Path

from dgfs import deep
from dgfs import format as fmt
from dgfs.errors import CacheCorrupt, DgfsError, MissingReference, NotFound
from dgfs.flight import SingleFlight
from dgfs.format import DeltaMode
from dgfs.workbench import Workbench


class ReferencePool:
    """Objects fetched into the cache, verified, and references as plain files."""

    def __init__(self, bench: Workbench, *, slots: int = 4) -> None:
        self._bench = bench
        self._flights = SingleFlight()
        # Decrypted copies of recently used references, for xdelta3 (it needs
        # a plain file). Bounded; an entry in use is never removed.
        self._plain_refs: dict[str, Path] = {}
        self._plain_ref_users: dict[str, int] = {}
        self._plain_ref_slots = slots

    async def ensure_cached(self, key: str, sha256: str) -> None:
        """Make sure the object ``key`` (plain bytes with ``sha256``) is in the cache."""
        await self._flights.ensure(
            f"fetch:{sha256}",
            lambda: self._bench.cache.contains(sha256),
            functools.partial(self._fetch, key, sha256),
        )

    async def ensure_reference_cached(self, ref_key: str, ref_sha256: str) -> None:
        """``ensure_cached`` for a reference read as a file (the self-delta of its
        directory's first file): its plain copy is kept too, as ``plain_copy``
        keeps it, for the deltas read next, which then need not decrypt it
        back out of the cache."""
        if ref_sha256 not in self._plain_refs:
            async with self.plain_copy(ref_key, ref_sha256):
                pass
        await self.ensure_cached(ref_key, ref_sha256)  # a plain copy outlives its cache entry

    async def _fetch(self, key: str, sha256: str, keep: Path | None = None) -> bool:
        """Download the object ``key`` into the cache, verified against ``sha256``.

        With ``keep``, its plain bytes are also left there, and True returned:
        a caller that needs a plain copy (xdelta3 does) saves decrypting it
        back out of the cache, a whole write and hash of a file that may be
        GiBs. Not when the content was cached meanwhile by another (the
        download was then not checked): False.
        """
        deep_reference = fmt.reference_mode(key) is DeltaMode.DEEP
        async with self._bench.scratch() as tmp, self._bench.scratch() as plain:
            try:
                head = await self._bench.download(key, tmp)
            except NotFound:
                raise MissingReference(f"{key} is missing") from None
            if deep_reference:
                cap = deep.reference_cap(head.metadata, head.size, self._bench.limits)
                await self._bench.cpu(deep.decompress_reference, tmp, plain, cap)
                tmp, plain = plain, tmp
            verified = await self._bench.into_cache(
                sha256,
                tmp,
                lambda: MissingReference(
                    f"{key} does not match its recorded SHA-256 {sha256[:12]}…"
                    " (replaced or corrupted)"
                ),
            )
            if keep is None or not verified:
                return False
            os.replace(tmp, keep)
            return True

    async def _fetch_plain(self, key: str, sha256: str, out: Path) -> None:
        """The plain bytes of the object ``key`` (``sha256``) in ``out``, through the cache:
        decrypted from it when cached, else downloaded once, cached and kept."""
        for _ in range(3):  # evicted by a tiny budget, or a corrupt entry dropped: once more
            kept = False

            async def fetch_and_keep() -> None:
                nonlocal kept
                kept = await self._fetch(key, sha256, keep=out)

            await self._flights.ensure(
                f"fetch:{sha256}", lambda: self._bench.cache.contains(sha256), fetch_and_keep
            )
            try:
                if kept or await self._bench.cpu(self._bench.cache.export, sha256, out):
                    return
            except CacheCorrupt:
                continue  # dropped (and logged) by the cache: fetched again from S3
        raise DgfsError(f"{key}: the cache is too small to hold it")

    @contextlib.asynccontextmanager
    async def plain_copy(self, ref_key: str, ref_sha256: str) -> AsyncIterator[Path]:
        """A plain (decrypted) copy of the reference, kept for reuse while slots last."""
        path = self._plain_refs.get(ref_sha256)
        if path is None:

            async def export() -> None:
                out = self._bench.scratch_path(".ref")
                try:
                    await self._fetch_plain(ref_key, ref_sha256, out)
                except BaseException:
                    out.unlink(missing_ok=True)
                    raise
                self._plain_refs[ref_sha256] = out

            await self._flights.ensure(
                f"plain:{ref_sha256}", lambda: ref_sha256 in self._plain_refs, export
            )
            path = self._plain_refs[ref_sha256]
        self._plain_ref_users[ref_sha256] = self._plain_ref_users.get(ref_sha256, 0) + 1
        try:
            yield path
        finally:
            self._plain_ref_users[ref_sha256] -= 1
            self._trim_plain_refs()

    def open_plain(self, sha256: str) -> int | None:
        """A descriptor of the plain copy of reference ``sha256`` (verified as it
        was made), or None if none is kept."""
        path = self._plain_refs.get(sha256)
        if path is None:
            return None
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # scratch cleaned under us: made again when next needed
            if not self._plain_ref_users.get(sha256):
                del self._plain_refs[sha256]
                self._plain_ref_users.pop(sha256, None)
            return None

    def _trim_plain_refs(self) -> None:
        idle = [sha for sha in self._plain_refs if not self._plain_ref_users.get(sha)]
        while len(self._plain_refs) > self._plain_ref_slots and idle:
            sha = idle.pop(0)
            self._plain_refs.pop(sha).unlink(missing_ok=True)
            self._plain_ref_users.pop(sha, None)

    def close(self) -> None:
        """Remove the decrypted reference copies."""
        for path in self._plain_refs.values():
            path.unlink(missing_ok=True)
        self._plain_refs.clear()
        self._plain_ref_users.clear()
