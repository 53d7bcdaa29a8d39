"""Experiment (issue 20): can one level-9 deflate stream be rebuilt in parallel, bit for bit?

A ``.tar.gz`` is a single deflate stream, so a deep cold read re-deflates
its whole content on one core. This script measures whether independent
zlib compressors, each started at a deflate block boundary of the original
stream with the 32 KiB before it as a preset dictionary (``zdict``), give
back exactly the original's bits for their segment, so that segments could
be compressed side by side and spliced at the bit level:

    .venv/bin/python benchmarks/parallel_deflate.py [FILE.tar.gz ...] [--segments 8]

For each gzip file (default: the Django sdists of ``benchmarks/series.py``)
it

1. inflates the stream with ``inflate(Z_BLOCK)`` (system zlib through
   ctypes: Python's ``zlib`` cannot stop at blocks) and records every
   block boundary: its bit offset in the stream and its offset in the
   content;
2. for every boundary (or ``--sample`` of them), compresses the content from
   there to the next boundary with a fresh level-9 compressor primed with
   the 32 KiB before it, ends the block with ``Z_BLOCK``, and compares the
   bits with the original's; and reports how many boundaries reproduce;
3. splits the content into ``--segments`` pieces at reproducing boundaries,
   compresses them in a thread pool (zlib releases the GIL), splices them,
   and compares the whole stream and the wall and CPU seconds with one
   serial compression.

zlib's state at a block boundary is the window, the hash chains built from
it, and the lazy-match state. With level 9 (``deflate_slow``) every
position is inserted in the hash chains, so the dictionary rebuilds them;
the lazy state is fresh only when the block ended on a match. A block that
ended on a literal leaves a pending literal whose match search used the
previous match's length (``best_len = prev_length``, chain cut past
``good_match``): the fresh compressor's search could differ there.

Measured on Django 4.2.1-4.2.3 (the first version of this script): 98% of
all block boundaries reproduce the next block; the 2% that do not are
stored blocks, whose padding to a byte depends on the bit a compressor
starts at; every boundary on a byte boundary (73-87 of ~400 per file)
reproduces, and so do whole segments between such boundaries. dgfs builds
on it: SPLIT segments (docs/FORMAT.md), whose pieces the writer compares
with the original before it writes one.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # dgfs and benchmarks/ from this tree

from dgfs.deep.deflate import Z_BLOCK, Z_BUF_ERROR, Z_OK, Z_STREAM_END, ZStream  # noqa: E402

WINDOW = 32768


def _libz() -> ctypes.CDLL:
    name = ctypes.util.find_library("z")
    if name is None:
        raise SystemExit("libz not found")
    lib = ctypes.CDLL(name)
    lib.zlibVersion.restype = ctypes.c_char_p
    if lib.zlibVersion().decode() != zlib.ZLIB_RUNTIME_VERSION:
        raise SystemExit("ctypes found another zlib than Python's")
    return lib


def gzip_body(data: bytes) -> int:
    """Offset of the deflate stream in a gzip file (FNAME/FEXTRA/FCOMMENT handled)."""
    flags = data[3]
    pos = 10
    if flags & 4:
        pos += 2 + int.from_bytes(data[pos : pos + 2], "little")
    for bit in (8, 16):
        if flags & bit:
            pos = data.index(b"\0", pos) + 1
    return pos + (2 if flags & 2 else 0)


def block_boundaries(stream: bytes) -> tuple[bytes, list[tuple[int, int]]]:
    """The content of the raw deflate ``stream`` and its block boundaries:
    ``(bit offset in the stream, offset in the content)``, the stream's end included."""
    lib = _libz()
    strm = ZStream()
    version = lib.zlibVersion()
    if lib.inflateInit2_(ctypes.byref(strm), -15, version, ctypes.sizeof(ZStream)) != Z_OK:
        raise SystemExit("inflateInit2 failed")
    src = ctypes.create_string_buffer(stream, len(stream))
    out_size = 1 << 20
    out = ctypes.create_string_buffer(out_size)
    strm.next_in = ctypes.addressof(src)
    strm.avail_in = len(stream)
    content = bytearray()
    bounds: list[tuple[int, int]] = [(0, 0)]
    while True:
        strm.next_out = ctypes.addressof(out)
        strm.avail_out = out_size
        rc = lib.inflate(ctypes.byref(strm), Z_BLOCK)
        content += out.raw[: out_size - strm.avail_out]
        if rc == Z_STREAM_END:
            bounds.append((strm.total_in * 8, len(content)))
            break
        if rc not in (Z_OK, Z_BUF_ERROR):
            raise SystemExit(f"inflate failed: {rc}")
        # At a block's end inflate stops with data_type & 128; its low 3 bits
        # are the bits of the last input byte not used yet.
        if strm.data_type & 128 and not strm.data_type & 64:
            bit = strm.total_in * 8 - (strm.data_type & 7)
            if bit != bounds[-1][0]:
                bounds.append((bit, len(content)))
    lib.inflateEnd(ctypes.byref(strm))
    return bytes(content), bounds


def segment_bits(content: bytes, start: int, end: int, final: bool) -> tuple[int, int]:
    """``content[start:end]`` deflated at level 9 by a fresh compressor primed
    with the 32 KiB before ``start``: its bits as an int (LSB first), and how many
    bytes of output (an upper bound of its bits / 8)."""
    zdict = content[max(0, start - WINDOW) : start]
    comp = (
        zlib.compressobj(9, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, zdict=zdict)
        if zdict
        else zlib.compressobj(9, zlib.DEFLATED, -15)
    )
    if final:
        out = comp.compress(content[start:end]) + comp.flush(zlib.Z_FINISH)
    else:
        # Past ``end`` too, so zlib has its look-ahead there as the original had;
        # the symbols after ``end`` stay in the next block, which Z_BLOCK ends.
        out = comp.compress(content[start : end + 4096]) + comp.flush(zlib.Z_BLOCK)
    return int.from_bytes(out, "little"), len(out)


def original_bits(stream_int: int, start_bit: int, end_bit: int) -> int:
    return (stream_int >> start_bit) & ((1 << (end_bit - start_bit)) - 1)


def reproduces(
    content: bytes, stream_int: int, bounds: list[tuple[int, int]], i: int, j: int
) -> bool:
    """Whether a fresh compressor at boundary ``i`` gives the original's bits
    up to boundary ``j``."""
    (start_bit, start), (end_bit, end) = bounds[i], bounds[j]
    final = j == len(bounds) - 1
    bits, _ = segment_bits(content, start, end, final)
    width = end_bit - start_bit
    return bits & ((1 << width) - 1) == original_bits(stream_int, start_bit, end_bit)


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def measure(path: Path, segments: int, sample: int) -> None:
    data = path.read_bytes()
    body = gzip_body(data)
    stream = data[body:-8]
    t = time.perf_counter()
    content, bounds = block_boundaries(stream)
    print(
        f"{path.name}: {len(stream) / 1e6:.1f} MB stream, {len(content) / 1e6:.1f} MB content,"
        f" {len(bounds) - 2} block boundaries (found in {time.perf_counter() - t:.2f} s)"
    )
    stream_int = int.from_bytes(stream, "little")
    inner = list(range(1, len(bounds) - 1))
    step = max(1, len(inner) // sample) if sample else 1
    tried = inner[::step]
    good = [i for i in tried if reproduces(content, stream_int, bounds, i, i + 1)]
    print(
        f"  boundaries where a fresh compressor reproduces the next block: {len(good)} of"
        f" {len(tried)} tried ({100 * len(good) / max(1, len(tried)):.0f}%)"
    )
    # A stored block pads to a byte boundary: its bits depend on where in a
    # byte the compressor stands. A compressor started at bit 0 of a byte
    # stands where the original did only at boundaries on a byte boundary.
    aligned = [i for i in inner if bounds[i][0] % 8 == 0]
    aligned_good = [i for i in aligned if reproduces(content, stream_int, bounds, i, i + 1)]
    print(
        f"  boundaries on a byte boundary: {len(aligned)}; the next block reproduced from"
        f" {len(aligned_good)} of them"
    )
    # Checkpoints: the byte-aligned boundary nearest each 1/segments of the content.
    checkpoints = [0]
    for k in range(1, segments):
        target = len(content) * k // segments
        near = min(aligned, key=lambda i: abs(bounds[i][1] - target), default=None)
        if near is not None and near > checkpoints[-1]:
            checkpoints.append(near)
    checkpoints.append(len(bounds) - 1)
    held = [
        reproduces(content, stream_int, bounds, i, j)
        for i, j in zip(checkpoints, checkpoints[1:], strict=False)
    ]
    print(f"  segments between checkpoints reproduced whole: {sum(held)} of {len(held)}")

    c, w = cpu(), time.perf_counter()
    serial = zlib.compressobj(9, zlib.DEFLATED, -15)
    whole = serial.compress(content) + serial.flush()
    serial_cpu, serial_wall = cpu() - c, time.perf_counter() - w
    print(
        f"  one compressor: {serial_cpu:.2f} CPU s, {serial_wall:.2f} s; equal: {whole == stream}"
    )

    def piece(k: int) -> int:
        i, j = checkpoints[k], checkpoints[k + 1]
        bits, _ = segment_bits(content, bounds[i][1], bounds[j][1], j == len(bounds) - 1)
        return bits & ((1 << (bounds[j][0] - bounds[i][0])) - 1)

    for workers in (1, 2):
        c, w = cpu(), time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            pieces = list(pool.map(piece, range(len(checkpoints) - 1)))
        spliced = 0
        for k, bits in enumerate(pieces):
            spliced |= bits << bounds[checkpoints[k]][0]
        rebuilt = spliced.to_bytes(len(stream), "little")
        print(
            f"  {len(checkpoints) - 1} segments, {workers} thread(s): {cpu() - c:.2f} CPU s,"
            f" {time.perf_counter() - w:.2f} s; equal: {rebuilt == stream}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--count", type=int, default=2, help="sdists of the series (default 2)")
    parser.add_argument(
        "--sample", type=int, default=200, help="boundaries tried per file (0: every one)"
    )
    args = parser.parse_args()
    files = args.files
    if not files:
        from benchmarks.series import all_series

        files = {s.name: s for s in all_series(count=args.count)}["sdists"].paths
    for path in files:
        measure(path, args.segments, args.sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
