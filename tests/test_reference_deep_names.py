"""Reference names held by files of their own: a deltaglider_proxy user's
file named ``reference.deep`` (the proxy reserves only ``reference.bin``),
another tool's ``reference.bin``. A directory holding such a reference.deep
stays DeltaGlider's (and a conversion into deep plans nothing there);
nothing is ever PUT over such a reference.bin, on stores without
conditional PUT too. A deep mount stored everything beside it direct, a
conversion into deep turned every delta direct and removed reference.bin
(2.5x the bytes, reported as success), and a conversion into dg never
finished; each test failed before."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from dgfs import format as fmt
from dgfs.convert import convert_in_place, plan_conversion
from dgfs.format import DeltaMode
from dgfs.runtime import S3Location
from dgfs.store.base import ObjectHead
from dgfs.store.memory import MemoryStore
from tests.coreharness import make_core
from testsupport.proxyobjects import ProxyWriter
from testsupport.releases import ReleaseSeries

NOTES = b"not a zstd frame, just a user's notes\n" * 100


async def _proxy_zips(store: MemoryStore, count: int) -> list[bytes]:
    """``count`` zips stored in ``app/`` as deltaglider_proxy stores them; their bytes."""
    writer = ProxyWriter()
    zips = [d for _, d in ReleaseSeries(size=128 << 10, seed=3).zips(count)]
    for i, data in enumerate(zips):
        for obj in writer.put(f"app/{i}.zip", data):
            await store.put_bytes(obj.key, obj.body, obj.metadata)
    return zips


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
    await _proxy_zips(memory_store, 3)
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
    await _proxy_zips(memory_store, 2)
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


@pytest.mark.expected_log(r"is no deep reference|not a reference, left alone|still need it")
async def test_converting_to_deep_beside_a_users_reference_deep_plans_nothing_there(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """Proxy directory (reference.bin + DG deltas) plus a user's reference.deep,
    `migrate --deltas deep` in place: every DG delta is rebuilt and stored
    again as a DG delta (reported converted), reference.bin kept with
    'rerun to finish', and every rerun plans the same work again."""
    await _user_reference_deep(memory_store)
    await _proxy_zips(memory_store, 3)
    core, cache = make_core(memory_store, tmp_path, DeltaMode.DEEP)
    loc = S3Location("b", "app")
    try:
        plan = await plan_conversion(memory_store, loc, DeltaMode.DEEP)
        report = await convert_in_place(core, plan, settle=0)
        again = await plan_conversion(memory_store, loc, DeltaMode.DEEP)
    finally:
        await core.aclose()
        cache.close()
    summary = (
        f"converted={[c.dest_key for c in report.converted]} "
        f"kept={report.references_kept} rerun to_convert={[f.key for f in again.to_convert]}"
    )
    assert again.nothing_to_do, summary
    assert not report.references_kept, summary


@pytest.mark.expected_log(r"has no dg-file-sha256|storing files beside it direct")
async def test_no_conditional_put_never_overwrites_a_foreign_reference_bin(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """A store without conditional PUT (mount probe sets conditional_create
    False) and a directory holding somebody's reference.bin without
    dg-file-sha256: before f2021ad the put went direct beside it; now
    _deltaspace drops that head, _ensure_reference sees no reference and
    uploads over the user's object."""
    original = b"somebody's own file called reference.bin\n" * 64
    await memory_store.put_bytes("app/reference.bin", original, {})
    core, cache = make_core(memory_store, tmp_path, DeltaMode.DG)
    core.conditional_create = False
    try:
        src = tmp_path / "a.zip"
        src.write_bytes(next(iter(ReleaseSeries(size=64 << 10, seed=5).zips(1)))[1])
        await core.put(src, "app/a.zip")
    finally:
        await core.aclose()
        cache.close()
    ref = memory_store.objects["app/reference.bin"]
    assert ref.body == original, (
        f"user's reference.bin overwritten: {len(original)} -> {len(ref.body)} bytes, "
        f"metadata now {sorted(ref.metadata)[:4]}..."
    )


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.peak = 0

    async def head(self, key: str) -> ObjectHead:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await trio.lowlevel.checkpoint()
            return await super().head(key)
        finally:
            self.in_flight -= 1


async def test_plan_conversion_heads_old_references_within_concurrency() -> None:
    """plan_conversion HEADs every old reference with head_many's default
    concurrency=None: one request per directory, all at once, whatever
    `concurrency` the caller passed."""
    store = CountingStore()
    now = datetime(2024, 1, 1, tzinfo=UTC)
    for i in range(200):
        meta = fmt.reference_metadata(f"d{i}/x.zip", "0" * 64, now)
        await store.put_bytes(f"app/d{i}/reference.bin", os.urandom(16), meta)
    await plan_conversion(store, S3Location("b", "app"), DeltaMode.DEEP, concurrency=4)
    assert store.peak <= 4, f"{store.peak} HEADs in flight with concurrency=4"
