"""In-place conversion (``dgfs migrate --deltas``) on what a bucket may hold
beside DeltaGlider's objects: a user's own file named ``x.delta`` (no
DeltaGlider metadata: a mount shows it as a file of its own), and a file
left in both forms within one second. Conversion deleted the first as a
stale delta, and never finished on either; each test failed before."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dgfs.convert import convert_in_place, plan_conversion
from dgfs.core import Core
from dgfs.format import DeltaMode, Kind
from dgfs.runtime import S3Location
from dgfs.store.memory import MemoryStore
from tests.coreharness import Clock, make_core
from testsupport.releases import ReleaseSeries


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zips(prefix: str, count: int = 3, seed: int = 4) -> dict[str, bytes]:
    return {f"{prefix}/{n}": d for n, d in ReleaseSeries(size=64 << 10, seed=seed).zips(count)}


async def put_all(core: Core, tmp: Path, items: dict[str, bytes]) -> None:
    for key, data in items.items():
        path = tmp / ("f-" + sha(key.encode())[:12])
        path.write_bytes(data)
        await core.put(path, key)


# --- in-place conversion deletes a user's foreign ``x.delta`` ---------------------------


async def test_conversion_never_deletes_a_foreign_dot_delta_file(tmp_path: Path) -> None:
    """A plain S3 object named ``app/second.zip.delta`` (no DeltaGlider metadata)
    is a file of its own name: the mount shows it as ``second.zip.delta``, and
    dgfs itself then stores ``app/second.zip`` direct so as not to overwrite
    it (tests/test_hostile.py). ``migrate --deltas deep`` in place takes it for a
    stale delta behind the newer direct ``second.zip`` and deletes it."""
    clock = Clock()
    store = MemoryStore("b", clock=clock)
    core, cache = make_core(store, tmp_path / "c", DeltaMode.DG)
    try:
        files = zips("app", 3)
        names = sorted(files)
        await put_all(core, tmp_path, {names[0]: files[names[0]]})
        clock.tick()
        await store.put_bytes("app/second.zip.delta", b"someone else's file", {})
        clock.tick()
        second = tmp_path / "second.zip"
        second.write_bytes(files[names[1]])
        stored = (await core.put(second, "app/second.zip")).stored
        assert stored.kind is Kind.DIRECT  # dgfs keeps the foreign object
        clock.tick()
        plan = await plan_conversion(store, S3Location("b", "app"), DeltaMode.DEEP)
        report = await convert_in_place(core, plan, settle=0)
        assert "app/second.zip.delta" not in report.stale_removed
        assert "app/second.zip.delta" in store.objects, "a user's file was deleted"
    finally:
        await core.aclose()
        cache.close()


@pytest.mark.expected_log("convert .* failed|no such file")
async def test_conversion_of_a_dir_with_a_foreign_dot_delta_file_finishes(
    tmp_path: Path,
) -> None:
    """Without the plain ``notes``, the foreign ``notes.delta`` is planned as a
    delta to convert; it fails every run (exit 1) and reference.bin is kept."""
    clock = Clock()
    store = MemoryStore("b", clock=clock)
    core, cache = make_core(store, tmp_path / "c", DeltaMode.DG)
    try:
        await put_all(core, tmp_path, zips("app"))
        clock.tick()
        await store.put_bytes("app/notes.delta", b"my patch notes\n" * 10, {})
        clock.tick()
        plan = await plan_conversion(store, S3Location("b", "app"), DeltaMode.DEEP)
        report = await convert_in_place(core, plan, settle=0)
        assert not report.failed, report.failed
        assert not report.any_failed
    finally:
        await core.aclose()
        cache.close()


async def test_conversion_finishes_when_a_stale_delta_shares_its_second_with_the_direct_copy(
    tmp_path: Path,
) -> None:
    """``x.zip`` was rewritten small (direct) over its delta and the writer died
    before deleting the delta, within the same second. Readers show the direct
    copy (newer ``dg-created-at``). The conversion plans the delta for
    conversion (its stale test is Last-Modified ``>``), ``convert_file`` then
    finds the direct copy and skips; the stale delta is never removed, so
    reference.bin is "kept, rerun to finish" on every rerun, and exit 0."""
    clock = Clock()  # fixed
    store = MemoryStore("b", clock=clock)
    core, cache = make_core(store, tmp_path / "c", DeltaMode.DG)
    try:
        files = zips("app", 2)
        first, second = sorted(files)
        await put_all(core, tmp_path, {first: files[first]})
        big = tmp_path / "big.zip"
        big.write_bytes(files[second])
        await core.put(big, "app/x.zip")
        stale = store.objects["app/x.zip.delta"]
        small = tmp_path / "small.zip"
        small.write_bytes(b"small now\n" * 20)
        assert (await core.put(small, "app/x.zip")).stored.kind is Kind.DIRECT
        store.objects["app/x.zip.delta"] = stale  # its delete never happened
        out = tmp_path / "shown"
        await core.get("app/x.zip", out)
        assert out.read_bytes() == small.read_bytes()  # what readers show

        location = S3Location("b", "app")
        for _ in range(2):  # a rerun finishes an interrupted conversion, says the doc
            plan = await plan_conversion(store, location, DeltaMode.DEEP)
            report = await convert_in_place(core, plan, settle=0)
        assert "app/reference.bin" not in store.objects, report.references_kept
        final = await plan_conversion(store, location, DeltaMode.DEEP)
        assert final.nothing_to_do
    finally:
        await core.aclose()
        cache.close()
