"""gzip and zip headers, read as far as the expansion needs: where deflate data starts."""

from __future__ import annotations

import struct
from typing import BinaryIO

from dgfs import tarblock
from dgfs.deep.deflate import DeflateParams

GZIP_MAGIC = b"\x1f\x8b\x08"
_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_END = b"PK\x05\x06"
_U32_MAX = 0xFFFFFFFF
# What a writer's header says of its level: gzip's XFL byte (2: slowest,
# 4: fastest), a zip entry's flag bits 1-2 (normal, maximum, fast, superfast).
XFL_PRIOR = {0: DeflateParams(6), 2: DeflateParams(9), 4: DeflateParams(1)}
_ZIP_FLAG_PRIOR = (DeflateParams(6), DeflateParams(9), DeflateParams(1), DeflateParams(1))


def zip_prior(flags: int) -> DeflateParams:
    """The settings a zip entry's general-purpose ``flags`` suggest."""
    return _ZIP_FLAG_PRIOR[(flags >> 1) & 3]


def nested_kind(head: bytes) -> str | None:
    """``"gzip"`` or ``"zip"`` if ``head`` starts a format we expand, else None."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZIP_LOCAL):
        return "zip"
    return None


def gzip_body_offset(src: BinaryIO, pos: int, end: int) -> int | None:
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


def read_local_header(src: BinaryIO, pos: int, end: int) -> tuple[int, int, int, int | None] | None:
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


def after_descriptor(src: BinaryIO, data_end: int, end: int, flags: int) -> int | None:
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


#: Tar header types whose size field counts data blocks after the header:
#: regular and contiguous files, pax and GNU extended headers (their records).
_TAR_SIZED = b"0\x007xgLK"
#: Types with no data blocks: links, devices, directories, FIFOs.
_TAR_EMPTY = b"123456"


class TarWalk:
    """Where the data blocks of the members of a tar of ``min_size`` bytes or
    more start and end (``cuts``: offsets from the tar's start, in order).

    The expansion ends RAW segments there, so such a member's data is a
    segment of its own whatever moved around it (``dgfs.deep.spans`` takes
    segments from 1 KiB); headers and small members stay together, as a
    rebuild pays for every segment. Where exactly the cuts fall matters to
    the size of deltas only, never to the bytes, so the walk ends at the
    first block that is no header it knows (``next_header`` None), at once
    for what is no tar. Fed whole headers (``header``) by a reader that
    seeks, or a stream's bytes in order (``feed``).
    """

    def __init__(self, min_size: int = 1024) -> None:
        self.min_size = min_size
        self.next_header: int | None = 0
        self.cuts: list[int] = []
        self._block = bytearray()  # the next header's bytes fed so far
        self._fed = 0  # stream bytes fed so far
        self._told = 0  # cuts ``feed`` has returned

    def header(self, block: bytes) -> None:
        """The ``tarblock.BLOCK`` bytes at ``next_header``: the member's cuts, and
        where the next header is."""
        assert self.next_header is not None
        kind = block[156:157]
        if not tarblock.checksum_ok(block):
            size = None
        elif kind in _TAR_SIZED:
            size = tarblock.number(block[124:136])
        else:
            size = 0 if kind in _TAR_EMPTY else None
        if size is None or size < 0:
            self.next_header = None
            return
        data = self.next_header + tarblock.BLOCK
        self.next_header = data + tarblock.padded(size)
        if size >= self.min_size:
            self.cuts += [data, self.next_header]

    def feed(self, piece: bytes) -> list[int]:
        """The next ``piece`` of the tar: the cuts that fall inside it or at its
        end, as offsets into it."""
        start = self._fed
        self._fed += len(piece)
        while self.next_header is not None and self.next_header + len(self._block) < self._fed:
            at = self.next_header + len(self._block) - start
            self._block += piece[at : at + tarblock.BLOCK - len(self._block)]
            if len(self._block) < tarblock.BLOCK:
                break
            self.header(bytes(self._block))
            self._block.clear()
        told = self._told
        while self._told < len(self.cuts) and self.cuts[self._told] <= self._fed:
            self._told += 1
        return [cut - start for cut in self.cuts[told : self._told]]


def tar_cuts(src: BinaryIO, start: int, end: int) -> list[int]:
    """``TarWalk``'s cuts of the tar at ``src[start:end]`` (offsets into ``src``),
    reading its headers only; [] if it is no tar."""
    walk = TarWalk()
    while walk.next_header is not None and start + walk.next_header + tarblock.BLOCK <= end:
        src.seek(start + walk.next_header)
        walk.header(src.read(tarblock.BLOCK))
    return [start + cut for cut in walk.cuts if start + cut <= end]
