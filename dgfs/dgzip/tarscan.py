"""What a tar tells the search of its gzip header: the newest mtime, the top directory.

dgfs reads the tar itself, header by header, as ``tarfile`` would but
under limits: an extended header (pax, GNU long name or link) is read only
up to ``MAX_TAR_EXTENSION`` bytes, at most ``MAX_TAR_HEADERS`` headers are
read, and the search's ``Budget`` is checked between headers. The content
comes from a delta whoever writes the bucket chose; nothing in it is
trusted, and a block that is not a header ends the scan.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dgfs import tarblock
from dgfs.dgzip.limits import Budget

log = logging.getLogger(__name__)

#: An extended tar header (pax, GNU long name or link) claiming more than
#: this ends the scan for facts: real ones hold a name or a few records.
MAX_TAR_EXTENSION = 1 << 20
#: Tar headers read for facts (a member with a pax header has two).
MAX_TAR_HEADERS = 200_000


@dataclass(frozen=True)
class TarFacts:
    """The newest member's mtime (rounded down) and the first member's top directory."""

    newest_mtime: int | None
    top_dir: str | None


_NO_FACTS = TarFacts(None, None)
#: Extended headers: pax (POSIX, Solaris), pax global, GNU long name, GNU long link.
_TAR_EXTENSIONS = (b"x", b"X", b"g", b"L", b"K")
#: Types whose data blocks follow the header (tarfile skips only these, and
#: types it does not know): regular, contiguous and GNU sparse files.
_TAR_WITH_DATA = (b"0", b"\0", b"7", b"S")
_TAR_KNOWN = _TAR_WITH_DATA + _TAR_EXTENSIONS + (b"1", b"2", b"3", b"4", b"5", b"6")
#: The only pax records the facts need (others are not kept: a tar may hold many).
_PAX_KEYS = (b"path", b"mtime", b"size")
_PAX_RECORD = re.compile(rb"(\d{1,20}) ([^=\n]+)=")


class _TooLarge(Exception):
    """An extended tar header claims more than ``MAX_TAR_EXTENSION`` bytes."""


def tar_facts(plain: Path, budget: Budget) -> TarFacts:
    """The newest member mtime (rounded down) and top directory of a tar, if it is one.

    The tar is read header by header, as tarfile reads it, but an extended
    header (pax, GNU long name) claiming more than ``MAX_TAR_EXTENSION``
    bytes gives no facts at all: tarfile read one whole into memory,
    whatever size it claimed (up to the 4 GiB the content may hold). The
    scan stops at the first block that is not a header, or after
    ``MAX_TAR_HEADERS`` headers, with the facts found so far; DecodeLimit
    past the search's deadline.
    """
    newest: float | None = None
    top: str | None = None
    try:
        with open(plain, "rb") as f:
            for name, mtime in _tar_members(f, budget):
                if mtime is not None and (newest is None or mtime > newest):
                    newest = mtime
                if top is None:
                    first = name.decode("utf-8", "surrogateescape").lstrip("./")
                    top = first.split("/", 1)[0] or None
    except _TooLarge as exc:
        log.debug("%s: no facts from its tar: %s", plain, exc)
        return _NO_FACTS
    return TarFacts(None if newest is None else max(0, math.floor(newest)), top)


def _tar_members(f: BinaryIO, budget: Budget) -> Iterator[tuple[bytes, float | None]]:
    """The name and mtime of each member of the tar ``f`` (pax records and GNU
    long names applied), reading no more than ``MAX_TAR_EXTENSION`` bytes of
    any extended header (``_TooLarge`` past that)."""
    offset = 0
    file_size = os.fstat(f.fileno()).st_size
    extended = _Extended()
    for _ in range(MAX_TAR_HEADERS):
        budget.check_time()
        block = _read_header(f, offset, file_size)
        if block is None:
            return
        size = tarblock.number(block[124:136])
        kind = block[156:157]
        if size is None or size < 0:
            return
        if kind in _TAR_EXTENSIONS:
            data = _read_extension(f, kind, size)
            if data is None:
                return
            extended.add(kind, data)
            offset += tarblock.BLOCK + tarblock.padded(size)
            continue
        name, mtime, size = extended.member(block, kind, size)
        yield name, mtime
        after = _after_member(f, offset, block, kind, size, budget)
        if after is None:
            return
        offset = after


def _read_header(f: BinaryIO, offset: int, file_size: int) -> bytes | None:
    """The tar header block at ``offset``; None past the end of the file, or if
    the block is no header: the end (two zero blocks fail the checksum too), or
    not a tar."""
    if offset + tarblock.BLOCK > file_size:  # sizes may claim any number
        return None
    f.seek(offset)
    block = f.read(tarblock.BLOCK)
    if len(block) < tarblock.BLOCK or not tarblock.checksum_ok(block):
        return None
    return block


def _read_extension(f: BinaryIO, kind: bytes, size: int) -> bytes | None:
    """The ``size`` bytes of an extended header of type ``kind``, read from ``f``
    just past its header block; None if the file ends first, ``_TooLarge`` if
    it claims more than ``MAX_TAR_EXTENSION`` (then nothing is read)."""
    if size > MAX_TAR_EXTENSION:
        raise _TooLarge(f"a {kind.decode()!r} header of {size} bytes")
    data = f.read(size)
    if len(data) < size:
        return None
    return data


class _Extended:
    """What the extended headers read so far say of the members after them:
    global pax records (every later member), and the pax records and GNU long
    name of the next member only."""

    def __init__(self) -> None:
        self.global_pax: dict[bytes, bytes] = {}
        self.pax: dict[bytes, bytes] = {}
        self.long_name: bytes | None = None

    def add(self, kind: bytes, data: bytes) -> None:
        """Keep what the extended header of type ``kind`` holding ``data`` says."""
        if kind == b"g":
            self.global_pax.update(_pax_records(data))
        elif kind in (b"x", b"X"):
            self.pax.update(_pax_records(data))
        elif kind == b"L":
            self.long_name = data.split(b"\0", 1)[0]

    def member(self, block: bytes, kind: bytes, size: int) -> tuple[bytes, float | None, int]:
        """The name, mtime and data size of the member whose header is ``block``
        (the pax records and long name applied to its header's); what was for
        that member alone is then used up."""
        records = {**self.global_pax, **self.pax}
        name = self.long_name or records.get(b"path") or _ustar_name(block, kind)
        mtime: float | None
        if b"mtime" in records:
            mtime = _pax_float(records[b"mtime"])
        else:
            mtime = tarblock.number(block[136:148])
        if b"size" in records:
            size = _pax_int(records[b"size"])
        self.pax, self.long_name = {}, None
        return name, mtime, size


def _after_member(
    f: BinaryIO, offset: int, block: bytes, kind: bytes, size: int, budget: Budget
) -> int | None:
    """Where the header after the member whose header ``block`` is at ``offset``
    starts: past its GNU sparse map, and past its ``size`` bytes of data when
    they follow the header (as tarfile skips them). None if the file ends
    inside the sparse map."""
    skip = kind in _TAR_WITH_DATA or kind not in _TAR_KNOWN
    offset += tarblock.BLOCK
    if kind == b"S" and block[482]:
        after_map = _skip_sparse_map(f, offset, budget)
        if after_map is None:
            return None
        offset = after_map
    return offset + (tarblock.padded(size) if skip and size > 0 else 0)


def _skip_sparse_map(f: BinaryIO, offset: int, budget: Budget) -> int | None:
    """Where the rest of a GNU sparse member's map ends: it goes on in extension
    blocks from ``offset``, each saying (byte 504) whether another comes
    (tarfile's ``_proc_sparse``). None if the file ends first."""
    while True:
        budget.check_time()
        f.seek(offset)
        extension = f.read(tarblock.BLOCK)
        if len(extension) < tarblock.BLOCK:
            return None
        offset += tarblock.BLOCK
        if not extension[504]:
            return offset


def _ustar_name(block: bytes, kind: bytes) -> bytes:
    """A member's name from its header alone (the ustar prefix joined, as tarfile does)."""
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix and kind not in (b"L", b"K", b"S"):
        return prefix + b"/" + name
    return name


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax header the facts need (``_PAX_KEYS``), up to the
    first that is malformed."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while (match := _PAX_RECORD.match(data, pos)) is not None:
        end = match.start(1) + int(match.group(1))
        if end <= match.end() or end > len(data) or data[end - 1] != 0x0A:
            break
        if match.group(2) in _PAX_KEYS:
            records[match.group(2)] = data[match.end() : end - 1]
        pos = end
    return records


def _pax_float(value: bytes) -> float | None:
    """A pax ``mtime`` (it may have a fraction), or None if it is no finite number."""
    try:
        number = float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    # Any float parses ("inf", "nan", "1e999"): floor() refuses those.
    return number if math.isfinite(number) else None


def _pax_int(value: bytes) -> int:
    """A pax ``size``; 0 if it is no integer, as tarfile reads it."""
    try:
        return int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return 0
