"""The search for each deflate stream's recipe, and the segment it becomes.

A span becomes a ``DEFLATE``, ``GNU`` or ``SPLIT`` segment only after
recompressing its inflated bytes gave back exactly the original span;
spans proven once are remembered (``VERIFIED_SPANS``). The walk over
gzip and zip files that finds the streams is :mod:`dgfs.deep.expand`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from dgfs import children
from dgfs.deep import gnuzip
from dgfs.deep.archives import TarWalk, nested_kind, tar_cuts
from dgfs.deep.deflate import (
    CANDIDATES,
    NEAR_MISS,
    BlockInflate,
    Checkpoint,
    DeflateMatch,
    DeflateParams,
    Payload,
    deflate_piece,
    inflate_blocks,
    match_deflate,
)
from dgfs.deep.limits import Budget
from dgfs.deep.memo import PEER_WAIT, Memo
from dgfs.deep.segments import (
    MAX_CHECKPOINTS,
    MIN_PIECE,
    RAW_CHUNK,
    TAG_DEFLATE,
    TAG_END,
    TAG_RAW,
    Recipe,
    SplitRecipe,
    header,
    varint,
)
from dgfs.errors import FormatError

#: Archives nested deeper than this stay as they are.
MAX_DEPTH = 4
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
#: A gzip member whose deflate body is at least this long is first tried as a
#: SPLIT segment: pieces of about SPLIT_PIECE inflated bytes, each rebuilt by
#: its own compressor, side by side (a .tar.gz is one deflate stream).
SPLIT_MIN = 1 << 20
SPLIT_PIECE = 4 << 20
#: Inflated bytes of a nested archive held in memory while it is expanded;
#: larger ones are spooled to scratch.
NESTED_IN_MEMORY = 1 << 20


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


class Writer:
    """Segments onto a seekable file; RAW data is buffered up to ``RAW_CHUNK``.
    Every byte written is counted in ``budget`` (if any) before it is written."""

    def __init__(self, out: BinaryIO, budget: Budget | None = None) -> None:
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
        self._write(bytes((TAG_RAW,)) + varint(len(piece)) + piece)

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


#: SHA-256 of a compressed span -> the recipe proven to reproduce it (or that
#: none does). Consecutive
#: releases share most of their zip members byte for byte: their spans are
#: inflated (to write the payload) but not compressed again to be checked.
#: Deflate is deterministic, so a span proven once is proven for good.
VERIFIED_SPANS = Memo(16 << 20)
#: Remembered for a span that nothing reproduces (with the zgz of this process).
_UNREPRODUCIBLE = "unreproducible"
#: Only spans at least this long are remembered (shorter ones are cheap).
MEMO_MIN_SPAN = 512
#: What one remembered span costs in memory (key, recipe, dict slot).
_SPAN_ENTRY_BYTES = 256


@dataclass(frozen=True)
class StreamAt:
    """Where a deflate stream starts: ``src[start:]``, ending by ``limit``,
    in an archive nested ``depth`` deep."""

    src: BinaryIO
    start: int
    limit: int
    depth: int


class StreamExpander:
    """Segments for the deflate streams of one expansion; ``range`` (the walk
    over archives, :class:`dgfs.deep.expand._Expander`) expands what a stream
    inflates to."""

    def __init__(
        self, writer: Writer, scratch_dir: Path, stats: ExpandStats, budget: Budget
    ) -> None:
        self.w = writer
        self.scratch_dir = scratch_dir
        self.stats = stats
        self.budget = budget
        # Per kind of stream ("zip" members, "gzip" members) and nesting depth.
        self.hints: dict[tuple[str, int], _Hint] = {}
        # Searching ahead of a walk (dgfs.deep.ahead): tells the memo only
        # zlib settings it proved, tries no GNU gzip (see _stream), and
        # leaves large nested gzip streams to the walk (a SPLIT segment is
        # proven by writing it), saying so in ``unfinished``.
        self.ahead = False
        self.unfinished = False
        # What the walk does while it waits for a verdict another expansion
        # is finding: search its own zip from the back (dgfs.deep.ahead).
        self.meanwhile: Callable[[], bool] | None = None

    def learned(self, kind: str, depth: int, params: DeflateParams, length: int) -> None:
        """``params`` reproduced a ``length``-byte stream of ``kind`` at ``depth``
        (found elsewhere: a segment taken from a search ahead): the next
        stream of the kind tries them first, as after a search here."""
        self.hints.setdefault((kind, depth), _Hint()).record(params, length)

    # -- plumbing --

    def copy(self, src: BinaryIO, start: int, end: int, cuts: Iterable[int] = ()) -> None:
        """``src[start:end]`` as RAW segments, one ending at each of ``cuts``
        (increasing offsets inside the range) and at most every ``RAW_CHUNK``."""
        src.seek(start)
        pos = start
        for stop in (*cuts, end):
            if pos > start:
                self.w.flush_raw()
            while pos < stop:
                chunk = src.read(min(RAW_CHUNK, stop - pos))
                if not chunk:
                    raise FormatError("source ended early")
                self.w.raw(chunk)
                pos += len(chunk)

    def range(self, src: BinaryIO, start: int, end: int, depth: int) -> None:
        """Segments for ``src[start:end]``, expanding what it recognises."""
        raise NotImplementedError

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
        at = StreamAt(src, start, limit, depth)
        if length is None or length < MEMO_MIN_SPAN or start + length > limit:
            return self._stream(at, kind, prior, length, None, None)
        span_digest = _span_digest(src, start, length)
        # Another expansion (the next release, uploaded beside this one) may
        # be searching these very bytes: its verdict is worth waiting for.
        wait = min(PEER_WAIT, self.budget.time_left())
        with VERIFIED_SPANS.computing(span_digest, wait, self.meanwhile) as known:
            self.budget.check_time()
            return self._stream(at, kind, prior, length, span_digest, known)

    def _stream(
        self,
        at: StreamAt,
        kind: str,
        prior: DeflateParams | None,
        length: int | None,
        span_digest: bytes | None,
        known: object,
    ) -> tuple[DeflateMatch, bool]:
        """``deflate`` once the memo was asked: ``known`` is its verdict on the
        ``length`` bytes ``at`` (``span_digest``); None: search, and
        tell the memo."""
        if isinstance(known, int) and gnuzip.zgz_path() is None:
            known = None  # proven with zgz, which is gone: could not be rebuilt here
        if length is not None and known == _UNREPRODUCIBLE:
            return DeflateMatch(length, 0, None), False
        if length is not None and isinstance(known, DeflateParams | int):
            found, recipe = self._segment(at, (), known, length)
            if recipe is not None:
                self.stats.streams_remembered += 1
                if isinstance(recipe, DeflateParams):
                    hint = self.hints.setdefault((kind, at.depth), _Hint())
                    hint.record(recipe, found.compressed_length)
                else:
                    self.stats.streams_gnu += 1
                return found, True
        found, recipe = self._search(at, kind, prior)
        # A search ahead tells the memo only settings it proved: its hints
        # are not the walk's (filled from the other end), so a miss may be
        # where its hint led it, not the stream (dgfs.deep.ahead).
        tells = not self.ahead or isinstance(recipe, DeflateParams)
        if found.compressed_length >= MEMO_MIN_SPAN and tells:
            if span_digest is None or length != found.compressed_length:
                span_digest = _span_digest(at.src, at.start, found.compressed_length)
            verdict = _UNREPRODUCIBLE if recipe is None else recipe
            VERIFIED_SPANS.put(span_digest, verdict, _SPAN_ENTRY_BYTES)
        return found, recipe is not None

    def _search(
        self, at: StreamAt, kind: str, prior: DeflateParams | None
    ) -> tuple[DeflateMatch, Recipe | None]:
        """Find the recipe of the stream ``at`` and write its segment."""
        hint = self.hints.setdefault((kind, at.depth), _Hint())
        first = hint.params or prior
        if first is None:
            found, recipe = self._segment(at, CANDIDATES)
        else:
            # One likely candidate alone first: on very compressible data a
            # wrong candidate emits its first block late, so running all of
            # them side by side would cost many full compressions.
            found, recipe = self._segment(at, (first,))
            retry = recipe is None and found.compressed_length and not found.near_miss
            if retry and (hint.params is None or hint.successes < TRUSTED_HINT):
                others = tuple(c for c in CANDIDATES if c != first)
                found, recipe = self._segment(at, others)
        if found.params is not None:
            hint.record(found.params, found.compressed_length)
            return found, found.params
        gnu_worth_it = (
            not self.ahead  # a GNU level found ahead is not told (see _stream)
            and found.uncompressed_length >= GNU_MIN_SIZE
            and gnuzip.zgz_path() is not None
            and (hint.gnu_level is not None or hint.gnu_failures < MAX_MISSES)
        )
        level = self._gnu_level(at.src, at.start, found, hint) if gnu_worth_it else None
        if level is None:
            return found, None
        found, recipe = self._segment(at, (), level, found.compressed_length)
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
        at: StreamAt,
        candidates: tuple[DeflateParams, ...],
        known: Recipe | None = None,
        known_length: int = 0,
    ) -> tuple[DeflateMatch, Recipe | None]:
        """Write the segment of the stream ``at`` if one of ``candidates``
        reproduces it, or (with ``known``) if it is ``known_length`` long and
        inflates: a recipe proven for these very bytes before."""
        seg_pos = self.w.tell()
        self.w.tag(header(known) if known is not None else bytes((TAG_DEFLATE,)) + b"\0" * 4)
        body_pos = self.w.tell()
        sink = _SegmentSink(self, at.depth)
        try:
            found = match_deflate(
                at.src,
                at.start,
                at.limit,
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
            self._end_segment(at, found, recipe, sink, body_pos)
            return found, recipe
        finally:
            sink.close()

    def _end_segment(
        self, at: StreamAt, found: DeflateMatch, recipe: Recipe, sink: _SegmentSink, body_pos: int
    ) -> None:
        """Record what the segment of the stream ``at`` proved, expand the
        archive it holds (if ``sink`` spooled one), and end it."""
        span = (_span_digest(at.src, at.start, found.compressed_length), found.compressed_length)
        self.stats.proven.add((span[0], recipe))
        if sink.spool is None:
            self.stats.leaves[(sink.content.digest(), recipe)] = span
        else:
            sink.spool.flush()
            self.w.rewind(body_pos)
            self.range(sink.spool, 0, found.uncompressed_length, at.depth + 1)
        self.w.tag(bytes((TAG_END,)))
        self.stats.streams_inflated += 1
        self.stats.inflated_bytes += found.uncompressed_length
        if isinstance(recipe, DeflateParams):
            seen = self.stats.params_seen
            seen[recipe] = seen.get(recipe, 0) + 1

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
                self.w.tag(header(recipe))
                size = found.uncompressed_length
                self.copy(spool, 0, size, tar_cuts(spool, 0, size))
                self.w.tag(bytes((TAG_END,)))
        finally:
            spool_path.unlink(missing_ok=True)
            self.budget.release(spooled)
        hint.record(params, found.compressed_length)
        self._record_split(src, start, found, recipe, content.digest())
        return DeflateMatch(found.compressed_length, found.uncompressed_length, params), True

    def _record_split(
        self, src: BinaryIO, start: int, found: BlockInflate, recipe: SplitRecipe, content: bytes
    ) -> None:
        """Record the SPLIT segment of the stream at ``start`` in the stats: what
        it proved (``content``: SHA-256 of its inflated bytes), and its counts."""
        span = (_span_digest(src, start, found.compressed_length), found.compressed_length)
        self.stats.proven.add((span[0], recipe))
        self.stats.leaves[(content, recipe)] = span
        self.stats.streams_inflated += 1
        self.stats.streams_split += 1
        self.stats.inflated_bytes += found.uncompressed_length
        self.stats.params_seen[recipe.params] = self.stats.params_seen.get(recipe.params, 0) + 1


class _SegmentSink:
    """Where ``StreamExpander._segment`` puts a stream's inflated bytes: RAW
    segments (hashed: the segment may be a leaf; a tar's end around its
    members' data), or a spool when they start an archive, which is
    expanded once the stream has ended."""

    def __init__(self, expander: StreamExpander, depth: int) -> None:
        self._expander = expander
        self._depth = depth
        self._first = True
        self.spool: BinaryIO | None = None
        self.spooled = 0
        self._tar = TarWalk()  # a tar's RAW segments end around its members' data
        self.content = hashlib.sha256()  # of what goes into the segment as RAW (a leaf)

    def __call__(self, piece: bytes) -> None:
        if self._first:
            self._first = False
            if self._depth < MAX_DEPTH and nested_kind(piece) is not None:
                # Most nested archives are small (a wheel's .json.gz): in memory
                # up to NESTED_IN_MEMORY, then in scratch.
                spooled_file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed in close)
                    NESTED_IN_MEMORY,
                    "w+b",
                    dir=str(self._expander.scratch_dir),
                    suffix=".nested",
                )
                self.spool = cast(BinaryIO, spooled_file)
        if self.spool is not None:
            self._expander.budget.hold(len(piece))
            self.spooled += len(piece)
            self.spool.write(piece)
            return
        self.content.update(piece)
        done = 0
        for cut in self._tar.feed(piece):
            self._expander.w.raw(piece[done:cut])
            self._expander.w.flush_raw()
            done = cut
        self._expander.w.raw(piece[done:])

    def close(self) -> None:
        """Drop the spool (if any) and what it held from the budget."""
        if self.spool is not None:
            self.spool.close()
        self._expander.budget.release(self.spooled)


def remembered(src: BinaryIO, start: int, length: int | None) -> bool:
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
