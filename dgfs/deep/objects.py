"""Bodies of deep objects: the compressed reference and the wrapped delta.

Blocking file-to-file functions (run them in a worker thread); nothing is
held in memory beyond a stream buffer. docs/FORMAT.md is the normative
description.

- A deep reference's body is one zstd frame holding the expanded form of
  the deltaspace's first file, at level 9 with zstd's own window for that
  level (8 MiB). Measured on a botocore wheel's 95 MB expanded form: 7.8 MB
  in 1.0 s (level 3: 10.3 MB in 0.2 s; level 15: 7.1 MB in 15 s; level 9
  with long-distance matching over 128 MiB: 7.7 MB in 1.6 s, for a 128 MiB
  window in memory on both sides); on a Django sdist's 59 MB, 8.1 MB in
  1.0 s (the ``.tar.gz`` itself is 10.4 MB). Readers accept windows up to
  2^27 bytes.
- A deep delta's body is ``DEEP_DELTA_MAGIC`` followed by a VCDIFF (xdelta3)
  that turns the expanded reference into the file's expanded form; or
  ``DEEP_DELTA_SPANS_MAGIC``, a table of spans the reference holds and a
  VCDIFF of the rest (:mod:`dgfs.deep.spans`).

A reference comes from the bucket: an 8 KB zstd frame decompresses to
256 MiB. :func:`decompress_reference` refuses a window over 2^27 bytes, a
frame whose header announces more than its limit, and stops writing at
that limit (the reference's recorded ``dgfs-expanded-size``, within the
expansion limits: :func:`reference_cap`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from dgfs import format as fmt
from dgfs.deep import spans
from dgfs.deep.limits import DEFAULT_MAX_BYTES, ExpansionLimits
from dgfs.deep.spans import Span
from dgfs.errors import DecodeLimit, FormatError
from dgfs.format import DEEP_DELTA_MAGIC, DEEP_DELTA_SPANS_MAGIC

ZSTD_LEVEL = 9
#: The largest window a reader accepts (a writer may use long-distance matching).
MAX_WINDOW_LOG = 27
_BUFFER = 1 << 20
_FRAME_HEADER_MAX = 18  # ZSTD_FRAMEHEADERSIZE_MAX


@dataclass(frozen=True)
class PackedReference:
    """What :func:`compress_reference` read and wrote."""

    expanded_sha256: str
    expanded_size: int
    stored_size: int


class _Hashing:
    """A file read through for zstd, hashed on the way (one read of the
    expanded form instead of one to hash it and one to compress it)."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._src.read(size)
        self.sha256.update(chunk)
        self.size += len(chunk)
        return chunk


def _zstd_threads() -> int:
    """zstd's workers for a reference: the first file of a directory waits for
    it, and the files stored beside it wait for the reference. One frame all
    the same; a botocore wheel's 95 MB form: 0.86 s on one core, 0.51 s on
    two (0.97 CPU s), 7.80 and 7.79 MB. 0: zstd's single-threaded mode."""
    cores = min(4, os.cpu_count() or 1)
    return cores if cores > 1 else 0


def compress_reference(expanded: Path, out: Path) -> PackedReference:
    """zstd-compress ``expanded`` into ``out``; returns the SHA-256 and size of
    what it read and the compressed size."""
    params = zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL, write_checksum=True, write_content_size=True, threads=_zstd_threads()
    )
    compressor = zstandard.ZstdCompressor(compression_params=params)
    size = expanded.stat().st_size
    with open(expanded, "rb") as src, open(out, "wb") as dst:
        hashing = _Hashing(src)
        # copy_stream only calls read(): the same call, so the same bytes, as on src.
        reader = cast(BinaryIO, hashing)
        compressor.copy_stream(reader, dst, size=size, read_size=_BUFFER, write_size=_BUFFER)
    if hashing.size != size:
        raise FormatError(f"{expanded} changed size while it was compressed")
    return PackedReference(hashing.sha256.hexdigest(), size, out.stat().st_size)


def reference_cap(metadata: Mapping[str, str], stored_size: int, limits: ExpansionLimits) -> int:
    """The most a deep reference (``metadata``, ``stored_size`` bytes of zstd)
    may decompress to (:meth:`ExpansionLimits.reference_cap`), from its
    recorded ``dgfs-expanded-size``."""
    recorded = metadata.get(fmt.META_EXPANDED_SIZE, "").strip()
    usable = recorded.isascii() and recorded.isdigit() and len(recorded) <= 19
    return limits.reference_cap(int(recorded) if usable else None, stored_size)


def decompress_reference(stored: Path, out: Path, max_size: int = DEFAULT_MAX_BYTES) -> None:
    """Undo :func:`compress_reference`; ``FormatError`` if ``stored`` is not such a body,
    ``DecodeLimit`` (and ``out`` holds no more than ``max_size`` bytes) if it
    decompresses to more than ``max_size`` bytes."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG)
    try:
        with open(stored, "rb") as src, open(out, "wb") as dst:
            announced = zstandard.get_frame_parameters(src.read(_FRAME_HEADER_MAX)).content_size
            if announced != zstandard.CONTENTSIZE_UNKNOWN and announced > max_size:
                raise _over(max_size, f"its header announces {announced}")
            src.seek(0)
            written = 0
            with decompressor.stream_reader(src, read_size=_BUFFER) as reader:
                while chunk := reader.read(_BUFFER):
                    written += len(chunk)
                    if written > max_size:
                        raise _over(max_size, "it holds more")
                    dst.write(chunk)
    except zstandard.ZstdError as exc:
        raise FormatError(f"deep reference body is not valid zstd: {exc}") from None


def _over(max_size: int, how: str) -> DecodeLimit:
    return DecodeLimit(
        f"deep reference decompresses to more than {max_size} bytes ({how}): the limit is its"
        " recorded dgfs-expanded-size, at most expand_max unless expand_ratio × its size is more"
    )


def wrap_delta(vcdiff: Path, out: Path, table: bytes | None = None) -> int:
    """A deep delta's body into ``out``: ``DEEP_DELTA_MAGIC`` + ``vcdiff``, or,
    with a span ``table`` (``spans.pack``), ``DEEP_DELTA_SPANS_MAGIC`` + the
    table + ``vcdiff``; returns the body's size."""
    with open(vcdiff, "rb") as src, open(out, "wb") as dst:
        if table is None:
            dst.write(DEEP_DELTA_MAGIC)
        else:
            dst.write(DEEP_DELTA_SPANS_MAGIC + table)
        shutil.copyfileobj(src, dst, _BUFFER)
    return out.stat().st_size


def unwrap_delta(body: Path, out: Path, reference_size: int, cap: int) -> list[Span] | None:
    """The VCDIFF inside a deep delta's body into ``out``, and its span table
    (None: a version-1 delta, of the whole form), checked against the
    reference's size and the expanded form's ``cap``; ``FormatError`` if the
    magic is wrong or the table malformed, ``DecodeLimit`` past a limit."""
    with open(body, "rb") as src:
        magic = src.read(len(DEEP_DELTA_MAGIC))
        if magic == DEEP_DELTA_MAGIC:
            found = None
        elif magic == DEEP_DELTA_SPANS_MAGIC:
            found = spans.unpack(src, reference_size, cap)
        else:
            raise FormatError("not a dgfs deep delta (bad magic, or a newer dgfs wrote it)")
        with open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, _BUFFER)
    return found
