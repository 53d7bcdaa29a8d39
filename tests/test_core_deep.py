"""Deep deltaspaces in the storage core: deltas of expanded forms (no FUSE)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import random
import time
from pathlib import Path

import pytest
import trio
import trio.testing
import zstandard

import dgfs.deep
from dgfs import format as fmt
from dgfs.core import Core
from dgfs.delta import DeltaEngine
from dgfs.errors import IntegrityError
from dgfs.format import DeltaMode, Kind
from dgfs.store.memory import MemoryStore
from dgfs.verify import Status, verify_key
from tests.coreharness import deep_core, make_core
from testsupport.releases import write_sdist, write_series


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_targz_series_stored_as_small_deep_deltas(
    deep: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    paths = [write_sdist(tmp_path, v) for v in range(1, 4)]
    results = [await deep.put(p, f"app/{p.name}") for p in paths]
    assert results[0].created_reference and all(r.stored.deep for r in results)
    assert "app/reference.deep" in memory_store.objects
    assert "app/reference.bin" not in memory_store.objects
    for path, result in zip(paths[1:], results[1:], strict=True):
        assert result.stored.kind is Kind.DELTA
        # The gzip streams differ almost entirely; their content barely does.
        assert result.stored.stored_size < 0.05 * path.stat().st_size
    for path in paths:
        out = tmp_path / "out"
        stored = await deep.get(f"app/{path.name}", out)
        assert stored.deep and sha(out) == sha(path)
    head = memory_store.objects["app/pkg-2.tar.gz.delta"]
    assert head.metadata[fmt.META_FORMAT] == fmt.DEEP_FORMAT
    assert head.body.startswith(fmt.DEEP_DELTA_SPANS_MAGIC)  # its tar members are spans


async def test_dg_mode_stores_gzip_direct(core: Core, tmp_path: Path) -> None:
    result = await core.put(write_sdist(tmp_path, 1), "app/pkg-1.tar.gz")
    assert result.stored.kind is Kind.DIRECT and not result.stored.deep


async def test_directory_keeps_the_mode_it_was_created_with(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    zips = write_series(tmp_path / "rel", 3, size=512 << 10)
    deep_core, deep_cache = make_core(memory_store, tmp_path / "d", DeltaMode.DEEP)
    dg_core, dg_cache = make_core(memory_store, tmp_path / "g", DeltaMode.DG)
    try:
        assert (await dg_core.put(zips[0], "dgdir/a.zip")).stored.deep is False
        assert (await deep_core.put(zips[1], "dgdir/b.zip")).stored.deep is False  # stays DG
        assert (await deep_core.put(zips[0], "deepdir/a.zip")).stored.deep is True
        assert (await dg_core.put(zips[2], "deepdir/c.zip")).stored.deep is True  # stays deep
        for key, path in [("dgdir/b.zip", zips[1]), ("deepdir/c.zip", zips[2])]:
            for core in (deep_core, dg_core):
                out = tmp_path / "out"
                await core.get(key, out)
                assert sha(out) == sha(path)
    finally:
        for core, cache in ((deep_core, deep_cache), (dg_core, dg_cache)):
            await core.aclose()
            cache.close()


async def test_deep_reads_from_a_fresh_cache(memory_store: MemoryStore, tmp_path: Path) -> None:
    """The reader fetches and unpacks reference.deep itself (another machine's view)."""
    writer, wcache = make_core(memory_store, tmp_path / "w", DeltaMode.DEEP)
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    for p in paths:
        await writer.put(p, f"app/{p.name}")
    await writer.aclose()
    wcache.close()
    reader, rcache = make_core(memory_store, tmp_path / "r", DeltaMode.DG)
    try:
        for p in paths:
            out = tmp_path / "out"
            await reader.get(f"app/{p.name}", out)
            assert sha(out) == sha(p)
    finally:
        await reader.aclose()
        rcache.close()


async def _fresh_reads(
    store: MemoryStore, root: Path, paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Each of ``paths`` (stored under app/) read by a new core with an empty
    cache, in order, checked; how many xdelta3 decodes each took."""
    decodes = 0
    decode = DeltaEngine.decode

    async def counted(self: DeltaEngine, *args: object, **kwargs: object) -> None:
        nonlocal decodes
        decodes += 1
        await decode(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DeltaEngine, "decode", counted)
    reader, cache = make_core(store, root, DeltaMode.DG)
    counts = []
    try:
        for p in paths:
            before = decodes
            out = root / "out"
            await reader.get(f"app/{p.name}", out)
            assert sha(out) == sha(p)
            counts.append(decodes - before)
    finally:
        await reader.aclose()
        cache.close()
    return counts


async def test_first_file_of_a_deep_directory_is_rebuilt_from_its_reference(
    deep: Core, memory_store: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first file's delta is a zero-diff one (its form is the reference):
    it is rebuilt from the reference's form without decoding the delta."""
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    for p in paths:
        await deep.put(p, f"app/{p.name}")
    first = memory_store.objects["app/pkg-1.tar.gz.delta"]
    assert first.metadata["dg-note"] == fmt.ZERO_DIFF_NOTE
    assert await _fresh_reads(memory_store, tmp_path / "r", paths, monkeypatch) == [0, 1]


@pytest.mark.expected_log("does not rebuild to it; decoding its delta")
async def test_a_zero_diff_note_that_lies_costs_a_rebuild_not_bytes(
    deep: Core, memory_store: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later file's delta whose note claims zero-diff: the reference's form
    rebuilds to other bytes, which the SHA-256 refuses, and the delta is
    decoded; the read returns the file's bytes."""
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    for p in paths:
        await deep.put(p, f"app/{p.name}")
    obj = memory_store.objects["app/pkg-2.tar.gz.delta"]
    lying = {**obj.metadata, "dg-note": fmt.ZERO_DIFF_NOTE}
    memory_store.objects["app/pkg-2.tar.gz.delta"] = dataclasses.replace(obj, metadata=lying)
    assert await _fresh_reads(memory_store, tmp_path / "r", paths[1:], monkeypatch) == [1]


async def test_a_first_file_over_the_time_limit_gets_one_limit_not_two(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """expand_time is "the wall time of one rebuild when reading". An honest
    first file: a gzip at level 9 of 5 MiB of random a-d (one DEFLATE stream,
    over PARALLEL_PAYLOAD so streamed; ~0.7 s per 1 MiB RAW chunk, ~3.4 s
    in all), read with expand_time=1.5. The shortcut's rebuild stops at its
    deadline with DecodeLimit, which _rebuilt_from_reference swallows as "the
    note lied" (a false WARNING), then the delta is decoded and the same form
    rebuilt for another full expand_time: the read fails after ~4.2 s, twice
    the limit (5d16281: ~2.1 s). A hostile bucket gets the same with a lying
    note on any delta whose reference is slow to rebuild."""
    rnd = random.Random(1)
    src = tmp_path / "data-1.gz"
    src.write_bytes(gzip.compress(bytes(rnd.choice(b"abcd") for _ in range(5 << 20)), 9, mtime=0))
    writer, wcache = make_core(memory_store, tmp_path / "w", DeltaMode.DEEP)
    try:
        await writer.put(src, "app/data-1.gz")
    finally:
        await writer.aclose()
        wcache.close()
    assert memory_store.objects["app/data-1.gz.delta"].metadata["dg-note"] == fmt.ZERO_DIFF_NOTE
    limit = 1.5
    reader, rcache = deep_core(memory_store, tmp_path / "r", seconds=limit)
    try:
        started = time.monotonic()
        with pytest.raises(IntegrityError, match=r"took over 1.5 s \(expand_time\)"):
            await reader.get("app/data-1.gz", tmp_path / "out")
        elapsed = time.monotonic() - started
    finally:
        await reader.aclose()
        rcache.close()
    assert elapsed < 2 * limit, f"the read took {elapsed:.2f} s against expand_time={limit}"


@pytest.mark.expected_log("does not rebuild to it; decoding its delta")
async def test_a_failed_rebuild_leaves_no_wrong_bytes_in_out(
    deep: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    """Rebuilder.rebuild: "IntegrityError, and out removed". A later file's
    delta with a lying zero-diff note and a body that is no deep delta (bad
    magic): the shortcut writes the reference's file (pkg-1's bytes) into
    ``out``, the SHA-256 refuses them, the fallback's unwrap raises
    IntegrityError, and ``out`` is left holding pkg-1's bytes under pkg-2's
    name (before ca72513 ``out`` was never written)."""
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    for p in paths:
        await deep.put(p, f"app/{p.name}")
    key = "app/pkg-2.tar.gz.delta"
    obj = memory_store.objects[key]
    lying = {**obj.metadata, "dg-note": fmt.ZERO_DIFF_NOTE}
    memory_store.objects[key] = dataclasses.replace(
        obj, body=b"garbage!" + obj.body, metadata=lying
    )
    reader, cache = make_core(memory_store, tmp_path / "r", DeltaMode.DG)
    out = tmp_path / "out"
    try:
        stored = await reader.locate("app/pkg-2.tar.gz")
        with pytest.raises(IntegrityError):
            await reader.rebuild(stored, out)
    finally:
        await reader.aclose()
        cache.close()
    assert not out.exists(), (
        f"out left holding {hashlib.sha256(out.read_bytes()).hexdigest()[:12]}"
        f" (pkg-1 is {hashlib.sha256(paths[0].read_bytes()).hexdigest()[:12]})"
    )


async def test_verify_checks_a_first_files_delta_body(
    deep: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    """dgfs verify rebuilds each delta to check the object in the bucket. A
    first file's delta body truncated to its magic (no VCDIFF at all) now
    passes: the shortcut never downloads it. Yet that body is what the
    fallback decodes (a reference rebuild over expand_time, as above) and what
    every dgfs before ca72513 reads: there the file is unreadable, and verify
    said FAILED before ca72513."""
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    for p in paths:
        await deep.put(p, f"app/{p.name}")
    key = "app/pkg-1.tar.gz.delta"
    obj = memory_store.objects[key]
    assert obj.metadata["dg-note"] == fmt.ZERO_DIFF_NOTE
    memory_store.objects[key] = dataclasses.replace(obj, body=obj.body[:8])
    reader, cache = make_core(memory_store, tmp_path / "r", DeltaMode.DG)
    try:
        result = await verify_key(reader, "app/pkg-1.tar.gz")
    finally:
        await reader.aclose()
        cache.close()
    assert result.status is Status.FAILED, f"verify says {result.status.value} of a broken body"


async def test_corrupt_deep_delta_is_refused(
    deep: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    for p in paths:
        await deep.put(p, f"app/{p.name}")
    obj = memory_store.objects["app/pkg-2.tar.gz.delta"]
    memory_store.objects["app/pkg-2.tar.gz.delta"] = dataclasses.replace(
        obj, body=b"NOTDEEP" + obj.body[7:]
    )
    with pytest.raises(IntegrityError):
        await deep.get("app/pkg-2.tar.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_rename_across_directories_rebuilds_into_the_target_mode(
    deep: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    path = write_sdist(tmp_path, 1)
    await deep.put(path, "app/pkg-1.tar.gz")
    await deep.put(write_sdist(tmp_path, 2), "app/pkg-2.tar.gz")
    moved = await deep.rename("app/pkg-2.tar.gz", "other/pkg-2.tar.gz")
    assert moved.deep
    out = tmp_path / "out"
    await deep.get("other/pkg-2.tar.gz", out)
    assert sha(out) == sha(tmp_path / "pkg-2.tar.gz")
    renamed = await deep.rename("app/pkg-1.tar.gz", "app/first.tar.gz")
    assert renamed.deep and renamed.ref_key == "app/reference.deep"
    await deep.get("app/first.tar.gz", out)
    assert sha(out) == sha(path)


async def test_directory_rename_moves_the_deep_reference(
    deep: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    for p in paths:
        await deep.put(p, f"app/{p.name}")
    await deep.rename_prefix("app", "moved")
    assert "moved/reference.deep" in memory_store.objects
    out = tmp_path / "out"
    stored = await deep.get("moved/pkg-2.tar.gz", out)
    assert stored.ref_key == "moved/reference.deep" and sha(out) == sha(paths[1])


@pytest.mark.expected_log(r"does not rebuild exactly")
async def test_expansion_that_fails_its_proof_is_stored_unexpanded(
    deep: Core, memory_store: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rebuild(expand(x)) != x must never reach the bucket (here: a faked proof failure)."""

    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    await deep.put(paths[0], f"app/{paths[0].name}")
    monkeypatch.setattr(dgfs.deep, "prove_form", lambda *_: False)
    result = await deep.put(paths[1], f"app/{paths[1].name}")
    monkeypatch.undo()
    # Unexpanded: the delta of a gzip stream against an expanded tar is large.
    assert (
        result.stored.stored_size > 0.3 * paths[1].stat().st_size
        or result.stored.kind is Kind.DIRECT
    )
    out = tmp_path / "out"
    await deep.get(f"app/{paths[1].name}", out)
    assert sha(out) == sha(paths[1])


@pytest.mark.expected_log(r"does not rebuild exactly")
@pytest.mark.parametrize("damage", ["raw byte", "deflate level"])
async def test_a_wrong_expanded_form_is_caught_without_a_second_deflate(
    deep: Core, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """The write path proves the form by ``prove_form``, not by deflating it
    all again: a form that would rebuild to other bytes (a RAW byte changed,
    or the tar.gz's level changed after its search) is never stored."""
    from dgfs.deep import expand
    from dgfs.deep.deflate import DeflateParams

    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    await deep.put(paths[0], f"app/{paths[0].name}")
    real_expand = expand.expand_file
    deflated_again: list[DeflateParams] = []  # compressors made once the form exists
    expanded = False
    real_compressor = DeflateParams.compressor

    def spoiled(src: Path, out: Path, **kwargs: object) -> expand.ExpandStats:
        nonlocal expanded
        stats = real_expand(src, out, **kwargs)  # type: ignore[arg-type]
        expanded = True
        form = bytearray(out.read_bytes())
        if damage == "raw byte":
            at = form.index(b"/mod3.py")  # a tar header, inside the gzip's DEFLATE
            form[at] ^= 0x01
        else:
            at = form.index(bytes((expand.TAG_DEFLATE,)) + DeflateParams(9).pack())
            form[at + 1] = 6
        out.write_bytes(bytes(form))
        return stats

    def counted(params: DeflateParams, zdict: bytes | memoryview = b"") -> object:
        if expanded:
            deflated_again.append(params)
        return real_compressor(params, zdict)

    monkeypatch.setattr(dgfs.deep, "expand_file", spoiled)
    monkeypatch.setattr(DeflateParams, "compressor", counted)
    result = await deep.put(paths[1], f"app/{paths[1].name}")
    monkeypatch.undo()
    assert deflated_again == []
    assert (
        result.stored.stored_size > 0.3 * paths[1].stat().st_size
        or result.stored.kind is Kind.DIRECT
    )
    out = tmp_path / "out"
    await deep.get(f"app/{paths[1].name}", out)
    assert sha(out) == sha(paths[1])


async def test_first_files_of_a_directory_stored_at_once_make_one_reference(
    deep: Core, memory_store: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upload workers store a new directory's first files side by side: one of
    them compresses the reference and the others wait for it, instead of each
    compressing one that the conditional PUT then refuses (botocore: 0.8 CPU
    seconds of zstd each)."""
    import time

    import trio

    from dgfs.deep import objects

    real_compress = objects.compress_reference
    compressed: list[Path] = []

    def slow_compress(expanded: Path, out: Path) -> objects.PackedReference:
        compressed.append(expanded)
        time.sleep(0.3)  # every put reaches the reference before the first one made it
        return real_compress(expanded, out)

    monkeypatch.setattr(dgfs.deep, "compress_reference", slow_compress)
    paths = [write_sdist(tmp_path, v) for v in range(1, 4)]
    created: list[bool] = []

    async def put(path: Path) -> None:
        created.append((await deep.put(path, f"app/{path.name}")).created_reference)

    async with trio.open_nursery() as nursery:
        for path in paths:
            nursery.start_soon(put, path)
    assert len(compressed) == 1
    assert sorted(created) == [False, False, True]
    # The SHA-256 and size recorded are those of the form it holds (hashed while compressed).
    ref = memory_store.objects["app/reference.deep"]
    held = zstandard.ZstdDecompressor().decompress(ref.body)
    assert ref.metadata["dg-file-sha256"] == hashlib.sha256(held).hexdigest()
    assert ref.metadata[fmt.META_EXPANDED_SIZE] == str(len(held))
    for path in paths:
        out = tmp_path / "out"
        await deep.get(f"app/{path.name}", out)
        assert sha(out) == sha(path)


@pytest.mark.expected_log(r"does not deflate like reference zlib")
async def test_foreign_zlib_makes_unexpanded_deep_objects(
    deep: Core, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dgfs.deep, "zlib_is_reference", lambda: False)
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    results = [await deep.put(p, f"app/{p.name}") for p in paths]
    assert (
        results[1].stored.kind is Kind.DIRECT
        or results[1].stored.stored_size > 0.3 * paths[1].stat().st_size
    )
    for path in paths:
        out = tmp_path / "out"
        await deep.get(f"app/{path.name}", out)
        assert sha(out) == sha(path)


async def test_stock_deltaglider_gzip_delta_is_recovered(
    core: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    """A .tar.gz delta as DeltaGlider 6.2.0 makes it (xdelta3 without -D -R,
    so DeltaGlider cannot read it back) is rebuilt byte for byte."""
    import os
    import subprocess
    from datetime import UTC, datetime

    paths = [write_sdist(tmp_path, v) for v in (1, 2)]
    now = datetime.now(UTC)
    ref_sha = sha(paths[0])
    await memory_store.put_bytes(
        "app/reference.bin", paths[0].read_bytes(), fmt.reference_metadata("a", ref_sha, now)
    )
    delta = tmp_path / "stock.delta"
    env = {k: v for k, v in os.environ.items() if k != "XDELTA"}
    subprocess.run(
        ["xdelta3", "-e", "-9", "-f", "-s", str(paths[0]), str(paths[1]), str(delta)],
        check=True,
        env=env,
    )
    meta = fmt.delta_metadata(
        original_name=paths[1].name,
        file_sha256=sha(paths[1]),
        file_size=paths[1].stat().st_size,
        ref_key="app/reference.bin",
        ref_sha256=ref_sha,
        delta_size=delta.stat().st_size,
        now=now,
    )
    await memory_store.put_bytes(f"app/{paths[1].name}.delta", delta.read_bytes(), meta)
    stored = await core.locate(f"app/{paths[1].name}")
    out = tmp_path / "out"
    assert await core.rebuild(stored, out) is True  # recovered, not plainly decoded
    assert sha(out) == sha(paths[1])
    # A file no gzip setting reproduces is refused, never returned wrong.
    await memory_store.put_bytes(
        "app/other.tar.gz.delta", delta.read_bytes(), {**meta, "dg-file-sha256": "0" * 64}
    )
    with pytest.raises(IntegrityError, match="refusing"):
        await core.get("app/other.tar.gz", tmp_path / "other")


async def test_rebuilds_against_one_reference_take_turns(deep: Core) -> None:
    """Deep rebuilds against one reference run one at a time, in order (side by
    side they took the cores from each other); against another reference
    they run beside them, and nothing is kept once all are done."""
    entered: list[str] = []
    release = trio.Event()

    async def rebuild(name: str, ref: str) -> None:
        async with deep.rebuilder._turn("app/reference.deep", ref):
            entered.append(name)
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rebuild, "first", "a" * 64)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(rebuild, "same reference", "a" * 64)
        nursery.start_soon(rebuild, "other reference", "b" * 64)
        await trio.testing.wait_all_tasks_blocked()
        assert entered == ["first", "other reference"]
        release.set()
    assert entered == ["first", "other reference", "same reference"]
    assert len(deep.rebuilder._turns) == 0
