"""Proving on write that an expanded form rebuilds to the original, without
compressing anything (``prove_form``)."""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from pathlib import Path
from typing import BinaryIO

from dgfs.deep.segments import (
    COMPRESSING,
    MAGIC,
    MAX_NESTING,
    RAW_CHUNK,
    TAG_DEFLATE,
    TAG_END,
    TAG_RAW,
    TAG_SPLIT,
    Reader,
    Recipe,
    unknown_tag,
)
from dgfs.errors import DecodeLimit, FormatError

log = logging.getLogger(__name__)


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
    reader: Reader,
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
    reader: Reader,
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
        if tag not in COMPRESSING:
            raise FormatError(unknown_tag(tag))
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
            _prove(Reader(src), expected, proven, leaves or {})
        except (_Mismatch, FormatError, DecodeLimit) as exc:
            log.debug("%s: expanded form not proven: %s", original, exc)
            return False
        return not src.read(1) and not expected.read(1)
