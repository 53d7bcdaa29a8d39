"""Names deltaglider_proxy writes that dgfs read wrongly: a user's file
named ``reference.deep`` (the proxy reserves only ``reference.bin``) made
dgfs take the directory for a deep one and fail every delta store there,
and an older proxy's ``dg-ref-key`` of a root-level delta
(``/reference.bin``) was not found. Each test failed before."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dgfs.core import Core
from dgfs.errors import DgfsError
from dgfs.format import DeltaMode
from dgfs.store.memory import MemoryStore
from tests.coreharness import make_core
from testsupport.proxyobjects import ProxyWriter, store_all
from testsupport.releases import ReleaseSeries


async def _proxy_dir_with_reference_deep(store: MemoryStore) -> tuple[bytes, list[bytes]]:
    """The proxy lets a client PUT ``app/reference.deep``: only ``reference.bin``
    and ``*.delta`` names are reserved (src/types.rs ``ObjectKey::validate_object``),
    and ``.deep`` is not delta-eligible (src/deltaglider/file_router.rs), so it is
    a passthrough object with full DG metadata (``dg-note: passthrough``)."""
    writer = ProxyWriter()
    notes = b"not a zstd frame, just a user's notes\n" * 100
    await store_all(store, writer.put("app/reference.deep", notes, delta=False))
    zips = [data for _, data in ReleaseSeries(size=128 << 10, seed=3).zips(2)]
    await store_all(store, writer.put("app/a.zip", zips[0]))
    return notes, zips


async def test_dgfs_stores_beside_a_proxy_file_named_reference_deep(
    core: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    _, zips = await _proxy_dir_with_reference_deep(memory_store)
    src = tmp_path / "b.zip"
    src.write_bytes(zips[1])
    # dgfs takes the directory for a deep one and decompresses the user's file as zstd.
    await core.put(src, "app/b.zip")
    out = tmp_path / "out"
    await core.get("app/b.zip", out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(zips[1]).hexdigest()


async def test_pre_ref_path_proxy_delta_at_the_bucket_root_reads(
    core: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    """deltaglider_proxy before commit 1283b4d ("Rename dg-ref-key → dg-ref-path
    with relative paths", 2026-03-30; tags up to v0.5.2) wrote ``dg-ref-key =
    format!("{}/reference.bin", deltaspace_id)`` (src/deltaglider/engine/store.rs),
    i.e. ``/reference.bin`` for a file at the bucket root (deltaspace_id "").
    Every proxy reads that against the sibling ``reference.bin``
    (src/storage/s3.rs ``headers_to_metadata`` keeps the last segment)."""
    writer = ProxyWriter()
    zips = [data for _, data in ReleaseSeries(size=128 << 10, seed=5).zips(2)]
    objects = writer.put("a.zip", zips[0]) + writer.put("b.zip", zips[1])
    for obj in objects:
        if obj.key.endswith(".delta"):
            ref = obj.metadata.pop("dg-ref-path")
            assert ref == "reference.bin"
            obj.metadata["dg-ref-key"] = "/reference.bin"  # the old proxy's spelling
    await store_all(memory_store, objects)
    assert set(memory_store.objects) == {"reference.bin", "a.zip.delta", "b.zip.delta"}
    out = tmp_path / "out"
    for key, data in (("a.zip", zips[0]), ("b.zip", zips[1])):
        await core.get(key, out)
        assert out.read_bytes() == data, key


@pytest.mark.expected_log(r"is no deep reference")
async def test_deep_mode_beside_a_proxy_file_named_reference_deep(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """26c61d4 ignores a reference.deep without deep metadata only in
    ``_deltaspace``: with ``deltas=deep`` (mount -o deltas=deep, migrate
    --deltas deep) the mode is deep anyway and ``_deep_reference`` HEADs
    reference.deep again, takes the user's passthrough file (it has a
    dg-file-sha256) for the deep reference and diffs against it."""
    writer = ProxyWriter()
    notes = b"not a zstd frame, just a user's notes\n" * 100
    for obj in writer.put("app/reference.deep", notes, delta=False):
        await memory_store.put_bytes(obj.key, obj.body, obj.metadata)
    zips = [data for _, data in ReleaseSeries(size=128 << 10, seed=3).zips(2)]
    core, cache = make_core(memory_store, tmp_path, DeltaMode.DEEP)
    try:
        src = tmp_path / "b.zip"
        src.write_bytes(zips[1])
        try:
            await core.put(src, "app/b.zip")
        except DgfsError as exc:
            pytest.fail(f"put beside a user's reference.deep failed: {exc!r}")
        out = tmp_path / "out"
        await core.get("app/b.zip", out)
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(zips[1]).digest()
        assert memory_store.objects["app/reference.deep"].body == notes
    finally:
        await core.aclose()
        cache.close()


async def test_a_delta_under_a_key_with_a_leading_slash_reads(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """S3 keys may start with "/" (``s3://b//x/a.zip``). dgfs itself writes
    dg-ref-key "/x/reference.bin" for a delta in "/x"; reference_of now
    strips the slash and reads "x/reference.bin", another object."""
    zips = [data for _, data in ReleaseSeries(size=128 << 10, seed=5).zips(2)]
    core, cache = make_core(memory_store, tmp_path)
    try:
        for name, data in zip(("a.zip", "b.zip"), zips, strict=True):
            src = tmp_path / name
            src.write_bytes(data)
            await core.put(src, f"/x/{name}")
        assert "/x/b.zip.delta" in memory_store.objects, sorted(memory_store.objects)
        meta = memory_store.objects["/x/b.zip.delta"].metadata
        assert meta["dg-ref-key"] == "/x/reference.bin"
    finally:
        await core.aclose()
        cache.close()
    reader, reader_cache = make_core(memory_store, tmp_path / "reader")  # cold cache
    try:
        out = tmp_path / "out"
        await reader.get("/x/b.zip", out)
        assert out.read_bytes() == zips[1]
    finally:
        await reader.aclose()
        reader_cache.close()


@pytest.mark.expected_log(r"not a reference, left alone")
async def test_gc_leaves_a_proxy_users_file_named_reference_deep(
    memory_store: MemoryStore,
) -> None:
    """docs/FORMAT.md now says a proxy user's ``reference.deep`` (passthrough,
    with dg-file-sha256) is a file of its own; ``dgfs gc`` still takes it for
    an orphaned deep reference beside DG deltas (only a name and a
    dg-file-sha256 are checked, not dgfs-format) and deletes it."""
    from dgfs import gc

    writer = ProxyWriter()
    notes = b"not a zstd frame, just a user's notes\n" * 100
    objects = writer.put("app/reference.deep", notes, delta=False)
    zips = [data for _, data in ReleaseSeries(size=128 << 10, seed=3).zips(2)]
    objects += writer.put("app/a.zip", zips[0]) + writer.put("app/b.zip", zips[1])
    for obj in objects:
        await memory_store.put_bytes(obj.key, obj.body, obj.metadata)
    garbage = await gc.find_garbage(memory_store)
    assert "app/reference.deep" not in [g.key for g in garbage], garbage
