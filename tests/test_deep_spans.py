"""Deep deltas that take spans from their reference as they are (version 2):
what a store writes, what a read accepts, and what a hostile table gets."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import os
import random
import tarfile
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zstandard

import dgfs.deep
from dgfs import format as fmt
from dgfs.core import Core
from dgfs.deep import archives, recompress, spans
from dgfs.deep.segments import MAGIC, MAX_NESTING, TAG_DEFLATE, TAG_END, TAG_RAW, Reader, varint
from dgfs.delta import DeltaEngine
from dgfs.errors import DecodeLimit, FormatError, IntegrityError
from dgfs.format import DeltaMode, Kind
from dgfs.store.memory import MemoryStore
from tests import coreharness
from tests.coreharness import make_core
from testsupport.releases import write_series


@contextlib.asynccontextmanager
async def fresh_core(store: MemoryStore, root: Path) -> AsyncIterator[Core]:
    """Another deep core over ``store``, with a cache of its own (a new mount)."""
    core, cache = make_core(store, root, DeltaMode.DEEP)
    try:
        yield core
    finally:
        await core.aclose()
        cache.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expanded(path: Path, tmp_path: Path) -> Path:
    form = tmp_path / f"{path.name}.dgx"
    dgfs.deep.expand_file(path, form, scratch_dir=tmp_path)
    return form


async def store_series(deep: Core, tmp_path: Path, count: int = 3) -> list[Path]:
    paths = write_series(tmp_path / "rel", count, size=1 << 20)
    for path in paths:
        await deep.put(path, f"app/{path.name}")
    return paths


async def test_a_later_release_is_stored_as_spans_of_its_reference_and_reads_back(
    deep: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    paths = await store_series(deep, tmp_path)
    for path in paths[1:]:
        obj = memory_store.objects[f"app/{path.name}.delta"]
        assert obj.body.startswith(fmt.DEEP_DELTA_SPANS_MAGIC)
        assert len(obj.body) < 0.05 * path.stat().st_size
    async with fresh_core(memory_store, tmp_path / "fresh") as reader:
        for path in paths:
            out = tmp_path / "out"
            stored = await reader.get(f"app/{path.name}", out)
            assert stored.kind is Kind.DELTA and stored.deep and sha(out) == sha(path)


async def test_a_version_1_delta_still_reads(
    deep: Core, memory_store: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deltas written before spans existed (and those with none to take) hold
    a VCDIFF of the whole form."""
    monkeypatch.setattr(dgfs.deep, "find_spans", lambda *_: [])
    paths = await store_series(deep, tmp_path)
    body = memory_store.objects[f"app/{paths[2].name}.delta"].body
    assert body.startswith(fmt.DEEP_DELTA_MAGIC)
    out = tmp_path / "out"
    await deep.get(f"app/{paths[2].name}", out)
    assert sha(out) == sha(paths[2])


def test_the_cut_form_spliced_with_its_spans_is_the_form(tmp_path: Path) -> None:
    first, second = write_series(tmp_path / "rel", 2, size=1 << 20)
    ref, form = expanded(first, tmp_path), expanded(second, tmp_path)
    found = spans.find(ref, sha(ref), form)
    assert sum(span.size for span in found) > 0.9 * form.stat().st_size
    for span in found:
        data = form.read_bytes()[span.at : span.at + span.size]
        assert data == ref.read_bytes()[span.ref : span.ref + span.size]
    spans.write_cut(form, found, tmp_path / "cut")
    spans.write_source(ref, found, tmp_path / "source")
    assert (tmp_path / "source").stat().st_size < 0.1 * ref.stat().st_size
    table = spans.unpack(io.BytesIO(spans.pack(found)), ref.stat().st_size, 1 << 30)
    assert table == found
    with spans.spliced(tmp_path / "cut", ref, table, 1 << 30) as back:
        assert back.read() == form.read_bytes()
        for at in (0, 1, found[0].at + found[0].size - 1, form.stat().st_size - 5):
            back.seek(at)  # reads from anywhere: a span's, a cut's, across both
            assert back.read(4096) == form.read_bytes()[at : at + 4096]


def raw(data: bytes) -> bytes:
    return bytes((TAG_RAW,)) + varint(len(data)) + data


@pytest.mark.parametrize(
    "reference",
    [
        b"not an expanded form" * 100,
        MAGIC + raw(b"x" * 4096),  # ends without END
        MAGIC + (bytes((TAG_DEFLATE, 6, 8, 241, 0)) * 40) + raw(b"x" * 4096),  # nests 40 deep
        MAGIC + bytes((9,)) + raw(b"x" * 4096) + bytes((TAG_END,)),  # unknown tag
    ],
    ids=["garbage", "no end", "nested too deep", "unknown tag"],
)
def test_a_reference_that_is_no_valid_form_gives_no_spans(tmp_path: Path, reference: bytes) -> None:
    ref = tmp_path / "ref"
    ref.write_bytes(reference)
    form = tmp_path / "form"
    form.write_bytes(MAGIC + raw(b"x" * 4096) + bytes((TAG_END,)))
    assert spans.find(ref, hashlib.sha256(reference).hexdigest(), form) == []


#: A span table that inflates past MAX_TABLE.
BOMB = zlib.compress(bytes(spans.MAX_TABLE + 10), 9)


def table(*rows: tuple[int, int, int], count: int | None = None) -> io.BytesIO:
    body = bytearray(varint(len(rows) if count is None else count))
    for row in rows:
        body += b"".join(map(varint, row))
    packed = zlib.compress(bytes(body))
    return io.BytesIO(varint(len(packed)) + packed)


@pytest.mark.parametrize(
    ("src", "error"),
    [
        (table(count=spans.MAX_SPANS + 1), DecodeLimit),
        (table((0, 0, 2000)), FormatError),  # past the reference's 1,000 bytes
        (table((0, 2 * 900, 200)), FormatError),  # starts at 900, ends past 1,000
        (table((0, 1, 10)), FormatError),  # zigzag -1: before the reference's start
        (table((0, 0, 0)), FormatError),  # empty
        (table((5000, 0, 10)), DecodeLimit),  # past the form's cap of 4,096
        (io.BytesIO(varint(4) + b"\x78\x9c\xff\xff"), FormatError),
        (io.BytesIO(varint(spans.MAX_TABLE + 1)), DecodeLimit),
        (io.BytesIO(varint(len(BOMB)) + BOMB), DecodeLimit),
    ],
    ids=[
        "too many",
        "past the reference",
        "ends past the reference",
        "before the reference",
        "empty span",
        "past the cap",
        "corrupt zlib",
        "table too large",
        "table inflates too far",
    ],
)
def test_a_hostile_span_table_is_refused(src: io.BytesIO, error: type[Exception]) -> None:
    with pytest.raises(error):
        spans.unpack(src, reference_size=1000, cap=4096)


async def test_a_delta_whose_spans_were_moved_reads_eio_and_returns_nothing(
    deep: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    """A span table pointing at other bytes of the reference (written in the
    bucket by someone else) gives another expanded form: the rebuilt file's
    SHA-256 refuses it."""
    paths = await store_series(deep, tmp_path)
    key = f"app/{paths[1].name}.delta"
    body = memory_store.objects[key].body
    src = io.BytesIO(body[len(fmt.DEEP_DELTA_SPANS_MAGIC) :])
    found = spans.unpack(src, 1 << 40, 1 << 40)
    moved = [found[0]._replace(ref=found[0].ref + 1), *found[1:]]
    forged = fmt.DEEP_DELTA_SPANS_MAGIC + spans.pack(moved) + src.read()
    memory_store.objects[key] = dataclasses.replace(memory_store.objects[key], body=forged)
    async with fresh_core(memory_store, tmp_path / "fresh") as reader:
        with pytest.raises(IntegrityError):
            await reader.get(f"app/{paths[1].name}", tmp_path / "out")
        assert not (tmp_path / "out").exists()


async def test_a_delta_of_a_newer_kind_names_the_cause(
    deep: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    paths = await store_series(deep, tmp_path, count=2)
    key = f"app/{paths[1].name}.delta"
    obj = memory_store.objects[key]
    memory_store.objects[key] = dataclasses.replace(obj, body=b"DGFSDEEP\x03\n" + obj.body[10:])
    with pytest.raises(IntegrityError, match="newer dgfs"):
        await deep.get(f"app/{paths[1].name}", tmp_path / "out")


def make_tar(members: dict[str, bytes], mtime: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def release(version: int, count: int = 200) -> dict[str, bytes]:
    """Members of a release: all but one unchanged since version 1, of sizes
    that are no multiple of 512, the changed one first (it moves the rest)."""
    rng = random.Random(7)
    members = {
        f"pkg/mod{i:03d}.py": rng.randbytes(4000 + 37 * i).hex().encode() for i in range(count)
    }
    members["pkg/mod000.py"] += b"# changed\n" * version
    return members


def test_tar_cuts_fall_where_data_of_members_of_1_kib_or_more_starts_and_ends() -> None:
    members = {"a": b"x" * 700, "dir/b": b"", "c": b"y" * 1024, "d": b"z" * 5000, "e": b"w"}
    data = make_tar(members, 1_700_000_000)
    cuts = archives.tar_cuts(io.BytesIO(data), 0, len(data))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = []
        for info in tar.getmembers():
            if info.size >= 1024:
                expected += [info.offset_data, info.offset_data + -(-info.size // 512) * 512]
    assert cuts == expected and len(cuts) == 4


@pytest.mark.parametrize(
    "data",
    [
        b"not a tar" * 1000,
        make_tar({"a": b"x" * 700}, 0)[:512].replace(b"0001274", b"7777777") + bytes(4096),
        b"",
    ],
    ids=["no tar", "size past the end", "empty"],
)
def test_tar_cuts_of_what_is_no_whole_tar_stay_inside_it(data: bytes) -> None:
    cuts = archives.tar_cuts(io.BytesIO(data), 0, len(data))
    assert all(0 < cut <= len(data) for cut in cuts)


@pytest.mark.parametrize(
    ("compressed", "count", "split"),
    [(False, 200, 0), (True, 200, 0), (True, 330, 1)],
    ids=["tar", "tar.gz", "tar.gz in pieces"],
)
def test_members_of_a_tar_are_spans_whatever_moved_before_them(
    tmp_path: Path, compressed: bool, count: int, split: int
) -> None:
    """Members' data in RAW segments of their own: a later release whose first
    member grew (and whose headers all changed: new mtimes) still takes the
    rest from the reference. A plain tar is RAW at the top; a .tar.gz one
    DEFLATE segment, or a SPLIT one from 4 MiB of content on."""
    paths = []
    for version in (1, 2):
        data = make_tar(release(version, count), 1_700_000_000 + version)
        if compressed:
            data = gzip.compress(data, 9, mtime=0)
        path = tmp_path / f"pkg-{version}.tar{'.gz' if compressed else ''}"
        path.write_bytes(data)
        paths.append(path)
    ref = expanded(paths[0], tmp_path)
    form = tmp_path / "form.dgx"
    stats = dgfs.deep.expand_file(paths[1], form, scratch_dir=tmp_path)
    assert stats.streams_split == split
    found = spans.find(ref, sha(ref), form)
    assert sum(span.size for span in found) > 0.9 * form.stat().st_size
    out = tmp_path / "rebuilt"
    assert dgfs.deep.rebuild_file(form, out, tmp_path) == (sha(paths[1]), paths[1].stat().st_size)


# Found by review of the first version of spans (each failed then).


def replace_reference(store: MemoryStore, key: str, expanded: bytes) -> None:
    """Put another expanded form in the deep reference ``key``, as someone with
    write access to the bucket could: zstd, with matching metadata."""
    obj = store.objects[key]
    body = zstandard.ZstdCompressor(write_content_size=True).compress(expanded)
    meta = dict(obj.metadata)
    digest = hashlib.sha256(expanded).hexdigest()
    for name, value in obj.metadata.items():
        if value == obj.metadata.get(fmt.META_EXPANDED_SIZE):
            meta[name] = str(len(expanded))
        elif len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            meta[name] = digest
    store.objects[key] = dataclasses.replace(
        obj, body=body, metadata=meta, etag=hashlib.md5(body).hexdigest()
    )


@pytest.mark.parametrize("length", [1 << 69, (1 << 63) - 4], ids=["past 2^64", "past 2^63"])
async def test_a_hostile_reference_with_a_huge_raw_length_does_not_fail_stores(
    deep: Core, memory_store: MemoryStore, tmp_path: Path, length: int
) -> None:
    """A deep reference from the bucket whose RAW length no seek can take:
    spans.find should give no spans (as for any reference that is no valid
    form), and the file be stored all the same. Got: `_segments`'
    `form.seek` raises ValueError / OSError, which `_index` does not catch,
    and every store into the directory fails."""
    paths = write_series(tmp_path / "rel", 2, size=1 << 20)
    await deep.put(paths[0], f"app/{paths[0].name}")
    ref_key = next(k for k in memory_store.objects if k.startswith("app/") and "reference" in k)
    hostile = MAGIC + bytes((TAG_RAW,)) + varint(length) + b"x" * 4096 + bytes((TAG_END,))
    replace_reference(memory_store, ref_key, hostile)
    async with fresh_core(memory_store, tmp_path / "fresh") as writer:
        await writer.put(paths[1], f"app/{paths[1].name}")
        out = tmp_path / "out"
        await writer.get(f"app/{paths[1].name}", out)
        assert sha(out) == sha(paths[1])


def test_find_on_a_reference_with_a_huge_raw_length_gives_no_spans(tmp_path: Path) -> None:
    """The unit behind the test above: `spans.find` promises [] for a
    reference that is no valid expanded form."""
    ref = tmp_path / "ref"
    ref.write_bytes(MAGIC + bytes((TAG_RAW,)) + varint(1 << 69) + b"x" * 4096 + bytes((TAG_END,)))
    form = tmp_path / "form"
    form.write_bytes(MAGIC + raw(b"x" * 4096) + bytes((TAG_END,)))
    assert spans.find(ref, sha(ref), form) == []


async def test_a_store_writes_no_span_table_its_readers_refuse(
    deep: Core, memory_store: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same end to end, at a scale a test can afford: readers accept at
    most MAX_SPANS spans, but `_diff_deep` / `spans.find` / `spans.pack`
    never look at it. With the readers' limit at 8 here, a store that
    succeeds leaves an object that reads EIO. Expected: what was stored
    reads back (the writer keeps to the limit, e.g. falls back to version 1)."""
    monkeypatch.setattr(spans, "MAX_SPANS", 8)
    paths = write_series(tmp_path / "rel", 2, size=1 << 20)
    for path in paths:
        await deep.put(path, f"app/{path.name}")
    body = memory_store.objects[f"app/{paths[1].name}.delta"].body
    assert body.startswith(fmt.DEEP_DELTA_SPANS_MAGIC)
    async with fresh_core(memory_store, tmp_path / "fresh") as reader:
        out = tmp_path / "out"
        stored = await reader.get(f"app/{paths[1].name}", out)
        assert stored.kind is Kind.DELTA and sha(out) == sha(paths[1])


def make_log_tar_gz(path: Path) -> Path:
    """A small, very compressible .tar.gz (zlib level 9, one deflate stream
    of 3 KB that inflates to 768 KB: a tar of logs)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(60):
            data = (f"line {i} of a log that repeats\n" * 400).encode()
            info = tarfile.TarInfo(f"log{i:03d}.txt")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue(), 9, mtime=0))
    return path


def test_a_tar_in_a_deflate_stream_is_not_counted_twice_against_the_budget(tmp_path: Path) -> None:
    """_SegmentSink now spools a tar (budget.hold per piece) and then copies
    the spool into the form (Writer holds the same bytes again), so its
    inflated bytes count twice against the expansion's allowance. This
    .tar.gz (2,981 bytes, allowance 1 MiB) expanded to a 768 KB form before
    spans (d9077a4: 1 stream inflated, peak scratch 768,041). Got: the
    expansion passed the allowance (the tar spooled and then written), the writer caught
    ExpansionLimit and stores the file unexpanded (its deltas lose deep mode).
    Expected: it expands as before."""
    path = make_log_tar_gz(tmp_path / "logs.tar.gz")
    stats = dgfs.deep.expand_file(path, tmp_path / "form.dgx", scratch_dir=tmp_path)
    assert stats.streams_inflated == 1


def test_a_hostile_reference_costs_no_more_memory_than_its_size_to_index(tmp_path: Path) -> None:
    """A deep reference from the bucket, nesting DEFLATE headers 15 deep
    around 1 KiB RAW segments of distinct bytes: every level is a segment of
    1 KiB or more, so `_index` keeps 16 SHA-256 entries (~200 bytes each in
    Python) per 1.1 KB, and hashes every byte 16 times, with no time limit.
    Its zstd body is 3.6 KB here (2.2 MB expanded, 7 MB of index); at the
    reference cap (4 GiB, or 100 × the stored size) that is ~13 GB of memory
    in the daemon, the first time any file is stored beside it (before
    spans, xdelta3 read the reference within its -B memory budget).
    Expected: the index holds no more memory than the reference's size."""
    nest = bytes((TAG_DEFLATE, 6, 8, 241, 0))
    chunks = [
        nest * (MAX_NESTING - 1)
        + raw(i.to_bytes(8, "big") + bytes(1016))
        + bytes((TAG_END,)) * (MAX_NESTING - 1)
        for i in range(2000)
    ]
    data = MAGIC + b"".join(chunks) + bytes((TAG_END,))
    size = len(data)
    ref = tmp_path / "ref"
    ref.write_bytes(data)
    form = tmp_path / "form"
    form.write_bytes(MAGIC + raw(b"y" * 4096) + bytes((TAG_END,)))
    ref_sha256 = sha(ref)
    tracemalloc.start()
    try:
        spans._INDEXES.clear()
        spans.find(ref, ref_sha256, form)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        spans._INDEXES.clear()
    assert peak <= size, f"{peak} bytes of memory for a {size}-byte reference"


@pytest.mark.parametrize("piece", [1, 100, 511, 512, 4096, 1 << 20])
def test_a_tar_walked_as_a_stream_is_cut_where_it_is_walked_by_headers(piece: int) -> None:
    data = make_tar(release(1, 40), 1_700_000_000) + bytes(1024)
    expected = archives.tar_cuts(io.BytesIO(data), 0, len(data))
    assert len(expected) == 80
    walk, found = archives.TarWalk(), []
    for start in range(0, len(data), piece):
        found += [start + cut for cut in walk.feed(data[start : start + piece])]
    assert found == expected


def test_spans_are_put_back_where_the_kernel_cannot_copy_between_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """copy_file_range fails across some filesystems and on old kernels
    (EXDEV, ENOSYS): the copy is done by reading and writing then."""

    def refuse(*_: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    test_the_cut_form_spliced_with_its_spans_is_the_form(tmp_path)


async def test_the_cut_is_encoded_at_the_mounts_xdelta_level_when_that_is_lower(
    memory_store: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-o xdelta_level=1`` asks for speed: the cut form is not encoded at 6 then."""
    levels: list[int | None] = []
    encode = DeltaEngine.encode

    async def recorded(self: DeltaEngine, *args: Path, level: int | None = None) -> int:
        levels.append(level)
        return await encode(self, *args, level=level)

    monkeypatch.setattr(DeltaEngine, "encode", recorded)
    monkeypatch.setattr(coreharness, "DeltaEngine", functools.partial(DeltaEngine, level=1))
    async with fresh_core(memory_store, tmp_path) as core:
        paths = await store_series(core, tmp_path, count=2)
        out = tmp_path / "out"
        await core.get(f"app/{paths[1].name}", out)
        assert sha(out) == sha(paths[1])
    assert levels == [None, 1]  # the reference's self-delta, then the cut


def test_subtrees_found_in_the_reference_are_not_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rebuilt once from the reference's form, the subtrees a later form
    takes from it as they are (its spans) come back by where they lie in the
    reference: none is hashed or compressed again, and the bytes are the file's."""
    recompress.REBUILT_SUBTREES.clear()
    recompress.FROM_REFERENCE.clear()
    first, second = write_series(tmp_path / "rel", 2, size=1 << 20)
    ref, form = expanded(first, tmp_path), expanded(second, tmp_path)
    found = spans.find(ref, sha(ref), form)
    spans.write_cut(form, found, tmp_path / "cut")
    digest, _ = recompress.rebuild_file(
        ref, tmp_path / "out", tmp_path, 2, in_reference=spans.InReference(sha(ref))
    )
    assert digest == sha(first)
    hashed: list[int] = []
    rebuild_subtree = recompress._rebuild_subtree

    def counted(subtree: bytes, *args: object, **kwargs: object) -> list[bytes]:
        hashed.append(len(subtree))
        return rebuild_subtree(subtree, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(recompress, "_rebuild_subtree", counted)
    in_reference = spans.InReference(sha(ref), found)
    with spans.spliced(tmp_path / "cut", ref, found, 1 << 30) as back:
        digest, _ = recompress.rebuild_file(
            back, tmp_path / "out", tmp_path, 2, in_reference=in_reference
        )
    assert digest == sha(second)
    subtrees = _top_level_subtrees(form)
    taken = [s for s in subtrees if in_reference.key(*s) is not None]
    assert taken, "the later release takes none of its reference's members as they are"
    assert len(hashed) <= len(subtrees) - len(taken)  # only those it does not take


def _top_level_subtrees(form: Path) -> list[tuple[int, int]]:
    """(start, end) of the form's top-level DEFLATE, GNU and SPLIT segments."""
    out = []
    with open(form, "rb") as src:
        src.seek(len(MAGIC))
        reader = Reader(src)
        while (tag := reader.exact(1)[0]) != TAG_END:
            start = src.tell() - 1
            if tag == TAG_RAW:
                src.seek(reader.varint(), os.SEEK_CUR)
                continue
            end = reader._subtree_end(tag, 1 << 40)
            assert end is not None
            out.append((start, end))
    return out
