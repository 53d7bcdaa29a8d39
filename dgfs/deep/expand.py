"""The expanded form: an archive with its compressed parts inflated, reversibly.

``expand_file`` turns a file into a byte stream in which every deflate
stream that zlib reproduces exactly (gzip members, zip/jar/whl members,
and gzip or zip files nested inside those) is replaced by its
uncompressed bytes plus the four bytes of settings that recompress it.
Everything else (headers, trailers, central directories, stored members,
streams nobody can reproduce, files that are not archives at all) is
copied as it is. ``rebuild`` turns the stream back into the original
bytes. Consecutive releases differ by a few percent in *content*, so
xdelta3 finds far more in common between expanded forms than between
the compressed files.

Correctness never rests on the archive parsers: a span becomes a
``DEFLATE`` segment only after recompressing its inflated bytes gave back
exactly the original span, and anything a parser misreads simply stays
``RAW``. Callers still check ``rebuild(expand(x))`` by SHA-256 before
storing.

Stream layout (version 1; docs/FORMAT.md is the normative text)::

    stream   := MAGIC segment* END
    segment  := RAW | DEFLATE | GNU | SPLIT
    RAW      := 0x01 varint(n) byte{n}
    DEFLATE  := 0x02 level memLevel windowBits strategy segment* END
    GNU      := 0x03 level segment* END
    SPLIT    := 0x04 level memLevel windowBits strategy varint(k)
                (varint(c) varint(u)){k} segment* END
    END      := 0x00

A ``DEFLATE`` segment's inner segments rebuild to the uncompressed bytes,
which raw deflate with those settings turns into the original span; a
``GNU`` segment's are compressed by GNU gzip at that level instead
(:mod:`dgfs.deep.gnuzip`); a ``SPLIT`` segment's are compressed as a
``DEFLATE`` segment's, in pieces that start at the checkpoints (offsets in
the stream and in the inflated bytes of byte-aligned block boundaries),
side by side (:func:`dgfs.deep.deflate.deflate_pieces`).
Nothing is held in memory beyond one segment's buffer (``RAW_CHUNK``) and
zlib's own state; nested archives are spooled to a scratch file.

Files come from users and, read back, from a bucket others can write: a
353-byte zip expanded to 134 MB in 0.5 s. ``expand_file`` works under
``ExpansionLimits`` (scratch bytes held, bytes inflated, zip entries and
gzip members, wall time; nesting stops at ``MAX_DEPTH``) and raises
``ExpansionLimit`` the moment one is passed: the writer then stores the file
unexpanded. Rebuilding refuses nesting deeper than ``MAX_NESTING`` and, in
``rebuild_file``, more output or time than the caller allows
(``DecodeLimit``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import tempfile
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from dgfs import children
from dgfs.deep import gnuzip
from dgfs.deep.deflate import (
    CANDIDATES,
    NEAR_MISS,
    Checkpoint,
    DeflateMatch,
    DeflateParams,
    Payload,
    deflate_chunks,
    deflate_piece,
    deflate_pieces,
    inflate_blocks,
    match_deflate,
)
from dgfs.errors import DecodeLimit, ExpansionLimit, FormatError

log = logging.getLogger(__name__)

MAGIC = b"DGFSX1\n\x00"
TAG_END = 0
TAG_RAW = 1
TAG_DEFLATE = 2
TAG_GNU = 3
TAG_SPLIT = 4
#: Tags of segments that compress what their inner segments rebuild to.
_COMPRESSING = (TAG_DEFLATE, TAG_GNU, TAG_SPLIT)

#: Largest RAW segment written; also the read/copy buffer size.
RAW_CHUNK = 1 << 20
#: Archives nested deeper than this stay as they are.
MAX_DEPTH = 4
#: Readers refuse DEFLATE/GNU segments nested deeper than this. dgfs writes at
#: most MAX_DEPTH + 1; a hostile form nesting 1,000 deep exhausted Python's
#: recursion (the rebuild recurses once per level).
MAX_NESTING = 16
#: After this many zip or gzip members in a row that nothing reproduces, the
#: rest of the archive is copied as it is (its writer was not zlib).
MAX_MISSES = 4
#: Once the settings that reproduced earlier streams of the same kind have
#: worked this often, a stream they fail on is kept as it is without trying
#: the others: one writer made them all, and it was not zlib this time
#: (e.g. GNU gzip's .json.gz inside a wheel whose members zlib made).
TRUSTED_HINT = 3
#: Streams zlib cannot reproduce are offered to GNU gzip (zgz) from this
#: many uncompressed bytes on; below it a process start costs more than it gains.
GNU_MIN_SIZE = 4096
#: A gzip member is looked up in VERIFIED_SPANS as if it filled the rest of
#: its range only when that range is at most this long (hashing is not free).
GZIP_GUESS_MAX = 8 << 20
#: Rebuilding: top-level DEFLATE segments up to this many uncompressed bytes
#: are compressed in worker threads; at most _IN_FLIGHT bytes wait for them.
PARALLEL_PAYLOAD = 4 << 20
_IN_FLIGHT = 16 << 20
#: A gzip member whose deflate body is at least this long is first tried as a
#: SPLIT segment: pieces of about SPLIT_PIECE inflated bytes, each rebuilt by
#: its own compressor, side by side (a .tar.gz is one deflate stream).
SPLIT_MIN = 1 << 20
SPLIT_PIECE = 4 << 20
#: Readers refuse SPLIT segments with more checkpoints than this, or with
#: checkpoints closer than MIN_PIECE inflated bytes: every piece costs a
#: window and a look-ahead, so tiny pieces would let a small form cost
#: far more CPU than its bytes.
MAX_CHECKPOINTS = 1 << 16
MIN_PIECE = 1 << 16
#: Inflated bytes of a nested archive held in memory while it is expanded;
#: larger ones are spooled to scratch.
NESTED_IN_MEMORY = 1 << 20
#: Default of ``ExpansionLimits.max_bytes``.
DEFAULT_MAX_BYTES = 4 << 30
#: However small a file, its expansion may take this much.
MIN_ALLOWANCE = 1 << 20
#: Bytes one expansion may inflate, all attempts together, per byte it may
#: write: a stream is inflated again when its first candidate settings fail,
#: for GNU gzip, and once more inside a nested archive.
INFLATE_FACTOR = 4

_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_DESCRIPTOR = b"PK\x07\x08"
_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_END = b"PK\x05\x06"
_U32_MAX = 0xFFFFFFFF
# What a writer's header says of its level: gzip's XFL byte (2: slowest,
# 4: fastest), a zip entry's flag bits 1-2 (normal, maximum, fast, superfast).
_XFL_PRIOR = {0: DeflateParams(6), 2: DeflateParams(9), 4: DeflateParams(1)}
_ZIP_FLAG_PRIOR = (DeflateParams(6), DeflateParams(9), DeflateParams(1), DeflateParams(1))


def _unknown_tag(tag: int) -> str:
    """A segment tag this dgfs does not know: corrupt, or written by a newer dgfs."""
    return (
        f"expanded form: unknown segment tag {tag} (a newer dgfs wrote it,"
        " or the object is corrupt: upgrade dgfs on this machine to read it)"
    )


def nested_kind(head: bytes) -> str | None:
    """``"gzip"`` or ``"zip"`` if ``head`` starts a format we expand, else None."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZIP_LOCAL):
        return "zip"
    return None


@dataclass(frozen=True)
class ExpansionLimits:
    """How far expanding one file may go (docs/SECURITY.md; mount options in
    brackets). Past any of them ``expand_file`` raises ``ExpansionLimit`` and
    the file is stored without expansion. The defaults are far beyond any
    real release series: botocore wheels and Django sdists expand 6-8 times,
    in about a second."""

    ratio: float = 100.0
    """Expanded bytes per byte of the file (``expand_ratio``)."""
    max_bytes: int = DEFAULT_MAX_BYTES
    """Expanded bytes of any one file (``expand_max``); also the most a deep
    reference may decompress to."""
    members: int = 200_000
    """Zip entries and gzip members walked, at every depth (``expand_members``)."""
    seconds: float = 600.0
    """Wall time of one expansion, or of one rebuild when reading (``expand_time``)."""

    def allowance(self, size: int) -> int:
        """Bytes the expanded form of a ``size``-byte file may take, and the
        scratch space its expansion may hold at once."""
        return min(self.max_bytes, max(MIN_ALLOWANCE, int(self.ratio * size)))

    def expanded_cap(self, size: int) -> int:
        """The most the expanded form of a ``size``-byte file may hold when
        read back: its allowance, or the form that expands nothing (what a
        file over a limit gets) when that is larger."""
        return max(self.allowance(size), plain_form_size(size))

    def reference_cap(self, expanded_size: int | None, stored_size: int) -> int:
        """The most a deep reference stored in ``stored_size`` bytes, recording
        ``expanded_size`` (None: nothing usable), may decompress to: what it
        records, and no more than ``max_bytes`` unless it is compressed less
        than ``ratio`` times (the plain form of a large first file is; a bomb
        is not)."""
        cap = max(self.max_bytes, int(self.ratio * stored_size))
        return cap if expanded_size is None else min(expanded_size, cap)


def plain_form_size(size: int) -> int:
    """Bytes of the form that expands nothing of a ``size``-byte file (``plain_form``)."""
    full, tail = divmod(size, RAW_CHUNK)
    headers = full * (1 + len(_varint(RAW_CHUNK))) + (1 + len(_varint(tail)) if tail else 0)
    return len(MAGIC) + size + headers + 1


class _Budget:
    """What one expansion may still spend (used by the expansion's thread only)."""

    def __init__(self, limits: ExpansionLimits, original_size: int) -> None:
        self.limits = limits
        self.original_size = original_size
        self.max_bytes = limits.allowance(original_size)
        self.held = 0
        """Bytes on scratch now: the expanded form so far and open spools."""
        self.peak = 0
        self.inflated = 0
        self.members = 0
        self.deadline = time.monotonic() + limits.seconds

    def hold(self, size: int) -> None:
        """``size`` more bytes are written to scratch."""
        self.held += size
        self.peak = max(self.peak, self.held)
        if self.held > self.max_bytes:
            raise ExpansionLimit(
                f"its expanded form would pass {self.max_bytes} bytes (expand_ratio="
                f"{self.limits.ratio:g} × its {self.original_size} bytes, at most"
                f" expand_max={self.limits.max_bytes})"
            )
        self.check_time()

    def release(self, size: int) -> None:
        """``size`` bytes written before were removed from scratch."""
        self.held -= size

    def stream(self) -> Callable[[int], None]:
        """An ``on_inflate`` counter for one more deflate stream."""
        produced = 0

        def count(size: int) -> None:
            nonlocal produced
            produced += size
            self.inflated += size
            if produced > self.max_bytes:
                raise ExpansionLimit(
                    f"a stream in it inflates to more than {self.max_bytes} bytes"
                    " (expand_ratio × its size, at most expand_max)"
                )
            if self.inflated > INFLATE_FACTOR * self.max_bytes:
                raise ExpansionLimit(
                    f"expanding it inflated more than {INFLATE_FACTOR * self.max_bytes} bytes"
                    f" ({INFLATE_FACTOR} × expand_ratio × its size, at most expand_max)"
                )
            self.check_time()

        return count

    def member(self) -> None:
        """One more zip entry or gzip member."""
        self.members += 1
        if self.members > self.limits.members:
            raise ExpansionLimit(
                f"it holds more than {self.limits.members} zip entries and gzip members"
                " (expand_members)"
            )
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise ExpansionLimit(f"expanding it took over {self.limits.seconds:g} s (expand_time)")

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True)
class SplitRecipe:
    """zlib settings, and the checkpoints where pieces of the stream start."""

    params: DeflateParams
    checkpoints: tuple[Checkpoint, ...]


#: How a stream is re-compressed: zlib settings (whole or in pieces), or a GNU gzip level.
Recipe = DeflateParams | SplitRecipe | int


@dataclass
class ExpandStats:
    """What ``expand_file`` did, for logs and benchmarks."""

    original_size: int = 0
    expanded_size: int = 0
    streams_inflated: int = 0
    streams_kept: int = 0
    streams_gnu: int = 0
    streams_split: int = 0
    """Streams written as SPLIT segments (rebuilt in pieces side by side)."""
    streams_remembered: int = 0
    """Inflated without a new check: the same bytes were proven before."""
    inflated_bytes: int = 0
    params_seen: dict[DeflateParams, int] = field(default_factory=dict)
    peak_scratch: int = 0
    """The most scratch bytes the expansion held at once (output and spools)."""
    proven: set[tuple[bytes, Recipe]] = field(default_factory=set)
    """(SHA-256 of a compressed span, recipe) for every DEFLATE and GNU segment
    written: the recipe turns the span's inflated bytes into exactly the span,
    as the search compared byte for byte (or an earlier search, for a span
    remembered in ``VERIFIED_SPANS``). :func:`prove_form` builds on these."""
    leaves: dict[tuple[bytes, Recipe], tuple[bytes, int]] = field(default_factory=dict)
    """(SHA-256 of inflated bytes, recipe) -> (SHA-256, length) of the compressed
    span they came from, for every DEFLATE and GNU segment that holds only RAW
    segments: what ``proven`` says of the span, found by its content, so that
    :func:`prove_form` checks such a segment by hashing instead of inflating."""


# --- writing -----------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Writer:
    """Segments onto a seekable file; RAW data is buffered up to ``RAW_CHUNK``.
    Every byte written is counted in ``budget`` (if any) before it is written."""

    def __init__(self, out: BinaryIO, budget: _Budget | None = None) -> None:
        self.out = out
        self.budget = budget
        self._pending = bytearray()

    def _write(self, data: bytes) -> None:
        if self.budget is not None:
            self.budget.hold(len(data))
        self.out.write(data)

    def raw(self, data: bytes) -> None:
        self._pending += data
        while len(self._pending) >= RAW_CHUNK:
            self._emit(RAW_CHUNK)

    def _emit(self, size: int) -> None:
        piece = bytes(self._pending[:size])
        del self._pending[:size]
        self._write(bytes((TAG_RAW,)) + _varint(len(piece)) + piece)

    def flush_raw(self) -> None:
        if self._pending:
            self._emit(len(self._pending))

    def tag(self, data: bytes) -> None:
        self.flush_raw()
        self._write(data)

    def tell(self) -> int:
        self.flush_raw()
        return self.out.tell()

    def rewind(self, pos: int) -> None:
        """Drop everything written from ``pos`` on (a failed segment)."""
        self._pending.clear()
        end = self.out.seek(0, os.SEEK_END)
        if self.budget is not None:
            self.budget.release(end - pos)
        self.out.seek(pos)
        self.out.truncate()

    def patch(self, pos: int, data: bytes) -> None:
        self.flush_raw()
        end = self.out.tell()
        self.out.seek(pos)
        self.out.write(data)
        self.out.seek(end)


@dataclass
class _Hint:
    """The settings that last reproduced a stream of one kind, and how often they did."""

    params: DeflateParams | None = None
    successes: int = 0
    gnu_level: int | None = None
    gnu_failures: int = 0

    def record(self, params: DeflateParams, compressed_length: int) -> None:
        # A short stream often comes out the same at several levels: it
        # names the settings but is no evidence that they are the writer's.
        evidence = 1 if compressed_length >= NEAR_MISS else 0
        if params == self.params:
            self.successes += evidence
        else:
            self.params, self.successes = params, evidence


def _header(recipe: Recipe) -> bytes:
    if isinstance(recipe, DeflateParams):
        return bytes((TAG_DEFLATE,)) + recipe.pack()
    if isinstance(recipe, SplitRecipe):
        out = bytearray((TAG_SPLIT,)) + recipe.params.pack() + _varint(len(recipe.checkpoints))
        for point in recipe.checkpoints:
            out += _varint(point.compressed) + _varint(point.uncompressed)
        return bytes(out)
    return bytes((TAG_GNU, recipe))


def _pick_checkpoints(boundaries: list[Checkpoint], total: int) -> tuple[Checkpoint, ...]:
    """Byte-aligned block boundaries about SPLIT_PIECE inflated bytes apart,
    none within half a piece of the end."""
    picked: list[Checkpoint] = []
    last = 0
    for point in boundaries:
        if len(picked) >= MAX_CHECKPOINTS:
            break
        if point.uncompressed - last >= max(SPLIT_PIECE, MIN_PIECE) and (
            total - point.uncompressed >= max(SPLIT_PIECE // 2, MIN_PIECE)
        ):
            picked.append(point)
            last = point.uncompressed
    return tuple(picked)


#: How long a thread waits for another one computing the same memo entry
#: before computing it too (a bound, not a timing: they normally finish first).
PEER_WAIT = 60.0


class _Memo:
    """A thread-safe LRU map with a byte budget (shared by concurrent expansions
    and rebuilds), whose entries are computed once when asked for at once."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # key -> (set when its computation ends, the thread computing it)
        self._flights: dict[bytes, tuple[threading.Event, int]] = {}
        self.waits = 0
        """Lookups that waited for another thread's computation (tests, benchmarks)."""

    @contextmanager
    def computing(self, key: bytes, wait: float = PEER_WAIT) -> Iterator[object | None]:
        """The value of ``key``; or None, and then the caller computes it and
        ``put``s it before leaving the block.

        Consecutive releases read or stored side by side (a prefetch beside a
        read, uploads in parallel) ask for the same entries at the same time:
        a thread that finds one being computed by another waits for it (at
        most ``wait`` seconds, then computes it too). Nested entries are
        computed inside outer ones; a thread never waits for itself, and
        the bound on the wait keeps a cycle (two archives nested in each
        other both ways) from blocking for good.
        """
        me = threading.get_ident()
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            flight = self._flights.get(key) if item is None else None
            claimed = item is None and flight is None
            if claimed:
                self._flights[key] = (threading.Event(), me)
        if item is not None:
            yield item[0]
            return
        if flight is not None:
            event, owner = flight
            if owner != me:
                self.waits += 1
                event.wait(wait)
            yield self.get(key)
            return
        try:
            yield None
        finally:
            with self._lock:
                event, _ = self._flights.pop(key)
            event.set()

    def get(self, key: bytes) -> object | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: bytes, value: object, size: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                self._bytes -= self._items.popitem(last=False)[1][1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


#: SHA-256 of a compressed span -> the recipe proven to reproduce it (or that
#: none does). Consecutive
#: releases share most of their zip members byte for byte: their spans are
#: inflated (to write the payload) but not compressed again to be checked.
#: Deflate is deterministic, so a span proven once is proven for good.
VERIFIED_SPANS = _Memo(16 << 20)
#: Remembered for a span that nothing reproduces (with the zgz of this process).
_UNREPRODUCIBLE = "unreproducible"
#: Only spans at least this long are remembered (shorter ones are cheap).
MEMO_MIN_SPAN = 512
#: What one remembered span costs in memory (key, recipe, dict slot).
_SPAN_ENTRY_BYTES = 256


class _Expander:
    def __init__(
        self, writer: _Writer, scratch_dir: Path, stats: ExpandStats, budget: _Budget
    ) -> None:
        self.w = writer
        self.scratch_dir = scratch_dir
        self.stats = stats
        self.budget = budget
        # Per kind of stream ("zip" members, "gzip" members) and nesting depth.
        self.hints: dict[tuple[str, int], _Hint] = {}

    # -- plumbing --

    def copy(self, src: BinaryIO, start: int, end: int) -> None:
        src.seek(start)
        left = end - start
        while left > 0:
            chunk = src.read(min(RAW_CHUNK, left))
            if not chunk:
                raise FormatError("source ended early")
            self.w.raw(chunk)
            left -= len(chunk)

    def range(self, src: BinaryIO, start: int, end: int, depth: int) -> None:
        """Segments for ``src[start:end]``, expanding what it recognises."""
        src.seek(start)
        kind = nested_kind(src.read(4)) if depth <= MAX_DEPTH else None
        if kind == "gzip":
            self.gzip(src, start, end, depth)
        elif kind == "zip":
            self.zip(src, start, end, depth)
        else:
            self.copy(src, start, end)

    def deflate(
        self,
        src: BinaryIO,
        start: int,
        limit: int,
        depth: int,
        kind: str,
        prior: DeflateParams | None = None,
        length: int | None = None,
    ) -> tuple[DeflateMatch, bool]:
        """One deflate stream at ``start``: a segment if reproducible, else nothing.

        ``prior`` is what the container's header suggests (gzip's XFL, a
        zip entry's flags); ``length`` the stream's length if the container
        says (a span proven before is then only inflated). Returns the
        match (``compressed_length == 0`` means "not deflate") and whether
        a segment was written for it.
        """
        if length is None or length < MEMO_MIN_SPAN or start + length > limit:
            return self._stream(src, start, limit, depth, kind, prior, length, None, None)
        span_digest = _span_digest(src, start, length)
        # Another expansion (the next release, uploaded beside this one) may
        # be searching these very bytes: its verdict is worth waiting for.
        wait = min(PEER_WAIT, self.budget.time_left())
        with VERIFIED_SPANS.computing(span_digest, wait) as known:
            self.budget.check_time()
            return self._stream(src, start, limit, depth, kind, prior, length, span_digest, known)

    def _stream(
        self,
        src: BinaryIO,
        start: int,
        limit: int,
        depth: int,
        kind: str,
        prior: DeflateParams | None,
        length: int | None,
        span_digest: bytes | None,
        known: object,
    ) -> tuple[DeflateMatch, bool]:
        """``deflate`` once the memo was asked: ``known`` is its verdict on the
        ``length`` bytes at ``start`` (``span_digest``); None: search, and
        tell the memo."""
        if isinstance(known, int) and gnuzip.zgz_path() is None:
            known = None  # proven with zgz, which is gone: could not be rebuilt here
        if length is not None and known == _UNREPRODUCIBLE:
            return DeflateMatch(length, 0, None), False
        if length is not None and isinstance(known, DeflateParams | int):
            found, recipe = self._segment(src, start, limit, depth, (), known, length)
            if recipe is not None:
                self.stats.streams_remembered += 1
                if isinstance(recipe, DeflateParams):
                    hint = self.hints.setdefault((kind, depth), _Hint())
                    hint.record(recipe, found.compressed_length)
                else:
                    self.stats.streams_gnu += 1
                return found, True
        found, recipe = self._search(src, start, limit, depth, kind, prior)
        if found.compressed_length >= MEMO_MIN_SPAN:
            if span_digest is None or length != found.compressed_length:
                span_digest = _span_digest(src, start, found.compressed_length)
            verdict = _UNREPRODUCIBLE if recipe is None else recipe
            VERIFIED_SPANS.put(span_digest, verdict, _SPAN_ENTRY_BYTES)
        return found, recipe is not None

    def _search(
        self,
        src: BinaryIO,
        start: int,
        limit: int,
        depth: int,
        kind: str,
        prior: DeflateParams | None,
    ) -> tuple[DeflateMatch, Recipe | None]:
        """Find the recipe of the stream at ``start`` and write its segment."""
        hint = self.hints.setdefault((kind, depth), _Hint())
        first = hint.params or prior
        if first is None:
            found, recipe = self._segment(src, start, limit, depth, CANDIDATES)
        else:
            # One likely candidate alone first: on very compressible data a
            # wrong candidate emits its first block late, so running all of
            # them side by side would cost many full compressions.
            found, recipe = self._segment(src, start, limit, depth, (first,))
            retry = recipe is None and found.compressed_length and not found.near_miss
            if retry and (hint.params is None or hint.successes < TRUSTED_HINT):
                others = tuple(c for c in CANDIDATES if c != first)
                found, recipe = self._segment(src, start, limit, depth, others)
        if found.params is not None:
            hint.record(found.params, found.compressed_length)
            return found, found.params
        gnu_worth_it = (
            found.uncompressed_length >= GNU_MIN_SIZE
            and gnuzip.zgz_path() is not None
            and (hint.gnu_level is not None or hint.gnu_failures < MAX_MISSES)
        )
        level = self._gnu_level(src, start, found, hint) if gnu_worth_it else None
        if level is None:
            return found, None
        found, recipe = self._segment(src, start, limit, depth, (), level, found.compressed_length)
        if recipe is not None:
            self.stats.streams_gnu += 1
        return found, recipe

    def _gnu_level(self, src: BinaryIO, start: int, found: DeflateMatch, hint: _Hint) -> int | None:
        """The GNU gzip level that reproduces the stream, if any (needs zgz)."""
        fd, name = tempfile.mkstemp(dir=self.scratch_dir, suffix=".gnu")
        payload = Path(name)
        spooled = 0

        def spool_write(piece: bytes) -> None:
            nonlocal spooled
            self.budget.hold(len(piece))
            spooled += len(piece)
            spool.write(piece)

        try:
            with os.fdopen(fd, "w+b") as spool:
                end = start + found.compressed_length
                match_deflate(src, start, end, spool_write, (), self.budget.stream())
            levels = [lv for lv in (hint.gnu_level, *gnuzip.LEVELS) if lv is not None]
            for level in dict.fromkeys(levels):
                span = _span_chunks(src, start, found.compressed_length)
                timeout = min(children.timeout_for(2 * spooled), self.budget.time_left())
                matched = gnuzip.gnu_matches(level, payload, span, timeout)
                self.budget.check_time()
                if matched:
                    hint.gnu_level = level
                    return level
            hint.gnu_failures += 1
            return None
        finally:
            payload.unlink(missing_ok=True)
            self.budget.release(spooled)

    def _segment(
        self,
        src: BinaryIO,
        start: int,
        limit: int,
        depth: int,
        candidates: tuple[DeflateParams, ...],
        known: Recipe | None = None,
        known_length: int = 0,
    ) -> tuple[DeflateMatch, Recipe | None]:
        """Write the segment of the stream at ``start`` if one of ``candidates``
        reproduces it, or (with ``known``) if it is ``known_length`` long and
        inflates: a recipe proven for these very bytes before."""
        seg_pos = self.w.tell()
        self.w.tag(_header(known) if known is not None else bytes((TAG_DEFLATE,)) + b"\0" * 4)
        body_pos = self.w.tell()
        spool: BinaryIO | None = None
        spooled = 0
        first = True
        content = hashlib.sha256()  # of what goes into the segment as RAW (a leaf)

        def sink(piece: bytes) -> None:
            nonlocal first, spool, spooled
            if first:
                first = False
                if depth < MAX_DEPTH and nested_kind(piece) is not None:
                    # Most nested archives are small (a wheel's .json.gz): in memory
                    # up to NESTED_IN_MEMORY, then in scratch.
                    spooled_file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed below)
                        NESTED_IN_MEMORY, "w+b", dir=str(self.scratch_dir), suffix=".nested"
                    )
                    spool = cast(BinaryIO, spooled_file)
            if spool is not None:
                self.budget.hold(len(piece))
                spooled += len(piece)
                spool.write(piece)
            else:
                content.update(piece)
                self.w.raw(piece)

        try:
            found = match_deflate(
                src,
                start,
                limit,
                sink,
                () if known is not None else candidates,
                self.budget.stream(),
            )
            recipe: Recipe | None
            if known is not None:
                recipe = known if found.compressed_length == known_length else None
            else:
                recipe = found.params
            if recipe is None:
                self.w.rewind(seg_pos)
                return found, None
            if known is None:
                self.w.patch(seg_pos + 1, found.params.pack())  # type: ignore[union-attr]
            span = (_span_digest(src, start, found.compressed_length), found.compressed_length)
            self.stats.proven.add((span[0], recipe))
            if spool is None:
                self.stats.leaves[(content.digest(), recipe)] = span
            if spool is not None:
                spool.flush()
                self.w.rewind(body_pos)
                self.range(spool, 0, found.uncompressed_length, depth + 1)
            self.w.tag(bytes((TAG_END,)))
            self.stats.streams_inflated += 1
            self.stats.inflated_bytes += found.uncompressed_length
            if isinstance(recipe, DeflateParams):
                seen = self.stats.params_seen
                seen[recipe] = seen.get(recipe, 0) + 1
            return found, recipe
        finally:
            if spool is not None:
                spool.close()
            self.budget.release(spooled)

    def _split(
        self, src: BinaryIO, start: int, limit: int, depth: int, prior: DeflateParams | None
    ) -> tuple[DeflateMatch, bool] | None:
        """The large deflate stream at ``start`` as a SPLIT segment, if the
        settings that worked last for gzip bodies (or ``prior``, from the
        header) reproduce it piece by piece from checkpoints; None if not
        tried or not reproduced (the caller then searches as for any stream).

        Every piece is compressed, as the rebuild will, and compared with the
        original's bytes (all stop at the first wrong byte of any): the stream
        is deflated once, by all cores.
        """
        hint = self.hints.setdefault(("gzip", depth), _Hint())
        try:
            fileno = src.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return None
        # Levels 1-3 do not insert every string in the hash chains: no pieces.
        likely = [p for p in (hint.params, prior) if p is not None and p.level >= 4]
        params = next(
            (p for p in dict.fromkeys(likely) if _prefix_matches(fileno, start, limit, p)), None
        )
        if params is None:
            return None  # another writer (GNU gzip, say): not worth inflating it all here
        fd, name = tempfile.mkstemp(dir=self.scratch_dir, suffix=".split")
        spool_path = Path(name)
        spooled = 0
        content = hashlib.sha256()

        def spool_write(piece: bytes) -> None:
            nonlocal spooled
            self.budget.hold(len(piece))
            spooled += len(piece)
            content.update(piece)
            spool.write(piece)

        try:
            with os.fdopen(fd, "w+b") as spool:
                found = inflate_blocks(src, start, limit, spool_write, self.budget.stream())
                if found is None or not found.compressed_length or not found.uncompressed_length:
                    return None
                spool.flush()
                checkpoints = _pick_checkpoints(found.checkpoints, found.uncompressed_length)
                payload = Payload.of_file(spool.fileno(), found.uncompressed_length)
                if not checkpoints or nested_kind(payload.read(0, 4)) is not None:
                    return None  # small, or an archive inside: the ordinary way
                ends = (*checkpoints, Checkpoint(found.compressed_length, payload.size))
                if not _pieces_match(params, payload, fileno, start, checkpoints, ends):
                    return None
                recipe = SplitRecipe(params, checkpoints)
                self.w.tag(_header(recipe))
                self.copy(spool, 0, found.uncompressed_length)
                self.w.tag(bytes((TAG_END,)))
        finally:
            spool_path.unlink(missing_ok=True)
            self.budget.release(spooled)
        hint.record(params, found.compressed_length)
        span = (_span_digest(src, start, found.compressed_length), found.compressed_length)
        self.stats.proven.add((span[0], recipe))
        self.stats.leaves[(content.digest(), recipe)] = span
        self.stats.streams_inflated += 1
        self.stats.streams_split += 1
        self.stats.inflated_bytes += found.uncompressed_length
        self.stats.params_seen[params] = self.stats.params_seen.get(params, 0) + 1
        match = DeflateMatch(found.compressed_length, found.uncompressed_length, params)
        return match, True

    # -- gzip (RFC 1952), one or more members --

    def gzip(self, src: BinaryIO, start: int, end: int, depth: int) -> None:
        pos = start
        misses = 0
        while pos < end and misses < MAX_MISSES:
            src.seek(pos)
            if src.read(3) != _GZIP_MAGIC:
                break
            self.budget.member()
            body = _gzip_body_offset(src, pos, end)
            if body is None:
                break
            self.copy(src, pos, body)
            src.seek(pos + 8)
            prior = _XFL_PRIOR.get(src.read(1)[0])
            # A gzip file of one member: its body ends 8 bytes before the end.
            guess = end - 8 - body if end - body <= GZIP_GUESS_MAX else None
            split = None
            if end - body >= SPLIT_MIN and not _remembered(src, body, guess):
                split = self._split(src, body, end, depth, prior)
            found, expanded = split or self.deflate(src, body, end, depth, "gzip", prior, guess)
            if found.compressed_length == 0:
                self.copy(src, body, end)  # not deflate after all: keep the rest
                return
            if not expanded:
                misses += 1
                self.stats.streams_kept += 1
                self.copy(src, body, body + found.compressed_length)
            else:
                misses = 0
            pos = min(end, body + found.compressed_length + 8)  # CRC32 + ISIZE
            self.copy(src, body + found.compressed_length, pos)
        self.copy(src, pos, end)

    # -- zip: walk local headers in order (data descriptors and zip64 included) --

    def zip(self, src: BinaryIO, start: int, end: int, depth: int) -> None:
        pos = cursor = start
        misses = 0
        while pos + 30 <= end:
            entry = _read_local_header(src, pos, end)
            if entry is None:
                break
            self.budget.member()
            data_start, method, flags, csize = entry
            if method == 8 and misses < MAX_MISSES:
                self.copy(src, cursor, data_start)
                cursor = data_start
                limit = end if csize is None else min(end, data_start + csize)
                prior = _ZIP_FLAG_PRIOR[(flags >> 1) & 3]
                found, expanded = self.deflate(src, data_start, limit, depth, "zip", prior, csize)
                if found.compressed_length == 0 and csize is None:
                    break  # neither deflate nor a known size: keep the rest as it is
                if expanded:
                    misses = 0
                    cursor = data_start + found.compressed_length
                elif found.compressed_length:
                    misses += 1
                    self.stats.streams_kept += 1
                # Bytes the stream did not cover (if any) are copied with the next span.
                data_end = data_start + (found.compressed_length if csize is None else csize)
            elif csize is not None:
                data_end = data_start + csize
                if method == 0 and csize >= 64 and depth < MAX_DEPTH:
                    src.seek(data_start)
                    if nested_kind(src.read(4)) is not None:
                        self.copy(src, cursor, data_start)
                        self.range(src, data_start, data_end, depth + 1)
                        cursor = data_end
            else:
                break  # size unknown (stored with a data descriptor): stop walking
            after = _after_descriptor(src, data_end, end, flags)
            if after is None:
                break
            pos = after
        self.copy(src, cursor, end)


def _remembered(src: BinaryIO, start: int, length: int | None) -> bool:
    """Whether VERIFIED_SPANS has a verdict on the ``length`` bytes at ``start``
    (then inflating them is all the ordinary way costs)."""
    if length is None or length < MEMO_MIN_SPAN:
        return False
    return VERIFIED_SPANS.get(_span_digest(src, start, length)) is not None


def _prefix_matches(fileno: int, start: int, limit: int, params: DeflateParams) -> bool:
    """Whether ``params`` reproduce what the first ``_PREFIX`` inflated bytes of
    the deflate stream at ``start`` compress to (True when they tell nothing)."""
    head = os.pread(fileno, min(_PREFIX, limit - start), start)
    try:
        plain = zlib.decompressobj(-15).decompress(head, _PREFIX)
    except zlib.error:
        return False
    out = params.compressor().compress(plain)
    return head.startswith(out)


#: Inflated bytes ``_prefix_matches`` compresses (zlib emits its first block
#: after about 16,000 symbols at memLevel 8).
_PREFIX = 1 << 20


def _pieces_match(
    params: DeflateParams,
    payload: Payload,
    fileno: int,
    start: int,
    checkpoints: tuple[Checkpoint, ...],
    ends: tuple[Checkpoint, ...],
) -> bool:
    """Whether every piece of ``payload``'s deflate stream (pieces from ``checkpoints``
    to ``ends``) compresses to the original's bytes at ``start`` of ``fileno``."""
    failed = threading.Event()
    starts = (Checkpoint(0, 0), *checkpoints)

    def piece_matches(index: int) -> bool:
        begin, end = starts[index], ends[index]
        final = index == len(checkpoints)
        want = end.compressed - begin.compressed
        offset = 0
        for out in deflate_piece(params, payload, begin.uncompressed, end.uncompressed, final):
            take = out[: want - offset] if not final else out
            original = os.pread(fileno, len(take), start + begin.compressed + offset)
            if failed.is_set() or take != original:
                failed.set()
                return False
            offset += len(take)
            if not final and offset == want:
                return True
        return offset == want

    workers = min(len(starts), os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="dgfs-piece") as pool:
        return all(list(pool.map(piece_matches, range(len(starts)))))


def _span_digest(src: BinaryIO, start: int, length: int) -> bytes:
    digest = hashlib.sha256()
    for chunk in _span_chunks(src, start, length):
        digest.update(chunk)
    return digest.digest()


def _span_chunks(src: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    src.seek(start)
    while length > 0:
        chunk = src.read(min(RAW_CHUNK, length))
        if not chunk:
            return
        length -= len(chunk)
        yield chunk


def _gzip_body_offset(src: BinaryIO, pos: int, end: int) -> int | None:
    """Offset of a gzip member's deflate data, or None if its header is cut short."""
    src.seek(pos)
    head = src.read(10)
    if len(head) < 10:
        return None
    flags = head[3]
    if flags & 0xE0:
        return None  # reserved bits set: not a gzip member we understand
    offset = pos + 10
    if flags & 0x04:  # FEXTRA
        src.seek(offset)
        raw = src.read(2)
        if len(raw) < 2:
            return None
        offset += 2 + struct.unpack("<H", raw)[0]
    for flag in (0x08, 0x10):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            src.seek(offset)
            while True:
                chunk = src.read(4096)
                if not chunk:
                    return None
                nul = chunk.find(b"\0")
                if nul >= 0:
                    offset += nul + 1
                    break
                offset += len(chunk)
    if flags & 0x02:  # FHCRC
        offset += 2
    return offset if offset <= end else None


def _read_local_header(
    src: BinaryIO, pos: int, end: int
) -> tuple[int, int, int, int | None] | None:
    """``(data_start, method, flags, compressed_size or None)`` of the zip entry at ``pos``."""
    src.seek(pos)
    head = src.read(30)
    if len(head) < 30 or not head.startswith(_ZIP_LOCAL):
        return None
    flags, method = struct.unpack("<HH", head[6:10])
    csize, usize, name_len, extra_len = struct.unpack("<IIHH", head[18:30])
    data_start = pos + 30 + name_len + extra_len
    if data_start > end:
        return None
    extra = src.read(name_len + extra_len)[name_len:]
    size: int | None = csize
    if csize == _U32_MAX or usize == _U32_MAX:
        size = _zip64_csize(extra, usize == _U32_MAX, csize == _U32_MAX)
    if flags & 0x08 and size == 0:
        size = None  # sizes follow the data, in a descriptor
    if size is not None and data_start + size > end:
        return None
    return data_start, method, flags, size


def _zip64_csize(extra: bytes, has_usize: bool, has_csize: bool) -> int | None:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack("<HH", extra[pos : pos + 4])
        body = extra[pos + 4 : pos + 4 + length]
        if tag == 0x0001:
            offset = 8 if has_usize else 0
            if has_csize and len(body) >= offset + 8:
                return int(struct.unpack("<Q", body[offset : offset + 8])[0])
            return None
        pos += 4 + length
    return None


def _after_descriptor(src: BinaryIO, data_end: int, end: int, flags: int) -> int | None:
    """Where the next record starts after an entry's data (and its data descriptor)."""
    if not flags & 0x08:
        return data_end
    # Descriptor: optional signature, CRC, then 4- or 8-byte sizes. Pick the
    # length after which the next record's signature follows.
    for length in (16, 12, 24, 20):
        nxt = data_end + length
        if nxt + 4 > end:
            continue
        src.seek(nxt)
        if src.read(4) in (_ZIP_LOCAL, _ZIP_CENTRAL, _ZIP_END):
            return nxt
    return None


# --- public API ------------------------------------------------------------------


def expand_file(
    src: Path, out: Path, *, scratch_dir: Path, limits: ExpansionLimits | None = None
) -> ExpandStats:
    """Write the expanded form of ``src`` to ``out`` (blocking; run it in a thread).

    Raises ``ExpansionLimit`` the moment the expansion would pass one of
    ``limits`` (by default ``ExpansionLimits()``), or at once for a file
    larger than ``limits.max_bytes``; ``out`` is then empty and nothing is
    left in ``scratch_dir``. The caller stores such a file unexpanded
    (:func:`plain_form`).
    """
    limits = limits or ExpansionLimits()
    stats = ExpandStats(original_size=src.stat().st_size)
    if stats.original_size > limits.max_bytes:
        raise ExpansionLimit(
            f"it is {stats.original_size} bytes, more than expand_max={limits.max_bytes}"
        )
    budget = _Budget(limits, stats.original_size)
    with open(src, "rb") as source, open(out, "w+b") as sink:
        writer = _Writer(sink, budget)
        try:
            writer.tag(MAGIC)
            expander = _Expander(writer, scratch_dir, stats, budget)
            try:
                expander.range(source, 0, stats.original_size, 0)
            except FormatError as exc:
                # A parser disagreed with the bytes: the plain form is always right.
                log.info("%s: expansion stopped (%s); kept as it is", src, exc)
                writer.rewind(len(MAGIC))
                stats.streams_inflated = stats.inflated_bytes = 0
                expander.copy(source, 0, stats.original_size)
            writer.tag(bytes((TAG_END,)))
        except ExpansionLimit:
            sink.truncate(0)
            raise
        stats.expanded_size = sink.tell()
    stats.peak_scratch = budget.peak
    return stats


def plain_form(src: Path, out: Path) -> None:
    """The expanded form that expands nothing (what ``expand_file`` falls back to)."""
    size = src.stat().st_size
    with open(src, "rb") as source, open(out, "wb") as sink:
        sink.write(MAGIC)
        writer = _Writer(sink)
        # Copying spends nothing but the file's own size: no limits.
        unlimited = _Budget(ExpansionLimits(max_bytes=size, seconds=float("inf")), size)
        _Expander(writer, Path(tempfile.gettempdir()), ExpandStats(), unlimited).copy(
            source, 0, size
        )
        writer.tag(bytes((TAG_END,)))


class _Reader:
    def __init__(
        self, src: BinaryIO, scratch_dir: Path | None, depth: int = 0, workers: int = 1
    ) -> None:
        self.src = src
        self.scratch_dir = scratch_dir
        self.depth = depth
        self.workers = workers
        """Threads a SPLIT segment's pieces are compressed by."""
        """DEFLATE/GNU segments open around the one being read (at most ``MAX_NESTING``)."""
        self.nests = False
        """Whether the subtree ``_subtree_end`` walked last holds others."""

    def exact(self, size: int) -> bytes:
        data = self.src.read(size)
        if len(data) != size:
            raise FormatError("expanded form ends early")
        return data

    def varint(self) -> int:
        value = shift = 0
        for _ in range(10):
            byte = self.exact(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise FormatError("expanded form: bad length")

    def _gnu(self, level: int) -> Iterator[bytes]:
        if not 1 <= level <= 9:
            raise FormatError(f"expanded form: bad GNU gzip level {level}")
        fd, name = tempfile.mkstemp(dir=self.scratch_dir, suffix=".gnu")
        payload = Path(name)
        try:
            with os.fdopen(fd, "wb") as spool:
                for chunk in self.segments():
                    spool.write(chunk)
            yield from gnuzip.gnu_deflate(level, payload)
        finally:
            payload.unlink(missing_ok=True)

    def segments(self) -> Iterator[bytes]:
        """Rebuild segments up to the next END, in order."""
        while (tag := self.exact(1)[0]) != TAG_END:
            if tag in _COMPRESSING:
                yield from self._subtree(tag)
            else:
                yield from self.segment(tag)

    def params(self) -> DeflateParams:
        try:
            return DeflateParams.unpack(self.exact(4))
        except ValueError as exc:
            raise FormatError(f"expanded form: {exc}") from None

    def split_recipe(self) -> SplitRecipe:
        """A SPLIT segment's settings and checkpoints (its tag was just read)."""
        params = self.params()
        count = self.varint()
        if not 0 < count <= MAX_CHECKPOINTS:
            raise FormatError(f"expanded form: {count} checkpoints in a SPLIT segment")
        points = [Checkpoint(self.varint(), self.varint()) for _ in range(count)]
        for before, after in zip([Checkpoint(0, 0), *points], points, strict=False):
            if after.compressed <= before.compressed or (
                after.uncompressed < before.uncompressed + MIN_PIECE
            ):
                raise FormatError(
                    f"expanded form: SPLIT checkpoints do not increase (by {MIN_PIECE} inflated)"
                )
        return SplitRecipe(params, tuple(points))

    def skip_header(self, tag: int) -> None:
        """Past the header of a DEFLATE, GNU or SPLIT segment whose tag was just read."""
        if tag == TAG_SPLIT:
            self.split_recipe()
        else:
            self.src.seek(4 if tag == TAG_DEFLATE else 1, os.SEEK_CUR)

    def _split(self, recipe: SplitRecipe) -> Iterator[bytes]:
        """A SPLIT segment's stream: its inner segments spooled, then compressed
        in pieces, ``workers`` at a time."""
        fd, name = tempfile.mkstemp(dir=self.scratch_dir, suffix=".split")
        payload_path = Path(name)
        try:
            with os.fdopen(fd, "w+b") as spool:
                for chunk in self.segments():
                    spool.write(chunk)
                spool.flush()
                if recipe.checkpoints[-1].uncompressed + MIN_PIECE > spool.tell():
                    raise FormatError("expanded form: a SPLIT checkpoint past its bytes")
                payload = Payload.of_file(spool.fileno(), spool.tell())
                try:
                    yield from deflate_pieces(
                        recipe.params, payload, recipe.checkpoints, self.workers
                    )
                except ValueError as exc:
                    raise FormatError(f"expanded form: {exc}") from None
        finally:
            payload_path.unlink(missing_ok=True)

    def segment(self, tag: int) -> Iterator[bytes]:
        """One RAW segment whose tag was just read."""
        if tag != TAG_RAW:
            raise FormatError(_unknown_tag(tag))
        left = self.varint()
        while left:
            chunk = self.exact(min(left, RAW_CHUNK))
            left -= len(chunk)
            yield chunk

    def compressed(self, tag: int) -> Iterator[bytes]:
        """One DEFLATE or GNU segment whose tag was just read, compressed as it goes."""
        if self.depth >= MAX_NESTING:
            raise DecodeLimit(f"expanded form: segments nest deeper than {MAX_NESTING}")
        self.depth += 1
        try:
            if tag == TAG_DEFLATE:
                yield from deflate_chunks(self.params(), self.segments())
            elif tag == TAG_SPLIT:
                yield from self._split(self.split_recipe())
            else:
                yield from self._gnu(self.exact(1)[0])
        finally:
            self.depth -= 1

    def _subtree(self, tag: int) -> Iterator[bytes]:
        """A DEFLATE or GNU segment: from REBUILT_SUBTREES when small enough, else streamed."""
        start = self.src.tell() - 1
        end = self._subtree_end(tag, PARALLEL_PAYLOAD)
        self.src.seek(start if end is not None else start + 1)
        if end is None:
            yield from self.compressed(tag)
        else:
            nests = self.nests
            yield from _rebuild_subtree(
                self.exact(end - start), self.scratch_dir, self.depth, remember=not nests
            )

    def segments_in_parallel(self, workers: int) -> Iterator[bytes]:
        """``segments``, with small subtrees rebuilt by ``workers`` threads.

        zlib releases the GIL while compressing, so a zip's members (and the
        gzip files inside them) are re-deflated side by side; output order
        and bytes are unchanged, and at most ``_IN_FLIGHT`` expanded bytes
        wait in memory.
        """
        queue: deque[Future[list[bytes]]] = deque()
        sizes: deque[int] = deque()
        in_flight = 0

        def ready(force: bool) -> Iterator[bytes]:
            nonlocal in_flight
            while queue and (force or queue[0].done() or in_flight > _IN_FLIGHT):
                in_flight -= sizes.popleft()
                yield from queue.popleft().result()

        with ThreadPoolExecutor(workers, thread_name_prefix="dgfs-deflate") as pool:
            while (tag := self.exact(1)[0]) != TAG_END:
                if tag not in _COMPRESSING:
                    yield from ready(force=True)
                    yield from self.segment(tag)
                    continue
                start = self.src.tell() - 1
                end = self._subtree_end(tag, PARALLEL_PAYLOAD)
                if end is None:  # too big to hold: stream it, in order
                    self.src.seek(start + 1)
                    yield from ready(force=True)
                    yield from self.compressed(tag)
                    continue
                self.src.seek(start)
                subtree = self.exact(end - start)
                remember = not self.nests
                queue.append(
                    pool.submit(_rebuild_subtree, subtree, self.scratch_dir, 0, remember=remember)
                )
                sizes.append(len(subtree))
                in_flight += len(subtree)
                yield from ready(force=False)
            yield from ready(force=True)

    def _subtree_end(self, tag: int, limit: int) -> int | None:
        """Where the DEFLATE or GNU segment whose tag was just read ends, or None
        if it holds more than ``limit`` RAW bytes. Reads only tags and lengths;
        ``nests`` then says whether it holds DEFLATE or GNU segments itself."""
        self.skip_header(tag)
        depth, total = 1, 0
        self.nests = False
        while depth:
            tag = self.exact(1)[0]
            if tag == TAG_END:
                depth -= 1
            elif tag == TAG_RAW:
                size = self.varint()
                total += size
                if total > limit:
                    return None
                self.src.seek(size, os.SEEK_CUR)
            elif tag in _COMPRESSING:
                self.skip_header(tag)
                depth += 1
                self.nests = True
            else:
                raise FormatError(_unknown_tag(tag))
        return self.src.tell()


#: SHA-256 of a DEFLATE or GNU subtree that holds no other -> the bytes it
#: rebuilds to. A file's zip members (and the gzip files in them) are
#: mostly the same as the previous release's; rebuilding is a pure function
#: of the subtree's bytes, so its result is reused. Subtrees holding others
#: are not kept: their own bytes seldom recur (a wheel's ``.json.gz``
#: members carry build times in their gzip headers), the streams inside
#: them do, and the budget then holds two to three botocore wheels' worth
#: of those instead of one.
REBUILT_SUBTREES = _Memo(32 << 20)


def _rebuild_subtree(
    subtree: bytes, scratch_dir: Path | None, depth: int, *, remember: bool = True
) -> list[bytes]:
    """The original bytes of one DEFLATE or GNU segment given whole (tag
    included), found inside ``depth`` others; from and into REBUILT_SUBTREES
    if ``remember``."""
    if not remember:
        return _rebuild_whole(subtree, scratch_dir, depth)
    key = hashlib.sha256(subtree).digest()
    with REBUILT_SUBTREES.computing(key) as cached:
        if isinstance(cached, list):
            return cached
        rebuilt = _rebuild_whole(subtree, scratch_dir, depth)
        REBUILT_SUBTREES.put(key, rebuilt, sum(map(len, rebuilt)) + 64)
        return rebuilt


def _rebuild_whole(subtree: bytes, scratch_dir: Path | None, depth: int) -> list[bytes]:
    reader = _Reader(io.BytesIO(subtree), scratch_dir, depth)
    rebuilt = list(reader.compressed(reader.exact(1)[0]))
    if reader.src.read(1):
        raise FormatError("expanded form: bytes after a segment's end")
    return rebuilt


def rebuild_chunks(
    src: BinaryIO, scratch_dir: Path | None = None, workers: int = 1
) -> Iterator[bytes]:
    """The original bytes of the expanded stream ``src``, in pieces.

    Raises ``FormatError`` if the stream is not a complete expanded form.
    ``scratch_dir`` holds GNU segments' payloads while zgz compresses them;
    ``workers`` > 1 re-deflates small top-level streams in that many threads.
    """
    if src.read(len(MAGIC)) != MAGIC:
        raise FormatError("not a dgfs expanded form (bad magic)")
    reader = _Reader(src, scratch_dir, workers=workers)
    if workers > 1:
        yield from reader.segments_in_parallel(workers)
    else:
        yield from reader.segments()
    if src.read(1):
        raise FormatError("expanded form: bytes after the end")


def rebuild_file(
    expanded: Path,
    out: Path,
    scratch_dir: Path | None = None,
    workers: int = 1,
    *,
    max_size: int | None = None,
    seconds: float | None = None,
) -> tuple[str, int]:
    """Write the original bytes of ``expanded`` to ``out``; returns (sha256, size).

    Raises ``DecodeLimit`` once the bytes pass ``max_size`` (the file's
    recorded size; ``out`` then holds no more than that) or the rebuild
    ``seconds`` (None: no limit).
    """
    digest = hashlib.sha256()
    size = 0
    deadline = None if seconds is None else time.monotonic() + seconds
    with open(expanded, "rb") as src, open(out, "wb") as sink:
        for chunk in rebuild_chunks(src, scratch_dir, workers):
            size += len(chunk)
            if max_size is not None and size > max_size:
                raise DecodeLimit(
                    f"expanded form rebuilds to more than {max_size} bytes (its dg-file-size)"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise DecodeLimit(f"rebuilding took over {seconds:g} s (expand_time)")
            digest.update(chunk)
            sink.write(chunk)
    return digest.hexdigest(), size


def rebuild_digest(
    expanded: Path, scratch_dir: Path | None = None, workers: int = 1
) -> tuple[str, int]:
    """SHA-256 and size of what ``expanded`` rebuilds to, without writing it."""
    digest = hashlib.sha256()
    size = 0
    with open(expanded, "rb") as src:
        for chunk in rebuild_chunks(src, scratch_dir, workers):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# --- proving a form without compressing again ----------------------------------------


class _Mismatch(Exception):
    """The form does not rebuild to the expected bytes."""


class _Expected:
    """The bytes a form must rebuild to, read in order, with read-back."""

    def __init__(self) -> None:
        self._data = b""  # read ahead from _more; the caller's next bytes start at _pos
        self._pos = 0

    def _more(self, want: int) -> bytes:
        """Up to about ``want`` further bytes; b"" at the end."""
        raise NotImplementedError

    def read(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer only at the end)."""
        end = self._pos + size
        if end <= len(self._data):
            out = self._data[self._pos : end]
            self._pos = end
            return out
        parts = [self._data[self._pos :]]
        have = len(parts[0])
        self._data, self._pos = b"", 0
        while have < size:
            more = self._more(size - have)
            if not more:
                break
            take = size - have
            if take < len(more):
                parts.append(more[:take])
                self._data, self._pos = more, take
                break
            parts.append(more)
            have += len(more)
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        """Put back ``data``, the last bytes ``read`` returned."""
        self._data, self._pos = data + self._data[self._pos :], 0


class _ExpectedFile(_Expected):
    """The original file itself: read in place, and what is put back is read again."""

    def __init__(self, src: BinaryIO) -> None:
        super().__init__()
        self._src = src

    def read(self, size: int) -> bytes:
        return self._src.read(size)

    def unread(self, data: bytes) -> None:
        self._src.seek(-len(data), os.SEEK_CUR)


class _ExpectedInflated(_Expected):
    """The inflated bytes of the raw deflate stream that starts where ``parent`` is."""

    def __init__(self, parent: _Expected) -> None:
        super().__init__()
        self._parent = parent
        self._decomp = zlib.decompressobj(-15)
        self._digest = hashlib.sha256()
        self._last = b""  # the chunk given to zlib last; its tail may follow the stream

    def _more(self, want: int) -> bytes:
        while not self._decomp.eof:
            data = self._decomp.unconsumed_tail
            if not data:
                self._digest.update(self._last)
                data = self._last = self._parent.read(_PROOF_READ)
                if not data:
                    raise _Mismatch("a deflate stream ends early")
            try:
                out = self._decomp.decompress(data, max(want, _PROOF_READ))
            except zlib.error:
                raise _Mismatch("not a deflate stream") from None
            if out:
                return out
        return b""

    def finish(self) -> bytes:
        """SHA-256 of the compressed stream, once all of its bytes were read;
        what followed it goes back to the parent."""
        if self.read(1) or not self._decomp.eof:
            raise _Mismatch("a deflate stream holds more than its segment rebuilds")
        unused = self._decomp.unused_data
        self._digest.update(self._last[: len(self._last) - len(unused)])
        self._parent.unread(unused)
        return self._digest.digest()


_PROOF_READ = 64 * 1024


def _prove_leaf(
    reader: _Reader,
    expected: _Expected,
    recipe: Recipe,
    leaves: dict[tuple[bytes, Recipe], tuple[bytes, int]],
) -> bool:
    """Check the segment whose header was just read by hashes, if it holds only
    RAW segments whose bytes ``leaves`` knows with ``recipe``: the span it
    rebuilds to must stand next in ``expected`` (raises ``_Mismatch``).
    Returns False, with ``reader`` back where it was, when it cannot say."""
    start = reader.src.tell()
    content = hashlib.sha256()
    while (tag := reader.exact(1)[0]) == TAG_RAW:
        left = reader.varint()
        while left:
            chunk = reader.exact(min(left, RAW_CHUNK))
            left -= len(chunk)
            content.update(chunk)
    span = leaves.get((content.digest(), recipe)) if tag == TAG_END else None
    if span is None:
        reader.src.seek(start)
        return False
    span_sha256, left = span
    digest = hashlib.sha256()
    while left:
        chunk = expected.read(min(left, RAW_CHUNK))
        if not chunk:
            raise _Mismatch("the file ends inside a deflate stream")
        left -= len(chunk)
        digest.update(chunk)
    if digest.digest() != span_sha256:
        raise _Mismatch("a deflate stream differs")
    return True


def _prove(
    reader: _Reader,
    expected: _Expected,
    proven: set[tuple[bytes, Recipe]],
    leaves: dict[tuple[bytes, Recipe], tuple[bytes, int]],
) -> None:
    """Check the segments up to the next END against ``expected`` (raises ``_Mismatch``)."""
    while (tag := reader.exact(1)[0]) != TAG_END:
        if tag == TAG_RAW:
            left = reader.varint()
            while left:
                chunk = reader.exact(min(left, RAW_CHUNK))
                left -= len(chunk)
                if expected.read(len(chunk)) != chunk:
                    raise _Mismatch("a RAW segment differs")
            continue
        if tag not in _COMPRESSING:
            raise FormatError(_unknown_tag(tag))
        if reader.depth >= MAX_NESTING:
            raise DecodeLimit(f"expanded form: segments nest deeper than {MAX_NESTING}")
        recipe: Recipe
        if tag == TAG_DEFLATE:
            recipe = reader.params()
        elif tag == TAG_SPLIT:
            recipe = reader.split_recipe()
        else:
            recipe = reader.exact(1)[0]
        if leaves and _prove_leaf(reader, expected, recipe, leaves):
            continue
        inflated = _ExpectedInflated(expected)
        reader.depth += 1
        _prove(reader, inflated, proven, leaves)
        reader.depth -= 1
        if (inflated.finish(), recipe) not in proven:
            raise _Mismatch(f"no search proved {recipe} for a stream")


def prove_form(
    expanded: Path,
    original: Path,
    proven: set[tuple[bytes, Recipe]],
    leaves: dict[tuple[bytes, Recipe], tuple[bytes, int]] | None = None,
) -> bool:
    """Whether ``expanded`` rebuilds to exactly the bytes of ``original``,
    without compressing anything: what ``rebuild_file`` would compare by
    SHA-256, at the cost of inflating.

    Walks the form and the original together: RAW segments must equal the
    original's bytes where they stand; a DEFLATE or GNU segment must stand
    where a deflate stream starts whose inflated bytes its inner segments
    rebuild to (checked the same way, recursively), and whose (SHA-256,
    recipe) is in ``proven`` (``ExpandStats.proven``): the expansion's search
    compressed those inflated bytes with that recipe, by the code the
    rebuild runs (``deflate_chunks``, ``gnuzip.gnu_deflate``), and compared
    every byte with the span. Deflate's output does not depend on how its
    input is split, so the rebuild gives the span back.

    With ``leaves`` (``ExpandStats.leaves``), a segment that holds only RAW
    segments is checked without inflating: the SHA-256 of its RAW bytes and
    its recipe name, in ``leaves``, the SHA-256 and length of the span the
    search compressed them into, and the original's next bytes must be that
    span (a segment ``leaves`` does not know is checked as above).
    """
    with open(expanded, "rb") as src, open(original, "rb") as orig:
        if src.read(len(MAGIC)) != MAGIC:
            return False
        expected = _ExpectedFile(orig)
        try:
            _prove(_Reader(src, None), expected, proven, leaves or {})
        except (_Mismatch, FormatError, DecodeLimit) as exc:
            log.debug("%s: expanded form not proven: %s", original, exc)
            return False
        return not src.read(1) and not expected.read(1)
