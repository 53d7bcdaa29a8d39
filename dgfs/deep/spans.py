"""Spans of an expanded form that its reference already holds, cut out before xdelta3.

A later release of a wheel holds mostly the members of the reference's, and
their segments are byte for byte in the reference's expanded form. xdelta3
finds them too, but pays for it over the whole of both forms: for a botocore
wheel it indexes 95 MB of reference and scans 95 MB of target to find the
8 MB that changed. So a version-2 deep delta lists those spans first (where
in the file's form, where in the reference's, how long), and xdelta3 runs
over what is left on each side: the form without the spans (the *cut*)
against the reference without the bytes the spans came from (the *source*).
docs/FORMAT.md is the normative description; ``benchmarks/deep_floor.py``
measures what it saves.

Spans are found by segment: every RAW, DEFLATE, GNU or SPLIT segment of at
least ``MIN_SPAN`` bytes of the reference is indexed by its SHA-256, and the
file's segments are looked up outermost first (equal SHA-256, equal bytes:
reads check the rebuilt file's SHA-256 all the same).

Reading, a span table comes from the bucket: :func:`unpack` refuses more
than ``MAX_SPANS`` spans, spans outside the reference or the output's cap,
and :func:`spliced` refuses to read a form past the cap.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import hashlib
import io
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from dgfs.deep.memo import Memo
from dgfs.deep.segments import (
    COMPRESSING,
    MAGIC,
    MAX_CHECKPOINTS,
    MAX_NESTING,
    TAG_END,
    TAG_RAW,
    TAG_SPLIT,
    Reader,
    unknown_tag,
    varint,
)
from dgfs.errors import DecodeLimit, FormatError

#: Segments shorter than this are left to xdelta3: each span costs about
#: 3 bytes of (compressed) table, and xdelta3 encodes a short copy as
#: cheaply. Deltas of 5 later releases, bodies in bytes (xdelta3 -6 of the
#: cut; version 1: -9 of the whole forms): botocore wheels 410,803 / 414,191
#: / 413,662 at 512 / 1,024 / 2,048 (version 1: 410,102), Django sdists
#: 1,114,400 / 915,561 / 970,060 (956,365), pip wheels 220,170 / 220,316 /
#: 219,230 (215,043).
MIN_SPAN = 1024
#: Readers refuse a table of more spans (each costs a Python object while
#: the delta is applied), and writers write no more; a 95 MB botocore wheel
#: needs about 1,300.
MAX_SPANS = 1 << 18
#: Segments of a file's form looked at when finding spans, at most (each
#: costs about 120 bytes while they are sorted; past that, what is left
#: goes to xdelta3).
MAX_SEGMENTS = 2 * MAX_SPANS
#: A reference comes from the bucket. Indexing one walks at most
#: _PARSED_PER_BYTE steps (_Steps) per byte of it and MAX_PARSED in all (a
#: form of tiny segments cost 6 s of CPU per 8 MiB), keeps at most
#: _INDEXED_PER_BYTE entries per byte and MAX_INDEX in all, of about
#: _INDEX_ENTRY bytes each, and hashes every byte at most _HASHED_PER_BYTE
#: times on average (a reference nesting 16 levels of 1 KiB segments would
#: cost 3 times its size in memory and 16 hashes of every byte); past a
#: limit, the rest of it is not indexed. A botocore wheel's form: 8,000
#: segments, 0.02 entries per KiB, every byte hashed about twice; a zip of
#: 1 KiB .json.gz files: 2.6 entries per KiB; a tar.gz of 1 KiB files:
#: 1.3 segments per KiB (so a form of over 1.6 GB of them is indexed in part).
_PARSED_PER_BYTE = 1 / 16
MAX_PARSED = 1 << 21
_INDEXED_PER_BYTE = 4 / MIN_SPAN
MAX_INDEX = 1 << 18  # at _INDEX_ENTRY bytes, 58 MB: within _INDEXES' budget
_HASHED_PER_BYTE = 4
_INDEX_ENTRY = 220
#: The most a span table takes, packed or inflated (MAX_SPANS spans of 3
#: varints of up to 10 bytes each; the count's varint is far within it).
MAX_TABLE = MAX_SPANS * 30
_BUFFER = 1 << 20

#: The segment index of recently used references, by their SHA-256: every
#: store into a directory needs its reference's, and building one reads it whole.
_INDEXES = Memo(64 << 20)


class Span(NamedTuple):
    """``size`` bytes at ``at`` in the file's expanded form are those at ``ref``
    in the reference's."""

    at: int
    ref: int
    size: int


class InReference:
    """Where the bytes of an expanded form lie in its reference's (of SHA-256
    ``sha256``): the spans' ranges (``spans``), or the whole form (None: the
    form is the reference, as for its directory's first file). A rebuild
    names a subtree by where it lies in the reference, and finds what it
    rebuilt to there without hashing it (``recompress.FROM_REFERENCE``)."""

    def __init__(self, sha256: str, spans: list[Span] | None = None) -> None:
        self._sha256 = bytes.fromhex(sha256)
        self._spans = spans
        self._starts = [span.at for span in spans or ()]
        self._base = 0  # where the bytes read lie in the form (``inside``)

    def inside(self, start: int) -> InReference:
        """The same, for a reader of the form's bytes from ``start`` on (a
        subtree read out of the form, where its own offsets start at 0)."""
        shifted = copy.copy(self)
        shifted._base = self._base + start
        return shifted

    def key(self, start: int, end: int) -> bytes | None:
        """A name for the read bytes ``[start, end)`` if they are all the
        reference's, found where they lie (else None)."""
        start, end = start + self._base, end + self._base
        at = start
        if self._spans is not None:
            i = bisect.bisect_right(self._starts, start) - 1
            if i < 0 or end > self._spans[i].at + self._spans[i].size:
                return None
            at = self._spans[i].ref + start - self._spans[i].at
        return self._sha256 + at.to_bytes(8, "little") + (end - start).to_bytes(8, "little")


class _Segment(NamedTuple):
    start: int
    end: int


class _Steps:
    """Parsing work counted while walking a form: a step per tag read (a
    compressing segment takes two, with its END) and per checkpoint a SPLIT
    header claims (up to 65,536, counted before they are read)."""

    def __init__(self, most: float = math.inf) -> None:
        self.most = most
        self.taken = 0

    def take(self, count: int) -> None:
        self.taken += count
        if self.taken > self.most:
            raise _TooCostly


class _TooCostly(Exception):
    """The walk took its ``_Steps``."""


def _segments(form: BinaryIO, steps: _Steps | None = None) -> Iterator[_Segment]:
    """Every segment of the expanded form ``form`` (each compressing one
    once its END is read), nesting at most ``MAX_NESTING`` deep;
    ``FormatError`` if it is no complete expanded form, ``_TooCostly`` once
    the walk takes more than ``steps`` allow."""
    steps = steps or _Steps()
    size = os.fstat(form.fileno()).st_size
    if form.read(len(MAGIC)) != MAGIC:
        raise FormatError("not a dgfs expanded form (bad magic)")
    reader = Reader(form)
    opened: list[int] = []
    while True:
        steps.take(1)
        start = form.tell()
        tag = reader.exact(1)[0]
        if tag == TAG_END:
            if not opened:
                break
            yield _Segment(opened.pop(), form.tell())
        elif tag == TAG_RAW:
            length = reader.varint()
            if length > size - form.tell():  # (no seek takes a hostile 2^69)
                raise FormatError("expanded form ends early")
            form.seek(length, os.SEEK_CUR)
            yield _Segment(start, form.tell())
        elif tag in COMPRESSING:
            if len(opened) >= MAX_NESTING:
                raise FormatError(f"expanded form: segments nest deeper than {MAX_NESTING}")
            if tag == TAG_SPLIT:
                steps.take(min(reader.peek_checkpoints(), MAX_CHECKPOINTS))
            reader.skip_header(tag)
            opened.append(start)
        else:
            raise FormatError(unknown_tag(tag))
    if form.read(1):
        raise FormatError("expanded form: bytes after the end")


def _sizeable(form: BinaryIO) -> list[_Segment]:
    """The segments of ``form`` (the file's, made by this dgfs) of ``MIN_SPAN``
    bytes or more, outermost first (an outer segment starts before those it
    holds): the first ``MAX_SEGMENTS`` of them."""
    found: list[_Segment] = []
    for segment in _segments(form):
        if segment.end - segment.start >= MIN_SPAN:
            found.append(segment)
            if len(found) == MAX_SEGMENTS:
                break
    return sorted(found)


def _digest(fd: int, start: int, end: int) -> bytes:
    """SHA-256 of bytes ``start`` to ``end`` of the file open as ``fd``."""
    digest = hashlib.sha256()
    while start < end:
        chunk = os.pread(fd, min(end - start, _BUFFER), start)
        if not chunk:
            raise FormatError("expanded form ends early")
        digest.update(chunk)
        start += len(chunk)
    return digest.digest()


def _index(reference: Path) -> dict[bytes, tuple[int, int]]:
    """Where each segment of ``reference`` of ``MIN_SPAN`` bytes or more lies, by
    its SHA-256 (the first of equal ones). A reference that is no expanded form
    (it comes from the bucket) has none; one that takes more parsing, entries
    or hashing than its size allows (the limits above) is indexed as far as
    they go."""
    found: dict[bytes, tuple[int, int]] = {}
    with open(reference, "rb") as form:
        size = os.fstat(form.fileno()).st_size
        steps = _Steps(min(MAX_PARSED, int(size * _PARSED_PER_BYTE) + 1024))
        most_indexed = min(MAX_INDEX, int(size * _INDEXED_PER_BYTE) + 1024)
        hashing = size * _HASHED_PER_BYTE
        try:
            for start, end in _segments(form, steps):
                if end - start < MIN_SPAN or len(found) >= most_indexed or end - start > hashing:
                    continue
                hashing -= end - start
                found.setdefault(_digest(form.fileno(), start, end), (start, end))
        except FormatError:
            return {}
        except _TooCostly:
            pass  # what was walked is indexed; the rest goes to xdelta3
    return found


def _reference_index(reference: Path, sha256: str) -> dict[bytes, tuple[int, int]]:
    key = bytes.fromhex(sha256)
    with _INDEXES.computing(key) as known:
        if isinstance(known, dict):
            return known
        index = _index(reference)
        _INDEXES.put(key, index, _INDEX_ENTRY * len(index) + 64)
        return index


def find(reference: Path, reference_sha256: str, form: Path) -> list[Span]:
    """The spans of ``form`` (the file's expanded form, made by this dgfs) that
    ``reference`` (its reference's expanded form, whose SHA-256 is
    ``reference_sha256``) holds, in order, outermost segments first; at most
    ``MAX_SPANS``, as readers take no more."""
    index = _reference_index(reference, reference_sha256)
    if not index:
        return []
    spans: list[Span] = []
    covered = 0
    with open(form, "rb") as src:
        for start, end in _sizeable(src):
            if start < covered:
                continue
            hit = index.get(_digest(src.fileno(), start, end))
            if hit is not None and hit[1] - hit[0] == end - start:
                spans.append(Span(start, hit[0], end - start))
                covered = end
                if len(spans) == MAX_SPANS:
                    break
    return spans


def _copy(src: int, start: int, dst: int, size: int) -> None:
    """``size`` bytes of the file open as ``src`` from ``start`` on, written at
    ``dst``'s position: in the kernel where it can (a form is copied in up to
    thousands of spans, as large as 95 MB in all); ``FormatError`` if ``src``
    ends before."""
    while size:
        try:
            done = os.copy_file_range(src, dst, size, start)
        except OSError:  # not between these files (an old kernel, another filesystem)
            chunk = os.pread(src, min(size, _BUFFER), start)
            done = len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view) :]
        if not done:
            raise FormatError("deep delta: a span or the cut form ends early")
        start += done
        size -= done


def _gaps(spans: list[Span], size: int, key: str) -> Iterator[tuple[int, int]]:
    """The (offset, length) ranges of a ``size``-byte file outside ``spans``'s
    ranges (``key``: ``"at"`` in the file's form, ``"ref"`` in the reference's)."""
    ranges = sorted((getattr(span, key), getattr(span, key) + span.size) for span in spans)
    pos = 0
    for start, end in ranges:
        if start > pos:
            yield pos, start - pos
        pos = max(pos, end)
    if size > pos:
        yield pos, size - pos


def write_cut(form: Path, spans: list[Span], out: Path) -> None:
    """``form`` without its spans: what xdelta3 encodes."""
    with open(form, "rb") as src, open(out, "wb") as dst:
        for start, length in _gaps(spans, os.fstat(src.fileno()).st_size, "at"):
            _copy(src.fileno(), start, dst.fileno(), length)


def write_source(reference: Path, spans: list[Span], out: Path) -> None:
    """``reference`` without the bytes ``spans`` came from: what the cut is
    encoded against (the rest holds what the changed segments resemble)."""
    with open(reference, "rb") as src, open(out, "wb") as dst:
        for start, length in _gaps(spans, os.fstat(src.fileno()).st_size, "ref"):
            _copy(src.fileno(), start, dst.fileno(), length)


class SplicedForm(io.RawIOBase):
    """A deep delta's expanded form, read where its bytes lie: the cut form's,
    with every span's read from the reference in place. Nothing is written:
    a botocore wheel's 95 MB form was copied out, span by span, before every
    rebuild (0.1 to 0.2 s each, and 95 MB of scratch), only to be read once.
    Reads past a file's end raise ``FormatError``."""

    def __init__(self, cut: BinaryIO, reference: BinaryIO, spans: list[Span], cap: int) -> None:
        super().__init__()
        cut_size = os.fstat(cut.fileno()).st_size
        if cut_size + sum(span.size for span in spans) > cap:
            raise DecodeLimit(f"deep delta: the expanded form would pass its cap of {cap} bytes")
        # Where each piece starts in the form, and (file descriptor, offset) it comes from.
        self._starts: list[int] = []
        self._sources: list[tuple[int, int]] = []
        taken = pos = 0  # bytes of the cut placed; where the form is
        for span in spans:
            if span.at > pos:
                self._piece(pos, cut.fileno(), taken)
                taken += span.at - pos
            self._piece(span.at, reference.fileno(), span.ref)
            pos = span.at + span.size
        if cut_size > taken:
            self._piece(pos, cut.fileno(), taken)
        self._size = pos + max(0, cut_size - taken)
        self._pos = 0

    def _piece(self, at: int, fd: int, offset: int) -> None:
        self._starts.append(at)
        self._sources.append((fd, offset))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._pos >= self._size or not len(buffer):
            return 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        end = self._starts[i + 1] if i + 1 < len(self._starts) else self._size
        fd, offset = self._sources[i]
        view = memoryview(buffer).cast("B")[: end - self._pos]
        done = os.preadv(fd, [view], offset + self._pos - self._starts[i])
        if not done:
            raise FormatError("deep delta: a span or the cut form ends early")
        self._pos += done
        return done


@contextlib.contextmanager
def spliced(cut: Path, reference: Path, spans: list[Span], cap: int) -> Iterator[BinaryIO]:
    """The file's expanded form (``SplicedForm``), buffered for small reads;
    ``DecodeLimit`` if it would pass ``cap`` bytes."""
    with (
        open(cut, "rb") as cut_file,
        open(reference, "rb") as ref_file,
        io.BufferedReader(SplicedForm(cut_file, ref_file, spans, cap)) as form,
    ):
        yield form


def _zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def pack(spans: list[Span]) -> bytes:
    """The span table: its count, then for each span the gap since the
    previous one in the file's form, where it lies in the reference relative
    to the previous one's end (zigzag: members mostly keep their order), and
    its size; zlib-compressed (the gaps are mostly zip headers of one size),
    after its compressed length."""
    table = bytearray(varint(len(spans)))
    at = ref = 0
    for span in spans:
        table += varint(span.at - at) + varint(_zigzag(span.ref - ref)) + varint(span.size)
        at, ref = span.at + span.size, span.ref + span.size
    packed = zlib.compress(bytes(table), 9)
    return varint(len(packed)) + packed


def _table(src: BinaryIO) -> io.BytesIO:
    """The span table read and inflated, no larger than ``MAX_TABLE`` either way."""
    reader = Reader(src)
    size = reader.varint()
    if size > MAX_TABLE:
        raise DecodeLimit(f"deep delta: a span table of {size} bytes (at most {MAX_TABLE})")
    inflater = zlib.decompressobj()
    try:
        table = inflater.decompress(reader.exact(size), MAX_TABLE)
    except zlib.error:
        raise FormatError("deep delta: a corrupt span table") from None
    if inflater.unconsumed_tail:
        raise DecodeLimit(f"deep delta: a span table inflating past {MAX_TABLE} bytes")
    if not inflater.eof:
        raise FormatError("deep delta: a span table that ends early")
    if inflater.unused_data:
        raise FormatError("deep delta: bytes after the span table's zlib stream")
    return io.BytesIO(table)


def unpack(src: BinaryIO, reference_size: int, cap: int) -> list[Span]:
    """A span table read from ``src`` (from the bucket), checked: at most
    ``MAX_SPANS`` spans, each non-empty, in order in a form of at most ``cap``
    bytes and inside a reference of ``reference_size`` bytes."""
    table = _table(src)
    reader = Reader(table)
    count = reader.varint()
    if count > MAX_SPANS:
        raise DecodeLimit(f"deep delta: {count} spans (at most {MAX_SPANS})")
    spans = []
    at = ref = 0
    for _ in range(count):
        gap, moved, size = reader.varint(), reader.varint(), reader.varint()
        start = at + gap
        ref += (moved >> 1) ^ -(moved & 1)
        if size == 0 or ref < 0 or ref + size > reference_size:
            raise FormatError("deep delta: a span lies outside the reference")
        if start + size > cap:
            raise DecodeLimit(f"deep delta: spans pass the expanded form's cap of {cap} bytes")
        spans.append(Span(start, ref, size))
        at, ref = start + size, ref + size
    if table.read(1):
        raise FormatError("deep delta: bytes after the span table")
    return spans
