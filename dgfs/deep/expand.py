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

The segments and their parser are :mod:`dgfs.deep.segments`; one stream
becoming a segment, :mod:`dgfs.deep.search`; the rebuild,
:mod:`dgfs.deep.recompress`; the proof on write, :mod:`dgfs.deep.proof`.

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

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from dgfs.deep import remember
from dgfs.deep.ahead import MIN_SIZE, BackSearch, SearchAhead, SpareCore
from dgfs.deep.archives import (
    GZIP_MAGIC,
    XFL_PRIOR,
    after_descriptor,
    gzip_body_offset,
    nested_kind,
    read_local_header,
    tar_cuts,
    zip_prior,
)
from dgfs.deep.limits import Budget, ExpansionLimits
from dgfs.deep.proof import prove_form
from dgfs.deep.recompress import REBUILT_SUBTREES, rebuild_chunks, rebuild_digest, rebuild_file
from dgfs.deep.search import (
    MAX_DEPTH,
    MAX_MISSES,
    SPLIT_MIN,
    TRUSTED_HINT,
    VERIFIED_SPANS,
    ExpandStats,
    StreamExpander,
    Writer,
    remembered,
)
from dgfs.deep.segments import (
    MAGIC,
    MAX_NESTING,
    RAW_CHUNK,
    TAG_DEFLATE,
    TAG_END,
    TAG_GNU,
    TAG_RAW,
    TAG_SPLIT,
    Recipe,
    SplitRecipe,
    plain_form_size,
)
from dgfs.errors import ExpansionLimit, FormatError

# What callers import from here, wherever it lives.
__all__ = [
    "MAGIC",
    "MAX_DEPTH",
    "MAX_NESTING",
    "RAW_CHUNK",
    "REBUILT_SUBTREES",
    "TAG_DEFLATE",
    "TAG_END",
    "TAG_GNU",
    "TAG_RAW",
    "TAG_SPLIT",
    "TRUSTED_HINT",
    "VERIFIED_SPANS",
    "ExpandStats",
    "ExpansionLimits",
    "Recipe",
    "SplitRecipe",
    "expand_file",
    "nested_kind",
    "plain_form_size",
    "plain_form",
    "prove_form",
    "rebuild_chunks",
    "rebuild_digest",
    "rebuild_file",
]

log = logging.getLogger(__name__)

#: A gzip member is looked up in VERIFIED_SPANS as if it filled the rest of
#: its range only when that range is at most this long (hashing is not free).
GZIP_GUESS_MAX = 8 << 20


class _Expander(StreamExpander):
    """The walk over gzip and zip files (nested ones too) that finds their streams."""

    def range(self, src: BinaryIO, start: int, end: int, depth: int) -> None:
        """Segments for ``src[start:end]``, expanding what it recognises."""
        src.seek(start)
        kind = nested_kind(src.read(4)) if depth <= MAX_DEPTH else None
        if kind == "gzip":
            self.gzip(src, start, end, depth)
        elif kind == "zip":
            self.zip(src, start, end, depth)
        else:
            self.copy(src, start, end, tar_cuts(src, start, end))

    # -- gzip (RFC 1952), one or more members --

    def gzip(self, src: BinaryIO, start: int, end: int, depth: int) -> None:
        pos = start
        misses = 0
        while pos < end and misses < MAX_MISSES:
            src.seek(pos)
            if src.read(3) != GZIP_MAGIC:
                break
            self.budget.member()
            body = gzip_body_offset(src, pos, end)
            if body is None:
                break
            self.copy(src, pos, body)
            src.seek(pos + 8)
            prior = XFL_PRIOR.get(src.read(1)[0])
            # A gzip file of one member: its body ends 8 bytes before the end.
            guess = end - 8 - body if end - body <= GZIP_GUESS_MAX else None
            split = None
            if end - body >= SPLIT_MIN and self.ahead:
                self.unfinished = True  # a SPLIT segment is proven by the walk that writes it
                return
            if end - body >= SPLIT_MIN and not remembered(src, body, guess):
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

    #: Lends the walk's search ahead a core (``expand_file``'s ``spare_core``).
    spare_core: SpareCore | None = None
    #: The file being expanded and its limits, for a search ahead.
    ahead_of: tuple[Path, ExpansionLimits] | None = None

    def zip(self, src: BinaryIO, start: int, end: int, depth: int) -> None:
        if depth or self.ahead_of is None or end - start < MIN_SIZE:
            self._zip(src, start, end, depth, None)
            return
        # The members searched from the back too: on a core lent for it if
        # one is free, else by the walk itself while it waits for a verdict
        # another expansion is finding (the next release, stored beside).
        path, limits = self.ahead_of
        # A search ahead takes at most half the expansion's time: the walk,
        # taking it up or waiting for it, never runs out of time for its own.
        limits = replace(limits, seconds=limits.seconds / 2)
        loan = self.spare_core() if self.spare_core is not None else None
        if loan is not None:
            budget = (limits, self.stats.original_size)
            ahead = SearchAhead(path, (start, end), _Expander, self.scratch_dir, budget, loan)
            if ahead.started:
                self.meanwhile = ahead.step
                try:
                    self._zip(src, start, end, depth, ahead.search)
                finally:
                    self.meanwhile = None
                    ahead.stop()
                self._proven_by(ahead.search)
                return
            ahead.stop()
        own = Budget(limits, self.stats.original_size)
        back = BackSearch(path, (start, end), _Expander, self.scratch_dir, own)
        self.meanwhile = back.step
        try:
            self._zip(src, start, end, depth, back)
        finally:
            self.meanwhile = None
            back.close()
        self._proven_by(back)

    def _proven_by(self, back: BackSearch) -> None:
        """What ``back``'s search proved (its spliced segments' streams among
        it), for ``prove_form``: facts about spans, true whoever found them."""
        self.stats.proven |= back.stats.proven
        self.stats.leaves.update(back.stats.leaves)

    def _zip(
        self, src: BinaryIO, start: int, end: int, depth: int, ahead: BackSearch | None
    ) -> None:
        pos = cursor = start
        misses = 0
        index = 0
        while pos + 30 <= end:
            entry = read_local_header(src, pos, end)
            if entry is None:
                break
            member, index = index, index + 1
            if ahead is not None:
                ahead.walked = member
            self.budget.member()
            data_start, method, flags, csize = entry
            if method == 8 and misses < MAX_MISSES:
                self.copy(src, cursor, data_start)
                cursor = data_start
                if csize and ahead is not None and ahead.splice(member, data_start, csize, self):
                    misses = 0
                    cursor = data_end = data_start + csize
                    after = after_descriptor(src, data_end, end, flags)
                    if after is None:
                        break
                    pos = after
                    continue
                limit = end if csize is None else min(end, data_start + csize)
                prior = zip_prior(flags)
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
            after = after_descriptor(src, data_end, end, flags)
            if after is None:
                break
            pos = after
        self.copy(src, cursor, end)


def expand_file(
    src: Path,
    out: Path,
    *,
    scratch_dir: Path,
    limits: ExpansionLimits | None = None,
    spare_core: SpareCore | None = None,
) -> ExpandStats:
    """Write the expanded form of ``src`` to ``out`` (blocking; run it in a thread).

    A zip of 1 MiB or more also has its members expanded from the last one
    backwards (:mod:`dgfs.deep.ahead`): on a core ``spare_core`` lends, if
    given and one is free, else by the walk itself while it waits for a
    verdict another expansion is finding.

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
    remember.ensure_loaded()  # what earlier processes proved, on first need
    budget = Budget(limits, stats.original_size)
    with open(src, "rb") as source, open(out, "w+b") as sink:
        writer = Writer(sink, budget)
        try:
            writer.tag(MAGIC)
            expander = _Expander(writer, scratch_dir, stats, budget)
            expander.spare_core = spare_core
            expander.ahead_of = (src, limits)
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
        writer = Writer(sink)
        # Copying spends nothing but the file's own size: no limits.
        unlimited = Budget(ExpansionLimits(max_bytes=size, seconds=float("inf")), size)
        _Expander(writer, Path(tempfile.gettempdir()), ExpandStats(), unlimited).copy(
            source, 0, size
        )
        writer.tag(bytes((TAG_END,)))
