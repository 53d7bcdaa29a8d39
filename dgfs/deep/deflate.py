"""Exact re-deflation: find zlib settings that reproduce a deflate stream bit for bit.

A deflate stream can be replaced by its uncompressed bytes only if
compressing those bytes again gives back the very same stream. Deflate
leaves the encoder free to choose, so that holds only when the stream was
made by zlib (Python's ``zlib``/``gzip``/``zipfile``, Java's
``java.util.zip``, most zip and tar.gz writers) with settings we can
guess: level, memLevel, window bits and strategy. Streams made by other
encoders (GNU gzip, pigz, 7-Zip, Zopfli, zlib-ng) come out different and
stay compressed.

:func:`match_deflate` decompresses a raw deflate stream while feeding the
output to every candidate compressor at once and comparing what each
emits against the original bytes; a candidate that emits one wrong byte is
dropped on the spot, so an unreproducible stream costs about one deflate
block per candidate, not a full recompression. Deflate's output does not
depend on how the input is sliced into ``compress()`` calls (zlib with
``Z_NO_FLUSH``), which is what makes the comparison valid while streaming.

zlib's output is stable across its 1.2.x and 1.3.x releases; other
implementations (zlib-ng, Intel's, Cloudflare's) differ. :func:`zlib_is_reference`
checks the running zlib against known answers: callers refuse to create
deep objects when it fails, and every rebuild is checked by SHA-256 anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import threading
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import BinaryIO, NamedTuple

from dgfs.deep.deadline import NEVER, Deadline

#: Decompressed bytes handed to the candidate compressors at a time: small
#: enough that a wrong candidate is dropped soon after its first block.
_FEED = 32 * 1024
_READ = 256 * 1024
_INFLATE_MAX = 1024 * 1024
#: A candidate that reproduced this many bytes and then went wrong shows the
#: stream came from a near relative of zlib (GNU gzip, say): the other
#: settings will not do better, so the search stops there.
NEAR_MISS = 4096


@dataclass(frozen=True)
class DeflateParams:
    """zlib settings for a raw deflate stream (no zlib or gzip wrapper)."""

    level: int
    mem_level: int = 8
    window_bits: int = 15
    strategy: int = zlib.Z_DEFAULT_STRATEGY

    def compressor(self, zdict: bytes | memoryview = b"") -> zlib._Compress:
        """A raw deflate compressor with these settings, primed with ``zdict`` if any."""
        if zdict:
            return zlib.compressobj(
                self.level, zlib.DEFLATED, -self.window_bits, self.mem_level, self.strategy, zdict
            )
        return zlib.compressobj(
            self.level, zlib.DEFLATED, -self.window_bits, self.mem_level, self.strategy
        )

    def pack(self) -> bytes:
        """Four bytes, as stored in the expanded form (docs/FORMAT.md)."""
        return bytes((self.level, self.mem_level, self.window_bits, self.strategy))

    @classmethod
    def unpack(cls, raw: bytes) -> DeflateParams:
        level, mem_level, window_bits, strategy = raw
        if not (
            0 <= level <= 9 and 1 <= mem_level <= 9 and 9 <= window_bits <= 15 and strategy <= 4
        ):
            raise ValueError(f"invalid deflate parameters {raw.hex()}")
        return cls(level, mem_level, window_bits, strategy)


def _candidates() -> tuple[DeflateParams, ...]:
    # Most likely first: zipfile/jar default (6), gzip module and tarfile (9).
    levels = (6, 9, 1, 5, 4, 7, 8, 3, 2)
    first = [DeflateParams(level) for level in levels]
    rarer = [DeflateParams(level, mem_level=9) for level in levels]
    rarer += [DeflateParams(level, strategy=zlib.Z_FILTERED) for level in (6, 9)]
    return tuple(first + rarer)


CANDIDATES: tuple[DeflateParams, ...] = _candidates()


@dataclass(frozen=True)
class DeflateMatch:
    """What :func:`match_deflate` found about one stream."""

    compressed_length: int
    """Bytes of the deflate stream (up to its final block); 0 if it is not valid deflate."""
    uncompressed_length: int
    params: DeflateParams | None
    """Settings that reproduce the stream exactly, or None."""
    near_miss: bool = False
    """No settings fit, and one fitted a long prefix: trying others is pointless."""


class _Candidate:
    __slots__ = ("params", "compressor", "matched")

    def __init__(self, params: DeflateParams) -> None:
        self.params = params
        self.compressor = params.compressor()
        self.matched = 0  # bytes of the original stream this candidate reproduced so far


def match_deflate(
    src: BinaryIO,
    start: int,
    limit: int,
    sink: Callable[[bytes], object] | None,
    candidates: Iterable[DeflateParams] = CANDIDATES,
    on_inflate: Callable[[int], object] | None = None,
) -> DeflateMatch:
    """Decompress the raw deflate stream at ``start`` of ``src`` (not past
    ``limit``), handing its output to ``sink``, and find which of
    ``candidates`` reproduces it.

    ``sink`` stops being called once no candidate is left (the output is
    useless then), but the stream is still decompressed to find its end.
    With no ``candidates`` at all it is a plain streaming inflate into ``sink``.
    Returns ``compressed_length == 0`` when the bytes are not valid deflate.
    ``on_inflate`` is told the size of every piece inflated (sink or not),
    at most ``_INFLATE_MAX`` bytes at a time: it may raise to stop a bomb.
    """
    live = [_Candidate(p) for p in candidates]
    candidates_given = bool(live)
    decomp = zlib.decompressobj(-15)
    window = _Window()
    consumed = 0  # stream bytes given to the decompressor
    produced = 0
    near_miss = False
    src.seek(start)
    while not decomp.eof:
        pending = decomp.unconsumed_tail
        if not pending:
            want = min(_READ, limit - start - consumed)
            pending = src.read(want) if want > 0 else b""
            if not pending:
                return DeflateMatch(0, produced, None)  # truncated: not a whole stream
            consumed += len(pending)
            window.data += pending
        try:
            # Bounded output: a stream of zeros inflates ~1000-fold.
            plain = decomp.decompress(pending, _INFLATE_MAX)
        except zlib.error:
            return DeflateMatch(0, produced, None)
        produced += len(plain)
        if on_inflate is not None:
            on_inflate(len(plain))
        for pos in range(0, len(plain), _FEED):
            piece = plain[pos : pos + _FEED]
            if live:
                live, missed = _survivors(live, piece, window)
                near_miss = near_miss or missed
                if live and sink is not None:
                    sink(piece)
            elif sink is not None and not candidates_given:
                sink(piece)  # plain inflation: no candidates asked for
        window.trim(live, consumed)
    length = consumed - len(decomp.unused_data)
    return _finish(live, window, length, produced, near_miss)


class _Window:
    """The original stream's bytes that a live candidate has still to match."""

    __slots__ = ("data", "start")

    def __init__(self) -> None:
        self.data = bytearray()  # original bytes from start on, still needed for comparison
        self.start = 0  # stream offset of data[0]

    def check(self, cand: _Candidate, out: bytes) -> bool:
        """Whether ``out``, the candidate's next output, is the original's next bytes."""
        if not out:
            return True
        offset = cand.matched - self.start
        if self.data[offset : offset + len(out)] != out:
            return False
        cand.matched += len(out)
        return True

    def trim(self, live: list[_Candidate], consumed: int) -> None:
        """Drop what every live candidate has matched (everything when none is left)."""
        if live:
            keep_from = min(c.matched for c in live)
            if keep_from > self.start:
                del self.data[: keep_from - self.start]
                self.start = keep_from
        else:
            self.data.clear()
            self.start = consumed


def _survivors(
    live: list[_Candidate], piece: bytes, window: _Window
) -> tuple[list[_Candidate], bool]:
    """The candidates whose output for ``piece`` matches, and whether one that
    failed had matched ``NEAR_MISS`` bytes (then none is left: a near miss)."""
    survivors = [c for c in live if window.check(c, c.compressor.compress(piece))]
    if len(survivors) < len(live) and any(
        c.matched >= NEAR_MISS for c in live if c not in survivors
    ):
        return [], True
    return survivors, False


def _finish(
    live: list[_Candidate], window: _Window, length: int, produced: int, near_miss: bool
) -> DeflateMatch:
    """The match once the stream of ``length`` bytes ended: the first live
    candidate whose flushed tail completes it exactly."""
    for cand in live:
        tail = cand.compressor.flush()
        if window.check(cand, tail) and cand.matched == length:
            return DeflateMatch(length, produced, cand.params)
        near_miss = near_miss or cand.matched >= NEAR_MISS
    return DeflateMatch(length, produced, None, near_miss)


def deflate_chunks(params: DeflateParams, chunks: Iterable[bytes]) -> Iterable[bytes]:
    """Compress ``chunks`` with ``params``: the inverse of a successful match."""
    compressor = params.compressor()
    for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()


# Known answers: SHA-256 prefixes of raw deflate of _kat_input() at four
# levels, as reference zlib (1.2.13, Debian 12) makes them.
def _kat_input() -> bytes:
    words = [b"delta", b"glider", b"release", b"archive", b"zip", b"gzip", b"store", b"fs"]
    out = bytearray()
    state = 12345
    for _ in range(40000):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        out += words[state % len(words)] + (b" " if state & 0x100 else b"\n")
    return bytes(out)


def _kat_digest(params: DeflateParams) -> str:
    data = _kat_input()
    return hashlib.sha256(b"".join(deflate_chunks(params, [data]))).hexdigest()[:16]


_KAT_PARAMS = (DeflateParams(1), DeflateParams(4), DeflateParams(6), DeflateParams(9))
_KAT_EXPECTED: tuple[str, ...] = (
    "ccc5ba438fe45b34",
    "3df99efb7178b801",
    "0181d8c7043224b9",
    "c9d900cdacc6e9b5",
)


@cache
def zlib_is_reference() -> bool:
    """Whether this process's zlib deflates exactly like reference zlib 1.2.11+.

    Deep objects made here are rebuilt elsewhere (and the other way round),
    so a zlib whose output differs (zlib-ng, a patched build) must not be
    used to make them.
    """
    return tuple(_kat_digest(p) for p in _KAT_PARAMS) == _KAT_EXPECTED


# --- a stream in pieces: independent compressors started at block boundaries ---------
#
# A deflate stream's blocks end where zlib's symbol buffer fills, so a
# compressor's state at a block boundary is its window (the last 2^windowBits
# bytes), the hash chains built from it and its lazy-match state. A fresh
# compressor primed with that window as a preset dictionary rebuilds the chains
# (deflateSetDictionary inserts every position, as levels 4-9 do while
# compressing) and starts with a clean lazy-match state; where that is also the
# original's, it emits the original's next blocks bit for bit. A stored block
# pads to a byte boundary, so only boundaries on one are used: there a
# compressor that starts at bit 0 stands where the original stood. Whether a
# boundary works is never assumed: the writer compares every piece with the
# original (``benchmarks/parallel_deflate.py`` measured 100% of the
# byte-aligned boundaries of Django sdists reproducing).

#: Input past a piece's end given to its compressor: zlib looks at most
#: 258 + 3 bytes ahead when it chooses a piece's last symbols.
PIECE_LOOKAHEAD = 4096


class Checkpoint(NamedTuple):
    """Where a piece of a deflate stream starts: a byte-aligned block boundary."""

    compressed: int
    """Offset in the deflate stream."""
    uncompressed: int
    """Offset in its inflated bytes."""


class Payload:
    """The inflated bytes that pieces are compressed from: bytes, or a file
    read by offset (``os.pread``: threads read it side by side), so that each
    piece holds only its window and one feed in memory."""

    def __init__(self, size: int, data: bytes = b"", fileno: int | None = None) -> None:
        self.size = size
        self._data = data
        self._fileno = fileno

    @classmethod
    def of_bytes(cls, data: bytes) -> Payload:
        return cls(len(data), data=data)

    @classmethod
    def of_file(cls, fileno: int, size: int) -> Payload:
        return cls(size, fileno=fileno)

    def read(self, offset: int, length: int) -> bytes:
        if self._fileno is None:
            return self._data[offset : offset + length]
        out = os.pread(self._fileno, length, offset)
        if len(out) != min(length, max(0, self.size - offset)):
            raise ValueError("the inflated bytes of a deflate stream changed size")
        return out


def deflate_piece(
    params: DeflateParams,
    payload: Payload,
    start: int,
    end: int,
    final: bool,
    deadline: Deadline = NEVER,
) -> Generator[bytes, None, None]:
    """The deflate stream of ``payload`` (with ``params``) from the checkpoint at
    ``start``, as a compressor primed with the window before ``start`` makes it:
    the bytes of the blocks up to ``end``, and more after them unless ``final``
    (the caller keeps what it knows to be the piece); ``final``: to the end of
    ``payload``, finished. Input goes in ``_PIECE_FEED`` pieces (deflate's output
    does not depend on how its input is split); ``deadline`` is checked before each."""
    window = max(0, start - (1 << params.window_bits))
    compressor = params.compressor(payload.read(window, start - window))
    stop = end if final else min(payload.size, end + PIECE_LOOKAHEAD)
    for pos in range(start, stop, _PIECE_FEED):
        deadline.check()
        out = compressor.compress(payload.read(pos, min(stop, pos + _PIECE_FEED) - pos))
        if out:
            yield out
    # Z_BLOCK ends the block in progress, so every bit before ``end`` is out.
    yield compressor.flush() if final else compressor.flush(zlib.Z_BLOCK)


_PIECE_FEED = 256 * 1024

#: Output of one piece that may wait, compressed, for the pieces before it to
#: be read. The writer's pieces (about 4 MiB inflated, ``SPLIT_PIECE``)
#: compress to less; a hostile form's pieces of any size then hold this
#: much each, not their whole output (``deflate_pieces``).
PIECE_HELD = 2 << 20


def _piece_stream(
    params: DeflateParams,
    payload: Payload,
    begin: Checkpoint,
    after: Checkpoint | None,
    deadline: Deadline,
) -> Generator[bytes, None, None]:
    """One piece of the stream (from ``begin`` to ``after``, None: to the end),
    as it is compressed. Raises ``ValueError`` if it is shorter than its
    checkpoints say."""
    if after is None:
        yield from deflate_piece(params, payload, begin.uncompressed, payload.size, True, deadline)
        return
    want = after.compressed - begin.compressed
    left = want
    pieces = deflate_piece(params, payload, begin.uncompressed, after.uncompressed, False, deadline)
    with contextlib.closing(pieces):
        for out in pieces:
            if len(out) >= left:
                yield out[:left]
                return  # the piece is complete: what follows belongs to the next one
            left -= len(out)
            yield out
    raise ValueError(f"a deflate piece gave {want - left} bytes, not {want}")


class _Handoff:
    """One piece's output on its way from the thread compressing it to the
    reader: at most ``limit`` bytes (and one chunk) wait at a time; the thread
    waits for room, and stops once the reader has given up (``close``)."""

    def __init__(self, limit: int) -> None:
        self._changed = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self._limit = limit
        self._filled = False
        self._closed = False

    def fill(self, chunks: Generator[bytes, None, None]) -> None:
        """Hand over ``chunks`` (in a worker thread); its errors are the caller's."""
        try:
            with contextlib.closing(chunks):
                for chunk in chunks:
                    with self._changed:
                        while self._held >= self._limit and not self._closed:
                            self._changed.wait()
                        if self._closed:
                            return
                        self._chunks.append(chunk)
                        self._held += len(chunk)
                        self._changed.notify_all()
        finally:
            with self._changed:
                self._filled = True
                self._changed.notify_all()

    def drain(self) -> Iterator[bytes]:
        """The chunks, in order, until ``fill`` has ended (by success or error)."""
        while True:
            with self._changed:
                while not self._chunks and not self._filled:
                    self._changed.wait()
                if not self._chunks:
                    return
                chunk = self._chunks.popleft()
                self._held -= len(chunk)
                self._changed.notify_all()
            yield chunk

    def close(self) -> None:
        """The reader gives up: ``fill`` stops at its next chunk."""
        with self._changed:
            self._closed = True
            self._chunks.clear()
            self._held = 0
            self._changed.notify_all()


def deflate_pieces(
    params: DeflateParams,
    payload: Payload,
    checkpoints: Sequence[Checkpoint],
    workers: int,
    deadline: Deadline = NEVER,
) -> Iterator[bytes]:
    """The deflate stream of ``payload`` with ``params``, its pieces between
    ``checkpoints`` (after the start, before the end, increasing) compressed by
    ``workers`` threads side by side (zlib releases the GIL) and given in order.

    Output is streamed: a piece waiting for the ones before it holds at most
    ``PIECE_HELD`` bytes, so however far apart a hostile form puts the
    checkpoints, memory stays bounded and the caller's size limit sees every
    byte as it comes. Raises ``ValueError`` if a piece comes out shorter than
    its checkpoints say, ``DecodeLimit`` once ``deadline`` has passed."""
    starts = [Checkpoint(0, 0), *checkpoints]
    ends: list[Checkpoint | None] = [*checkpoints, None]
    if workers <= 1:
        for begin, after in zip(starts, ends, strict=True):
            yield from _piece_stream(params, payload, begin, after, deadline)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="dgfs-piece")
    # Pieces run in the order they are submitted, so the one being read always
    # has a thread: the others may wait for room, it never waits for them.
    queue: deque[tuple[_Handoff, Future[None]]] = deque()
    try:
        for begin, after in zip(starts, ends, strict=True):
            handoff = _Handoff(PIECE_HELD)
            stream = _piece_stream(params, payload, begin, after, deadline)
            queue.append((handoff, pool.submit(handoff.fill, stream)))
            if len(queue) > workers:
                yield from _drained(*queue[0])
                queue.popleft()  # only now: ``finally`` closes a piece read in part
        while queue:
            yield from _drained(*queue[0])
            queue.popleft()
    finally:
        for handoff, _ in queue:
            handoff.close()
        pool.shutdown(wait=True, cancel_futures=True)


def _drained(handoff: _Handoff, filled: Future[None]) -> Iterator[bytes]:
    """A piece's output, then its error if compressing it failed."""
    yield from handoff.drain()
    filled.result()


class ZStream(ctypes.Structure):
    """zlib's ``z_stream`` (zlib.h), for ``inflate`` through ctypes."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


Z_OK, Z_STREAM_END, Z_BUF_ERROR, Z_BLOCK = 0, 1, -5, 5  # zlib.h


@cache
def _libz() -> ctypes.CDLL | None:
    """The zlib Python's own ``zlib`` runs (the same version), for ``inflate(Z_BLOCK)``."""
    name = ctypes.util.find_library("z")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.zlibVersion.restype = ctypes.c_char_p
    if lib.zlibVersion().decode() != zlib.ZLIB_RUNTIME_VERSION:
        return None
    return lib


class BlockInflate(NamedTuple):
    """What :func:`inflate_blocks` found."""

    compressed_length: int
    """0 if the bytes are not a whole deflate stream."""
    uncompressed_length: int
    checkpoints: list[Checkpoint]
    """Every byte-aligned block boundary inside the stream, in order."""


def inflate_blocks(
    src: BinaryIO,
    start: int,
    limit: int,
    sink: Callable[[bytes], object],
    on_inflate: Callable[[int], object] | None = None,
) -> BlockInflate | None:
    """Inflate the raw deflate stream at ``start`` of ``src`` (not past
    ``limit``) into ``sink``, noting its byte-aligned block boundaries; None
    when this process cannot load its zlib by ctypes. ``on_inflate`` as in
    :func:`match_deflate` (it may raise to stop a bomb)."""
    lib = _libz()
    if lib is None:
        return None
    strm = ZStream()
    if lib.inflateInit2_(ctypes.byref(strm), -15, lib.zlibVersion(), ctypes.sizeof(ZStream)):
        return None
    out = ctypes.create_string_buffer(_INFLATE_MAX)
    checkpoints: list[Checkpoint] = []
    consumed = produced = 0
    src.seek(start)
    held = ctypes.create_string_buffer(0)  # the input zlib points into
    stalled = 0  # calls in a row that moved nothing
    try:
        while True:
            if not strm.avail_in:
                want = min(_READ, limit - start - consumed)
                chunk = src.read(want) if want > 0 else b""
                if chunk:
                    held = ctypes.create_string_buffer(chunk, len(chunk))
                    strm.next_in = ctypes.addressof(held)
                    strm.avail_in = len(chunk)
                    consumed += len(chunk)
            strm.next_out = ctypes.addressof(out)
            strm.avail_out = _INFLATE_MAX
            before = strm.total_in
            rc = lib.inflate(ctypes.byref(strm), Z_BLOCK)
            size = _INFLATE_MAX - strm.avail_out
            # Out of input and nothing moves (a stream may end a call after
            # its last input byte): the stream is cut short.
            stalled = stalled + 1 if not size and strm.total_in == before else 0
            if stalled > 2:
                return BlockInflate(0, produced, [])
            if size:
                produced += size
                if on_inflate is not None:
                    on_inflate(size)
                sink(ctypes.string_at(ctypes.addressof(out), size))
            if rc == Z_STREAM_END:
                return BlockInflate(strm.total_in, produced, checkpoints)
            if rc not in (Z_OK, Z_BUF_ERROR):
                return BlockInflate(0, produced, [])
            # Stopped right after a block's end code (128), not inside the
            # last block (64), with no bits of the last byte left (& 7).
            if strm.data_type & 0xC7 == 128 and (
                not checkpoints or checkpoints[-1].uncompressed != produced
            ):
                checkpoints.append(Checkpoint(strm.total_in, produced))
    finally:
        lib.inflateEnd(ctypes.byref(strm))
