"""The bytes around a gzip member's deflate body: its header, read and written, and its trailer.

Writers differ in the header (FLG, MTIME, XFL, OS, the name), which is
what the search guesses; the trailer (CRC-32 and size) follows from the
content alone.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from dgfs.dgzip.limits import CHUNK, Budget

GZIP_MAGIC = b"\x1f\x8b\x08"
FLAG_FHCRC = 0x02
FLAG_FEXTRA = 0x04
FLAG_FNAME = 0x08
FLAG_FCOMMENT = 0x10
#: OS byte Python's gzip module writes ("unknown").
OS_UNKNOWN = 255
#: OS byte GNU gzip and zlib write on Unix.
OS_UNIX = 3
#: Bytes of a header without a name (or any other optional field).
HEADER_SIZE = 10
TRAILER_SIZE = 8


@dataclass(frozen=True)
class GzipHeader:
    """The fields of a gzip member header that writers differ in."""

    flags: int
    mtime: int
    xfl: int
    os: int
    name: bytes | None
    raw: bytes
    """The whole header, up to the deflate data."""


def read_gzip_header(path: Path) -> GzipHeader | None:
    """The header of the gzip file ``path``, or None if it does not start with one."""
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    if len(head) < HEADER_SIZE or not head.startswith(GZIP_MAGIC):
        return None
    flags, mtime, xfl, os_byte = struct.unpack("<BIBB", head[3:10])
    if flags & 0xE0:
        return None
    pos = HEADER_SIZE
    if flags & FLAG_FEXTRA:
        if pos + 2 > len(head):
            return None
        pos += 2 + struct.unpack("<H", head[pos : pos + 2])[0]
    name = None
    for flag in (FLAG_FNAME, FLAG_FCOMMENT):
        if flags & flag:
            end = head.find(b"\0", pos)
            if end < 0:
                return None
            if flag == FLAG_FNAME:
                name = head[pos:end]
            pos = end + 1
    if flags & FLAG_FHCRC:
        pos += 2
    if pos > len(head):
        return None
    return GzipHeader(flags, mtime, xfl, os_byte, name, head[:pos])


def gzip_header(*, mtime: int, xfl: int, os_byte: int, name: bytes | None) -> bytes:
    """A gzip member header with FNAME set exactly when ``name`` is given."""
    flags = FLAG_FNAME if name is not None else 0
    head = GZIP_MAGIC + struct.pack("<BIBB", flags, mtime, xfl, os_byte)
    return head + name + b"\0" if name is not None else head


def gzip_trailer(plain: Path, budget: Budget) -> bytes:
    """CRC-32 and size modulo 2**32 of ``plain``: the 8 bytes that end a gzip member."""
    crc = 0
    size = 0
    with open(plain, "rb") as f:
        while chunk := f.read(CHUNK):
            budget.check_time()
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return struct.pack("<II", crc, size & 0xFFFFFFFF)
