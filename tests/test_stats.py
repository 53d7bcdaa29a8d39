"""dgfs stats: counting rules, modes, the DeltaGlider-layout cache, interop."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dgfs import format as fmt
from dgfs.format import DeltaMode, Kind
from dgfs.stats import MODES, BucketStats, Fingerprint, cache_key, compute_stats, encode_caches
from dgfs.stats_cache import Mode
from dgfs.store.base import ObjectInfo, ObjectStore
from dgfs.store.memory import MemoryStore
from dgfs.store.s3 import S3Store
from tests.coreharness import Clock, make_core, write
from tests.mountutil import dg_upload
from testsupport.dgcli import deltaglider_bin
from testsupport.releases import ReleaseSeries
from testsupport.servers import s3_client

SHA = "0" * 64


def delta_meta(size: int, ref_key: str) -> dict[str, str]:
    return {
        "dg-tool": "test",
        "dg-original-name": "x",
        "dg-file-sha256": SHA,
        "dg-file-size": str(size),
        "dg-created-at": "2024-01-01T00:00:00Z",
        "dg-ref-key": ref_key,
        "dg-ref-sha256": SHA,
        "dg-delta-size": "1",
        "dg-delta-cmd": "xdelta3",
    }


async def fill_known_bucket(store: ObjectStore) -> None:
    """A bucket whose totals the tests compute by hand.

    app/: reference 1000, three deltas (stored 10/50/60, original 1000/1100/1200;
          v3 written last), a direct file of 200, a foreign file of 300
    old/: an orphaned reference of 500 and a foreign file of 40
    root: a foreign file of 7; .deltaglider/tmp/junk (99) is internal.
    """
    ref = {"dg-file-sha256": SHA, "dg-note": "reference", "dg-source-name": "v1.zip"}
    await store.put_bytes("app/reference.bin", b"r" * 1000, ref)
    await store.put_bytes("app/v1.zip.delta", b"d" * 10, delta_meta(1000, "app/reference.bin"))
    await store.put_bytes("app/v2.zip.delta", b"d" * 50, delta_meta(1100, "app/reference.bin"))
    await store.put_bytes("app/v3.zip.delta", b"d" * 60, delta_meta(1200, "app/reference.bin"))
    direct = {"dg-file-sha256": SHA, "dg-file-size": "200", "dg-compression": "none"}
    await store.put_bytes("app/notes.txt", b"n" * 200, direct)
    await store.put_bytes("app/foreign.bin", b"f" * 300, {})
    await store.put_bytes("old/reference.bin", b"o" * 500, ref)
    await store.put_bytes("old/readme", b"x" * 40, {})
    await store.put_bytes("top.txt", b"t" * 7, {})
    await store.put_bytes(".deltaglider/tmp/junk", b"j" * 99, {})
    await store.put_bytes("app/", b"", {"mode": "16877"})  # a directory marker: no file


PLAIN_ORIGINAL = 200 + 300 + 40 + 7
STORED = 1000 + 10 + 50 + 60 + 200 + 300 + 500 + 40 + 7


async def test_detailed_mode_is_exact(memory_store: MemoryStore) -> None:
    await fill_known_bucket(memory_store)
    stats = await compute_stats(memory_store, "", "detailed", use_cache=False)
    assert (stats.file_count, stats.delta_count) == (7, 3)
    assert (stats.direct_count, stats.foreign_count, stats.plain_count) == (1, 3, 4)
    assert stats.original_bytes == 1000 + 1100 + 1200 + PLAIN_ORIGINAL
    assert stats.stored_bytes == STORED
    assert stats.saved_bytes == stats.original_bytes - STORED
    assert stats.ratio == pytest.approx(STORED / (3300 + PLAIN_ORIGINAL))
    assert (stats.reference_count, stats.reference_bytes) == (2, 1500)
    assert not stats.estimated
    assert [(o.key, o.size) for o in stats.orphans] == [("old/reference.bin", 500)]
    spaces = {s.prefix: s for s in stats.spaces}
    assert set(spaces) == {"", "app", "old"}
    assert (spaces["app"].original_bytes, spaces["app"].stored_bytes) == (3800, 1620)
    assert spaces["old"].orphaned and not spaces["app"].orphaned
    assert (spaces["old"].file_count, spaces["old"].stored_bytes) == (1, 540)


async def test_quick_mode_estimates_deltas_from_the_reference(memory_store: MemoryStore) -> None:
    await fill_known_bucket(memory_store)
    stats = await compute_stats(memory_store, "", "quick", use_cache=False)
    assert (stats.file_count, stats.delta_count, stats.plain_count) == (7, 3, 4)
    assert stats.direct_count is None and stats.foreign_count is None
    assert stats.original_bytes == 3 * 1000 + PLAIN_ORIGINAL
    assert stats.stored_bytes == STORED
    assert stats.estimated


async def test_sampled_mode_heads_the_newest_delta_per_space(memory_store: MemoryStore) -> None:
    await fill_known_bucket(memory_store)
    stats = await compute_stats(memory_store, "", "sampled", use_cache=False)
    # v3 is exact (1200); v1 and v2 are estimated halfway between it and the reference.
    assert stats.original_bytes == 1200 + 2 * ((1200 + 1000) // 2) + PLAIN_ORIGINAL
    assert stats.stored_bytes == STORED
    assert stats.estimated


async def test_prefix_limits_the_count(memory_store: MemoryStore) -> None:
    await fill_known_bucket(memory_store)
    stats = await compute_stats(memory_store, "app", "detailed")
    assert stats.prefix == "app"
    assert (stats.file_count, stats.original_bytes, stats.stored_bytes) == (5, 3800, 1620)
    assert not stats.orphans
    assert cache_key("detailed") not in memory_store.objects  # prefixes are not cached


async def test_cache_is_reused_until_the_bucket_changes(memory_store: MemoryStore) -> None:
    await fill_known_bucket(memory_store)
    first = await compute_stats(memory_store, "", "detailed")
    assert not first.from_cache and cache_key("detailed") in memory_store.objects
    second = await compute_stats(memory_store, "", "detailed")
    assert second.from_cache
    assert second.to_json() | {"from_cache": False} == first.to_json()
    # Writing another mode's cache does not invalidate this one.
    await compute_stats(memory_store, "", "quick")
    assert (await compute_stats(memory_store, "", "detailed")).from_cache
    # Same size, other bytes: the ETag in the fingerprint notices.
    await memory_store.put_bytes("top.txt", b"T" * 7, {})
    third = await compute_stats(memory_store, "", "detailed")
    assert not third.from_cache
    await memory_store.put_bytes("app/more.bin", b"m" * 5, {})
    fourth = await compute_stats(memory_store, "", "detailed")
    assert not fourth.from_cache and fourth.file_count == 8
    assert (await compute_stats(memory_store, "", "detailed", refresh=True)).from_cache is False
    etag = memory_store.objects[cache_key("detailed")].etag
    await compute_stats(memory_store, "", "detailed", use_cache=False)
    assert memory_store.objects[cache_key("detailed")].etag == etag  # --no-cache writes nothing


async def test_cache_file_is_in_deltagliders_layout_and_states_its_own_size(
    memory_store: MemoryStore,
) -> None:
    await fill_known_bucket(memory_store)
    stats = await compute_stats(memory_store, "", "detailed")
    doc = json.loads(memory_store.objects[cache_key("detailed")].body)
    assert doc["version"] == "1.0" and doc["mode"] == "detailed"
    assert set(doc["stats"]) == {
        "bucket",
        "object_count",
        "total_size",
        "compressed_size",
        "space_saved",
        "average_compression_ratio",
        "delta_objects",
        "direct_objects",
        "object_limit_reached",
    }
    assert doc["stats"]["total_size"] == stats.original_bytes
    assert doc["stats"]["compressed_size"] == STORED
    assert doc["stats"]["delta_objects"] == 3 and doc["stats"]["direct_objects"] == 4
    # DeltaGlider validates against a LIST of every object, this file included.
    listing = await memory_store.list("", delimiter=None)
    assert doc["validation"] == {
        "object_count": len(listing.objects),
        "compressed_size": sum(o.size for o in listing.objects),
    }


def test_encoded_caches_reach_a_fixed_point_across_digit_boundaries() -> None:
    fingerprint = Fingerprint(0, 0, "x")
    entries = {
        mode: BucketStats("b", "", mode, computed_at="2024-01-01T00:00:00+00:00")
        for mode in ("quick", "detailed")
    }
    for base in (0, 9, 10**3 - 700, 10**4 - 1200, 10**4 - 3000, 10**6 - 2600):
        filler = [fmt_obj(f"k{i}", base // 4) for i in range(4)]
        filler.append(fmt_obj(cache_key("quick"), 123456))  # replaced by the new one
        bodies = encode_caches(entries, fingerprint, filler)  # type: ignore[arg-type]
        total = 4 * (base // 4) + sum(len(body) for body in bodies.values())
        for body in bodies.values():
            doc = json.loads(body)
            assert doc["validation"] == {"object_count": 6, "compressed_size": total}


def fmt_obj(key: str, size: int) -> ObjectInfo:
    return ObjectInfo(key, size, "etag", datetime.now(UTC))


# DeltaGlider's own cache reader and validator, run over a cache file in the bucket.
# (deltaglider 6.2.0's CLI cannot read any stats cache: its reader expects a
# ``.data`` attribute its S3 adapter does not provide, so ``deltaglider stats``
# always recomputes. This drives the same reader with the bytes from S3.)
DG_READ_CACHE = """
import dataclasses, json, sys, types
from deltaglider.adapters.storage_s3 import S3StorageAdapter
from deltaglider.client_operations import stats
from deltaglider.core.object_listing import list_all_objects

endpoint, bucket, mode = sys.argv[1:4]
storage = S3StorageAdapter(endpoint_url=endpoint)

def get(address):
    name, _, key = address.partition("/")
    body = storage.client.get_object(Bucket=name, Key=key)["Body"].read()
    return types.SimpleNamespace(data=body)

quiet = lambda *args, **kwargs: None
logger = types.SimpleNamespace(debug=quiet, info=quiet, warning=print, error=print)
client = types.SimpleNamespace(
    service=types.SimpleNamespace(storage=types.SimpleNamespace(get=get), logger=logger)
)
cached, validation = stats._read_stats_cache(client, bucket, mode)
listing = list_all_objects(storage, bucket=bucket, max_keys=1000)
count, size = len(listing.objects), sum(o["size"] for o in listing.objects)
print(json.dumps({
    "stats": dataclasses.asdict(cached) if cached else None,
    "valid": bool(validation) and stats._is_cache_valid(validation, count, size),
}))
"""


def dg_read_cache(endpoint: str, bucket: str, mode: str) -> dict[str, object]:
    """What DeltaGlider's cache reader makes of ``.deltaglider/stats_{mode}.json``."""
    python = Path(deltaglider_bin()).parent / "python"
    result = subprocess.run(
        [str(python), "-c", DG_READ_CACHE, endpoint, bucket, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DG_DISABLE_EC2_DETECTION": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.interop
async def test_bucket_written_by_deltaglider_and_its_cache_reads_in_deltaglider(
    moto_endpoint: str, bucket_name: str, s3_store: S3Store, tmp_path: Path
) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    sizes = []
    for name, data in ReleaseSeries(size=256 << 10, seed=7).zips(4):
        (dist / name).write_bytes(data)
        dg_upload(moto_endpoint, dist / name, bucket_name, f"app/{name}")
        sizes.append(len(data))
    (dist / "notes.txt").write_bytes(b"notes\n" * 50)
    dg_upload(moto_endpoint, dist / "notes.txt", bucket_name, "app/notes.txt")

    # Hand-computed totals from what boto3 sees.
    client = s3_client(moto_endpoint)
    objects = client.list_objects_v2(Bucket=bucket_name)["Contents"]
    stored = sum(o["Size"] for o in objects)
    deltas = [o for o in objects if o["Key"].endswith(".delta")]
    assert len(deltas) == 4
    original = sum(sizes) + 300
    for delta in deltas:
        meta = client.head_object(Bucket=bucket_name, Key=delta["Key"])["Metadata"]
        assert int(meta["dg-file-size"]) in sizes

    stats = await compute_stats(s3_store, "", "detailed")
    assert (stats.file_count, stats.delta_count, stats.direct_count) == (5, 4, 1)
    assert stats.foreign_count == 0
    assert (stats.original_bytes, stats.stored_bytes) == (original, stored)
    quick = await compute_stats(s3_store, "", "quick")
    assert quick.stored_bytes == stored and quick.original_bytes == 4 * sizes[0] + 300

    # DeltaGlider's reader accepts both cache files dgfs wrote, and its
    # validation (count and bytes of a LIST, these files included) holds.
    dg_quick = dg_read_cache(moto_endpoint, bucket_name, "quick")
    assert dg_quick["valid"] is True
    assert dg_quick["stats"] == quick.deltaglider_stats()
    dg_detailed = dg_read_cache(moto_endpoint, bucket_name, "detailed")
    assert dg_detailed["valid"] is True
    dg_numbers = dg_detailed["stats"]
    assert isinstance(dg_numbers, dict)
    assert (dg_numbers["total_size"], dg_numbers["compressed_size"]) == (original, stored)
    assert dg_numbers["space_saved"] == original - stored
    assert (dg_numbers["delta_objects"], dg_numbers["direct_objects"]) == (4, 1)
    # And dgfs still uses its own cache after DeltaGlider looked at the bucket.
    assert (await compute_stats(s3_store, "", "detailed")).from_cache
    client.close()


async def test_orphan_detection_needs_no_delta_at_all(memory_store: MemoryStore) -> None:
    await memory_store.put_bytes("a/reference.bin", b"r" * 10, {"dg-file-sha256": SHA})
    await memory_store.put_bytes("a/x.zip", b"x" * 3, {})
    stats = await compute_stats(memory_store, "", "quick", use_cache=False)
    assert [o.key for o in stats.orphans] == ["a/reference.bin"]
    await memory_store.put_bytes(fmt.delta_key("a/y.zip"), b"d", delta_meta(10, "a/reference.bin"))
    stats = await compute_stats(memory_store, "", "quick", use_cache=False)
    assert stats.orphans == []


async def test_a_reference_bin_another_tool_wrote_is_no_orphan(memory_store: MemoryStore) -> None:
    """`dgfs gc` keeps a reference.bin without DeltaGlider metadata, so stats must
    not call it orphaned (and suggest a gc that then refuses)."""
    await memory_store.put_bytes("a/reference.bin", b"r" * 10, {})
    await memory_store.put_bytes("b/reference.bin", b"r" * 20, {"dg-file-sha256": SHA})
    stats = await compute_stats(memory_store, "", "quick", use_cache=False)
    assert [o.key for o in stats.orphans] == ["b/reference.bin"]


@pytest.mark.parametrize("mode", MODES)
async def test_stats_counts_a_file_left_in_two_forms_once(tmp_path: Path, mode: Mode) -> None:
    """A writer that replaced ``x.zip``'s delta by a direct copy died before
    deleting the delta (the state docs/CLI.md describes for migrate and
    --normalize). A mount shows one ``x.zip``; stats counted two files and
    added both original sizes. The delta's bytes stay stored, as a hidden
    form, and its reference is no orphan."""
    clock = Clock()
    store = MemoryStore("b", clock=clock)
    core, cache = make_core(store, tmp_path / "c", DeltaMode.DG)
    try:
        releases = ReleaseSeries(size=64 << 10, seed=4).zips(2)
        (first, first_data), (_, second_data) = releases
        await core.put(write(tmp_path / "first", first_data), f"app/{first}")
        clock.tick()
        await core.put(write(tmp_path / "big", second_data), "app/x.zip")
        stale = store.objects["app/x.zip.delta"]
        clock.tick()
        small = b"small now\n" * 20
        assert (await core.put(write(tmp_path / "small", small), "app/x.zip")).stored.kind is (
            Kind.DIRECT
        )
        store.objects["app/x.zip.delta"] = stale  # its delete never happened
        stats = await compute_stats(store, "", mode, use_cache=False)
        assert (stats.file_count, stats.delta_count, stats.plain_count) == (2, 1, 1)
        assert (stats.hidden_forms, stats.hidden_bytes) == (1, len(stale.body))
        assert sum(len(o.body) for o in store.objects.values()) == stats.stored_bytes
        assert not stats.orphans
        if mode == "detailed":
            assert stats.original_bytes == len(first_data) + len(small)
    finally:
        await core.aclose()
        cache.close()


async def test_stats_counts_the_form_shown_of_two_in_one_second(tmp_path: Path) -> None:
    """Both forms in one Last-Modified second: the one with the newer
    ``dg-created-at`` is the file (HEADed in every mode)."""
    store = MemoryStore("b", clock=Clock())  # never ticks
    core, cache = make_core(store, tmp_path / "c", DeltaMode.DG)
    try:
        (first, first_data), (_, second_data) = ReleaseSeries(size=64 << 10, seed=4).zips(2)
        await core.put(write(tmp_path / "first", first_data), f"app/{first}")
        await core.put(write(tmp_path / "old", b"old version\n" * 20), "app/x.zip")
        direct = store.objects["app/x.zip"]
        await core.put(write(tmp_path / "new", second_data), "app/x.zip")
        store.objects["app/x.zip"] = direct  # the older form, never deleted
        for mode in MODES:
            stats = await compute_stats(store, "", mode, use_cache=False)
            assert (stats.delta_count, stats.plain_count) == (2, 0), mode
            assert (stats.hidden_forms, stats.hidden_bytes) == (1, len(direct.body))
    finally:
        await core.aclose()
        cache.close()
