"""Version-2 deep deltas under bounds: tar cuts fed in any pieces, the limits
on indexing a reference from the bucket, and what they must not cost a
legitimate form (found by review; each failed when written)."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import dgfs.deep
from dgfs.deep import archives, spans
from dgfs.deep.memo import Memo
from dgfs.deep.segments import MAGIC, MIN_PIECE, TAG_END, TAG_RAW, TAG_SPLIT, Reader, varint
from dgfs.errors import FormatError


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header(name: str, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header with ``size_field`` (12 bytes) and a right checksum."""
    info = tarfile.TarInfo(name)
    info.size = 0
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    assert len(block) == 512
    block[124:136] = size_field
    block[156:157] = kind
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def base256(size: int) -> bytes:
    return b"\x80" + size.to_bytes(11, "big")


def random_tar(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    fmt = rng.choice([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i in range(rng.randrange(0, 12)):
            name = "d/" * rng.randrange(0, 60) + f"m{i}"  # long names: pax / GNU longname
            if fmt == tarfile.USTAR_FORMAT:
                name = f"m{i}"
            size = rng.choice([0, 1, 511, 512, 513, 1023, 1024, 1025, 3000, 5000])
            info = tarfile.TarInfo(name)
            info.size = size
            if rng.random() < 0.2:
                info.pax_headers = {"comment": "x" * rng.randrange(0, 2000)}
            tar.addfile(info, io.BytesIO(bytes(rng.randrange(256) for _ in range(size))))
    data = buf.getvalue()
    tail = rng.random()
    if tail < 0.2:
        # a member whose size (base-256, or octal) runs past the end
        data = data.rstrip(b"\0")
        data += bytes(-len(data) % 512)
        data += header("big", base256(rng.choice([1024, 5000, 1 << 70]))) + bytes(
            rng.randrange(0, 6000)
        )
    elif tail < 0.4:
        data = data[: rng.randrange(0, len(data) + 1)]  # ends anywhere, mid-header too
    return data


def pieces(rng: random.Random, data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        step = rng.choice([0, 0, 1, 7, 100, 511, 512, 513, 1024, 4096, 70000])
        out.append(data[pos : pos + step])
        pos += step
    out.append(b"")
    return out


def test_tar_walk_fed_any_pieces_cuts_as_tar_cuts() -> None:
    rng = random.Random(1234)
    for _ in range(400):
        data = random_tar(rng)
        expected = archives.tar_cuts(io.BytesIO(data), 0, len(data))
        walk, found, start = archives.TarWalk(), [], 0
        for piece in pieces(rng, data):
            got = walk.feed(piece)
            assert got == sorted(got)
            assert all(0 < cut <= len(piece) for cut in got), (got, len(piece))
            found += [start + cut for cut in got]
            start += len(piece)
        assert found == expected
        assert found == sorted(set(found))


def make_wheel(path: Path, version: int, count: int = 600) -> Path:
    """A wheel of small modules (1.2 to 2 KB each, as in many packages of
    generated code or stubs), zlib level 6 like pip/wheel write them."""
    rng = random.Random(11)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(count):
            words = [
                rng.choice(("def", "return", "self", "value", "import", "class"))
                for _ in range(rng.randrange(180, 240))
            ]
            text = f"# module {i}\n" + " ".join(words) + f"\n# v{version if i == 0 else 1}\n"
            info = zipfile.ZipInfo(f"pkg/mod{i:04d}.py", (2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, text)
    return path


def test_a_wheel_of_small_modules_keeps_its_spans(tmp_path: Path) -> None:
    """Every member but the first is unchanged; their DEFLATE segments (and
    the RAW inside each) are 1 KiB or more, so a zip member counted twice
    against a limit of 1 segment per KiB of form. Got: find saw only the
    first ~60% of the form's segments, and the rest went to xdelta3."""
    ref_zip = make_wheel(tmp_path / "a-1.whl", 1)
    new_zip = make_wheel(tmp_path / "a-2.whl", 2)
    ref = tmp_path / "ref.dgx"
    form = tmp_path / "form.dgx"
    dgfs.deep.expand_file(ref_zip, ref, scratch_dir=tmp_path)
    stats = dgfs.deep.expand_file(new_zip, form, scratch_dir=tmp_path)
    assert stats.streams_inflated == 600
    found = spans.find(ref, sha(ref), form)
    covered = sum(span.size for span in found)
    assert covered > 0.8 * form.stat().st_size, (
        f"{len(found)} spans cover {covered} of {form.stat().st_size} bytes"
    )


@pytest.mark.parametrize("pad", [0, 1, 511, 512, 32 * 1024 - 512, 32 * 1024 - 1024])
def test_a_tar_gz_cut_by_the_sink_proves_and_rebuilds(tmp_path: Path, pad: int) -> None:
    """Cuts at and around the sink's 32 KiB pieces: RAW segments are the tar's
    bytes in order (the leaf's hash), the proof with leaves passes."""
    rng = random.Random(pad)
    members = {"pad": bytes(pad)}
    for i in range(30):
        members[f"m{i}"] = (
            rng.randbytes(rng.choice([1024, 1500, 32 * 1024, 40000]))
            .hex()
            .encode()[: rng.choice([1024, 2000, 32768, 33000])]
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    plain = buf.getvalue()
    path = tmp_path / "x.tar.gz"
    path.write_bytes(gzip.compress(plain, 6, mtime=0))
    form = tmp_path / "x.dgx"
    stats = dgfs.deep.expand_file(path, form, scratch_dir=tmp_path)
    assert stats.streams_inflated == 1
    assert dgfs.deep.prove_form(form, path, stats.proven, stats.leaves) is True
    out = tmp_path / "out"
    assert dgfs.deep.rebuild_file(form, out, tmp_path)[0] == sha(path)
    # the RAW segments inside the DEFLATE end where tar_cuts says
    data = form.read_bytes()
    pos, ends, inside = len(MAGIC) + 5, [], 0
    assert data[len(MAGIC)] != TAG_RAW or True
    # walk: MAGIC, gzip header RAW, DEFLATE hdr, RAWs..., END
    pos = len(MAGIC)
    from dgfs.deep.segments import Reader

    src = io.BytesIO(data)
    src.seek(pos)
    reader = Reader(src)
    depth = 0
    while True:
        tag = reader.exact(1)[0]
        if tag == TAG_END:
            if depth == 0:
                break
            depth -= 1
            continue
        if tag == TAG_RAW:
            n = reader.varint()
            src.seek(n, 1)
            if depth == 1:
                inside += n
                ends.append(inside)
            continue
        reader.skip_header(tag)
        depth += 1
    cuts = archives.tar_cuts(io.BytesIO(plain), 0, len(plain))
    assert inside == len(plain)
    assert set(cuts) <= set(ends), sorted(set(cuts) - set(ends))[:5]


def test_a_hostile_reference_of_tiny_segments_is_parsed_only_as_far_as_its_size_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deep reference from the bucket of 8 MiB of empty RAW segments (its
    zstd body: under 1 KB) was walked segment by segment in Python, with no
    bound: 6.4 CPU s here, about an hour at the reference cap (4 GiB),
    before a store into its directory could go on. It is parsed no further
    than _PARSED_PER_BYTE segments per byte, then given no index."""
    ref = tmp_path / "ref"
    ref.write_bytes(MAGIC + bytes((TAG_RAW, 0)) * (4 << 20) + bytes((TAG_END,)))
    form = tmp_path / "form"
    form.write_bytes(MAGIC + bytes((TAG_RAW,)) + varint(4096) + b"x" * 4096 + bytes((TAG_END,)))
    parsed = 0
    walk = spans._segments

    def counted(src: io.BufferedReader, *steps: object) -> Iterator[spans._Segment]:
        nonlocal parsed
        for segment in walk(src, *steps):  # type: ignore[arg-type]
            parsed += 1
            yield segment

    monkeypatch.setattr(spans, "_segments", counted)
    spans._INDEXES.clear()
    try:
        assert spans.find(ref, sha(ref), form) == []
    finally:
        spans._INDEXES.clear()
    allowed = ref.stat().st_size * spans._PARSED_PER_BYTE + 1024
    assert 0 < parsed <= allowed + 2, f"{parsed} segments parsed (allowed {allowed:.0f})"


def test_a_reference_that_is_no_valid_form_past_the_segment_limit_gives_no_spans(
    tmp_path: Path,
) -> None:
    """docs/SECURITY.md: "A reference.deep that is no valid expanded form is
    given no spans". Got: a limit on the segments read (1 per KiB) stopped
    reading before the garbage, so a reference whose first half is
    DEFLATE(RAW 1 KiB) pairs and whose rest is an unknown tag was indexed."""
    nest = bytes((2, 6, 8, 241, 0))  # TAG_DEFLATE + params, as in test_deep_spans
    members = [i.to_bytes(8, "big") + bytes(1016) for i in range(400)]
    ref_bytes = MAGIC + b"".join(
        nest + bytes((TAG_RAW,)) + varint(1024) + m + bytes((TAG_END,)) for m in members
    )
    ref_bytes += bytes((9,)) + b"garbage" * 100  # unknown tag; no END
    ref = tmp_path / "ref"
    ref.write_bytes(ref_bytes)
    with open(ref, "rb") as src, pytest.raises(Exception, match="unknown|tag"):
        list(spans._segments(src))
    form = tmp_path / "form"
    form.write_bytes(MAGIC + bytes((TAG_RAW,)) + varint(1024) + members[0] + bytes((TAG_END,)))
    spans._INDEXES.clear()
    try:
        assert spans.find(ref, sha(ref), form) == []
    finally:
        spans._INDEXES.clear()


def test_a_wheel_that_gained_modules_before_the_old_ones_keeps_its_spans(tmp_path: Path) -> None:
    """A limit of 1 segment of 1 KiB or more per KiB of form, where it took
    all: release 2 adds 1,200 modules that sort before the 600 unchanged
    ones; the form's first segments up to the limit were all new, so find
    gave no span (a version-1 delta over the whole forms) though a third of
    the form is in the reference."""
    rng = random.Random(5)

    def module(i: int, tag: str) -> bytes:
        words = [
            rng.choice(("def", "return", "self", "value", "import", "class"))
            for _ in range(rng.randrange(180, 240))
        ]
        return (f"# {tag} {i}\n" + " ".join(words) + "\n").encode()

    old = {f"pkg/z{i:04d}.py": module(i, "old") for i in range(600)}
    new = {f"pkg/a{i:04d}.py": module(i, "new") for i in range(1200)}
    paths = []
    for version, members in ((1, old), (2, {**new, **old})):
        path = tmp_path / f"p-{version}.whl"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                info = zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
        paths.append(path)
    ref, form = tmp_path / "ref.dgx", tmp_path / "form.dgx"
    dgfs.deep.expand_file(paths[0], ref, scratch_dir=tmp_path)
    dgfs.deep.expand_file(paths[1], form, scratch_dir=tmp_path)
    spans._INDEXES.clear()
    found = spans.find(ref, sha(ref), form)
    assert len(found) >= 600, f"{len(found)} spans for 600 unchanged modules"


def json_gz_zip(path: Path, version: int, count: int) -> Path:
    """A zip (deflated, as zipfile/zip/jar write every member) of small
    .json.gz files: each member nests gzip in the zip member's deflate."""
    rng = random.Random(5)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(count):
            body = "".join(rng.choice("abcdefghij ") for _ in range(1000))
            text = f'{{"id": {i}, "v": {version if i == 0 else 1}, "data": "{body}"}}'
            info = zipfile.ZipInfo(f"d/{i:05d}.json.gz", (2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, gzip.compress(text.encode(), 6, mtime=0))
    return path


def test_a_zip_of_small_json_gz_members_keeps_its_spans(tmp_path: Path) -> None:
    """Every member but the first is unchanged. Each member is 3 segments of
    1 KiB or more (the zip member's DEFLATE, the gzip's DEFLATE, the JSON's
    RAW) in ~1.15 KiB of form: 2.6 per KiB, over _INDEXED_PER_BYTE (2 per
    KiB then), so the index stopped ~3/4 of the way through the reference
    and the last members got no span (at more members, up to 23% of them).
    Expected: a span for each of the 2,999 unchanged members; got 2,639."""
    count = 3000
    ref_zip = json_gz_zip(tmp_path / "a-1.zip", 1, count)
    new_zip = json_gz_zip(tmp_path / "a-2.zip", 2, count)
    ref, form = tmp_path / "ref.dgx", tmp_path / "form.dgx"
    assert dgfs.deep.expand_file(ref_zip, ref, scratch_dir=tmp_path).streams_inflated == 2 * count
    dgfs.deep.expand_file(new_zip, form, scratch_dir=tmp_path)
    spans._INDEXES.clear()
    try:
        found = spans.find(ref, sha(ref), form)
    finally:
        spans._INDEXES.clear()
    assert len(found) >= count - 1, f"{len(found)} spans for {count - 1} unchanged members"


def split_segment(checkpoints: int) -> bytes:
    """A SPLIT segment with no inner segments and ``checkpoints`` valid
    checkpoints (each ~8 bytes): one segment for ``_index``'s count."""
    out = bytearray((TAG_SPLIT, 6, 8, 15, 0)) + varint(checkpoints)
    for i in range(1, checkpoints + 1):
        out += varint(i) + varint(i * MIN_PIECE)
    return bytes(out + bytes((TAG_END,)))


def test_a_hostile_reference_of_split_checkpoints_is_parsed_only_as_far_as_the_limits_allow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parse limit counted segments, but a SPLIT segment's header holds up
    to 65,536 checkpoints, each parsed in Python (2 varints, a Checkpoint):
    a reference of SPLIT headers is one segment per 500 KB, and cost about
    a third of the CPU per byte of a reference of empty RAW segments
    (here ~0.3 us/byte: ~20 CPU minutes at the 4 GiB reference cap, whose
    zstd body is ~350 KB, as the segments repeat), past MAX_PARSED and
    _PARSED_PER_BYTE alike. MAX_PARSED is scaled down here (to 4,096 from
    2^21) so that a 4 MB reference shows what a 4 GiB one does at the
    default. Expected: parsing reads no more varints than a few per segment
    the limits allow; got ~500,000."""
    monkeypatch.setattr(spans, "MAX_PARSED", 4096)
    ref = tmp_path / "ref"
    ref.write_bytes(MAGIC + split_segment(1 << 16) * 8 + bytes((TAG_END,)))
    size = ref.stat().st_size
    varints = 0
    read = Reader.varint

    def counted(self: Reader) -> int:
        nonlocal varints
        varints += 1
        return read(self)

    monkeypatch.setattr(Reader, "varint", counted)
    spans._index(ref)
    allowed = min(spans.MAX_PARSED, size * spans._PARSED_PER_BYTE + 1024)
    assert varints <= 4 * allowed, f"{varints} varints read (allowed segments: {allowed:.0f})"


def small_files_tar_gz(path: Path, version: int, count: int) -> Path:
    rng = random.Random(7)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(count):
            data = rng.randbytes(512).hex().encode()  # 1 KiB: one cut member
            if i == count - 1:
                data = data[:-8] + b"%08d" % version
            info = tarfile.TarInfo(f"f{i:06d}")
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue(), 6, mtime=0))
    return path


def test_a_large_legitimate_form_past_max_parsed_keeps_the_spans_of_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tar.gz of files of 1 KiB or so is 2 segments per 1.5 KiB of form
    (tar members are not counted by expand_members), so a legitimate one of
    1.5 GiB or more (under expand_max, 4 GiB) has over MAX_PARSED (2^21)
    segments, and its reference got no index at all: every span was lost,
    where the file's own form keeps its first MAX_SEGMENTS. Scaled down:
    MAX_PARSED = 2,000 against 1,200 members (~2,400 segments). Only the
    last member changed. Expected: spans for (at least) the members parsed
    within the limit; got 0."""
    monkeypatch.setattr(spans, "MAX_PARSED", 2000)
    count = 1200
    ref_gz = small_files_tar_gz(tmp_path / "a-1.tar.gz", 1, count)
    new_gz = small_files_tar_gz(tmp_path / "a-2.tar.gz", 2, count)
    ref, form = tmp_path / "ref.dgx", tmp_path / "form.dgx"
    dgfs.deep.expand_file(ref_gz, ref, scratch_dir=tmp_path)
    dgfs.deep.expand_file(new_gz, form, scratch_dir=tmp_path)
    with open(ref, "rb") as src:
        assert sum(1 for _ in spans._segments(src)) > spans.MAX_PARSED
    spans._INDEXES.clear()
    try:
        found = spans.find(ref, sha(ref), form)
    finally:
        spans._INDEXES.clear()
    assert len(found) >= 800, f"{len(found)} spans for {count - 1} unchanged members"


def test_an_index_at_its_limit_is_kept_between_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_INDEXES exists so that every store into a directory need not read and
    hash its reference again. An index was allowed 524,288 entries, charged
    more than the memo's whole budget: it was evicted by its own put (with
    every other reference's index), and built again by every store."""
    monkeypatch.setattr(spans, "_INDEXES", Memo(spans._INDEXES.max_bytes))
    built: list[Path] = []

    def fake_index(reference: Path) -> dict[bytes, tuple[int, int]]:
        built.append(reference)
        count = spans.MAX_INDEX if reference.name == "big" else 10
        return {i.to_bytes(8, "big"): (0, 1024) for i in range(count)}

    monkeypatch.setattr(spans, "_index", fake_index)
    spans._reference_index(tmp_path / "other", "11" * 32)
    for _ in range(3):
        spans._reference_index(tmp_path / "big", "33" * 32)
    spans._reference_index(tmp_path / "other", "11" * 32)
    assert [path.name for path in built] == ["other", "big"]


def test_bytes_after_the_span_tables_zlib_stream_are_refused() -> None:
    """FORMAT.md: the zlib stream ends exactly at its n bytes. Got: bytes
    after the stream's end inside those n were accepted silently."""
    table = varint(1) + varint(0) + varint(0) + varint(1024)
    packed = zlib.compress(table, 9) + b"trailing junk"
    with pytest.raises(FormatError, match="after the span table"):
        spans.unpack(io.BytesIO(varint(len(packed)) + packed), 4096, 1 << 20)
