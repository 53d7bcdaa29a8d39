"""Small files that expand enormously: what a hostile bucket writer or user can hand dgfs.

Each is built without ever holding (or compressing) its expanded bytes, so a
test can make a 3 GiB bomb in a fraction of a second.
"""

from __future__ import annotations

import gzip
import io
import random
import struct
import zipfile
import zlib
from functools import cache

import zstandard

from dgfs.deep.deflate import DeflateParams
from dgfs.deep.expand import MAGIC, TAG_DEFLATE, TAG_END, TAG_RAW

MiB = 1 << 20


def nested_gzip_zip(payload: int = 128 * MiB, *, filler: int = 0) -> bytes:
    """A zip of one deflated member that is a gzip of a gzip of ``payload``
    zeros, all made by Python's zlib: 353 bytes for 128 MiB, each layer of
    which deep mode can reproduce and so expands. ``filler`` random bytes in
    a stored member make it as large as a file must be to be a delta."""
    inner = gzip.compress(gzip.compress(bytes(payload), 9, mtime=0), 9, mtime=0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        if filler:
            zf.writestr(zipfile.ZipInfo("filler.bin"), random.Random(filler).randbytes(filler))
        zf.writestr(zipfile.ZipInfo("a.gz"), inner, zipfile.ZIP_DEFLATED, compresslevel=9)
    return buf.getvalue()


@cache
def _zeros_member(size: int, level: int) -> tuple[bytes, int]:
    """Raw deflate (zlib, ``level``) of ``size`` zeros and their CRC-32, made in pieces."""
    compressor = DeflateParams(level).compressor()
    chunk = bytes(min(size, 8 * MiB))
    out = bytearray()
    crc = 0
    left = size
    while left:
        piece = chunk[: min(left, len(chunk))]
        out += compressor.compress(piece)
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    out += compressor.flush()
    return bytes(out), crc


def zeros_zip(total: int, member: int = 64 * MiB, level: int = 9, *, filler: int = 0) -> bytes:
    """A zip whose deflated members (zlib ``level``, so reproducible) hold
    ``total`` zeros in all: ~1/1000 of ``total``; first, ``filler`` random
    bytes in a stored member (incompressible content, as archives carry)."""
    data, crc = _zeros_member(member, level)
    count, rest = divmod(total, member)
    sizes = [member] * count + ([rest] if rest else [])
    entries = [(b"filler.bin", 0, *_random_member(filler), filler)] if filler else []
    for i, size in enumerate(sizes):
        body, body_crc = (data, crc) if size == member else _zeros_member(size, level)
        entries.append((f"zeros-{i:04d}.bin".encode(), 8, body, body_crc, size))
    out = bytearray()
    central = bytearray()
    for name, method, body, body_crc, size in entries:
        flags = 2 if method == 8 else 0
        offset = len(out)
        out += b"PK\x03\x04" + struct.pack(
            "<HHHHHIIIHH", 20, flags, method, 0, 0x21, body_crc, len(body), size, len(name), 0
        )
        out += name + body
        central += b"PK\x01\x02" + struct.pack(
            "<HHHHHHIII", 20, 20, flags, method, 0, 0x21, body_crc, len(body), size
        )
        central += struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, offset) + name
    start = len(out)
    out += central
    out += b"PK\x05\x06" + struct.pack(
        "<HHHHIIH", 0, 0, len(entries), len(entries), len(central), start, 0
    )
    return bytes(out)


def _random_member(size: int) -> tuple[bytes, int]:
    body = random.Random(size).randbytes(size)
    return body, zlib.crc32(body)


def _varint_be(value: int) -> bytes:
    """RFC 3284's integer: base 128, most significant group first."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def vcdiff_run(total: int, window: int = 16 * MiB) -> bytes:
    """A VCDIFF (no source) that decodes to ``total`` zeros: one RUN per
    window. 261 bytes for 256 MiB."""
    body = bytearray(b"\xd6\xc3\xc4\x00\x00")
    while total:
        size = min(window, total)
        total -= size
        data, inst = b"\x00", b"\x00" + _varint_be(size)  # code 0: RUN, size follows
        rest = _varint_be(size) + b"\x00" + _varint_be(len(data)) + _varint_be(len(inst))
        rest += _varint_be(0) + data + inst
        body += b"\x00" + _varint_be(len(rest)) + rest
    return bytes(body)


def zstd_zeros(total: int, *, content_size: bool = True) -> bytes:
    """One zstd frame of ``total`` zeros: ~8 KB for 256 MiB. Without
    ``content_size`` the header does not say how much it holds."""
    params = zstandard.ZstdCompressionParameters.from_level(3, write_content_size=content_size)
    compressor = zstandard.ZstdCompressor(compression_params=params)
    chunk = bytes(min(total, 8 * MiB))
    out = io.BytesIO()
    with compressor.stream_writer(out, size=total if content_size else -1, closefd=False) as writer:
        left = total
        while left:
            piece = chunk[: min(left, len(chunk))]
            writer.write(piece)
            left -= len(piece)
    return out.getvalue()


def nested_form(levels: int, payload: bytes = b"x") -> bytes:
    """An expanded form whose DEFLATE segments nest ``levels`` deep around ``payload``."""
    raw = bytes((TAG_RAW, len(payload))) + payload
    opening = bytes((TAG_DEFLATE,)) + DeflateParams(6).pack()
    return MAGIC + opening * levels + raw + bytes((TAG_END,)) * (levels + 1)
