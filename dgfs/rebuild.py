"""Rebuilding: the original bytes of stored files, verified, and into the cache.

``Rebuilder`` turns a ``StoredFile`` (a delta against its reference, deep
or DeltaGlider v6, or a direct object) back into the file's bytes, and never
hands back bytes whose SHA-256 differs from the recorded one. It owns the
rebuilds running now (``stream``: served while xdelta3 writes them) and the
stock gzip deltas whose recovery failed in this process.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeVar

import trio

from dgfs import deep, dgzip
from dgfs import format as fmt
from dgfs.cache import CacheEntryReader
from dgfs.delta import HEADER_PROBE, OutputCap, is_stock_gzip_delta
from dgfs.errors import (
    CacheCorrupt,
    DecodeLimit,
    DeltaEngineError,
    DgfsError,
    FormatError,
    IntegrityError,
    XdeltaFailedHere,
    XdeltaMissing,
)
from dgfs.flight import KeyedLocks, SingleFlight
from dgfs.format import Kind, StoredFile
from dgfs.references import ReferencePool
from dgfs.telemetry import Telemetry
from dgfs.workbench import Workbench

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class _Form(NamedTuple):
    """An expanded form to rebuild: opened in the thread that reads it, and
    where its bytes lie in its reference (None: not known)."""

    open: Callable[[], AbstractContextManager[BinaryIO]]
    in_reference: deep.InReference | None


_UNRECOVERABLE = (
    "{key}: DeltaGlider stored it from gzip input without -D, and no gzip settings"
    " reproduce the original bytes; refusing to return other bytes"
)


def _open_form(path: Path) -> BinaryIO:
    return open(path, "rb")


def _made_from_gzip(delta: Path) -> bool:
    """Whether a DG v6 delta is the stock CLI's diff of decompressed gzip input."""
    with open(delta, "rb") as f:
        return is_stock_gzip_delta(f.read(HEADER_PROBE))


def _made_by_gzip_tool(gzip_file: Path) -> bool:
    """Whether a gzip file's header is gzip(1)'s (OS byte 3, Unix); Python's
    gzip module writes 255, and then gzip(1) never gives the same bytes."""
    with open(gzip_file, "rb") as f:
        head = f.read(10)
    return len(head) == 10 and head[9] == 3


# Threads re-deflating one expanded form's streams (zlib releases the GIL).
_REBUILD_WORKERS = min(4, os.cpu_count() or 1)

#: Rebuilt files up to this size reach a reader only once whole and checked
#: against their SHA-256 (the filesystem's ``verify_whole_below``), so
#: xdelta3 need not also check each window it decodes (a repeated cost).
#: Larger ones may be served while xdelta3 writes them (``RebuildStream``):
#: their windows stay checked, so a corrupt one is never written.
CHECKED_WHOLE_UP_TO = 32 << 20


@dataclass
class RebuildStream:
    """The output file of a delta's rebuild while xdelta3 writes it (``Rebuilder.stream``).

    xdelta3 writes its output once, in order, into the same file (measured:
    O_TRUNC of the path given, then 8 MiB writes), so every byte below the
    file's current size is final. ``writing``: that has begun (a stock
    gzip delta, whose output may be rewritten, never sets it);
    ``complete``: all ``size`` bytes are there; ``error``: the rebuild
    failed, nothing more will come.
    """

    path: Path
    size: int
    writing: bool = False
    complete: bool = False
    error: DgfsError | None = None


class RecentRebuilds:
    """Plain copies of the files rebuilt last, each read and verified by the
    cache as it took them (``ContentCache.take_file``; one it did not read
    is not kept): a reader that comes right after the rebuild (the next file of a
    series, prefetched) reads one as it is instead of decrypting it back out
    of the cache. Bounded in files and bytes, least recently used dropped; a
    reader keeps its own descriptor, so dropping a copy never cuts a read
    short. Trio thread only."""

    def __init__(self, *, max_files: int = 8, max_bytes: int = 256 << 20) -> None:
        self._copies: collections.OrderedDict[str, tuple[Path, int]] = collections.OrderedDict()
        self._bytes = 0
        self._max_files = max_files
        self._max_bytes = max_bytes

    def keep(self, sha256: str, path: Path) -> None:
        """Take ``path`` (verified content ``sha256``): kept, or removed if too large."""
        size = path.stat().st_size
        if size > self._max_bytes // 2 or sha256 in self._copies:
            path.unlink(missing_ok=True)
            return
        self._copies[sha256] = (path, size)
        self._bytes += size
        while len(self._copies) > self._max_files or self._bytes > self._max_bytes:
            _, (old, old_size) = self._copies.popitem(last=False)
            self._bytes -= old_size
            old.unlink(missing_ok=True)

    def open(self, sha256: str) -> int | None:
        """A descriptor of the plain copy of ``sha256``, or None."""
        copy = self._copies.get(sha256)
        if copy is None:
            return None
        self._copies.move_to_end(sha256)
        try:
            return os.open(copy[0], os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # scratch cleaned under us: read from the cache
            del self._copies[sha256]
            self._bytes -= copy[1]
            return None

    def close(self) -> None:
        """Remove every copy."""
        for path, _ in self._copies.values():
            path.unlink(missing_ok=True)
        self._copies.clear()
        self._bytes = 0


class Rebuilder:
    """The original bytes of stored files: into a path, or into the cache."""

    def __init__(
        self,
        bench: Workbench,
        references: ReferencePool,
        telemetry: Telemetry,
    ) -> None:
        self._bench = bench
        self._references = references
        self._telemetry = telemetry
        self._flights = SingleFlight()
        # sha256 -> the rebuild of that content running now (served while written)
        self._streams: dict[str, RebuildStream] = {}
        # SHA-256 of stock gzip deltas whose recovery failed (a search costs
        # seconds to minutes) -> why.
        self._unrecoverable: dict[str, str] = {}
        self.recent = RecentRebuilds()
        # The turns of deep rebuilds, by reference (see ``_turn``).
        self._turns = KeyedLocks()

    async def rebuild(
        self,
        stored: StoredFile,
        out: Path,
        *,
        verify: bool = True,
        stream: RebuildStream | None = None,
    ) -> bool:
        """Write the original bytes of a delta into ``out``.

        With ``verify`` the result's SHA-256 is checked (``IntegrityError``,
        and ``out`` removed, on mismatch). Returns True when the delta was
        one the stock DeltaGlider CLI made from gzip input and cannot read
        back itself, and dgfs recovered its bytes.
        """
        assert stored.kind is Kind.DELTA and stored.ref_key and stored.ref_sha256
        recovered = False
        try:
            if stored.deep:
                await self._rebuild_deep(stored, out)
            else:
                recovered = await self._rebuild_dg(stored, out, stream)
        except (XdeltaMissing, XdeltaFailedHere):
            out.unlink(missing_ok=True)
            raise  # this machine's failure, not the object's
        except DeltaEngineError as exc:
            # A truncated or corrupt delta body (or a reference it was not made
            # against): the object is broken, say which one.
            out.unlink(missing_ok=True)
            # xdelta3's own words, without the scratch paths and advice lines:
            # the log gets one line naming the object.
            reason = str(exc).splitlines()[0].rpartition("xdelta3: ")[2]
            raise IntegrityError(f"{stored.stored_key}: cannot be decoded ({reason})") from None
        size = out.stat().st_size
        if size != stored.original_size:
            out.unlink(missing_ok=True)
            raise IntegrityError(
                f"{stored.stored_key}: rebuilt {size} bytes where its metadata says"
                f" {stored.original_size}; refusing to return them"
            )
        if verify:
            await self._verify_file(out, stored)
        return recovered

    async def _rebuild_dg(
        self, stored: StoredFile, out: Path, stream: RebuildStream | None = None
    ) -> bool:
        assert stored.ref_key and stored.ref_sha256
        async with self._bench.scratch(".delta") as delta_path:
            await self._bench.download(stored.stored_key, delta_path)
            async with self._references.plain_copy(stored.ref_key, stored.ref_sha256) as plain_ref:
                from_gzip = await self._bench.cpu(_made_from_gzip, delta_path)
                # The stock decode of gzip input gives the original back only
                # when gzip(1) recompresses it the same way: never for files
                # another gzip writer made (their header's OS byte says so).
                if from_gzip and not await self._bench.cpu(_made_by_gzip_tool, plain_ref):
                    await self._recover_stock_gzip(stored, plain_ref, delta_path, out)
                    return True
                # Served while written only when xdelta3 checks every window:
                # no reader gets bytes nothing checked before the file's end.
                window_checks = stored.original_size > CHECKED_WHOLE_UP_TO
                if stream is not None and window_checks and not from_gzip:
                    stream.writing = True  # xdelta3 writes ``out`` once, in order
                try:
                    await self._bench.engine.decode(
                        plain_ref,
                        delta_path,
                        out,
                        cap=OutputCap(stored.original_size),
                        window_checks=window_checks,
                    )
                except DeltaEngineError:
                    if not from_gzip:
                        raise
                else:
                    if not from_gzip or await self._matches(out, stored):
                        return False
                await self._recover_stock_gzip(stored, plain_ref, delta_path, out)
                return True

    async def _matches(self, path: Path, stored: StoredFile) -> bool:
        return (await self._bench.digest(path)).sha256 == stored.file_sha256

    async def _recover_stock_gzip(
        self, stored: StoredFile, plain_ref: Path, delta_path: Path, out: Path
    ) -> None:
        """The original bytes of a delta the stock DeltaGlider CLI made from gzip input.

        Its xdelta3 diffed the decompressed streams and recompresses on
        decode with other settings, so DeltaGlider itself cannot give the
        file back; the decompressed content is exact, and the gzip settings
        that made the original are searched for (:mod:`dgfs.dgzip`), one
        search at a time (``Workbench.search``), each within ``expand_time``
        (``DecodeLimit``). A search that failed is not repeated in this
        process.
        """
        sha256 = stored.file_sha256
        if sha256 is None:
            raise IntegrityError(_UNRECOVERABLE.format(key=stored.visible_key))
        if sha256 in self._unrecoverable:
            raise IntegrityError(self._unrecoverable[sha256])
        async with self._bench.scratch(".tar") as decompressed:
            await self._bench.engine.decode_decompressed(
                plain_ref,
                delta_path,
                decompressed,
                cap=OutputCap(self._bench.limits.allowance(stored.original_size), "expand_ratio"),
            )
            recover = functools.partial(
                dgzip.recover_gzip,
                decompressed,
                out,
                original_name=fmt.split_key(stored.visible_key)[1],
                expected_sha256=sha256,
                expected_size=stored.original_size,
                reference_gzip=plain_ref,
                scratch_dir=self._bench.scratch_dir,
                seconds=self._bench.limits.seconds,
            )
            try:
                found = await self._bench.search(recover)
            except DecodeLimit as exc:
                why = f"{stored.visible_key}: stored by DeltaGlider from gzip input; {exc}"
                self._unrecoverable[sha256] = why
                raise DecodeLimit(why) from None
            if not found:
                why = _UNRECOVERABLE.format(key=stored.visible_key)
                self._unrecoverable[sha256] = why
                raise IntegrityError(why)
        log.info(
            "%s: written by DeltaGlider from gzip input, which DeltaGlider cannot read back;"
            " recovered the original bytes",
            stored.visible_key,
        )

    async def _rebuild_deep(self, stored: StoredFile, out: Path) -> None:
        # One expand_time for the read's rebuilds, counted while one runs,
        # whichever way its form is found.
        deadline = deep.Deadline(self._bench.limits.seconds, started=False)
        if stored.zero_diff and await self._rebuilt_from_reference(stored, out, deadline):
            return
        async with self._expanded_form(stored) as form:
            await self._rebuild_form(stored, form, out, deadline)

    async def _rebuilt_from_reference(
        self, stored: StoredFile, out: Path, deadline: deep.Deadline
    ) -> bool:
        """Whether the file (a zero-diff delta: its directory's first) was rebuilt
        into ``out`` from its reference's form as it is, to its SHA-256: its
        delta need not be decoded (a whole form's worth of xdelta3, 0.4 s for
        a botocore wheel). False, and the delta is to be decoded, when the
        note lied: another file's delta, or a reference replaced since."""
        assert stored.ref_key and stored.ref_sha256
        async with self._references.plain_copy(stored.ref_key, stored.ref_sha256) as plain_ref:
            try:
                whole = deep.InReference(stored.ref_sha256)  # the form is the reference
                form = _Form(functools.partial(_open_form, plain_ref), whole)
                sha256 = await self._rebuild_form(stored, form, out, deadline)
            except IntegrityError as exc:
                deadline.check()  # out of time: no second try (DecodeLimit)
                sha256 = str(exc)
        if sha256 == stored.file_sha256:
            return True
        out.unlink(missing_ok=True)  # another file's bytes
        log.warning(
            "%s: its note says it is its reference's file, but the reference does not"
            " rebuild to it; decoding its delta",
            stored.stored_key,
        )
        return False

    async def _rebuild_form(
        self, stored: StoredFile, form: _Form, out: Path, deadline: deep.Deadline
    ) -> str:
        """The file the expanded form ``form`` opens rebuilds to, into ``out``,
        by ``deadline``; returns its SHA-256."""

        def rebuild() -> str:
            deadline.start()
            try:
                return rebuild_form()
            finally:
                deadline.pause()

        def rebuild_form() -> str:
            with form.open() as src:
                sha256, _ = deep.rebuild_file(
                    src,
                    out,
                    self._bench.scratch_dir,
                    _REBUILD_WORKERS,
                    max_size=stored.original_size,
                    seconds=deadline,
                    in_reference=form.in_reference,
                )
            return sha256

        assert stored.ref_key and stored.ref_sha256
        try:
            async with self._turn(stored.ref_key, stored.ref_sha256):
                return await self._bench.cpu(rebuild)
        except (FormatError, DgfsError) as exc:
            out.unlink(missing_ok=True)
            raise IntegrityError(f"{stored.visible_key}: cannot rebuild: {exc}") from None

    def _turn(self, ref_key: str, ref_sha256: str) -> AbstractAsyncContextManager[None]:
        """The rebuilds of deep files against one reference, one at a time
        (in order), each on _REBUILD_WORKERS threads. Their forms hold mostly
        the reference's subtrees: side by side, their threads took the cores
        (and the GIL) from each other and waited for each other's subtrees
        (6 botocore wheels read at once, in one process: 3.4 s, the first
        ready after 2.0 s; one at a time 3.2 s, and 1.4 s). Files of other
        directories are rebuilt beside them, whatever their reference's
        bytes: a slow one holds up only its own directory's."""
        return self._turns.held(f"{ref_key}\0{ref_sha256}")

    @contextlib.asynccontextmanager
    async def _expanded_form(self, stored: StoredFile) -> AsyncIterator[_Form]:
        """The expanded form a deep delta turns its reference into, to open
        while the block lasts: the VCDIFF applied to the whole reference, or,
        after a span table, to the reference without the spans, with the
        spans read from the reference in place (``deep.spliced``)."""
        assert stored.ref_key and stored.ref_sha256
        cap = self._bench.limits.expanded_cap(stored.original_size)
        why = "expand_ratio × its dg-file-size, at most expand_max"
        async with (
            self._bench.scratch(".delta") as body,
            self._bench.scratch(".vcdiff") as vcdiff,
            self._references.plain_copy(stored.ref_key, stored.ref_sha256) as plain_ref,
            self._bench.scratch(".dgx") as decoded,
        ):
            await self._bench.download(stored.stored_key, body)
            unwrap = deep.unwrap_delta, body, vcdiff, plain_ref.stat().st_size, cap
            try:
                spans = await self._bench.cpu(*unwrap)
            except FormatError as exc:
                raise IntegrityError(f"{stored.stored_key}: {exc}") from None
            # Parsed under limits, rebuilt and checked whole: never streamed.
            if spans is None:
                await self._bench.engine.decode(
                    plain_ref, vcdiff, decoded, cap=OutputCap(cap, why), window_checks=False
                )
                yield _Form(functools.partial(_open_form, decoded), None)
                return
            assert isinstance(spans, list)
            async with self._bench.scratch(".src") as source:
                await self._bench.cpu(deep.write_source, plain_ref, spans, source)
                left = OutputCap(cap - sum(span.size for span in spans), why)
                # ``decoded`` holds the cut form: the spans are read where they are.
                await self._bench.engine.decode(
                    source, vcdiff, decoded, cap=left, window_checks=False
                )
            spliced = functools.partial(deep.spliced, decoded, plain_ref, spans, cap)
            yield _Form(spliced, deep.InReference(stored.ref_sha256, spans))

    async def _verify_file(self, path: Path, stored: StoredFile) -> None:
        if stored.file_sha256 is None:
            return
        digest = await self._bench.digest(path)
        if digest.sha256 != stored.file_sha256:
            path.unlink(missing_ok=True)
            raise IntegrityError(
                f"{stored.visible_key}: SHA-256 mismatch (expected {stored.file_sha256},"
                f" got {digest.sha256}); refusing to return wrong bytes"
            )

    async def write(self, stored: StoredFile, dest: Path) -> None:
        """Write the original bytes of ``stored`` to ``dest``, verified.

        ``dest`` appears only once complete and verified (written beside it,
        then renamed).
        """
        tmp = dest.with_name(f".{dest.name}.dgfs-{os.getpid()}-{id(stored):x}")
        try:
            if stored.kind is Kind.DELTA:
                await self.rebuild(stored, tmp)
            else:
                await self._bench.download(stored.stored_key, tmp)
                await self._verify_file(tmp, stored)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    async def materialize(self, stored: StoredFile, *, counted: bool = True) -> str:
        """Bring the original bytes of ``stored`` into the cache; returns their sha256.

        Concurrent callers for the same content share one reconstruction.
        ``counted``: the cache counts this as a reader's hit or miss (not so
        for a prefetch).
        """
        sha256 = stored.file_sha256
        if sha256 is None:
            raise FormatError(f"{stored.stored_key}: no SHA-256 recorded")
        if (self._bench.cache.lookup if counted else self._bench.cache.contains)(sha256):
            return sha256
        if stored.kind is not Kind.DELTA:
            await self._references.ensure_cached(stored.stored_key, sha256)
            return sha256
        if sha256 == stored.ref_sha256 and stored.ref_key:
            # The file is its directory's reference (the self-delta of the first
            # file stored there): its bytes are the reference's, which the cache
            # verifies by this very SHA-256. No xdelta3 run, no second copy.
            await self._references.ensure_reference_cached(stored.ref_key, sha256)
            return sha256

        async def rebuild_into_cache() -> None:
            async with self._bench.scratch() as out:
                stream = self._streams[sha256] = RebuildStream(out, stored.original_size)
                try:
                    started = trio.current_time()
                    await self.rebuild(stored, out, verify=False, stream=stream)
                    stream.complete = True
                    self._telemetry.rebuilt(trio.current_time() - started)
                    verified = await self._bench.into_cache(
                        sha256,
                        out,
                        lambda: IntegrityError(
                            f"{stored.visible_key}: rebuilt bytes fail their SHA-256;"
                            " refusing to return wrong bytes"
                        ),
                    )
                    if verified:  # else cached meanwhile by another: ``out`` was not read
                        kept = self._bench.scratch_path(".rebuilt")
                        os.replace(out, kept)  # a reader holding ``out`` open reads on
                        stream.path = kept
                        self.recent.keep(sha256, kept)
                except BaseException as exc:
                    stream.error = (
                        exc
                        if isinstance(exc, DgfsError)
                        else DgfsError(f"{stored.visible_key}: rebuild stopped")
                    )
                    raise
                finally:
                    # Before ``out`` goes: a reader holding it open keeps reading.
                    del self._streams[sha256]

        await self._flights.ensure(
            f"rebuild:{sha256}", lambda: self._bench.cache.contains(sha256), rebuild_into_cache
        )
        return sha256

    def open_plain(self, sha256: str) -> int | None:
        """A descriptor of verified plain bytes of content ``sha256`` kept on
        the side (rebuilt lately, or a reference's plain copy), or None:
        read from the cache then."""
        fd = self.recent.open(sha256)
        return fd if fd is not None else self._references.open_plain(sha256)

    def stream(self, sha256: str) -> RebuildStream | None:
        """The rebuild of content ``sha256`` running now, if any (see ``RebuildStream``)."""
        return self._streams.get(sha256)

    async def open_cached(self, stored: StoredFile) -> CacheEntryReader:
        """A reader of the original bytes of ``stored`` from the cache, which gets
        them first (rebuilt or fetched, verified); the caller closes it."""
        return await self._use_cached(stored, self._bench.cache.open)

    async def export_cached(self, stored: StoredFile, dest: Path) -> None:
        """Write the original bytes of ``stored`` to ``dest`` through the cache (verified)."""

        def export(sha256: str) -> bool | None:
            return self._bench.cache.export(sha256, dest) or None

        await self._use_cached(stored, export)

    async def _use_cached(self, stored: StoredFile, use: Callable[[str], _T | None]) -> _T:
        """``use(sha256)`` in a worker thread once the content of ``stored`` is cached."""
        for _ in range(3):  # evicted by a tiny budget, or a corrupt entry dropped: once more
            sha256 = await self.materialize(stored)
            try:
                result = await trio.to_thread.run_sync(use, sha256)
            except CacheCorrupt:
                continue  # dropped (and logged) by the cache: brought in again
            if result is not None:
                return result
        raise DgfsError(f"{stored.visible_key}: the cache is too small to hold it")
