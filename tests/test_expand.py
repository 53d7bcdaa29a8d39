"""The expanded form (dgfs.deep): exact re-deflation, expansion and rebuild.

The property everything rests on: for every input ``x``,
``rebuild(expand(x)) == x`` byte for byte, and expansion never raises,
whatever ``x`` holds. The corpus is synthetic and deterministic (seeded
``random``), small enough for the whole file to run in about ten seconds.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import random
import struct
import subprocess
import tarfile
import tempfile
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgfs.deep import expand, gnuzip, proof, recompress, search, segments
from dgfs.deep.deflate import (
    CANDIDATES,
    DeflateParams,
    deflate_chunks,
    match_deflate,
    zlib_is_reference,
)
from dgfs.deep.expand import (
    MAGIC,
    MAX_DEPTH,
    ExpandStats,
    ExpansionLimits,
    expand_file,
    plain_form,
    rebuild_chunks,
    rebuild_digest,
    rebuild_file,
)
from dgfs.deep.memo import Memo
from dgfs.deep.segments import RAW_CHUNK
from dgfs.errors import DecodeLimit, DeltaEngineError, DgfsError, FormatError

GNU_GZIP = "/bin/gzip"
needs_zgz = pytest.mark.skipif(gnuzip.zgz_path() is None, reason="zgz (pristine-tar) not installed")

# --- corpus ------------------------------------------------------------------------------


def text(size: int, seed: int = 0) -> bytes:
    """Compressible, text-like bytes: lines of Zipf-distributed words, some repeated."""
    rng = random.Random(seed)
    letters = b"abcdefghijklmnopqrstuvwxyz"
    words = [bytes(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(300)]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    lines: list[bytes] = []
    out = bytearray()
    while len(out) < size:
        if lines and rng.random() < 0.3:
            line = rng.choice(lines)  # repeated lines, as in code and logs
        else:
            line = b" ".join(rng.choices(words, weights, k=rng.randint(3, 12))) + b"\n"
            lines.append(line)
        out += line
    return bytes(out[:size])


def json_lines() -> bytes:
    """~260 KB of JSON lines whose GNU gzip -6 stream no zlib setting reproduces."""
    rng = random.Random(5)
    return b"\n".join(
        b'{"id": %d, "name": "item%d", "value": %f}' % (i, rng.randint(0, 10**6), rng.random())
        for i in range(5000)
    )


def raw_deflate(
    payload: bytes,
    level: int = 6,
    *,
    mem_level: int = 8,
    wbits: int = 15,
    strategy: int = zlib.Z_DEFAULT_STRATEGY,
) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level, strategy)
    return compressor.compress(payload) + compressor.flush()


def gzip_member(
    payload: bytes,
    body: bytes | None = None,
    *,
    level: int = 9,
    fname: bytes | None = None,
    fextra: bytes | None = None,
    fcomment: bytes | None = None,
    fhcrc: bool = False,
    flags: int = 0,
    xfl: int | None = None,
) -> bytes:
    """One gzip member with a hand-written header (RFC 1952) around ``body``
    (by default zlib's raw deflate of ``payload`` at ``level``)."""
    if fhcrc:
        flags |= 0x02
    if fextra is not None:
        flags |= 0x04
    if fname is not None:
        flags |= 0x08
    if fcomment is not None:
        flags |= 0x10
    header = bytearray(b"\x1f\x8b\x08" + bytes((flags,)) + struct.pack("<I", 1_700_000_000))
    if xfl is None:
        xfl = {9: 2, 1: 4}.get(level, 0)  # as zlib's gzip writer sets it
    header += bytes((xfl, 3))  # XFL, OS = Unix
    if fextra is not None:
        header += struct.pack("<H", len(fextra)) + fextra
    if fname is not None:
        header += fname + b"\0"
    if fcomment is not None:
        header += fcomment + b"\0"
    if fhcrc:
        header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    if body is None:
        body = raw_deflate(payload, level)
    trailer = struct.pack("<II", zlib.crc32(payload), len(payload) & 0xFFFFFFFF)
    return bytes(header) + body + trailer


def gnu_gzip(payload: bytes, level: int) -> bytes:
    return subprocess.run(
        [GNU_GZIP, f"-{level}", "-n", "-c"], input=payload, capture_output=True, check=True
    ).stdout


Member = tuple[str, bytes, int, int | None]  # name, data, compress_type, compresslevel


def zip_entries(zf: zipfile.ZipFile, members: list[Member], *, force_zip64: bool = False) -> None:
    for name, data, compress_type, level in members:
        info = zipfile.ZipInfo(name, date_time=(2024, 1, 2, 3, 4, 6))
        info.compress_type = compress_type
        info.external_attr = 0o644 << 16
        if force_zip64:
            info.file_size = len(data)
            with zf.open(info, "w", force_zip64=True) as dest:
                dest.write(data)
        else:
            zf.writestr(info, data, compresslevel=level)


def make_zip(members: list[Member], *, force_zip64: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zip_entries(zf, members, force_zip64=force_zip64)
    return buf.getvalue()


class Unseekable(io.RawIOBase):
    """A write-only stream zipfile cannot seek back in, so it writes data descriptors."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return self.buf.write(data)


def make_streamed_zip(members: list[Member], *, force_zip64: bool = False) -> bytes:
    stream = Unseekable()
    with zipfile.ZipFile(stream, "w") as zf:
        zip_entries(zf, members, force_zip64=force_zip64)
    return stream.buf.getvalue()


def hand_zip(entries: list[tuple[bytes, int, int, bytes, bytes, bytes]]) -> bytes:
    """A zip written byte by byte: ``(name, method, flags, data, descriptor, plain)``.

    Sizes and CRC go in the local header unless ``flags`` has bit 3, in which
    case ``descriptor`` (the bytes after the data) carries them.
    """
    out = bytearray()
    central = bytearray()
    for name, method, flags, data, descriptor, plain in entries:
        crc, csize, usize = zlib.crc32(plain), len(data), len(plain)
        offset = len(out)
        sizes = (0, 0, 0) if flags & 0x08 else (crc, csize, usize)
        out += b"PK\x03\x04" + struct.pack(
            "<HHHHHIIIHH", 20, flags, method, 0, 0x21, *sizes, len(name), 0
        )
        out += name + data + descriptor
        central += b"PK\x01\x02"
        central += struct.pack("<HHHHHHIII", 20, 20, flags, method, 0, 0x21, crc, csize, usize)
        central += struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, offset)
        central += name
    start = len(out)
    out += central
    out += b"PK\x05\x06" + struct.pack(
        "<HHHHIIH", 0, 0, len(entries), len(entries), len(central), start, 0
    )
    return bytes(out)


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def nested_war() -> tuple[bytes, int]:
    """A war holding jars and .gz files, stored and deflated, and how many
    deflate streams (at every depth) zlib made in it."""
    jar = make_zip(
        [
            ("a/A.class", text(3000, 1), zipfile.ZIP_DEFLATED, 6),
            ("a/B.class", text(4000, 2), zipfile.ZIP_DEFLATED, 6),
            ("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\r\n", zipfile.ZIP_STORED, None),
        ]
    )  # 2 streams
    gz = gzip_member(text(5000, 3), level=9)  # 1 stream
    war = make_zip(
        [
            ("WEB-INF/lib/stored.jar", jar, zipfile.ZIP_STORED, None),  # 2
            ("WEB-INF/lib/deflated.jar", jar, zipfile.ZIP_DEFLATED, 6),  # 1 + 2
            ("static/data.json.gz", gz, zipfile.ZIP_STORED, None),  # 1
            ("static/other.json.gz", gz, zipfile.ZIP_DEFLATED, 6),  # 1 + 1
            ("index.html", text(2000, 4), zipfile.ZIP_DEFLATED, 6),  # 1
        ]
    )
    return war, 9


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_memos() -> None:
    """Each test starts without streams proven by another."""
    expand.VERIFIED_SPANS.clear()
    expand.REBUILT_SUBTREES.clear()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def round_trip(tmp: Path, data: bytes, name: str = "input.bin") -> tuple[ExpandStats, bytes]:
    """Expand ``data`` (as a file called ``name``), rebuild it, check every byte;
    returns the stats and the expanded form."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    scratch = work / "scratch"
    scratch.mkdir()
    src = work / name
    src.write_bytes(data)
    expanded = work / (name + ".dgx")
    stats = expand_file(src, expanded, scratch_dir=scratch)
    rebuilt = work / "rebuilt"
    digest, size = rebuild_file(expanded, rebuilt, scratch)
    assert rebuilt.read_bytes() == data
    assert (digest, size) == (sha256(data), len(data))
    assert rebuild_digest(expanded, scratch) == (digest, size)
    assert rebuild_digest(expanded, scratch, workers=3) == (digest, size)
    assert expand.prove_form(expanded, src, stats.proven)
    assert expand.prove_form(expanded, src, stats.proven, stats.leaves)
    if stats.streams_inflated:
        assert not expand.prove_form(expanded, src, set()), "proven without the search's word"
        assert not expand.prove_form(expanded, src, set(), {}), "proven without the search's word"
    assert stats.original_size == len(data)
    assert stats.expanded_size == expanded.stat().st_size
    assert list(scratch.iterdir()) == [], "scratch files left behind"
    form = expanded.read_bytes()
    tags = segment_tags(form)
    assert len(tags) == stats.streams_inflated
    assert sum(1 for tag, _ in tags if tag == expand.TAG_GNU) == stats.streams_gnu
    return stats, form


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def segment_tags(form: bytes) -> list[tuple[int, int]]:
    """``(tag, depth)`` of every DEFLATE, GNU and SPLIT segment of an expanded form,
    read straight from the grammar in the module docstring."""
    assert form.startswith(MAGIC)
    pos, depth, found = len(MAGIC), 0, []
    while True:
        tag = form[pos]
        pos += 1
        if tag == expand.TAG_END:
            if depth == 0:
                break
            depth -= 1
        elif tag == expand.TAG_RAW:
            length, pos = read_varint(form, pos)
            assert length > 0, "empty RAW segment written"
            pos += length
        elif tag == expand.TAG_DEFLATE:
            DeflateParams.unpack(form[pos : pos + 4])
            found.append((tag, depth))
            pos, depth = pos + 4, depth + 1
        elif tag == expand.TAG_GNU:
            assert 1 <= form[pos] <= 9
            found.append((tag, depth))
            pos, depth = pos + 1, depth + 1
        elif tag == expand.TAG_SPLIT:
            DeflateParams.unpack(form[pos : pos + 4])
            count, pos = read_varint(form, pos + 4)
            for _ in range(2 * count):
                _, pos = read_varint(form, pos)
            found.append((tag, depth))
            depth += 1
        else:
            raise AssertionError(f"unknown tag {tag} at {pos - 1}")
    assert pos == len(form), "bytes after the final END"
    return found


def raw_content(form: bytes) -> bytes:
    """The RAW bytes of a form that has no DEFLATE or GNU segment."""
    assert segment_tags(form) == []
    pos, out = len(MAGIC), bytearray()
    while form[pos] == expand.TAG_RAW:
        length, pos = read_varint(form, pos + 1)
        out += form[pos : pos + length]
        pos += length
    assert form[pos:] == b"\x00"
    return bytes(out)


def expand_bytes(tmp: Path, data: bytes) -> bytes:
    return round_trip(tmp, data)[1]


# --- the corpus, round trip by round trip ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty", b""),
        ("one-byte", b"\x1f"),
        ("random.bin", random.Random(1).randbytes(50_000)),
        ("random.zip", random.Random(2).randbytes(20_000)),
        ("fake.tar.gz", b"this is not gzip at all\n" * 500),
        ("notes.txt", text(30_000, 5)),
        ("magic-only.gz", b"\x1f\x8b\x08"),
        ("local-header-only.zip", b"PK\x03\x04"),
        ("zeros.gz", b"\x1f\x8b\x08" + bytes(5000)),
        ("pk-soup.zip", (b"PK\x03\x04" + bytes(26)) * 50),
    ],
)
def test_non_archives_are_copied_as_they_are(tmp_path: Path, name: str, data: bytes) -> None:
    stats, form = round_trip(tmp_path, data, name)
    assert stats.streams_inflated == 0
    assert raw_content(form) == data
    (tmp_path / "src").write_bytes(data)
    plain_form(tmp_path / "src", tmp_path / "plain")
    plain = (tmp_path / "plain").read_bytes()
    assert raw_content(plain) == data
    if expand.nested_kind(data[:4]) is None:
        assert form == plain  # nothing recognised: byte for byte the plain form


def test_empty_file_expands_to_magic_and_end(tmp_path: Path) -> None:
    _, form = round_trip(tmp_path, b"")
    assert form == MAGIC + b"\x00"


def test_random_file_larger_than_one_raw_segment(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(expand.RAW_CHUNK + 12_345)
    stats, form = round_trip(tmp_path, data)
    assert stats.streams_inflated == 0
    assert 0 < stats.expanded_size - stats.original_size < 64


@pytest.mark.parametrize("level", [1, 6, 9])
def test_python_gzip_is_inflated(tmp_path: Path, level: int) -> None:
    payload = text(100_000, level)
    # The levels give different streams, so the one found is the one used.
    assert len({raw_deflate(payload, lv) for lv in (1, 6, 9)}) == 3
    data = gzip.compress(payload, compresslevel=level, mtime=0)
    stats, form = round_trip(tmp_path, data, "doc.txt.gz")
    assert (stats.streams_inflated, stats.streams_kept, stats.streams_gnu) == (1, 0, 0)
    assert stats.inflated_bytes == len(payload)
    assert stats.params_seen == {DeflateParams(level): 1}
    assert payload in form  # the text itself, verbatim
    assert stats.expanded_size > 3 * stats.original_size


def test_gzip_of_empty_payload(tmp_path: Path) -> None:
    stats, _ = round_trip(tmp_path, gzip.compress(b"", mtime=0), "empty.gz")
    assert stats.streams_inflated == 1
    assert stats.inflated_bytes == 0


def test_tar_gz_expansion_holds_the_tar_verbatim(tmp_path: Path) -> None:
    marker = b"MARKER-dgfs-7f3a9c-in-the-tar"
    tar = tar_bytes(
        {
            "pkg-1.0/README": text(20_000, 6),
            "pkg-1.0/marker.txt": marker + b"\n" + text(3000, 7),
            "pkg-1.0/setup.py": b"from setuptools import setup\nsetup()\n",
        }
    )
    data = gzip.compress(tar, compresslevel=9, mtime=0)
    assert marker not in data
    stats, form = round_trip(tmp_path, data, "pkg-1.0.tar.gz")
    assert stats.streams_inflated == 1
    payloads = raw_payloads(form)
    assert tar in b"".join(payloads)
    # Cut where each member starts and its data ends (dgfs.deep.spans finds them).
    assert len(payloads) >= 2 * 3
    assert stats.expanded_size > 3 * stats.original_size


def raw_payloads(form: bytes) -> list[bytes]:
    """The bytes of every RAW segment of an expanded form, in order."""
    reader = segments.Reader(io.BytesIO(form[len(expand.MAGIC) :]))
    payloads = []
    while tag := reader.src.read(1):
        if tag[0] == segments.TAG_RAW:
            payloads.append(b"".join(reader.segment(tag[0])))
        elif tag[0] in segments.COMPRESSING:
            reader.skip_header(tag[0])
    return payloads


def test_multi_member_gzip_with_zero_padding(tmp_path: Path) -> None:
    first, second = text(20_000, 8), text(15_000, 9)
    data = (
        gzip.compress(first, compresslevel=9, mtime=0)
        + gzip.compress(second, compresslevel=6, mtime=0)
        + bytes(512)
    )
    assert gzip.decompress(data[:-512]) == first + second
    stats, form = round_trip(tmp_path, data, "multi.gz")
    assert stats.streams_inflated == 2
    assert stats.inflated_bytes == len(first) + len(second)
    assert first in form and second in form
    assert form.endswith(bytes(512) + b"\x00")  # the padding, raw, then END


@pytest.mark.parametrize(
    "fields",
    [
        {"fname": b"report.txt"},
        {"fextra": b"AB\x04\x00wxyz"},
        {"fcomment": b"made by hand"},
        {"fhcrc": True},
        {"fname": b"r.txt", "fextra": b"\x00" * 300, "fcomment": b"c" * 5000, "fhcrc": True},
    ],
    ids=["fname", "fextra", "fcomment", "fhcrc", "all"],
)
def test_gzip_header_fields(tmp_path: Path, fields: dict[str, Any]) -> None:
    payload = text(40_000, 10)
    data = gzip_member(payload, level=9, **fields)
    assert gzip.decompress(data) == payload
    stats, form = round_trip(tmp_path, data, "fields.gz")
    assert (stats.streams_inflated, stats.streams_kept) == (1, 0)
    assert payload in form


@pytest.mark.parametrize(
    ("xfl", "level"),
    [(2, 9), (4, 1), (0, 6), (4, 9), (2, 1), (0, 9), (2, 6), (0xFF, 6)],
    ids=["slowest-9", "fastest-1", "none-6", "lie-4-9", "lie-2-1", "lie-0-9", "lie-2-6", "junk"],
)
def test_gzip_xfl_prior_right_or_wrong(tmp_path: Path, xfl: int, level: int) -> None:
    """The XFL byte only orders the search: a header that lies costs time, not bytes."""
    payload = text(30_000, 17)
    data = gzip_member(payload, level=level, xfl=xfl)
    stats, _ = round_trip(tmp_path, data, "prior.gz")
    assert (stats.streams_inflated, stats.streams_kept) == (1, 0)
    assert stats.params_seen == {DeflateParams(level): 1}


@pytest.mark.parametrize("flags", [0x00, 0x02, 0x04, 0x06])
@pytest.mark.parametrize("level", [1, 6, 9])
def test_zip_flag_prior_right_or_wrong(tmp_path: Path, flags: int, level: int) -> None:
    """Zip flag bits 1-2 (normal, maximum, fast, superfast) only order the search."""
    plain = text(30_000, 18)
    body = raw_deflate(plain, level)
    data = hand_zip([(b"a.txt", 8, flags, body, b"", plain)])
    stats, _ = round_trip(tmp_path, data, "prior.zip")
    assert (stats.streams_inflated, stats.streams_kept) == (1, 0)
    assert stats.params_seen == {DeflateParams(level): 1}


def test_gzip_with_reserved_flags_is_kept(tmp_path: Path) -> None:
    data = gzip_member(text(10_000, 11), flags=0x20)
    stats, _ = round_trip(tmp_path, data, "reserved.gz")
    assert stats.streams_inflated == 0


@pytest.mark.parametrize(
    "options",
    [
        {"mem_level": 3},
        {"strategy": zlib.Z_HUFFMAN_ONLY},
        {"strategy": zlib.Z_FIXED},
        {"strategy": zlib.Z_RLE},
        {"wbits": 10},
    ],
    ids=["memLevel3", "huffman-only", "fixed", "rle", "window10"],
)
def test_unreproducible_stream_is_kept(tmp_path: Path, options: dict[str, int]) -> None:
    payload = text(60_000, 12)
    body = raw_deflate(payload, 6, **options)
    data = gzip_member(payload, body)
    assert gzip.decompress(data) == payload
    stats, form = round_trip(tmp_path, data, "odd.gz")
    assert (stats.streams_inflated, stats.streams_kept) == (0, 1)
    assert body in form  # kept compressed, as it is


def test_gnu_gzip_is_expanded_via_zgz(tmp_path: Path) -> None:
    payload = json_lines()
    data = gnu_gzip(payload, 6)
    assert gzip.decompress(data) == payload
    # zlib alone cannot make this stream...
    found = match_deflate(io.BytesIO(data), 10, len(data), None)
    assert found.params is None and found.compressed_length == len(data) - 18
    stats, form = round_trip(tmp_path, data, "items.json.gz")
    assert (stats.streams_inflated, stats.streams_kept) == (1, 0)
    if gnuzip.zgz_path() is not None:
        # ...GNU gzip's compressor, through zgz, does.
        assert stats.streams_gnu == 1
        assert segment_tags(form) == [(expand.TAG_GNU, 0)]
        assert payload in form


@pytest.mark.parametrize("level", [6, 9])
def test_gnu_gzip_round_trip(tmp_path: Path, level: int) -> None:
    for payload in (text(150_000, 13), json_lines()):
        data = gnu_gzip(payload, level)
        stats, form = round_trip(tmp_path, data, "gnu.gz")
        assert stats.streams_kept + stats.streams_inflated == 1
        if gnuzip.zgz_path() is not None:
            assert stats.streams_inflated == 1
            assert payload in form


def test_gnu_stream_is_kept_without_zgz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gnuzip, "zgz_path", lambda: None)
    data = gnu_gzip(json_lines(), 6)
    stats, _ = round_trip(tmp_path, data, "items.json.gz")
    assert (stats.streams_inflated, stats.streams_kept, stats.streams_gnu) == (0, 1, 0)


@needs_zgz
def test_gnu_segment_cannot_be_rebuilt_without_zgz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = gnu_gzip(json_lines(), 6)
    _, form = round_trip(tmp_path, data, "items.json.gz")
    (tmp_path / "form").write_bytes(form)
    monkeypatch.setattr(gnuzip, "zgz_path", lambda: None)
    expand.REBUILT_SUBTREES.clear()  # (a rebuild remembered here would still serve)
    with pytest.raises(DeltaEngineError, match="pristine-tar"):
        rebuild_file(tmp_path / "form", tmp_path / "out", tmp_path)


def test_truncated_gzip(tmp_path: Path) -> None:
    payload = text(50_000, 14)
    data = gzip_member(payload, fname=b"cut.txt", fcomment=b"comment")
    header = data.index(b"comment\0") + len(b"comment\0")
    cuts = [1, 3, 5, 10, 14, header - 3, header, header + 1, len(data) // 2]
    cuts += [len(data) - 9, len(data) - 8, len(data) - 4, len(data) - 1]
    for cut in cuts:
        stats, _ = round_trip(tmp_path, data[:cut], "cut.gz")
        # A stream that does not end is never inflated (it could not be recompressed).
        assert stats.streams_inflated == (1 if cut >= len(data) - 8 else 0), cut


def test_corrupt_gzip(tmp_path: Path) -> None:
    payload = text(50_000, 15)
    data = gzip.compress(payload, compresslevel=9, mtime=0)
    for offset in (11, 100, len(data) // 2, len(data) - 20, len(data) - 5):
        corrupt = bytearray(data)
        corrupt[offset] ^= 0x55
        round_trip(tmp_path, bytes(corrupt), "corrupt.gz")


def test_gzip_nested_deeper_than_max_depth(tmp_path: Path) -> None:
    data = text(5000, 16)
    for _ in range(MAX_DEPTH + 3):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    stats, form = round_trip(tmp_path, data, "deep.gz")
    assert 2 <= stats.streams_inflated <= MAX_DEPTH + 1
    assert max(depth for _, depth in segment_tags(form)) == stats.streams_inflated - 1


# --- zip -----------------------------------------------------------------------------------


def mixed_zip_members() -> list[Member]:
    return [
        ("stored.txt", text(5000, 20), zipfile.ZIP_STORED, None),
        ("l6.txt", text(20_000, 21), zipfile.ZIP_DEFLATED, 6),
        ("l9.txt", text(20_000, 22), zipfile.ZIP_DEFLATED, 9),
        ("l1.txt", text(20_000, 23), zipfile.ZIP_DEFLATED, 1),
        ("empty.txt", b"", zipfile.ZIP_DEFLATED, 6),
        ("random.bin", random.Random(24).randbytes(3000), zipfile.ZIP_DEFLATED, 6),
        ("stored-random.bin", random.Random(25).randbytes(3000), zipfile.ZIP_STORED, None),
        ("l6b.txt", text(8000, 26), zipfile.ZIP_DEFLATED, 6),
    ]


def test_zip_with_stored_and_deflated_members(tmp_path: Path) -> None:
    members = mixed_zip_members()
    data = make_zip(members)
    stats, form = round_trip(tmp_path, data, "mixed.zip")
    deflated = [m for m in members if m[2] == zipfile.ZIP_DEFLATED]
    assert (stats.streams_inflated, stats.streams_kept) == (len(deflated), 0)
    for _, body, _, _ in deflated:
        assert body in form
    assert set(stats.params_seen) >= {DeflateParams(1), DeflateParams(9)}


def test_nested_archives_in_a_war(tmp_path: Path) -> None:
    war, streams = nested_war()
    stats, form = round_trip(tmp_path, war, "app.war")
    assert (stats.streams_inflated, stats.streams_kept) == (streams, 0)
    depths = [depth for _, depth in segment_tags(form)]
    # deflated.jar's two members and other.json.gz's member sit inside a DEFLATE segment.
    assert depths.count(1) == 3
    assert text(3000, 1) in form and text(5000, 3) in form


def test_small_nested_archives_are_expanded_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A botocore wheel holds ~800 .json.gz members: a scratch file each cost
    0.05 of a warm expansion's 0.37 CPU seconds."""
    scratch_files: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def counted(*args: Any, **kwargs: Any) -> Any:
        scratch_files.append(kwargs.get("suffix", ""))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(expand.tempfile, "mkstemp", counted)
    war, streams = nested_war()
    stats, _ = round_trip(tmp_path, war, "app.war")
    assert stats.streams_inflated == streams
    assert ".nested" not in scratch_files


def test_zip_with_data_descriptors(tmp_path: Path) -> None:
    members: list[Member] = [
        ("a.txt", text(10_000, 30), zipfile.ZIP_DEFLATED, 6),
        ("b.txt", text(10_000, 31), zipfile.ZIP_DEFLATED, 9),
        ("c.gz", gzip.compress(text(6000, 32), mtime=0), zipfile.ZIP_DEFLATED, 6),
        ("d.txt", b"", zipfile.ZIP_DEFLATED, 6),
    ]
    data = make_streamed_zip(members)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert all(info.flag_bits & 0x08 for info in zf.infolist())
        assert zf.read("b.txt") == text(10_000, 31)
    stats, form = round_trip(tmp_path, data, "streamed.zip")
    assert (stats.streams_inflated, stats.streams_kept) == (5, 0)  # 4 members + the nested gzip
    assert text(10_000, 31) in form and text(6000, 32) in form


def test_zip_with_data_descriptors_and_a_stored_member(tmp_path: Path) -> None:
    members: list[Member] = [
        ("a.txt", text(10_000, 33), zipfile.ZIP_DEFLATED, 6),
        ("s.txt", text(1000, 34), zipfile.ZIP_STORED, None),
        ("b.txt", text(10_000, 35), zipfile.ZIP_DEFLATED, 6),
    ]
    stats, form = round_trip(tmp_path, make_streamed_zip(members), "streamed.zip")
    # The stored member's size is only in its descriptor: at least what comes before it
    # is expanded, and the rest is kept exactly.
    assert stats.streams_inflated >= 1
    assert text(10_000, 33) in form


@pytest.mark.parametrize("streamed", [False, True], ids=["seekable", "descriptor"])
def test_zip64(tmp_path: Path, streamed: bool) -> None:
    members: list[Member] = [
        ("a.txt", text(12_000, 36), zipfile.ZIP_DEFLATED, None),
        ("b.txt", text(9000, 37), zipfile.ZIP_DEFLATED, None),
    ]
    data = (make_streamed_zip if streamed else make_zip)(members, force_zip64=True)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.read("a.txt") == text(12_000, 36)
    assert data[18:26] == b"\xff" * 8  # the local header defers its sizes to the zip64 extra
    stats, form = round_trip(tmp_path, data, "big.zip")
    assert (stats.streams_inflated, stats.streams_kept) == (2, 0)
    assert text(9000, 37) in form


def test_hand_written_zip_descriptors_and_encryption_flag(tmp_path: Path) -> None:
    one, two, three = text(7000, 40), text(7000, 41), text(7000, 42)
    d1, d2, d3 = raw_deflate(one), raw_deflate(two), raw_deflate(three)
    noise = random.Random(43).randbytes(4000)  # what an encrypted member looks like
    assert match_deflate(io.BytesIO(noise), 0, len(noise), None).compressed_length == 0

    def descriptor(plain: bytes, body: bytes, signature: bool) -> bytes:
        fields = struct.pack("<III", zlib.crc32(plain), len(body), len(plain))
        return (b"PK\x07\x08" if signature else b"") + fields

    data = hand_zip(
        [
            (b"no-signature.txt", 8, 0x08, d1, descriptor(one, d1, False), one),
            (b"signature.txt", 8, 0x08, d2, descriptor(two, d2, True), two),
            (b"encrypted.bin", 8, 0x01, noise, b"", b""),
            (b"flagged-but-plain.txt", 8, 0x01, d3, b"", three),
            (b"stored.txt", 0, 0, b"stored body", b"", b"stored body"),
        ]
    )
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.read("no-signature.txt") == one
        assert zf.read("signature.txt") == two
        assert zf.read("stored.txt") == b"stored body"
    stats, form = round_trip(tmp_path, data, "hand.zip")
    assert stats.streams_inflated == 3
    assert one in form and two in form and three in form
    assert noise in form


def test_truncated_zip_at_every_position(tmp_path: Path) -> None:
    data = make_zip(
        [
            ("a.txt", text(1500, 50), zipfile.ZIP_DEFLATED, 6),
            ("b.gz", gzip.compress(text(800, 51), mtime=0), zipfile.ZIP_STORED, None),
            ("c.txt", text(600, 52), zipfile.ZIP_DEFLATED, 9),
        ]
    )
    for cut in range(0, len(data), 3):
        round_trip(tmp_path, data[:cut], "cut.zip")


def test_truncated_war(tmp_path: Path) -> None:
    war, _ = nested_war()
    for cut in range(1, len(war), len(war) // 40):
        round_trip(tmp_path, war[:cut], "cut.war")


def test_zip_with_a_corrupt_deflate_member(tmp_path: Path) -> None:
    members: list[Member] = [
        (f"m{i}.txt", text(6000, 60 + i), zipfile.ZIP_DEFLATED, 6) for i in range(4)
    ]
    data = make_zip(members)
    victim = data.index(b"m1.txt") + len(b"m1.txt") + 400  # inside m1's deflate data
    for flip in (0x01, 0x40, 0xFF):
        corrupt = bytearray(data)
        corrupt[victim] ^= flip
        stats, form = round_trip(tmp_path, bytes(corrupt), "corrupt.zip")
        # The other members are not spoiled. (The damaged one may still be inflated:
        # a flipped literal code can leave a stream zlib makes from other bytes.)
        assert stats.streams_inflated >= 3
        for i in (0, 2, 3):
            assert text(6000, 60 + i) in form


def test_corrupt_zip_headers(tmp_path: Path) -> None:
    data = make_zip(mixed_zip_members())
    rng = random.Random(70)
    for _ in range(30):
        corrupt = bytearray(data)
        offset = rng.randrange(len(data))
        corrupt[offset] = rng.randrange(256)
        round_trip(tmp_path, bytes(corrupt), "corrupt.zip")
    # Sizes in the first local header pointing far past the end of the file.
    huge = bytearray(data)
    huge[18:26] = b"\xfe\xff\xff\x7f" * 2
    round_trip(tmp_path, bytes(huge), "huge.zip")


def test_trusted_hint_keeps_a_stream_from_another_writer(tmp_path: Path) -> None:
    """After zlib level 6 made several members, a member it did not make is kept
    without trying the other settings (and still rebuilds exactly)."""
    members: list[Member] = [
        (f"m{i}.txt", text(8000, 80 + i), zipfile.ZIP_DEFLATED, 6)
        for i in range(expand.TRUSTED_HINT + 1)
    ]
    members.append(("late.txt", text(8000, 90), zipfile.ZIP_DEFLATED, 1))
    stats, _ = round_trip(tmp_path, make_zip(members), "hinted.zip")
    assert stats.streams_inflated + stats.streams_kept == len(members)
    assert stats.streams_inflated >= expand.TRUSTED_HINT + 1


def test_zip_made_by_zlib_level_9_is_fully_inflated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small members come out the same at levels 6 and 9; they must not make
    the expander give up on the level-9 members that follow. (Without zgz, as
    GNU gzip -9 happens to reproduce zlib -9 on inputs this small.)"""
    monkeypatch.setattr(gnuzip, "zgz_path", lambda: None)
    members: list[Member] = [
        (f"small{i}.txt", text(300, 140 + i), zipfile.ZIP_DEFLATED, 9) for i in range(5)
    ]
    members += [(f"big{i}.txt", text(40_000, 150 + i), zipfile.ZIP_DEFLATED, 9) for i in range(3)]
    assert raw_deflate(members[0][1], 6) == raw_deflate(members[0][1], 9)
    assert raw_deflate(members[-1][1], 6) != raw_deflate(members[-1][1], 9)
    stats, _ = round_trip(tmp_path, make_zip(members), "level9.zip")
    assert (stats.streams_inflated, stats.streams_kept) == (len(members), 0)


def test_expansion_memory_is_bounded(tmp_path: Path) -> None:
    payload_size = 48 << 20
    data = gzip.compress(bytes(payload_size), compresslevel=9, mtime=0)  # ~47 KB
    (tmp_path / "zeros.gz").write_bytes(data)
    tracemalloc.start()
    try:
        # ~1000 times its size: beyond the default expand_ratio, which is not tested here.
        limits = ExpansionLimits(ratio=2000)
        stats = expand_file(
            tmp_path / "zeros.gz", tmp_path / "zeros.dgx", scratch_dir=tmp_path, limits=limits
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.inflated_bytes == payload_size
    # Expanding a 4 MiB text gzip peaks near 5 MiB: one RAW_CHUNK, zlib states, reads.
    assert peak < 16 << 20, f"peak {peak >> 20} MiB"


def test_small_raw_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The RAW segment size is the writer's choice: a form made with tiny RAW
    segments rebuilds with any reader buffer."""
    war, streams = nested_war()
    monkeypatch.setattr(search, "RAW_CHUNK", 97)
    stats, form = round_trip(tmp_path, war, "app.war")
    assert stats.streams_inflated == streams
    monkeypatch.undo()
    (tmp_path / "form").write_bytes(form)
    assert rebuild_digest(tmp_path / "form") == (sha256(war), len(war))


# --- properties --------------------------------------------------------------------------


def gzip_sample() -> bytes:
    return gzip_member(text(3000, 100), fname=b"x.txt") + gzip.compress(text(2000, 101), mtime=0)


def zip_sample() -> bytes:
    return make_zip(
        [
            ("a.txt", text(2000, 102), zipfile.ZIP_DEFLATED, 6),
            ("b.gz", gzip.compress(text(1000, 103), mtime=0), zipfile.ZIP_STORED, None),
            ("c.bin", random.Random(104).randbytes(300), zipfile.ZIP_DEFLATED, 9),
        ]
    )


def streamed_sample() -> bytes:
    return make_streamed_zip(
        [
            ("a.txt", text(2000, 105), zipfile.ZIP_DEFLATED, 6),
            ("b.txt", text(1500, 106), zipfile.ZIP_DEFLATED, 9),
        ]
    )


SAMPLES = [gzip_sample(), zip_sample(), streamed_sample()]

mutation = st.tuples(
    st.sampled_from(["insert", "overwrite", "delete"]),
    st.floats(min_value=0.0, max_value=1.0),
    st.binary(min_size=1, max_size=40),
)

property_settings = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def mutate(data: bytes, edits: list[tuple[str, float, bytes]]) -> bytes:
    out = bytearray(data)
    for op, where, chunk in edits:
        pos = int(where * len(out))
        if op == "insert":
            out[pos:pos] = chunk
        elif op == "overwrite":
            out[pos : pos + len(chunk)] = chunk
        else:
            del out[pos : pos + len(chunk)]
    return bytes(out)


@property_settings
@given(data=st.binary(max_size=4096))
def test_property_random_bytes(tmp_path: Path, data: bytes) -> None:
    round_trip(tmp_path, data)


@property_settings
@given(
    sample=st.sampled_from(range(len(SAMPLES))),
    edits=st.lists(mutation, min_size=1, max_size=4),
)
def test_property_spliced_archives(
    tmp_path: Path, sample: int, edits: list[tuple[str, float, bytes]]
) -> None:
    round_trip(tmp_path, mutate(SAMPLES[sample], edits), "spliced.zip")


@property_settings
@given(
    prefix=st.sampled_from([b"", b"\x1f\x8b\x08\x00", b"PK\x03\x04"]),
    tail=st.binary(max_size=2048),
)
def test_property_magic_then_garbage(tmp_path: Path, prefix: bytes, tail: bytes) -> None:
    round_trip(tmp_path, prefix + tail)


# --- the expanded form's parser ----------------------------------------------------------


def rebuild_bytes(form: bytes) -> bytes:
    return b"".join(rebuild_chunks(io.BytesIO(form)))


def raw_segment(data: bytes) -> bytes:
    length = len(data)
    varint = bytearray()
    while True:
        varint.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    return b"\x01" + bytes(varint) + data


def raw_zeros(size: int) -> bytes:
    """RAW segments of ``size`` zero bytes, at most ``RAW_CHUNK`` each (as dgfs writes)."""
    full, tail = divmod(size, RAW_CHUNK)
    return raw_segment(bytes(RAW_CHUNK)) * full + (raw_segment(bytes(tail)) if tail else b"")


def traced_peak(call: Callable[[], object]) -> tuple[object, int]:
    """What ``call`` returned, or the ``DgfsError`` it raised, and the most
    memory Python's allocators (zlib's included) held meanwhile."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except DgfsError as exc:
            result = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def test_hand_written_forms_follow_the_grammar() -> None:
    payload = text(3000, 110)
    params = DeflateParams(9, mem_level=9)
    assert rebuild_bytes(MAGIC + b"\x00") == b""
    assert rebuild_bytes(MAGIC + raw_segment(b"") + raw_segment(b"abc") + b"\x00") == b"abc"
    assert rebuild_bytes(MAGIC + raw_segment(b"x" * 300) + b"\x00") == b"x" * 300
    form = MAGIC + b"\x02" + params.pack() + raw_segment(payload) + b"\x00\x00"
    assert rebuild_bytes(form) == raw_deflate(payload, 9, mem_level=9)
    # A DEFLATE segment with nothing inside is the deflate of no bytes.
    assert rebuild_bytes(MAGIC + b"\x02" + params.pack() + b"\x00\x00") == raw_deflate(b"", 9)
    # Nested: gzip header, a DEFLATE segment, trailer.
    nested = (
        MAGIC
        + raw_segment(b"head")
        + b"\x02"
        + DeflateParams(1).pack()
        + raw_segment(payload[:1000])
        + raw_segment(payload[1000:])
        + b"\x00"
        + raw_segment(b"tail")
        + b"\x00"
    )
    assert rebuild_bytes(nested) == b"head" + raw_deflate(payload, 1) + b"tail"


@needs_zgz
def test_hand_written_gnu_segment(tmp_path: Path) -> None:
    payload = json_lines()
    form = MAGIC + b"\x03\x06" + raw_segment(payload) + b"\x00\x00"
    assert b"".join(rebuild_chunks(io.BytesIO(form), tmp_path)) == gnu_gzip(payload, 6)[10:-8]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("form", "message"),
    [
        (b"", "bad magic"),
        (b"DGFSX2\n\x00\x00", "bad magic"),
        (MAGIC[:-1], "bad magic"),
        (MAGIC, "ends early"),
        (MAGIC + b"\x07", "unknown segment tag 7"),
        (MAGIC + b"\xff\x00", "unknown segment tag 255"),
        (MAGIC + b"\x01", "ends early"),
        (MAGIC + b"\x01\x05abc", "ends early"),
        (MAGIC + b"\x01\x05abcde", "ends early"),
        (MAGIC + b"\x01" + b"\x80" * 10 + b"\x01", "bad length"),
        (MAGIC + b"\x01\xff\xff\xff\xff\x0f" + b"abc", "ends early"),
        (MAGIC + b"\x02\x06\x08", "ends early"),
        (MAGIC + b"\x02\x06\x08\x0f\x00", "ends early"),
        (MAGIC + b"\x02\x06\x08\x0f\x00\x00", "ends early"),
        (MAGIC + b"\x02\x0a\x08\x0f\x00\x00\x00", "invalid deflate parameters"),
        (MAGIC + b"\x02\x06\x00\x0f\x00\x00\x00", "invalid deflate parameters"),
        (MAGIC + b"\x02\x06\x08\x10\x00\x00\x00", "invalid deflate parameters"),
        (MAGIC + b"\x02\x06\x08\x0f\x05\x00\x00", "invalid deflate parameters"),
        (MAGIC + b"\x03\x00\x00\x00", "bad GNU gzip level 0"),
        (MAGIC + b"\x03\x0a\x00\x00", "bad GNU gzip level 10"),
        (MAGIC + b"\x03\x06\x01\x02ab", "ends early"),
        (MAGIC + b"\x00\x00", "bytes after the end"),
        (MAGIC + b"\x01\x01a\x00junk", "bytes after the end"),
    ],
)
def test_malformed_forms_raise_format_error(tmp_path: Path, form: bytes, message: str) -> None:
    (tmp_path / "form").write_bytes(form)
    with pytest.raises(FormatError, match=message):
        rebuild_file(tmp_path / "form", tmp_path / "out", tmp_path)
    with pytest.raises(FormatError, match=message):
        rebuild_digest(tmp_path / "form", tmp_path)


def test_every_prefix_of_a_form_is_rejected(tmp_path: Path) -> None:
    data = make_zip(
        [
            ("a.txt", text(700, 120), zipfile.ZIP_DEFLATED, 6),
            ("b.gz", gzip.compress(text(500, 121), mtime=0), zipfile.ZIP_DEFLATED, 9),
        ]
    )
    form = expand_bytes(tmp_path, data)
    assert len(segment_tags(form)) == 3
    assert rebuild_bytes(form) == data
    for cut in range(len(form)):
        with pytest.raises(FormatError):
            rebuild_bytes(form[:cut])


def _form_sample() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return round_trip(Path(tmp), zip_sample())[1]


FORM_SAMPLE = _form_sample()


@property_settings
@given(edits=st.lists(mutation, min_size=1, max_size=3))
def test_property_damaged_forms_fail_cleanly(
    tmp_path: Path, edits: list[tuple[str, float, bytes]]
) -> None:
    """A damaged form either rebuilds to some bytes (the caller's SHA-256 check
    catches them) or raises FormatError; nothing else escapes."""
    form = mutate(FORM_SAMPLE, edits)
    with contextlib.suppress(FormatError, DeltaEngineError):
        b"".join(rebuild_chunks(io.BytesIO(form), tmp_path))


@property_settings
@given(body=st.binary(max_size=512))
def test_property_garbage_after_magic(tmp_path: Path, body: bytes) -> None:
    with contextlib.suppress(FormatError, DeltaEngineError):
        b"".join(rebuild_chunks(io.BytesIO(MAGIC + body), tmp_path))


# --- deflate: parameters, matching, known answers ----------------------------------------


def test_zlib_is_reference() -> None:
    assert zlib_is_reference() is True


@pytest.mark.parametrize(
    "params",
    [*CANDIDATES, DeflateParams(0, 1, 9, 0), DeflateParams(9, 9, 15, zlib.Z_FIXED)],
)
def test_params_pack_unpack(params: DeflateParams) -> None:
    raw = params.pack()
    assert len(raw) == 4
    assert DeflateParams.unpack(raw) == params


@pytest.mark.parametrize(
    "raw",
    [
        bytes((10, 8, 15, 0)),
        bytes((6, 0, 15, 0)),
        bytes((6, 10, 15, 0)),
        bytes((6, 8, 8, 0)),
        bytes((6, 8, 16, 0)),
        bytes((6, 8, 15, 5)),
        bytes((255, 255, 255, 255)),
        b"\x06\x08\x0f",
        b"\x06\x08\x0f\x00\x00",
        b"",
    ],
)
def test_params_unpack_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        DeflateParams.unpack(raw)


def test_every_unpackable_params_compress() -> None:
    """Whatever four bytes unpack to, zlib accepts as settings (so a damaged form
    fails with FormatError or wrong bytes, never a zlib error)."""
    for level in range(10):
        for mem_level in range(1, 10):
            for window_bits in range(9, 16):
                for strategy in range(5):
                    params = DeflateParams.unpack(bytes((level, mem_level, window_bits, strategy)))
                    assert b"".join(deflate_chunks(params, [b"abcabcabc"]))


def collect() -> tuple[list[bytes], Callable[[bytes], None]]:
    pieces: list[bytes] = []
    return pieces, pieces.append


def test_match_finds_level_9() -> None:
    payload = text(60_000, 130)
    stream = raw_deflate(payload, 9)
    assert stream != raw_deflate(payload, 6)
    pieces, sink = collect()
    found = match_deflate(io.BytesIO(stream), 0, len(stream), sink)
    assert found.params == DeflateParams(9)
    assert found.compressed_length == len(stream)
    assert found.uncompressed_length == len(payload)
    assert b"".join(pieces) == payload


@pytest.mark.parametrize("params", CANDIDATES, ids=str)
def test_match_reproduces_every_candidate(params: DeflateParams) -> None:
    payload = text(30_000, 131)
    stream = b"".join(deflate_chunks(params, [payload]))
    found = match_deflate(io.BytesIO(stream), 0, len(stream), None)
    assert found.params is not None
    assert b"".join(deflate_chunks(found.params, [payload])) == stream


def test_match_in_the_middle_of_a_file() -> None:
    payload = text(40_000, 132)
    stream = raw_deflate(payload, 6)
    buf = b"JUNK" * 5 + stream + b"TRAILER" * 100
    pieces, sink = collect()
    found = match_deflate(io.BytesIO(buf), 20, len(buf), sink)
    assert (found.compressed_length, found.params) == (len(stream), DeflateParams(6))
    assert b"".join(pieces) == payload
    # A limit that cuts the stream short: not a whole stream.
    cut = match_deflate(io.BytesIO(buf), 20, 20 + len(stream) - 1, None)
    assert cut.compressed_length == 0 and cut.params is None


def test_match_on_a_large_stream() -> None:
    payload = text(700_000, 133)  # several reads and feeds
    stream = raw_deflate(payload, 1)
    pieces, sink = collect()
    found = match_deflate(io.BytesIO(stream), 0, len(stream), sink)
    assert found.params == DeflateParams(1)
    assert b"".join(pieces) == payload


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xff" * 64, b"\x07" * 10, random.Random(134).randbytes(64), b"\x00\x05\x00\xfa\xffab"],
)
def test_match_rejects_non_deflate(garbage: bytes) -> None:
    pieces, sink = collect()
    found = match_deflate(io.BytesIO(garbage), 0, len(garbage), sink)
    assert found.compressed_length == 0
    assert found.params is None


def test_match_without_candidates_just_inflates() -> None:
    payload = text(50_000, 135)
    stream = raw_deflate(payload, 6, mem_level=3)
    pieces, sink = collect()
    found = match_deflate(io.BytesIO(stream), 0, len(stream), sink, ())
    assert (found.compressed_length, found.uncompressed_length) == (len(stream), len(payload))
    assert found.params is None
    assert b"".join(pieces) == payload


def test_match_unreproducible_stream() -> None:
    payload = text(400_000, 136)  # long enough for zlib to emit blocks before the end
    stream = raw_deflate(payload, 6, strategy=zlib.Z_HUFFMAN_ONLY)
    pieces, sink = collect()
    found = match_deflate(io.BytesIO(stream), 0, len(stream), sink)
    assert found.params is None
    assert (found.compressed_length, found.uncompressed_length) == (len(stream), len(payload))
    assert payload.startswith(b"".join(pieces))  # the sink stops once no candidate is left
    assert len(b"".join(pieces)) < len(payload)


# --- gnuzip --------------------------------------------------------------------------------


def test_zgz_path() -> None:
    path = gnuzip.zgz_path()
    assert path is None or Path(path).is_file()


@needs_zgz
@pytest.mark.parametrize("level", [1, 6, 9])
def test_gnu_deflate_is_raw_deflate_of_the_payload(tmp_path: Path, level: int) -> None:
    payload = json_lines()[:100_000]
    (tmp_path / "payload").write_bytes(payload)
    stream = b"".join(gnuzip.gnu_deflate(level, tmp_path / "payload"))
    assert zlib.decompress(stream, -15) == payload
    assert stream == gnu_gzip(payload, level)[10:-8]  # GNU gzip's own body


@needs_zgz
def test_gnu_deflate_of_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "payload").write_bytes(b"")
    stream = b"".join(gnuzip.gnu_deflate(6, tmp_path / "payload"))
    assert zlib.decompress(stream, -15) == b""


@needs_zgz
def test_gnu_matches(tmp_path: Path) -> None:
    payload = json_lines()
    (tmp_path / "payload").write_bytes(payload)
    body = gnu_gzip(payload, 6)[10:-8]

    def pieces(data: bytes, size: int) -> Iterator[bytes]:
        return iter([data[i : i + size] for i in range(0, len(data), size)])

    assert gnuzip.gnu_matches(6, tmp_path / "payload", iter([body]))
    assert gnuzip.gnu_matches(6, tmp_path / "payload", pieces(body, 1000))
    assert gnuzip.gnu_matches(6, tmp_path / "payload", pieces(body, 7))
    flipped = bytearray(body)
    flipped[len(body) // 2] ^= 1
    assert not gnuzip.gnu_matches(6, tmp_path / "payload", iter([bytes(flipped)]))
    assert not gnuzip.gnu_matches(6, tmp_path / "payload", iter([body[:-1]]))
    assert not gnuzip.gnu_matches(6, tmp_path / "payload", iter([body, b"x"]))
    assert not gnuzip.gnu_matches(6, tmp_path / "payload", iter([]))
    assert not gnuzip.gnu_matches(1, tmp_path / "payload", iter([body]))


def test_gnu_deflate_without_zgz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gnuzip, "zgz_path", lambda: None)
    (tmp_path / "payload").write_bytes(b"abc")
    with pytest.raises(DeltaEngineError, match="zgz"):
        list(gnuzip.gnu_deflate(6, tmp_path / "payload"))
    assert not gnuzip.gnu_matches(6, tmp_path / "payload", iter([raw_deflate(b"abc")]))


@pytest.mark.parametrize("limit", [1, 3000, 1 << 30])
def test_parallel_rebuild_streams_big_segments_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    """Subtrees above PARALLEL_PAYLOAD are streamed in place, the others rebuilt
    by threads: the bytes and their order never change."""
    monkeypatch.setattr(recompress, "PARALLEL_PAYLOAD", limit)
    monkeypatch.setattr(recompress, "_IN_FLIGHT", 4096)
    war, _ = nested_war()
    data = war + gzip_member(text(20000, 9), level=6)
    src = tmp_path / "in.war"
    src.write_bytes(data)
    form = tmp_path / "in.dgx"
    expand_file(src, form, scratch_dir=tmp_path)
    out = tmp_path / "out"
    assert rebuild_file(form, out, tmp_path, workers=2) == (sha256(data), len(data))
    assert out.read_bytes() == data


#: An empty RAW segment whose length, 0, takes 10 bytes: a header with no payload.
EMPTY_RAW = b"\x01" + b"\x80" * 9 + b"\x00"


@pytest.mark.parametrize("workers", [1, 3])
def test_a_subtree_of_headers_is_streamed_not_read_whole(tmp_path: Path, workers: int) -> None:
    """A hostile DEFLATE segment holding 6 MiB of empty RAW segments and no
    RAW payload at all. ``_subtree_end`` bounded a subtree by its RAW bytes
    only, so this one fitted PARALLEL_PAYLOAD whatever its size and was then
    read whole into memory (``exact(end - start)``): a file claiming 40 MB
    may have a 4 GiB form of such headers. Its own bytes count now, so it is
    streamed, a segment at a time, and rebuilds to the deflate of nothing."""
    body = EMPTY_RAW * ((6 << 20) // len(EMPTY_RAW))
    form = MAGIC + b"\x02" + DeflateParams(1).pack() + body + b"\x00\x00"
    (tmp_path / "f.dgx").write_bytes(form)
    result, peak = traced_peak(
        lambda: rebuild_file(tmp_path / "f.dgx", tmp_path / "out", tmp_path, workers)
    )
    empty = raw_deflate(b"", 1)
    assert result == (sha256(empty), len(empty))
    assert peak < recompress.PARALLEL_PAYLOAD, f"peak {peak >> 20} MiB, form {len(form) >> 20} MiB"


@pytest.mark.parametrize("workers", [1, 2])
def test_the_rebuild_time_limit_is_checked_while_scanning(tmp_path: Path, workers: int) -> None:
    """``rebuild_file(seconds=...)`` checked its deadline only when a chunk
    came out. A hostile form: DEFLATE segments nested 16 deep around 1 MiB of
    empty RAW segments and one RAW of PARALLEL_PAYLOAD + 1 zeros; every level
    scans the headers again to learn the subtree is too big to hold, ~3 s per
    MiB of headers before a byte comes out, and a file claiming 43 MB may have
    a 4 GiB form: hours, against expand_time's 600 s. The deadline is now
    checked at every segment and chunk, in scanning, spooling and compressing."""
    tail = recompress.PARALLEL_PAYLOAD + 1
    body = EMPTY_RAW * ((1 << 20) // len(EMPTY_RAW)) + raw_segment(bytes(tail))
    depth = 16
    deflate_header = b"\x02" + DeflateParams(0).pack()
    form = MAGIC + deflate_header * depth + body + b"\x00" * (depth + 1)
    (tmp_path / "f.dgx").write_bytes(form)
    limit = 0.1
    started = time.monotonic()
    with pytest.raises(DecodeLimit, match=r"took over 0\.1 s \(expand_time\)"):
        rebuild_file(tmp_path / "f.dgx", tmp_path / "out", tmp_path, workers, seconds=limit)
    elapsed = time.monotonic() - started
    assert elapsed < 10 * limit, f"stopped after {elapsed:.1f} s (limit {limit} s)"


def test_streams_proven_before_are_inflated_without_a_check(tmp_path: Path) -> None:
    """A release's zip members mostly equal the previous release's: the second
    time their spans are only inflated, and the expanded form is the same."""
    war, _ = nested_war()
    data = war + gzip_member(text(20000, 9), level=6)
    first_stats, first_form = round_trip(tmp_path, data, "a.war")
    second_stats, second_form = round_trip(tmp_path, data, "a.war")
    assert second_form == first_form
    # (The war holds the same jar and .gz twice: some are remembered at once.)
    assert second_stats.streams_remembered > first_stats.streams_remembered
    assert second_stats.streams_inflated == first_stats.streams_inflated


@needs_zgz
def test_remembered_gnu_span_is_not_used_without_zgz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = gnu_gzip(json_lines(), 6)
    stats, _ = round_trip(tmp_path, data, "items.json.gz")
    assert stats.streams_gnu == 1
    monkeypatch.setattr(gnuzip, "zgz_path", lambda: None)
    stats, _ = round_trip(tmp_path, data, "items.json.gz")
    assert (stats.streams_inflated, stats.streams_kept, stats.streams_gnu) == (0, 1, 0)


# --- the proof that needs no second deflate ------------------------------------------------


def _deflate_param_offsets(form: bytes) -> list[int]:
    """Where the four parameter bytes of every DEFLATE segment of ``form`` sit."""
    pos, depth, found = len(MAGIC), 0, []
    while True:
        tag = form[pos]
        pos += 1
        if tag == expand.TAG_END:
            if depth == 0:
                return found
            depth -= 1
        elif tag == expand.TAG_RAW:
            length, pos = read_varint(form, pos)
            pos += length
        elif tag == expand.TAG_DEFLATE:
            found.append(pos)
            pos, depth = pos + 4, depth + 1
        else:
            pos, depth = pos + 1, depth + 1


@pytest.mark.parametrize("by_leaves", [False, True], ids=["inflating", "leaves-hashed"])
def test_proof_refuses_every_form_that_rebuilds_to_other_bytes(
    tmp_path: Path, by_leaves: bool
) -> None:
    """``prove_form`` replaces the write path's second full deflate: each way a
    form can rebuild to bytes other than the file's must fail it (the rebuild
    confirms those bytes differ), and so must a stream the search never proved;
    whether segments are checked by inflating or, with ``leaves``, by hashes."""
    war, _ = nested_war()
    src, expanded, scratch = tmp_path / "app.war", tmp_path / "app.dgx", tmp_path / "scratch"
    scratch.mkdir()
    src.write_bytes(war)
    stats = expand_file(src, expanded, scratch_dir=scratch)
    form = expanded.read_bytes()
    assert expand.prove_form(expanded, src, stats.proven)
    leaves = stats.leaves if by_leaves else None
    assert not by_leaves or leaves

    def proven(
        candidate: bytes, original: bytes = war, facts: Any = stats.proven, known: Any = leaves
    ) -> bool:
        (tmp_path / "c.dgx").write_bytes(candidate)
        (tmp_path / "c.orig").write_bytes(original)
        return expand.prove_form(tmp_path / "c.dgx", tmp_path / "c.orig", facts, known)

    def rebuilds_to_war(candidate: bytes) -> bool:
        (tmp_path / "c.dgx").write_bytes(candidate)
        try:
            return rebuild_digest(tmp_path / "c.dgx", scratch) == (sha256(war), len(war))
        except (FormatError, DeltaEngineError, ValueError):
            return False

    # Another level in one DEFLATE segment's header (nested ones too).
    offsets = _deflate_param_offsets(form)
    assert len(offsets) >= 3
    for offset in offsets:
        level = form[offset]
        changed = form[:offset] + bytes((level % 9 + 1,)) + form[offset + 1 :]
        if rebuilds_to_war(changed):
            continue  # a short stream every level compresses alike: not a wrong form
        assert not proven(changed), f"other level at {offset} proven"
    # One byte of every RAW and inflated region in turn (the war's stored bytes,
    # headers, members' content); and the original changed, cut or lengthened.
    for pos in range(len(MAGIC), len(form) - 1, 97):
        damaged = form[:pos] + bytes((form[pos] ^ 0x20,)) + form[pos + 1 :]
        if not rebuilds_to_war(damaged):
            assert not proven(damaged), f"byte {pos} flipped, proven"
    for pos in range(0, len(war), 101):
        other = war[:pos] + bytes((war[pos] ^ 1,)) + war[pos + 1 :]
        assert not proven(form, other), f"original byte {pos} flipped, proven"
    assert not proven(form, war[:-1]) and not proven(form, war + b"\0")
    assert not proven(form, b"")
    # The search's word is what proves a stream: none, or another recipe, fails.
    assert not proven(form, war, set(), {})
    swapped = {
        (digest, DeflateParams(9 if r == DeflateParams(6) else 6)) for digest, r in stats.proven
    }
    swapped_leaves = {
        (digest, DeflateParams(9 if r == DeflateParams(6) else 6)): span
        for (digest, r), span in stats.leaves.items()
    }
    assert not proven(form, war, swapped, swapped_leaves if by_leaves else None)


def test_proof_with_leaves_inflates_only_segments_that_hold_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wheel's proof inflated 95 MB again (0.2 of its 0.3 CPU seconds); with
    ``leaves`` only streams that hold others are inflated (the war's jar and
    gzip members), the rest checked by hashes."""
    war, streams = nested_war()
    src, expanded = tmp_path / "app.war", tmp_path / "app.dgx"
    src.write_bytes(war)
    stats = expand_file(src, expanded, scratch_dir=tmp_path)
    inflated: list[object] = []
    real = proof._ExpectedInflated

    def counted(parent: Any) -> Any:
        inflated.append(parent)
        return real(parent)

    monkeypatch.setattr(proof, "_ExpectedInflated", counted)
    assert expand.prove_form(expanded, src, stats.proven, stats.leaves)
    assert stats.streams_inflated == streams
    assert len(inflated) == 2  # deflated.jar and other.json.gz hold the 7 others


def test_proof_of_gnu_segments_needs_the_gnu_level(tmp_path: Path) -> None:
    if gnuzip.zgz_path() is None:
        pytest.skip("zgz (pristine-tar) not installed")
    data = gnu_gzip(json_lines(), 6)
    src, expanded = tmp_path / "g", tmp_path / "g.dgx"
    src.write_bytes(data)
    stats = expand_file(src, expanded, scratch_dir=tmp_path)
    assert stats.streams_gnu == 1
    assert expand.prove_form(expanded, src, stats.proven)
    other = {(digest, 9) for digest, _ in stats.proven}
    assert not expand.prove_form(expanded, src, other)


# --- memo entries computed once for threads asking at once ------------------------------------


def test_memo_entry_asked_for_at_once_is_computed_once() -> None:
    import threading
    import time

    memo = Memo(1 << 20)
    computed: list[int] = []
    got: list[object] = []
    start = threading.Barrier(4)

    def ask(n: int) -> None:
        start.wait()
        with memo.computing(b"k", wait=30) as value:
            if value is None:
                computed.append(n)
                time.sleep(0.3)
                value = f"made by {n}"
                memo.put(b"k", value, 10)
            got.append(value)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(computed) == 1 and got == [f"made by {computed[0]}"] * 4
    assert memo.waits == 3


def test_memo_waiter_computes_itself_when_its_peer_fails_or_is_itself() -> None:
    import threading

    memo = Memo(1 << 20)
    claimed, release = threading.Event(), threading.Event()

    def failing_peer() -> None:
        with contextlib.suppress(RuntimeError), memo.computing(b"k") as value:
            assert value is None
            claimed.set()
            release.wait()
            raise RuntimeError("peer failed")

    peer = threading.Thread(target=failing_peer)
    peer.start()
    claimed.wait()
    threading.Timer(0.2, release.set).start()
    with memo.computing(b"k", wait=30) as value:
        assert value is None  # waited, got nothing: computes it itself
    peer.join()
    # A thread asking again inside its own computation does not wait for itself.
    with memo.computing(b"n", wait=30) as outer, memo.computing(b"n", wait=30) as inner:
        assert outer is None and inner is None
    assert memo.waits == 1


def test_concurrent_rebuilds_and_expansions_of_one_archive_share_their_work(
    tmp_path: Path,
) -> None:
    """Side by side (a prefetch beside a read, two uploads), rebuilds share
    rebuilt subtrees and expansions share verdicts: every byte still right."""
    import threading

    war, _ = nested_war()
    src = tmp_path / "app.war"
    src.write_bytes(war)
    forms = [tmp_path / f"{n}.dgx" for n in range(3)]
    results: list[object] = []
    start = threading.Barrier(3)

    def expand_and_rebuild(n: int) -> None:
        start.wait()
        stats = expand_file(src, forms[n], scratch_dir=tmp_path)
        results.append(expand.prove_form(forms[n], src, stats.proven))
        start.wait()
        results.append(rebuild_digest(forms[n], tmp_path, workers=2))

    threads = [threading.Thread(target=expand_and_rebuild, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 3
    assert results.count((sha256(war), len(war))) == 3
    assert len({f.read_bytes() for f in forms}) == 1


def _leaf_subtrees(form: bytes) -> set[bytes]:
    """The DEFLATE and GNU segments of ``form`` (whole, tag included) that hold no other."""
    pos, stack, leaves = len(MAGIC), [], set()  # stack: [start, holds others]
    while True:
        tag = form[pos]
        pos += 1
        if tag == expand.TAG_END:
            if not stack:
                return leaves
            start, nests = stack.pop()
            if not nests:
                leaves.add(form[start:pos])
        elif tag == expand.TAG_RAW:
            length, pos = read_varint(form, pos)
            pos += length
        else:
            if stack:
                stack[-1][1] = True
            stack.append([pos - 1, False])
            pos += 4 if tag == expand.TAG_DEFLATE else 1


@pytest.mark.parametrize("workers", [1, 2])
def test_only_subtrees_holding_no_others_are_remembered(tmp_path: Path, workers: int) -> None:
    war, _ = nested_war()
    _, form = round_trip(tmp_path, war, "app.war")
    expand.REBUILT_SUBTREES.clear()
    (tmp_path / "f.dgx").write_bytes(form)
    for _ in range(2):  # the second time from the memo
        assert rebuild_digest(tmp_path / "f.dgx", tmp_path, workers) == (sha256(war), len(war))
    leaves = _leaf_subtrees(form)
    assert 0 < len(leaves) < len(segment_tags(form))
    remembered = set(expand.REBUILT_SUBTREES._items)
    assert remembered == {hashlib.sha256(leaf).digest() for leaf in leaves}


@pytest.mark.parametrize("length", [1 << 62, 1 << 63, (1 << 70) - 1])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_huge_raw_length_inside_a_subtree_is_a_format_error(
    tmp_path: Path, length: int, workers: int
) -> None:
    """A hostile expanded form: a DEFLATE segment holding one RAW segment
    whose varint length is huge. ``_subtree_end`` sought past it before
    checking its limit, and the seek itself failed: OSError(EINVAL) for
    2^62, ValueError for 2^63 and more, neither a FormatError (the read
    path's ``except (FormatError, DgfsError)`` missed them)."""
    from dgfs.deep.deflate import DeflateParams
    from dgfs.deep.recompress import rebuild_file
    from dgfs.deep.segments import MAGIC, TAG_DEFLATE, TAG_END, TAG_RAW, varint
    from dgfs.errors import DgfsError, FormatError

    form = tmp_path / "hostile.dgx"
    form.write_bytes(
        MAGIC
        + bytes([TAG_DEFLATE])
        + DeflateParams(6).pack()
        + bytes([TAG_RAW])
        + varint(length)
        + b"x" * 16
        + bytes([TAG_END, TAG_END])
    )
    with pytest.raises((FormatError, DgfsError)):
        rebuild_file(form, tmp_path / "out", tmp_path, workers, seconds=30)
