"""Deep deltas that take spans from their reference as they are (version 2):
what a store writes, what a read accepts, and what a hostile table gets."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import random
import tarfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import dgfs.deep
from dgfs import format as fmt
from dgfs.core import Core
from dgfs.deep import archives, spans
from dgfs.deep.segments import MAGIC, TAG_DEFLATE, TAG_END, TAG_RAW, varint
from dgfs.errors import DecodeLimit, FormatError, IntegrityError
from dgfs.format import DeltaMode, Kind
from dgfs.store.memory import MemoryStore
from tests.coreharness import make_core
from testsupport.releases import write_series


@pytest.fixture
async def deep(memory_store: MemoryStore, tmp_path: Path) -> AsyncIterator[Core]:
    core, cache = make_core(memory_store, tmp_path, DeltaMode.DEEP)
    yield core
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
    reader, cache = make_core(memory_store, tmp_path / "fresh", DeltaMode.DEEP)
    try:
        for path in paths:
            out = tmp_path / "out"
            stored = await reader.get(f"app/{path.name}", out)
            assert stored.kind is Kind.DELTA and stored.deep and sha(out) == sha(path)
    finally:
        await reader.aclose()
        cache.close()


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
    spans.splice(tmp_path / "cut", ref, table, tmp_path / "back", 1 << 30)
    assert (tmp_path / "back").read_bytes() == form.read_bytes()


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
    reader, cache = make_core(memory_store, tmp_path / "fresh", DeltaMode.DEEP)
    try:
        with pytest.raises(IntegrityError):
            await reader.get(f"app/{paths[1].name}", tmp_path / "out")
        assert not (tmp_path / "out").exists()
    finally:
        await reader.aclose()
        cache.close()


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
