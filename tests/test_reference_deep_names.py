"""A deltaglider_proxy user's own file named ``reference.deep`` (the proxy
reserves only ``reference.bin``): a directory holding one stays
DeltaGlider's. A deep mount stored everything beside it direct, a
conversion into deep turned every delta direct and removed reference.bin
(2.5x the bytes, reported as success), and a conversion into dg never
finished; each test failed before."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgfs.convert import convert_in_place, plan_conversion
from dgfs.format import DeltaMode
from dgfs.runtime import S3Location
from dgfs.store.memory import MemoryStore
from tests.coreharness import make_core
from testsupport.proxyobjects import ProxyWriter
from testsupport.releases import ReleaseSeries

NOTES = b"not a zstd frame, just a user's notes\n" * 100


async def _user_reference_deep(store: MemoryStore) -> None:
    for obj in ProxyWriter().put("app/reference.deep", NOTES, delta=False):
        await store.put_bytes(obj.key, obj.body, obj.metadata)


@pytest.mark.expected_log(r"is no deep reference")
async def test_a_deep_mount_stores_deltas_beside_a_users_reference_deep(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """deltas=deep, a proxy user's file app/reference.deep, no reference.bin:
    reference.bin is free, so the directory could be a DG deltaspace; instead
    every file goes direct forever (no compression at all)."""
    await _user_reference_deep(memory_store)
    zips = [d for _, d in ReleaseSeries(size=128 << 10, seed=3).zips(3)]
    core, cache = make_core(memory_store, tmp_path, DeltaMode.DEEP)
    try:
        for i, data in enumerate(zips):
            src = tmp_path / f"{i}.zip"
            src.write_bytes(data)
            await core.put(src, f"app/{i}.zip")
    finally:
        await core.aclose()
        cache.close()
    keys = sorted(memory_store.objects)
    assert any(k.endswith(".delta") for k in keys), f"no delta at all: {keys}"


@pytest.mark.expected_log(r"is no deep reference|not a reference, left alone")
async def test_converting_to_deep_beside_a_users_reference_deep_keeps_the_deltas(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """A proxy directory (reference.bin + DG deltas) that also holds a user's
    reference.deep: `migrate --deltas deep` in place rebuilds every DG delta
    and stores it *direct* (the deep reference name is taken), then deletes
    reference.bin: the directory loses all its compression, reported as a
    successful conversion."""
    await _user_reference_deep(memory_store)
    writer = ProxyWriter()
    zips = [d for _, d in ReleaseSeries(size=128 << 10, seed=3).zips(3)]
    for i, data in enumerate(zips):
        for obj in writer.put(f"app/{i}.zip", data):
            await memory_store.put_bytes(obj.key, obj.body, obj.metadata)
    before = sum(len(o.body) for o in memory_store.objects.values())
    core, cache = make_core(memory_store, tmp_path, DeltaMode.DEEP)
    try:
        plan = await plan_conversion(memory_store, S3Location("b", "app"), DeltaMode.DEEP)
        report = await convert_in_place(core, plan, settle=0)
    finally:
        await core.aclose()
        cache.close()
    after = sum(len(o.body) for o in memory_store.objects.values())
    keys = sorted(memory_store.objects)
    assert not report.failed
    assert any(k.endswith(".delta") for k in keys), (
        f"every delta turned direct: {keys}; stored {before} -> {after} bytes"
    )


@pytest.mark.expected_log(r"not a reference, left alone")
async def test_converting_to_dg_beside_a_users_reference_deep_finishes(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """`migrate --deltas dg` takes a user's reference.deep for an old deep
    reference: never nothing_to_do, and each run reports it kept because
    'deep deltas still need it (rerun to finish)' though there is no deep delta."""
    await _user_reference_deep(memory_store)
    writer = ProxyWriter()
    zips = [d for _, d in ReleaseSeries(size=128 << 10, seed=3).zips(2)]
    for i, data in enumerate(zips):
        for obj in writer.put(f"app/{i}.zip", data):
            await memory_store.put_bytes(obj.key, obj.body, obj.metadata)
    core, cache = make_core(memory_store, tmp_path, DeltaMode.DG)
    try:
        plan = await plan_conversion(memory_store, S3Location("b", "app"), DeltaMode.DG)
        report = await convert_in_place(core, plan, settle=0)
        again = await plan_conversion(memory_store, S3Location("b", "app"), DeltaMode.DG)
    finally:
        await core.aclose()
        cache.close()
    assert report.references_kept == [], report.references_kept
    assert again.nothing_to_do, again.old_references
