"""The expanded form's segments: tags, their encoding, and the bounded parser.

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

:class:`Reader` reads tags, lengths and headers under bounds (nesting,
checkpoints): the rebuild (:mod:`dgfs.deep.recompress`) and the proof
(:mod:`dgfs.deep.proof`) build on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from dgfs.deep.deadline import NEVER, Deadline
from dgfs.deep.deflate import Checkpoint, DeflateParams
from dgfs.errors import FormatError

MAGIC = b"DGFSX1\n\x00"
TAG_END = 0
TAG_RAW = 1
TAG_DEFLATE = 2
TAG_GNU = 3
TAG_SPLIT = 4
#: Tags of segments that compress what their inner segments rebuild to.
COMPRESSING = (TAG_DEFLATE, TAG_GNU, TAG_SPLIT)

#: Largest RAW segment written; also the read/copy buffer size.
RAW_CHUNK = 1 << 20
#: Readers refuse DEFLATE/GNU segments nested deeper than this. dgfs writes at
#: most MAX_DEPTH + 1; a hostile form nesting 1,000 deep exhausted Python's
#: recursion (the rebuild recurses once per level).
MAX_NESTING = 16
#: Readers refuse SPLIT segments with more checkpoints than this, or with
#: checkpoints closer than MIN_PIECE inflated bytes: every piece costs a
#: window and a look-ahead, so tiny pieces would let a small form cost
#: far more CPU than its bytes.
MAX_CHECKPOINTS = 1 << 16
MIN_PIECE = 1 << 16


def unknown_tag(tag: int) -> str:
    """A segment tag this dgfs does not know: corrupt, or written by a newer dgfs."""
    return (
        f"expanded form: unknown segment tag {tag} (a newer dgfs wrote it,"
        " or the object is corrupt: upgrade dgfs on this machine to read it)"
    )


def plain_form_size(size: int) -> int:
    """Bytes of the form that expands nothing of a ``size``-byte file (``plain_form``)."""
    full, tail = divmod(size, RAW_CHUNK)
    headers = full * (1 + len(varint(RAW_CHUNK))) + (1 + len(varint(tail)) if tail else 0)
    return len(MAGIC) + size + headers + 1


@dataclass(frozen=True)
class SplitRecipe:
    """zlib settings, and the checkpoints where pieces of the stream start."""

    params: DeflateParams
    checkpoints: tuple[Checkpoint, ...]


#: How a stream is re-compressed: zlib settings (whole or in pieces), or a GNU gzip level.
Recipe = DeflateParams | SplitRecipe | int


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def header(recipe: Recipe) -> bytes:
    if isinstance(recipe, DeflateParams):
        return bytes((TAG_DEFLATE,)) + recipe.pack()
    if isinstance(recipe, SplitRecipe):
        out = bytearray((TAG_SPLIT,)) + recipe.params.pack() + varint(len(recipe.checkpoints))
        for point in recipe.checkpoints:
            out += varint(point.compressed) + varint(point.uncompressed)
        return bytes(out)
    return bytes((TAG_GNU, recipe))


class Reader:
    """Tags, lengths and headers of an expanded form, read under bounds: of
    nesting, checkpoints, and time (``deadline``, checked once per segment
    or chunk)."""

    def __init__(self, src: BinaryIO, depth: int = 0, deadline: Deadline = NEVER) -> None:
        self.src = src
        self.depth = depth
        """DEFLATE/GNU segments open around the one being read (at most ``MAX_NESTING``)."""
        self.deadline = deadline
        """When reading must stop (``DecodeLimit``): the rebuild's time limit."""
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
        self.deadline.check()  # up to MAX_CHECKPOINTS: checked once, after them
        return SplitRecipe(params, tuple(points))

    def peek_checkpoints(self) -> int:
        """How many checkpoints the SPLIT segment whose tag was just read
        claims (read without moving; 0 if it cannot be read)."""
        at = self.src.tell()
        try:
            self.src.seek(4, os.SEEK_CUR)
            return self.varint()
        except FormatError:
            return 0
        finally:
            self.src.seek(at)

    def skip_header(self, tag: int) -> None:
        """Past the header of a DEFLATE, GNU or SPLIT segment whose tag was just read."""
        if tag == TAG_SPLIT:
            self.split_recipe()
        else:
            self.src.seek(4 if tag == TAG_DEFLATE else 1, os.SEEK_CUR)

    def segment(self, tag: int) -> Iterator[bytes]:
        """One RAW segment whose tag was just read."""
        if tag != TAG_RAW:
            raise FormatError(unknown_tag(tag))
        left = self.varint()
        while left:
            self.deadline.check()
            chunk = self.exact(min(left, RAW_CHUNK))
            left -= len(chunk)
            yield chunk

    def _subtree_end(self, tag: int, limit: int) -> int | None:
        """Where the DEFLATE, GNU or SPLIT segment whose tag was just read ends,
        or None once it takes more than ``limit`` bytes of the form: its RAW
        payload and its own tags, headers and lengths alike (a subtree of
        empty RAW segments is as large as its bytes). Reads only tags and
        lengths; ``nests`` then says whether it holds such segments itself."""
        start = self.src.tell() - 1
        self.skip_header(tag)
        depth = 1
        self.nests = False
        while depth:
            if self.src.tell() - start > limit:
                return None
            self.deadline.check()  # every level scans its subtree: headers alone take time
            tag = self.exact(1)[0]
            if tag == TAG_END:
                depth -= 1
            elif tag == TAG_RAW:
                length = self.varint()
                if self.src.tell() - start + length > limit:
                    return None  # (a hostile length may be past any offset a seek takes)
                self.src.seek(length, os.SEEK_CUR)
            elif tag in COMPRESSING:
                self.skip_header(tag)
                depth += 1
                self.nests = True
            else:
                raise FormatError(unknown_tag(tag))
        end = self.src.tell()
        return end if end - start <= limit else None
