"""The gzip headers the search tries for a body, most likely first.

A header is FLG (FNAME or not), MTIME, XFL, OS and the name. The names
come from the file's own name, the tar's top directory and the
reference's header; the MTIMEs from the tar's newest member (first
``MTIME_AFTER`` seconds after it, then ``MTIME_BEFORE`` before, then up to
``MTIME_LATE`` after), the reference's and 0; XFL and OS from the body's
writer and the reference. Only headers of exactly the length the body
leaves are made, lazily: the search hashes as many as its limits allow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dgfs.dgzip.bodies import Body
from dgfs.dgzip.member import HEADER_SIZE, OS_UNIX, OS_UNKNOWN, GzipHeader, gzip_header
from dgfs.dgzip.tarscan import TarFacts

#: Seconds after the newest tar member's mtime tried first as the gzip MTIME...
MTIME_AFTER = 300
#: ...then these before it (clock skew, a member touched after the header)...
MTIME_BEFORE = 30
#: ...then further after it, as far as MAX_HEADERS allows.
MTIME_LATE = 3600


def name_candidates(
    original_name: str, tar: TarFacts, ref_header: GzipHeader | None = None
) -> list[bytes]:
    """Names a writer may have put in FNAME, most likely first.

    Older Pythons' gzip wrote the path it was given (``dist/x.tar`` from
    setuptools): the reference's directory part, and ``dist/``, are tried too.
    """
    base = original_name.rsplit("/", 1)[-1]
    names: list[str] = []
    if base.endswith(".gz"):
        names.append(base[:-3])  # Python's gzip and GNU gzip both drop ".gz"
    if base.endswith(".tgz"):
        names.append(base[:-4] + ".tar")  # GNU gzip, gzipping the .tar
    names.append(base)  # Python's gzip keeps any other suffix, e.g. ".tgz"
    if tar.top_dir is not None:
        names.append(tar.top_dir + ".tar")  # sdists: the archive is named after its top directory
    directories = ["dist/"]
    if ref_header is not None and ref_header.name and b"/" in ref_header.name:
        with contextlib.suppress(UnicodeDecodeError):
            directories.insert(0, ref_header.name.decode("latin-1").rsplit("/", 1)[0] + "/")
    names += [d + n for d in dict.fromkeys(directories) for n in list(names)]
    encoded = []
    for name in names:
        with contextlib.suppress(UnicodeEncodeError):
            encoded.append(name.encode("latin-1"))
    return list(dict.fromkeys(encoded))


def mtime_candidates(tar: TarFacts, ref_header: GzipHeader | None) -> tuple[list[int], list[int]]:
    """(most likely, the rest) gzip MTIME values."""
    first: list[int] = []
    rest: list[int] = []
    newest = tar.newest_mtime
    if newest is not None:
        first += [newest, newest + 1]
    if ref_header is not None:
        first.append(ref_header.mtime)
    first.append(0)  # gzip -n, reproducible builds
    if newest is not None:
        rest += range(newest + 2, newest + MTIME_AFTER + 1)
        rest += range(newest - 1, max(-1, newest - MTIME_BEFORE - 1), -1)
        rest += range(newest + MTIME_AFTER + 1, newest + MTIME_LATE + 1)
    first = [m for m in dict.fromkeys(first) if 0 <= m <= 0xFFFFFFFF]
    seen = set(first)
    rest = [m for m in dict.fromkeys(rest) if m not in seen and 0 <= m <= 0xFFFFFFFF]
    return first, rest


@dataclass(frozen=True)
class _Shape:
    """The header fields other than MTIME."""

    name: bytes | None
    xfl: int
    os_byte: int


def header_candidates(
    body: Body,
    header_length: int,
    names: list[bytes],
    mtimes: tuple[list[int], list[int]],
    ref_header: GzipHeader | None,
) -> Iterator[bytes]:
    """Headers of exactly ``header_length`` bytes for ``body``, most likely first."""
    if ref_header is not None and len(ref_header.raw) == header_length:
        yield ref_header.raw  # the reference's own self-delta, or a build that pins it all
    if header_length == HEADER_SIZE:
        fitting: list[bytes | None] = [None]
    else:
        fitting = [n for n in names if len(n) + 1 + HEADER_SIZE == header_length]
    xfls = [body.xfl()]
    oses = [body.os_byte()]
    if ref_header is not None:
        xfls.append(ref_header.xfl)
        oses.insert(0, ref_header.os)
    oses += [OS_UNKNOWN, OS_UNIX]
    shapes = [
        _Shape(name, xfl, os_byte)
        for xfl in dict.fromkeys(xfls)
        for os_byte in dict.fromkeys(oses)
        for name in fitting
    ]
    primary = [s for s in shapes if s.xfl == xfls[0] and s.os_byte == oses[0]]
    others = [s for s in shapes if s not in primary]
    likely, rest = mtimes
    tiers: list[tuple[Iterable[int], list[_Shape]]] = [
        (likely, shapes),
        (rest, primary),
        (rest, others),
    ]
    for tier_mtimes, tier_shapes in tiers:
        for mtime in tier_mtimes:
            for shape in tier_shapes:
                yield gzip_header(
                    mtime=mtime, xfl=shape.xfl, os_byte=shape.os_byte, name=shape.name
                )
