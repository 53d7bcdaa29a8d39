"""dgfs gc: orphaned references, expired temp objects, stale multipart uploads."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from dgfs.cli.gc import parse_duration
from dgfs.cli.main import main as dgfs_main
from dgfs.errors import ConfigError
from dgfs.format import DeltaMode
from dgfs.fs import dirindex
from dgfs.gc import GC_BACKUP_PREFIX, GarbageKind, collect, find_garbage
from dgfs.store.memory import MemoryStore
from dgfs.store.s3 import S3Store
from testsupport.servers import s3_client

SHA = "1" * 64
NOW = datetime.now(UTC) + timedelta(minutes=1)  # objects are written just before


@pytest.fixture(autouse=True)
def _now(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOW is a minute after each test starts, not after the module was
    imported: a long suite would otherwise write the objects after NOW."""
    monkeypatch.setattr(sys.modules[__name__], "NOW", datetime.now(UTC) + timedelta(minutes=1))


async def fill(store: MemoryStore | S3Store) -> None:
    ref_meta = {"dg-file-sha256": SHA, "dg-note": "reference"}
    await store.put_bytes("app/reference.bin", b"r" * 100, ref_meta)
    await store.put_bytes("app/x.zip.delta", b"d" * 10, {"dg-file-sha256": SHA})
    await store.put_bytes("gone/reference.bin", b"o" * 300, ref_meta)  # orphaned
    await store.put_bytes("gone/readme.txt", b"x", {})
    past = (NOW - timedelta(hours=1)).isoformat()
    future = (NOW + timedelta(hours=1)).isoformat()
    await store.put_bytes(".deltaglider/tmp/old-rehydrated", b"t" * 50, {"dg-expires-at": past})
    await store.put_bytes(".deltaglider/tmp/fresh-rehydrated", b"t", {"dg-expires-at": future})
    await store.put_bytes(".deltaglider/tmp/probe-leftover", b"p" * 2, {})
    await store.put_bytes(".deltaglider/stats_quick.json", b"{}", {})


async def test_find_garbage_looks_without_touching(memory_store: MemoryStore) -> None:
    await fill(memory_store)
    before = dict(memory_store.objects)
    found = await find_garbage(memory_store, now=NOW)
    assert {(g.kind, g.key) for g in found} == {
        (GarbageKind.ORPHANED_REFERENCE, "gone/reference.bin"),
        (GarbageKind.EXPIRED_TMP, ".deltaglider/tmp/old-rehydrated"),
    }
    # Without an expiry, age decides.
    aged = await find_garbage(memory_store, now=NOW, tmp_max_age=timedelta(0))
    assert (GarbageKind.EXPIRED_TMP, ".deltaglider/tmp/probe-leftover") in {
        (g.kind, g.key) for g in aged
    }
    young = await find_garbage(memory_store, tmp_max_age=timedelta(hours=1))
    assert ".deltaglider/tmp/probe-leftover" not in {g.key for g in young}
    # A prefix limits the search (temp objects live at the bucket root).
    scoped = await find_garbage(memory_store, "app", now=NOW)
    assert scoped == []
    assert memory_store.objects == before


async def test_collect_removes_and_keeps_a_backup(memory_store: MemoryStore) -> None:
    await fill(memory_store)
    found = await find_garbage(memory_store, now=NOW)
    result = await collect(memory_store, found, settle=0, now=NOW)
    assert not result.failed and not result.restored
    assert result.freed_bytes == 300 + 50
    assert "gone/reference.bin" not in memory_store.objects
    assert ".deltaglider/tmp/old-rehydrated" not in memory_store.objects
    assert "app/reference.bin" in memory_store.objects
    assert ".deltaglider/tmp/fresh-rehydrated" in memory_store.objects
    backups = [k for k in memory_store.objects if k.startswith(GC_BACKUP_PREFIX)]
    assert len(backups) == 1 and backups[0].endswith("/gone/reference.bin")
    assert memory_store.objects[backups[0]].body == b"o" * 300
    # Nothing left to collect (the backup has not expired).
    assert await find_garbage(memory_store, now=NOW) == []
    # After its expiry the backup itself goes.
    later = await find_garbage(memory_store, now=NOW + timedelta(days=2))
    assert backups[0] in {g.key for g in later}


@pytest.mark.expected_log("a delta appeared")
async def test_reference_is_put_back_if_a_delta_arrives_while_gc_runs(
    memory_store: MemoryStore,
) -> None:
    await fill(memory_store)
    found = await find_garbage(memory_store, now=NOW)

    async def writer() -> None:
        # A writer that saw the reference just before gc removed it.
        while "gone/reference.bin" in memory_store.objects:
            await trio.sleep(0.01)
        await memory_store.put_bytes("gone/new.zip.delta", b"d", {"dg-file-sha256": SHA})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        result = await collect(memory_store, found, settle=0.3, now=NOW)
    assert result.restored == ["gone/reference.bin"]
    assert memory_store.objects["gone/reference.bin"].body == b"o" * 300
    assert memory_store.objects["gone/reference.bin"].metadata["dg-file-sha256"] == SHA
    assert "dg-gc-original-key" not in memory_store.objects["gone/reference.bin"].metadata
    assert [g.key for g in result.removed] == [".deltaglider/tmp/old-rehydrated"]


@pytest.mark.parametrize("replaced_after", ["copy_object", "delete"])
async def test_a_reference_a_writer_replaces_while_gc_runs_is_kept(
    memory_store: MemoryStore, monkeypatch: pytest.MonkeyPatch, replaced_after: str
) -> None:
    """gc read an orphaned reference, backed it up, then deleted whatever was
    at its key: a new reference another writer stored in between (with the
    deltas made against it) was deleted, and the settle check put the old
    bytes back, so those deltas failed their reference check for good.
    Now only the version read is backed up and deleted; a new one stays."""
    await fill(memory_store)
    found = await find_garbage(memory_store, now=NOW)
    real = getattr(memory_store, replaced_after)

    async def then_replaced(*args: object, **kwargs: object) -> object:
        if "gone/reference.bin" in memory_store.objects and args[0] == "gone/reference.bin":
            await memory_store.put_bytes("gone/reference.bin", b"n" * 200, {"dg-note": "new"})
        return await real(*args, **kwargs)

    monkeypatch.setattr(memory_store, replaced_after, then_replaced)
    result = await collect(memory_store, found, settle=0, now=NOW)
    assert memory_store.objects["gone/reference.bin"].body == b"n" * 200
    assert [item.key for item, _ in result.kept] == ["gone/reference.bin"]
    assert not [k for k in memory_store.objects if k.startswith(GC_BACKUP_PREFIX)]


async def test_a_later_run_restores_a_needed_backup(memory_store: MemoryStore) -> None:
    await fill(memory_store)
    await collect(memory_store, await find_garbage(memory_store, now=NOW), settle=0, now=NOW)
    # A delta lands in the directory after gc finished.
    await memory_store.put_bytes("gone/late.zip.delta", b"d", {"dg-file-sha256": SHA})
    found = await find_garbage(memory_store, now=NOW + timedelta(days=3))
    restore = [g for g in found if g.kind is GarbageKind.RESTORE_REFERENCE]
    assert [g.key for g in restore] == ["gone/reference.bin"]
    result = await collect(memory_store, restore, settle=0)
    assert result.restored == ["gone/reference.bin"]
    assert memory_store.objects["gone/reference.bin"].body == b"o" * 300


async def test_orphan_that_gained_a_delta_before_removal_is_kept(
    memory_store: MemoryStore,
) -> None:
    await fill(memory_store)
    found = await find_garbage(memory_store, now=NOW)
    await memory_store.put_bytes("gone/y.zip.delta", b"d", {"dg-file-sha256": SHA})
    result = await collect(memory_store, found, settle=0, now=NOW)
    assert [item.key for item, _ in result.kept] == ["gone/reference.bin"]
    assert "gone/reference.bin" in memory_store.objects


async def test_stale_multipart_uploads_on_s3(s3_store: S3Store, moto_endpoint: str) -> None:
    client = s3_client(moto_endpoint)
    upload = client.create_multipart_upload(Bucket=s3_store.bucket, Key="app/big.zip.delta")
    # Ages are measured from the time the store reports (moto reports a fixed one).
    listed = client.list_multipart_uploads(Bucket=s3_store.bucket)["Uploads"]
    initiated = listed[0]["Initiated"].astimezone(UTC)
    found = await find_garbage(s3_store, now=initiated + timedelta(hours=23))
    assert found == []  # younger than a day
    found = await find_garbage(s3_store, now=initiated + timedelta(hours=25))
    assert [(g.kind, g.key, g.upload_id) for g in found] == [
        (GarbageKind.STALE_MULTIPART, "app/big.zip.delta", upload["UploadId"])
    ]
    result = await collect(s3_store, found, settle=0)
    assert result.removed == found
    assert client.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads", []) == []
    client.close()


def test_cli_dry_run_then_yes(
    moto_endpoint: str, bucket_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def setup() -> None:
        store = S3Store(bucket_name, endpoint_url=moto_endpoint)
        try:
            await fill(store)
        finally:
            await store.aclose()

    trio.run(setup)
    client = s3_client(moto_endpoint)
    client.create_multipart_upload(Bucket=bucket_name, Key="app/partial.zip")

    def keys() -> set[str]:
        return {o["Key"] for o in client.list_objects_v2(Bucket=bucket_name)["Contents"]}

    before = keys()
    common = ["--endpoint-url", moto_endpoint, "--multipart-max-age", "0", "--settle", "0"]
    assert dgfs_main(["gc", f"s3://{bucket_name}", *common]) == 0
    out = capsys.readouterr().out
    assert "Dry run" in out and "gone/reference.bin" in out and "app/partial.zip" in out
    assert keys() == before
    assert len(client.list_multipart_uploads(Bucket=bucket_name)["Uploads"]) == 1

    assert dgfs_main(["gc", "--yes", f"s3://{bucket_name}", *common]) == 0
    out = capsys.readouterr().out
    assert "Removed 3 item(s)" in out  # the orphan, the expired temp object, the upload
    assert not {"gone/reference.bin", ".deltaglider/tmp/old-rehydrated"} & keys()
    assert ".deltaglider/tmp/fresh-rehydrated" in keys()
    assert client.list_multipart_uploads(Bucket=bucket_name).get("Uploads", []) == []
    client.close()


def test_parse_duration() -> None:
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("24h") == timedelta(hours=24)
    assert parse_duration("7d") == timedelta(days=7)
    with pytest.raises(ConfigError):
        parse_duration("soon")


async def test_non_ascii_orphan_is_backed_up_and_restored(memory_store: MemoryStore) -> None:
    await memory_store.put_bytes("relé/reference.bin", b"r" * 10, {"dg-file-sha256": SHA})
    found = await find_garbage(memory_store, now=NOW)
    result = await collect(memory_store, found, settle=0, now=NOW)
    assert [g.key for g in result.removed] == ["relé/reference.bin"]
    await memory_store.put_bytes("relé/a.zip.delta", b"d", {"dg-file-sha256": SHA})
    restore = await find_garbage(memory_store, now=NOW)
    assert [(g.kind, g.key) for g in restore] == [
        (GarbageKind.RESTORE_REFERENCE, "relé/reference.bin")
    ]
    await collect(memory_store, restore, settle=0)
    assert memory_store.objects["relé/reference.bin"].body == b"r" * 10


def test_one_rule_says_which_references_are_unneeded() -> None:
    from dgfs.gc import unneeded_references

    dg, deep = DeltaMode.DG, DeltaMode.DEEP
    assert unneeded_references({dg}, set()) == {dg}
    assert unneeded_references({dg}, {deep}) == set()  # a directory's only reference
    assert unneeded_references({dg, deep}, {deep}) == {dg}
    assert unneeded_references({dg, deep}, {dg}) == {deep}
    assert unneeded_references({dg, deep}, {None}) == set()  # unread: needs both


async def test_indexes_of_directories_that_hold_nothing_are_garbage(
    memory_store: MemoryStore,
) -> None:
    """A directory removed or renamed by another machine (or another tool)
    leaves its index (a mount writes them to save HEADs); nothing reads it."""
    index = dirindex.index_key
    await memory_store.put_bytes("app/x.zip", b"x", {})
    await memory_store.put_bytes("tree/sub/y.zip", b"y", {})  # tree/ holds a directory
    await memory_store.put_bytes("empty/", b"", {})  # a directory's marker only
    for directory in ("", "app/", "tree/", "tree/sub/", "empty/", "gone/", "gone/deeper/"):
        await memory_store.put_bytes(index(directory), b"i" * 7, {})
    await memory_store.put_bytes(".deltaglider/gone/x", b"i", {})  # not a directory that counts
    found = await find_garbage(memory_store, now=NOW)
    orphans = [g for g in found if g.kind is GarbageKind.ORPHANED_INDEX]
    assert sorted(g.key for g in orphans) == [index("gone/deeper/"), index("gone/")]
    # A run over a prefix never looks at indexes, even one over theirs.
    for prefix in ("app", ".deltaglider/dgfs-index/v1"):
        assert not [g for g in await find_garbage(memory_store, prefix, now=NOW) if g in orphans]
    result = await collect(memory_store, found, settle=0, now=NOW)
    assert set(orphans) <= set(result.removed)
    assert index("gone/") not in memory_store.objects
    assert index("tree/sub/") in memory_store.objects and index("") in memory_store.objects
