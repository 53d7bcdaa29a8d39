"""The deflate bodies the search tries, most likely first, and how each is made.

A body is zlib settings (:data:`dgfs.deep.CANDIDATES`) or a GNU gzip level
(through ``zgz``, :func:`dgfs.deep.gnu_deflate`). First come those that
reproduce the start of the reference's own stream (a cheap fingerprint of
the tool that made it, and usually its successor), then what the
reference's XFL says, then the rest. Each body is one full compression,
written to a scratch file and given up as soon as it grows longer than
the file being rebuilt allows.
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from dgfs.deep import CANDIDATES, GNU_LEVELS, DeflateParams, gnu_deflate, zgz_path
from dgfs.dgzip.limits import CHUNK, Budget
from dgfs.dgzip.member import OS_UNIX, OS_UNKNOWN, GzipHeader
from dgfs.errors import DeltaEngineError

log = logging.getLogger(__name__)

#: Decompressed bytes of the reference used to fingerprint its compressor.
_PROBE_PLAIN = 1 << 20
#: Compressed bytes a candidate must reproduce to count as the reference's writer.
_PROBE_EVIDENCE = 16 << 10
_PROBE_FEED = 32 << 10


@dataclass(frozen=True)
class Body:
    """One way to make the deflate body: zlib settings or a GNU gzip level."""

    params: DeflateParams | None = None
    gnu_level: int | None = None

    @property
    def level(self) -> int:
        if self.params is not None:
            return self.params.level
        assert self.gnu_level is not None
        return self.gnu_level

    def xfl(self) -> int:
        """The XFL byte its writer puts in the header (zlib, Python and GNU gzip agree)."""
        return 2 if self.level == 9 else 4 if self.level == 1 else 0

    def os_byte(self) -> int:
        """The OS byte its most likely writer puts in the header."""
        return OS_UNIX if self.gnu_level is not None else OS_UNKNOWN

    def chunks(self, plain: Path, timeout: float | None = None) -> Generator[bytes, None, None]:
        """The raw deflate body of the file ``plain``; DeltaEngineError if zgz
        fails, DecodeLimit if it runs longer than ``timeout`` seconds."""
        if self.gnu_level is not None:
            yield from gnu_deflate(self.gnu_level, plain, timeout)
            return
        assert self.params is not None
        compressor = self.params.compressor()
        with open(plain, "rb") as f:
            while chunk := f.read(CHUNK):
                if out := compressor.compress(chunk):
                    yield out
        yield compressor.flush()

    def __str__(self) -> str:
        if self.params is not None:
            p = self.params
            return f"zlib level {p.level} memLevel {p.mem_level} strategy {p.strategy}"
        return f"GNU gzip -{self.gnu_level}"


_XFL_BODIES = {
    2: (Body(DeflateParams(9)), Body(gnu_level=9)),
    4: (Body(DeflateParams(1)), Body(gnu_level=1)),
    0: (Body(DeflateParams(6)), Body(gnu_level=6)),
}


def body_plans(
    reference: Path | None, ref_header: GzipHeader | None, scratch_dir: Path, budget: Budget
) -> list[Body]:
    """Ways to make the body, most likely first.

    The reference's writer (the one that reproduces the start of its
    stream), then what the reference's XFL says of its level, then
    Python's gzip default (level 9), then everything else.
    """
    plans: list[Body] = []
    if reference is not None and ref_header is not None:
        plans += _reference_writers(reference, ref_header, scratch_dir, budget)
        plans += _XFL_BODIES.get(ref_header.xfl, ())
    plans.append(Body(DeflateParams(9)))
    plans += [Body(p) for p in CANDIDATES]
    plans += [Body(gnu_level=level) for level in GNU_LEVELS]
    have_gnu = zgz_path() is not None
    return [
        body
        for body in dict.fromkeys(plans)  # ordered, without repeats
        if body.gnu_level is None or have_gnu
    ]


def _reference_writers(
    reference: Path, header: GzipHeader, scratch_dir: Path, budget: Budget
) -> list[Body]:
    """The bodies that reproduce the first compressed bytes of the reference's stream.

    A cheap fingerprint of the tool that made the reference (a wrong zlib
    candidate fails within its first block); the tool that made its
    successor is usually the same.
    """
    compressed, plain = _reference_prefix(reference, len(header.raw))
    if len(compressed) < _PROBE_EVIDENCE:
        return []
    # Without a flush zlib emits only finished blocks, which the whole stream
    # must start with; a wrong candidate is dropped at its first wrong block.
    live = {params: (params.compressor(), 0) for params in CANDIDATES}
    for pos in range(0, len(plain), _PROBE_FEED):
        piece = plain[pos : pos + _PROBE_FEED]
        for params, (compressor, matched) in list(live.items()):
            emitted = compressor.compress(piece)
            if compressed[matched : matched + len(emitted)] == emitted:
                live[params] = (compressor, matched + len(emitted))
            else:
                del live[params]
        if not live:
            break
    found = [Body(params) for params, (_, matched) in live.items() if matched >= _PROBE_EVIDENCE]
    if found or zgz_path() is None:
        return found
    # GNU gzip's output for a prefix ends in a flushed block: compare what comes before.
    with tempfile.NamedTemporaryFile(prefix="dgzip-probe-", dir=scratch_dir) as probe:
        probe.write(plain)
        probe.flush()
        for body in _XFL_BODIES.get(header.xfl, ())[1:]:
            try:
                out = b"".join(body.chunks(Path(probe.name), budget.seconds_left()))
            except DeltaEngineError:
                continue
            if _common_prefix(out, compressed) >= _PROBE_EVIDENCE:
                found.append(body)
    return found


def _reference_prefix(reference: Path, offset: int) -> tuple[bytes, bytes]:
    """The first compressed bytes of the reference's deflate stream and what they inflate to."""
    decomp = zlib.decompressobj(-15)
    compressed = bytearray()
    plain = bytearray()
    with open(reference, "rb") as f:
        f.seek(offset)
        while len(plain) < _PROBE_PLAIN and not decomp.eof:
            chunk = f.read(4096)  # inflates to at most ~4 MiB: the bound stays near
            if not chunk:
                break
            try:
                plain += decomp.decompress(chunk)
            except zlib.error:
                return b"", b""
            compressed += chunk
    return bytes(compressed), bytes(plain)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def write_body(body: Body, plain: Path, dest: Path, max_length: int, budget: Budget) -> int | None:
    """Write ``body`` of ``plain`` to ``dest`` and return its length; None once it
    exceeds ``max_length`` bytes or cannot be made. DecodeLimit past the
    search's deadline."""
    length = 0
    with open(dest, "wb") as out:
        pieces = body.chunks(plain, budget.seconds_left())
        try:
            for piece in pieces:
                budget.check_time()
                length += len(piece)
                if length > max_length:
                    return None
                out.write(piece)
        except DeltaEngineError as exc:
            log.debug("%s: %s", body, exc)
            return None
        finally:
            pieces.close()  # stops zgz early when the budget ran out
    return length
