"""The storage core: put/get/rename/delete in the DeltaGlider format (no FUSE)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import re
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from dgfs import posixmeta, rebuild
from dgfs.core import Core
from dgfs.errors import (
    DeltaEngineError,
    FormatError,
    IntegrityError,
    MissingReference,
    NotFound,
    StoreError,
)
from dgfs.format import Kind
from dgfs.store.base import ObjectHead
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from tests.coreharness import flip_byte, make_core, write
from testsupport.releases import ReleaseSeries


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def releases(tmp_path: Path) -> list[Path]:
    out = tmp_path / "dist"
    out.mkdir()
    return [write(out / name, data) for name, data in ReleaseSeries(size=256 << 10).zips(4)]


async def test_reference_delta_direct_and_foreign_round_trip(
    core: Core, memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    first = await core.put(releases[0], "app/" + releases[0].name)
    assert first.stored.kind is Kind.DELTA and first.created_reference
    second = await core.put(releases[1], "app/" + releases[1].name)
    assert second.stored.kind is Kind.DELTA and not second.created_reference
    assert second.stored.stored_size < releases[1].stat().st_size * 0.2
    text = write(tmp_path / "notes.txt", b"release notes\n" * 200)
    direct = await core.put(text, "app/notes.txt")
    assert direct.stored.kind is Kind.DIRECT
    await memory_store.put_bytes("app/foreign.bin", b"not ours", {})

    assert set(memory_store.objects) == {
        "app/reference.bin",
        f"app/{releases[0].name}.delta",
        f"app/{releases[1].name}.delta",
        "app/notes.txt",
        "app/foreign.bin",
    }
    for key, expected in (
        (f"app/{releases[0].name}", releases[0].read_bytes()),
        (f"app/{releases[1].name}", releases[1].read_bytes()),
        ("app/notes.txt", text.read_bytes()),
        ("app/foreign.bin", b"not ours"),
    ):
        out = tmp_path / "out"
        stored = await core.get(key, out)
        assert out.read_bytes() == expected, key
        assert stored.visible_key == key


async def test_every_release_is_small_after_the_first(
    core: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    series = ReleaseSeries(size=512 << 10, seed=7)
    originals = {}
    for name, data in series.zips(10):
        originals[name] = data
        await core.put(write(tmp_path / name, data), f"rel/{name}")
    reference = memory_store.objects["rel/reference.bin"]
    deltas = [o for k, o in memory_store.objects.items() if k.endswith(".delta")]
    assert len(deltas) == 10
    original_total = sum(map(len, originals.values()))
    stored_total = len(reference.body) + sum(len(d.body) for d in deltas)
    assert stored_total < original_total * 0.3
    for name, data in originals.items():
        await core.get(f"rel/{name}", tmp_path / "check")
        assert (tmp_path / "check").read_bytes() == data


async def test_exactly_one_reference_when_many_writers_race(
    memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    # Separate cores (separate caches) behave like separate mounts.
    cores = [make_core(memory_store, tmp_path / f"m{i}") for i in range(4)]
    async with trio.open_nursery() as nursery:
        for i, (core, _) in enumerate(cores):
            nursery.start_soon(core.put, releases[i], f"race/{releases[i].name}")
    refs = [k for k in memory_store.objects if k.endswith("reference.bin")]
    assert refs == ["race/reference.bin"]
    ref_sha = memory_store.objects["race/reference.bin"].metadata["dg-file-sha256"]
    for path in releases:
        meta = memory_store.objects[f"race/{path.name}.delta"].metadata
        assert meta["dg-ref-sha256"] == ref_sha
        await cores[0][0].get(f"race/{path.name}", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == path.read_bytes()
    for core, cache in cores:
        await core.aclose()
        cache.close()


async def test_unrelated_archive_falls_back_to_direct(
    core: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    rng = random.Random(5)

    def random_zip(name: str) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(name, rng.randbytes(200_000))
        return buf.getvalue()

    await core.put(write(tmp_path / "a.zip", random_zip("a")), "x/a.zip")
    result = await core.put(write(tmp_path / "b.zip", random_zip("b")), "x/b.zip")
    assert result.stored.kind is Kind.DIRECT
    assert "x/b.zip.delta" not in memory_store.objects
    assert memory_store.objects["x/b.zip"].metadata["dg-compression"] == "none"
    await core.get("x/b.zip", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "b.zip").read_bytes()


async def test_overwrite_switches_form_and_removes_the_old_one(
    core: Core, memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    await core.put(releases[0], "o/first.zip")
    await core.put(releases[1], "o/app.zip")
    assert "o/app.zip.delta" in memory_store.objects
    noise = write(tmp_path / "t", random.Random(987).randbytes(50_000))  # nothing alike
    await core.put(noise, "o/app.zip")
    assert "o/app.zip.delta" not in memory_store.objects
    assert "o/app.zip" in memory_store.objects
    await core.put(releases[2], "o/app.zip")
    assert "o/app.zip" not in memory_store.objects
    await core.get("o/app.zip", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == releases[2].read_bytes()


ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?$")


async def test_metadata_matches_the_deltaglider_format(
    core: Core, memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    await core.put(releases[0], "m/" + releases[0].name)
    await core.put(releases[1], "m/" + releases[1].name)
    await core.put(write(tmp_path / "n.txt", b"x" * 5000), "m/n.txt")
    ref = memory_store.objects["m/reference.bin"].metadata
    # DeltaGlider 6.2.0's keys, plus deltaglider_proxy's (tests/test_format_proxy.py).
    dg_ref_keys = {"dg-tool", "dg-source-name", "dg-file-sha256", "dg-created-at", "dg-note"}
    assert set(ref) == dg_ref_keys | {"dg-original-name", "dg-file-size", "dg-md5"}
    assert ref["dg-source-name"] == releases[0].name
    assert ref["dg-note"] == "reference"
    assert ref["dg-file-sha256"] == sha(releases[0].read_bytes())
    assert ISO_Z.match(ref["dg-created-at"])
    assert ref["dg-tool"].startswith("dgfs/")

    zero = memory_store.objects[f"m/{releases[0].name}.delta"].metadata
    delta = memory_store.objects[f"m/{releases[1].name}.delta"].metadata
    delta_keys = {
        "dg-tool",
        "dg-original-name",
        "dg-file-sha256",
        "dg-file-size",
        "dg-created-at",
        "dg-ref-key",
        "dg-ref-sha256",
        "dg-delta-size",
        "dg-delta-cmd",
    }
    proxy_keys = {"dg-ref-path", "dg-note", "dg-md5", "content-type"}
    assert set(delta) == delta_keys | proxy_keys
    assert set(zero) == delta_keys | proxy_keys
    assert zero["dg-note"] == "zero-diff (reference identical)"
    name = releases[1].name
    assert delta["dg-original-name"] == name
    assert delta["dg-file-size"] == str(releases[1].stat().st_size)
    assert delta["dg-ref-key"] == "m/reference.bin"
    assert delta["dg-ref-sha256"] == ref["dg-file-sha256"]
    assert delta["dg-delta-size"] == str(len(memory_store.objects[f"m/{name}.delta"].body))
    assert delta["dg-delta-cmd"] == f"xdelta3 -e -9 -s reference.bin {name} {name}.delta"
    assert ISO_Z.match(delta["dg-created-at"])

    direct = memory_store.objects["m/n.txt"].metadata
    assert set(direct) == {
        "dg-tool",
        "dg-original-name",
        "dg-file-sha256",
        "dg-file-size",
        "dg-created-at",
        "dg-compression",
    } | {"dg-note", "dg-md5", "content-type"}
    assert direct["dg-compression"] == "none"
    assert ISO.match(direct["dg-created-at"])  # DeltaGlider writes no Z here


async def test_posix_metadata_travels_beside_the_format(
    core: Core, memory_store: MemoryStore, releases: list[Path]
) -> None:
    extra = posixmeta.posix_metadata(
        mtime_ns=1_700_000_000_123_456_789, mode=0o100640, uid=7, gid=8
    )
    await core.put(releases[0], "p/a.zip", extra_metadata=extra)
    meta = memory_store.objects["p/a.zip.delta"].metadata
    assert meta["mtime"] == "1700000000.123456789"
    assert posixmeta.parse_mtime_ns(meta) == 1_700_000_000_123_456_789
    assert posixmeta.parse_int_meta(meta, "mode") == 0o100640
    assert (meta["uid"], meta["gid"]) == ("7", "8")


async def test_corrupted_delta_fails_clearly(
    core: Core, memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    await core.put(releases[0], "c/a.zip")
    await core.put(releases[1], "c/b.zip")
    flip_byte(memory_store, "c/b.zip.delta", lambda body: len(body) // 2)
    out = tmp_path / "out"
    with pytest.raises((IntegrityError, DeltaEngineError)):
        await core.get("c/b.zip", out)
    assert not out.exists()


async def test_corrupted_reference_is_detected(
    memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    writer, wcache = make_core(memory_store, tmp_path / "w")
    await writer.put(releases[0], "r/a.zip")
    await writer.put(releases[1], "r/b.zip")
    flip_byte(memory_store, "r/reference.bin", lambda body: 100)
    reader, rcache = make_core(memory_store, tmp_path / "r")  # cold cache: must download
    with pytest.raises(IntegrityError, match="SHA-256"):
        await reader.get("r/b.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for c, cache in ((writer, wcache), (reader, rcache)):
        await c.aclose()
        cache.close()


@pytest.mark.parametrize("checked_whole", [True, False], ids=["whole", "may-stream"])
async def test_a_corrupt_delta_window_never_gives_wrong_bytes(
    memory_store: MemoryStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    checked_whole: bool,
) -> None:
    """A byte flipped inside the literal bytes a delta adds. A file checked
    whole before use is decoded without xdelta3's window checks (the SHA-256
    catches it); a larger one, which may be served while it is written, keeps
    them (xdelta3 refuses the window). Either way no wrong byte comes out."""
    rng = random.Random(7)
    base = rng.randbytes(64 << 10)
    added = rng.randbytes(8 << 10)  # incompressible: stored as it is in the delta
    first = write(tmp_path / "a.bin", base)
    second = write(tmp_path / "b.bin", base[:30000] + added + base[30000:])
    writer, wcache = make_core(memory_store, tmp_path / "w")
    await writer.put(first, "c/a.zip")
    await writer.put(second, "c/b.zip")
    body = memory_store.objects["c/b.zip.delta"].body
    at = body.find(added[4096:4160])
    assert at > 0, "the added bytes are not stored literally; pick other test data"
    flip_byte(memory_store, "c/b.zip.delta", lambda _: at)
    if not checked_whole:
        monkeypatch.setattr(rebuild, "CHECKED_WHOLE_UP_TO", len(second.read_bytes()) - 1)
    reader, rcache = make_core(memory_store, tmp_path / "r")
    caught_by = "SHA-256 mismatch" if checked_whole else "cannot be decoded"
    with pytest.raises(IntegrityError, match=caught_by):
        await reader.get("c/b.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    stored = await reader.locate("c/b.zip")
    with pytest.raises(IntegrityError):
        await reader.materialize(stored)
    assert stored.file_sha256 is not None and not rcache.contains(stored.file_sha256)
    for c, cache in ((writer, wcache), (reader, rcache)):
        await c.aclose()
        cache.close()


async def test_missing_reference_is_reported(
    memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    writer, wcache = make_core(memory_store, tmp_path / "w")
    await writer.put(releases[0], "g/a.zip")
    await writer.put(releases[1], "g/b.zip")
    del memory_store.objects["g/reference.bin"]
    reader, rcache = make_core(memory_store, tmp_path / "r")
    with pytest.raises(MissingReference, match="g/reference.bin"):
        await reader.get("g/b.zip", tmp_path / "out")
    for c, cache in ((writer, wcache), (reader, rcache)):
        await c.aclose()
        cache.close()


async def test_get_of_missing_key(core: Core, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await core.get("nope.zip", tmp_path / "out")


async def test_reserved_names_are_refused(core: Core, releases: list[Path]) -> None:
    for key in ("a/reference.bin", "a/x.zip.delta", ".deltaglider/x"):
        with pytest.raises(FormatError):
            await core.put(releases[0], key)


async def test_rename_within_and_across_deltaspaces(
    core: Core, memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    await core.put(releases[0], "s/a.zip")
    await core.put(releases[1], "s/b.zip")
    moved = await core.rename("s/b.zip", "s/c.zip")
    assert moved.kind is Kind.DELTA and moved.ref_key == "s/reference.bin"
    meta = memory_store.objects["s/c.zip.delta"].metadata
    assert meta["dg-original-name"] == "c.zip"
    assert "s/b.zip.delta" not in memory_store.objects
    across = await core.rename("s/c.zip", "t/c.zip")
    assert across.ref_key == "t/reference.bin"  # rebuilt into its new deltaspace
    for key in ("s/a.zip", "t/c.zip"):
        await core.get(key, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == releases[1].read_bytes()


async def test_directory_rename_moves_reference_and_rewrites_pointers(
    core: Core, memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    for path in releases[:3]:
        await core.put(path, f"old/{path.name}")
    await memory_store.put_bytes("old/", b"", {})
    moved = await core.rename_prefix("old", "new")
    assert moved == 5
    assert not [k for k in memory_store.objects if k.startswith("old/")]
    for path in releases[:3]:
        meta = memory_store.objects[f"new/{path.name}.delta"].metadata
        assert meta["dg-ref-key"] == "new/reference.bin"
        await core.get(f"new/{path.name}", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == path.read_bytes()


@contextlib.asynccontextmanager
async def faulty_tree(
    memory_store: MemoryStore, files: list[Path], tmp_path: Path
) -> AsyncIterator[tuple[FaultyStore, Core]]:
    """A core over a ``FaultyStore`` around ``memory_store``, ``files`` put
    under ``old/`` and the marker ``old/sub/`` beside them (closed after)."""
    faulty = FaultyStore(memory_store)
    core, cache = make_core(faulty, tmp_path)
    try:
        for path in files:
            await core.put(path, f"old/{path.name}")
        await memory_store.put_bytes("old/sub/", b"", {"mode": "16877"})
        yield faulty, core
    finally:
        await core.aclose()
        cache.close()


async def test_a_directory_rename_that_fails_midway_leaves_the_source_whole(
    memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    async with faulty_tree(memory_store, releases[:3], tmp_path) as (faulty, core):
        before = dict(memory_store.objects)
        faulty.fail("copy", key=f"old/{releases[1].name}.delta", transient=False)
        with pytest.raises(StoreError):
            await core.rename_prefix("old", "new")
        # Nothing deleted at the source, no half copy left under the new name.
        assert memory_store.objects.keys() == before.keys()
        # The marker is written anew, not copied (SeaweedFS refuses to copy "dir/").
        assert await core.rename_prefix("old", "new") == 5
        assert memory_store.objects["new/sub/"].metadata == {"mode": "16877"}
        assert [c for c in faulty.log if c.operation == "copy" and c.keys[0].endswith("/")] == []


@pytest.mark.parametrize("operation", ["copy", "upload"])
async def test_a_directory_rename_whose_copy_reply_was_lost_leaves_no_copy_behind(
    memory_store: MemoryStore, releases: list[Path], tmp_path: Path, operation: str
) -> None:
    """One object of the tree is copied (a file, server-side; a marker, its
    bytes written anew), but the reply is lost: the rename fails whole, and
    the copy S3 made all the same goes with the others. (Before: only the
    copies whose reply came back were removed; the lost one stayed, and the
    failed ``mv old new`` left a directory ``new`` behind.)"""
    async with faulty_tree(memory_store, releases[:2], tmp_path) as (faulty, core):
        before = set(memory_store.objects)
        key = f"old/{releases[1].name}.delta" if operation == "copy" else "new/sub/"
        faulty.fail(operation, key=key, transient=False, after=True)
        with pytest.raises(StoreError):
            await core.rename_prefix("old", "new")
        assert set(memory_store.objects) == before


async def test_delete_leaves_the_reference(
    core: Core, memory_store: MemoryStore, releases: list[Path]
) -> None:
    await core.put(releases[0], "d/a.zip")
    await core.delete("d/a.zip")
    assert set(memory_store.objects) == {"d/reference.bin"}
    with pytest.raises(NotFound):
        await core.delete("d/a.zip")


async def test_materialize_shares_one_rebuild(
    core: Core, memory_store: MemoryStore, releases: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    await core.put(releases[0], "s/a.zip")
    await core.put(releases[1], "s/b.zip")
    core.cache.discard(sha(releases[1].read_bytes()))
    calls = 0
    real_decode = core.engine.decode

    async def counting_decode(*args: object, **limits: object) -> None:
        nonlocal calls
        calls += 1
        await trio.sleep(0.05)
        await real_decode(*args, **limits)  # type: ignore[arg-type]

    monkeypatch.setattr(core.engine, "decode", counting_decode)
    stored = await core.locate("s/b.zip")
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(core.materialize, stored)
    assert calls == 1
    with core.cache.open(stored.file_sha256 or "") as reader:  # type: ignore[union-attr]
        assert reader.read(0, reader.size) == releases[1].read_bytes()


async def test_a_cold_rebuild_downloads_the_reference_once_and_keeps_it_plain(
    memory_store: MemoryStore, releases: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, wcache = make_core(memory_store, tmp_path / "w")
    for n, release in enumerate(releases[:3]):
        await writer.put(release, f"c/{n}.zip")
    reader, rcache = make_core(memory_store, tmp_path / "r")  # cold cache
    downloads: list[str] = []
    real_download = memory_store.download

    async def counting_download(key: str, dest: Path) -> ObjectHead:
        downloads.append(key)
        return await real_download(key, dest)

    def no_export(sha256: str, dest: Path) -> bool:
        raise AssertionError("the downloaded reference was decrypted back out of the cache")

    monkeypatch.setattr(memory_store, "download", counting_download)
    monkeypatch.setattr(rcache, "export", no_export)
    for n in (1, 2):
        await reader.get(f"c/{n}.zip", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == releases[n].read_bytes()
    assert downloads.count("c/reference.bin") == 1
    assert rcache.contains(sha(releases[0].read_bytes()))  # and it is cached for later mounts
    for c, cache in ((writer, wcache), (reader, rcache)):
        await c.aclose()
        cache.close()


async def test_the_reference_file_is_read_without_decoding_its_self_delta(
    memory_store: MemoryStore, releases: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, wcache = make_core(memory_store, tmp_path / "w")
    await writer.put(releases[0], "s/a.zip")  # becomes the reference, stored as a self-delta
    await writer.put(releases[1], "s/b.zip")
    reader, rcache = make_core(memory_store, tmp_path / "r")  # cold cache
    decodes: list[Path] = []
    real_decode = reader.engine.decode

    async def counting_decode(source: Path, delta: Path, out: Path, **limits: object) -> None:
        decodes.append(delta)
        await real_decode(source, delta, out, **limits)

    monkeypatch.setattr(reader.engine, "decode", counting_decode)
    stored = await reader.locate("s/a.zip")
    assert stored.kind is Kind.DELTA and stored.file_sha256 == stored.ref_sha256
    with await reader.open_cached(stored) as entry:
        assert entry.read(0, entry.size) == releases[0].read_bytes()
    assert decodes == []
    with await reader.open_cached(await reader.locate("s/b.zip")) as entry:
        assert entry.read(0, entry.size) == releases[1].read_bytes()
    assert len(decodes) == 1
    for c, cache in ((writer, wcache), (reader, rcache)):
        await c.aclose()
        cache.close()


@pytest.mark.slow
async def test_large_file_with_changes_beyond_64_mib_stays_small(
    core: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    mib = 1 << 20
    rng = random.Random(11)
    base = bytearray(rng.randbytes(110 * mib))
    # Content moved by more than xdelta3's default 64 MiB window, plus edits
    # far beyond it: only a source window covering the whole reference finds it.
    target = bytearray(base[72 * mib :] + base[: 72 * mib])
    target[90 * mib : 90 * mib + 4096] = rng.randbytes(4096)
    target[105 * mib : 105 * mib + 4096] = rng.randbytes(4096)
    # Zip magic so the policy treats them as archives.
    base[:4] = target[:4] = b"PK\x03\x04"
    first = write(tmp_path / "big-1.zip", bytes(base))
    second = write(tmp_path / "big-2.zip", bytes(target))
    del base
    await core.put(first, "big/big-1.zip")
    result = await core.put(second, "big/big-2.zip")
    assert result.stored.kind is Kind.DELTA
    assert result.stored.stored_size < mib, result.stored.stored_size
    out = tmp_path / "out"
    await core.get("big/big-2.zip", out)
    assert sha(out.read_bytes()) == sha(bytes(target))


async def test_a_rebuilt_file_is_kept_plain_beside_the_cache_and_bounded(
    memory_store: MemoryStore, releases: list[Path], tmp_path: Path
) -> None:
    """A reader that comes right after a rebuild (a prefetched file) reads the
    verified plain output instead of decrypting the cache entry back; the
    reference of the directory reads from its plain copy. Copies are
    bounded, the oldest removed, and all go when the core closes."""
    writer, wcache = make_core(memory_store, tmp_path / "w")
    for n, release in enumerate(releases[:3]):
        await writer.put(release, f"c/{n}.zip")
    reader, rcache = make_core(memory_store, tmp_path / "r")  # cold cache
    reader.rebuilder.recent = rebuild.RecentRebuilds(max_files=1)
    kept: list[int] = []
    for n, release in enumerate(releases[:3]):
        stored = await reader.locate(f"c/{n}.zip")
        sha256 = await reader.materialize(stored)
        fd = reader.open_plain(sha256)
        assert fd is not None, n
        kept.append(fd)
        assert os.pread(fd, len(release.read_bytes()) + 1, 0) == release.read_bytes()
    first = await reader.locate("c/1.zip")
    assert first.file_sha256 is not None
    assert reader.open_plain(first.file_sha256) is None  # one copy at most: dropped
    copies = list((tmp_path / "r" / "scratch-dg").glob("*.rebuilt"))
    assert len(copies) == 1
    await reader.aclose()
    assert not list((tmp_path / "r" / "scratch-dg").glob("*.rebuilt"))
    for fd in kept:  # a descriptor handed out reads on after its copy went
        assert os.pread(fd, 4, 0) == b"PK\x03\x04"
        os.close(fd)
    await writer.aclose()
    wcache.close()
    rcache.close()


def test_recent_rebuilds_keep_what_fits(tmp_path: Path) -> None:
    recent = rebuild.RecentRebuilds(max_files=3, max_bytes=100)
    paths = {}
    for name, size in (("a", 30), ("b", 45), ("c", 30), ("huge", 51)):
        paths[name] = write(tmp_path / name, b"x" * size)
        recent.keep(name, paths[name])
    assert not paths["huge"].exists()  # over half the budget: never kept
    assert not paths["a"].exists() and paths["b"].exists() and paths["c"].exists()
    fd = recent.open("b")
    assert fd is not None
    os.close(fd)
    assert recent.open("a") is None and recent.open("huge") is None
    recent.close()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("what", ["rebuild", "reference"])
async def test_bytes_the_cache_did_not_check_are_never_kept_plain(
    memory_store: MemoryStore,
    releases: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    what: str,
) -> None:
    """Found by review: when the content was cached by another while a
    rebuild (or a reference's download) ran, the cache took nothing from
    this one and did not read it, and that unread output was kept as a
    verified plain copy for readers."""
    writer, wcache = make_core(memory_store, tmp_path / "w")
    for n, release in enumerate(releases[:2]):
        await writer.put(release, f"c/{n}.zip")
    reader, rcache = make_core(memory_store, tmp_path / "r")  # cold cache
    stored = await reader.locate("c/1.zip" if what == "rebuild" else "c/0.zip")
    assert stored.file_sha256 is not None
    right = releases[1 if what == "rebuild" else 0].read_bytes()

    def cached_meanwhile_and_spoiled(out: Path) -> None:
        rcache.add_file(stored.file_sha256 or "", write(tmp_path / "right", right))
        out.write_bytes(b"x" * len(right))  # as large as the file: only its hash tells

    if what == "rebuild":
        real_decode = reader.engine.decode

        async def decode(source: Path, delta: Path, out: Path, **limits: object) -> None:
            await real_decode(source, delta, out, **limits)  # type: ignore[arg-type]
            cached_meanwhile_and_spoiled(out)

        monkeypatch.setattr(reader.engine, "decode", decode)
    else:
        real_download = reader.bench.download

        async def download(key: str, dest: Path) -> ObjectHead:
            head = await real_download(key, dest)
            cached_meanwhile_and_spoiled(dest)
            return head

        monkeypatch.setattr(reader.bench, "download", download)
    sha256 = await reader.materialize(stored)
    fd = reader.open_plain(sha256)
    if fd is not None:  # only ever verified bytes
        try:
            assert os.pread(fd, len(right) + 1, 0) == right
        finally:
            os.close(fd)
    with rcache.open(sha256) as entry:  # type: ignore[union-attr]
        assert entry.read(0, entry.size) == right
    for core, cache in ((writer, wcache), (reader, rcache)):
        await core.aclose()
        cache.close()
