"""A bucket written the deltaglider_proxy way, the DeltaGlider CLI, and
``dgfs migrate --normalize`` between them (docs/FORMAT.md, "deltaglider_proxy").

The CLI cannot read what the proxy writes (no ``dg-ref-key``, no
``dg-compression``); after ``--normalize`` it reads every file, and so do
dgfs and the proxy's own parse rules (``testsupport/proxyobjects.py``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
import trio

from dgfs import format as fmt
from dgfs import proxymeta
from dgfs.cli.main import EXIT_OK, EXIT_USAGE
from dgfs.cli.main import main as dgfs_main
from dgfs.errors import NotFound, PreconditionFailed
from dgfs.migrate import open_migration, plan_migration, run_migration
from dgfs.normalize import normalize
from dgfs.policy import Policy
from dgfs.runtime import S3Location, Settings
from dgfs.store.base import ObjectHead, ObjectStore
from dgfs.store.memory import MemoryStore
from dgfs.store.s3 import S3Store
from tests.coreharness import make_core
from testsupport.dgcli import run_deltaglider
from testsupport.proxyobjects import (
    ProxyEncryption,
    ProxyWriter,
    StoredObject,
    proxy_client_view,
    proxy_parse,
)
from testsupport.releases import ReleaseSeries
from testsupport.servers import REGION, make_bucket


def proxy_files() -> dict[str, bytes]:
    series = ReleaseSeries(size=256 << 10, seed=51)
    files = {f"app/{name}": data for name, data in series.zips(3)}
    files["app/NOTES.txt"] = b"notes\n" * 400
    files["top.zip"] = series.next_zip()[1]  # a deltaspace at the bucket root
    return files


def proxy_objects(files: dict[str, bytes]) -> list[StoredObject]:
    writer = ProxyWriter()
    return [
        obj
        for key, data in files.items()
        for obj in writer.put(key, data, delta=key.endswith(".zip"), user={"ci": "7"})
    ]


def test_normalized_metadata_adds_what_each_reader_lacks() -> None:
    writer = ProxyWriter()
    data = b"PK" + bytes(5000)
    ref, delta = writer.put("a/x.zip", data)
    (direct,) = writer.put("a/n.txt", b"n", delta=False)
    new_delta = fmt.normalized_metadata(delta.key, delta.metadata)
    assert new_delta is not None
    assert new_delta["dg-ref-key"] == "a/reference.bin"  # what DeltaGlider requires
    assert {k: new_delta[k] for k in delta.metadata} == delta.metadata  # nothing changed
    new_direct = fmt.normalized_metadata(direct.key, direct.metadata)
    assert new_direct is not None and new_direct["dg-compression"] == "none"
    assert fmt.normalized_metadata(ref.key, ref.metadata) is None  # the proxy's has it all
    for meta, key in ((new_delta, delta.key), (new_direct, direct.key)):
        assert fmt.normalized_metadata(key, meta) is None  # idempotent
    # DeltaGlider's own objects gain the proxy's keys.
    dg_delta = {
        "dg-tool": "deltaglider/6.2.0",
        "dg-original-name": "x.zip",
        "dg-file-sha256": "a" * 64,
        "dg-file-size": "9",
        "dg-created-at": "2026-01-01T00:00:00Z",
        "dg-ref-key": "a/reference.bin",
        "dg-ref-sha256": "b" * 64,
        "dg-delta-size": "3",
        "dg-delta-cmd": "xdelta3 -e -9 -s reference.bin x.zip x.zip.delta",
    }
    new = fmt.normalized_metadata("a/x.zip.delta", dg_delta)
    assert new == {**dg_delta, "dg-ref-path": "reference.bin", "dg-note": "delta"}
    dg_ref = {"dg-tool": "t", "dg-source-name": "x.zip", "dg-file-sha256": "a" * 64,
              "dg-created-at": "2026-01-01T00:00:00Z", "dg-note": "reference"}  # fmt: skip
    new_ref = fmt.normalized_metadata("a/reference.bin", dg_ref)
    assert new_ref == {**dg_ref, "dg-original-name": "__reference__"}
    assert proxy_parse(new_ref)["storage"] == "reference"
    # A Content-Type the proxy would not serve is added as its content-type key;
    # application/octet-stream (what it serves without one) is not.
    typed = fmt.normalized_metadata("a/x.zip.delta", dg_delta, "application/zip")
    assert typed is not None and typed["content-type"] == "application/zip"
    assert proxy_client_view(typed)[0] == "application/zip"
    assert fmt.normalized_metadata("a/x.zip.delta", typed, "application/zip") is None
    assert "content-type" not in new  # no Content-Type given
    assert fmt.normalized_metadata("a/x.zip.delta", dg_delta, proxymeta.DEFAULT_CONTENT_TYPE) == new
    assert fmt.normalized_metadata(direct.key, direct.metadata, "text/plain") == {
        **new_direct,
        "content-type": "text/plain",
    }
    kept = {**delta.metadata, "content-type": "x/y"}  # the proxy's own is never changed
    assert fmt.normalized_metadata(delta.key, kept, "application/zip") == {
        **new_delta,
        "content-type": "x/y",
    }
    assert fmt.normalized_metadata(ref.key, ref.metadata, "text/plain") is None
    # Foreign and deep objects, and unusable metadata, are left alone.
    assert fmt.normalized_metadata("a/y.bin", {"owner": "x"}) is None
    deep = {**dg_delta, "dgfs-format": "deep-1", "dg-ref-key": "a/reference.deep"}
    assert fmt.normalized_metadata("a/x.zip.delta", deep) is None
    assert fmt.normalized_metadata("a/x.zip.delta", {**dg_delta, "dg-file-size": "x"}) is None


async def test_normalize_rewrites_in_place_and_skips_a_file_replaced_meanwhile() -> None:
    store = MemoryStore("m")
    for obj in proxy_objects(proxy_files()):
        await store.put_bytes(obj.key, obj.body, obj.metadata)
    bodies = {k: o.body for k, o in store.objects.items()}
    dry = await normalize(store, "", dry_run=True)
    assert dry.rewritten and all(o.body == bodies[k] for k, o in store.objects.items())
    assert all("dg-ref-key" not in o.metadata for o in store.objects.values())

    real_head = store.head
    raced = "app/NOTES.txt"

    async def head_then_replace(key: str) -> ObjectHead:
        head = await real_head(key)
        if key == raced:  # another writer replaces it between our HEAD and our copy
            await store.put_bytes(key, b"new", {"owner": "z"})
        return head

    store.head = head_then_replace  # type: ignore[method-assign]
    report = await normalize(store, "")
    assert report.changed_meanwhile == [raced]
    assert store.objects[raced].metadata == {"owner": "z"}  # the new version, untouched
    assert sorted(report.rewritten) == sorted(k for k in dry.rewritten if k != raced)
    store.head = real_head  # type: ignore[method-assign]
    for key, obj in store.objects.items():
        assert key == raced or obj.body == bodies[key]  # no byte moved
    again = await normalize(store, "")
    assert again.rewritten == [] and again.changed_meanwhile == []


async def test_normalize_leaves_the_hidden_form_of_a_file_alone(tmp_path: Path) -> None:
    """A writer died between storing ``d/a.zip.delta`` and removing the
    older ``d/a.zip`` (as DeltaGlider 6.2 wrote it: no ``dg-note``). The
    copy gave the old form a new Last-Modified, so it became the one shown:
    normalizing brought the old version back (found by review)."""
    store = MemoryStore("m")
    core, cache = make_core(store, tmp_path)
    new, old = b"the new version\n" * 256, b"the old version\n" * 256
    (tmp_path / "new").write_bytes(new)
    assert (await core.put(tmp_path / "new", "d/a.zip")).stored.stored_key == "d/a.zip.delta"
    old_meta = fmt.direct_metadata(
        original_name="a.zip",
        file_sha256=hashlib.sha256(old).hexdigest(),
        file_size=len(old),
        now=datetime.now(UTC),
    )
    del old_meta["dg-note"]
    await store.put_bytes("d/a.zip", old, old_meta)
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    store.objects["d/a.zip"] = replace(store.objects["d/a.zip"], last_modified=hour_ago)
    assert fmt.normalized_metadata("d/a.zip", old_meta) is not None  # it lacks a key
    try:
        report = await normalize(store, "")
        assert report.shadowed == ["d/a.zip"]
        assert "d/a.zip" not in report.rewritten
        shown = await core.locate("d/a.zip")
        assert shown.stored_key == "d/a.zip.delta"
        assert shown.file_sha256 == hashlib.sha256(new).hexdigest()
    finally:
        await core.aclose()
        cache.close()


@pytest.mark.interop
def test_deltaglider_reads_a_proxy_bucket_after_normalize(
    moto_endpoint: str, bucket_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    files = proxy_files()

    for obj in proxy_objects(files):
        client.put_object(Bucket=bucket_name, Key=obj.key, Body=obj.body, Metadata=obj.metadata)
    zip_key = next(k for k in files if k.startswith("app/") and k.endswith(".zip"))
    before = run_deltaglider(
        moto_endpoint, "cp", f"s3://{bucket_name}/{zip_key}", str(tmp_path / "b"), check=False
    )
    assert before.returncode != 0 and "dg-ref-key" in before.stdout + before.stderr  # the premise

    base = ["migrate", "--normalize", f"s3://{bucket_name}/", f"s3://{bucket_name}/"]
    endpoint = ["--endpoint-url", moto_endpoint]
    assert dgfs_main([*base, *endpoint]) == EXIT_USAGE  # neither --yes nor --dry-run
    capsys.readouterr()
    assert dgfs_main([*base, "--dry-run", "--json", *endpoint]) == EXIT_OK
    planned = json.loads(capsys.readouterr().out)["would_rewrite"]
    assert sorted(planned) == sorted(
        [k + ".delta" for k in files if k.endswith(".zip")] + ["app/NOTES.txt"]
    )
    assert dgfs_main([*base, "--yes", "--quiet", *endpoint]) == EXIT_OK

    for key, data in files.items():
        out = tmp_path / hashlib.sha256(key.encode()).hexdigest()
        run_deltaglider(moto_endpoint, "cp", f"s3://{bucket_name}/{key}", str(out))
        assert out.read_bytes() == data, key
        stored_key = key + ".delta" if key.endswith(".zip") else key
        meta = client.head_object(Bucket=bucket_name, Key=stored_key)["Metadata"]
        assert meta["user-ci"] == "7"  # the client's own metadata stays
        assert proxy_parse(meta)["storage"] == ("delta" if key.endswith(".zip") else "passthrough")
    client.close()


@pytest.mark.interop
def test_proxy_parses_what_deltaglider_writes(
    moto_endpoint: str, bucket_name: str, tmp_path: Path
) -> None:
    """The proxy reads the CLI's objects (``dg-ref-key`` is its fallback) but
    serves them with an empty ETag (no ``dg-md5``) until dgfs rewrites them;
    ``--normalize`` adds what it can from metadata alone."""
    series = ReleaseSeries(size=256 << 10, seed=52)
    names = []
    for name, data in [*series.zips(2), ("N.txt", b"n\n" * 500)]:
        (tmp_path / name).write_bytes(data)
        run_deltaglider(moto_endpoint, "cp", str(tmp_path / name), f"s3://{bucket_name}/d/{name}")
        names.append(name)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    try:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket_name)["Contents"]]
        expected = {"d/reference.bin": "reference", "d/N.txt": "passthrough"}
        expected.update({f"d/{n}.delta": "delta" for n in names if n.endswith(".zip")})
        assert sorted(keys) == sorted(expected)
        for key, storage in expected.items():
            parsed = proxy_parse(client.head_object(Bucket=bucket_name, Key=key)["Metadata"])
            assert parsed["storage"] == storage, key
            assert parsed["md5"] == ""  # the proxy's ETag for them: empty
            if storage == "delta":
                assert parsed["ref_path"] == "reference.bin"
    finally:
        client.close()


async def copy_if_match_refuses_another_version(store: ObjectStore) -> None:
    """A copy or delete on the condition of a version read earlier refuses
    another writer's newer object under the key, and goes ahead on its own."""
    await store.put_bytes("k", b"one", {"a": "1"})
    old = await store.head("k")
    await store.put_bytes("k", b"two", {"a": "2"})
    with pytest.raises(PreconditionFailed):
        await store.copy("k", "k", {"a": "3"}, version=old)
    with pytest.raises(PreconditionFailed):
        await store.copy("k", "k2", None, version=old)
    with pytest.raises(PreconditionFailed):
        await store.delete("k", version=old)
    assert (await store.head("k")).metadata == {"a": "2"}
    current = await store.head("k")
    await store.copy("k", "k2", None, version=current)
    assert (await store.get_range("k2", 0, 10)) == b"two"
    await store.copy("k", "k", {"a": "3"}, version=current)
    assert (await store.head("k")).metadata == {"a": "3"}
    await store.delete("k", version=await store.head("k"))
    with pytest.raises(NotFound):
        await store.head("k")
    await store.delete("k", version=current)  # gone already: as any delete of a missing key


async def delete_many_keeps_what_changed(store: ObjectStore) -> None:
    """``delete_many`` with ETags deletes what is still the version read and
    keeps (and returns) what another writer changed; missing keys are fine."""
    for key in ("a", "b", "c"):
        await store.put_bytes(key, b"one " + key.encode(), {})
    etags = {key: (await store.head(key)).etag for key in ("a", "b", "c")}
    etags["gone"] = "0" * 32
    await store.put_bytes("b", b"two", {})  # another writer, after the read
    kept = await store.delete_many(["a", "b", "c", "gone"], etags=etags)
    assert kept == ["b"]
    assert await store.get_range("b", 0, 10) == b"two"
    for key in ("a", "c"):
        with pytest.raises(NotFound):
            await store.head(key)
    assert await store.delete_many(["b"]) == []  # no ETags: deleted as it is
    with pytest.raises(NotFound):
        await store.head("b")


async def test_s3_delete_many_keeps_what_changed(s3_store: S3Store) -> None:
    await delete_many_keeps_what_changed(s3_store)


async def test_memory_delete_many_keeps_what_changed(memory_store: MemoryStore) -> None:
    await delete_many_keeps_what_changed(memory_store)


async def test_s3_copy_if_match_refuses_another_version(s3_store: S3Store) -> None:
    await copy_if_match_refuses_another_version(s3_store)


async def test_memory_copy_if_match_refuses_another_version(memory_store: MemoryStore) -> None:
    await copy_if_match_refuses_another_version(memory_store)


@pytest.mark.seaweedfs
async def test_seaweedfs_honours_the_conditions_of_copies_and_deletes(
    seaweed_endpoint: str,
) -> None:
    """S3Store's docstrings say SeaweedFS honours If-Match on DeleteObject and
    the ETags of DeleteObjects (renames, rm and gc rely on them): checked."""
    bucket = f"dgfs-cond-{uuid.uuid4().hex[:12]}"
    make_bucket(seaweed_endpoint, bucket)
    store = S3Store(bucket, endpoint_url=seaweed_endpoint, region=REGION)
    try:
        await copy_if_match_refuses_another_version(store)
        await delete_many_keeps_what_changed(store)
        assert store.conditional_delete  # never refused, so never dropped
        # HEAD and LIST answers are dated by the server (directory indexes
        # and the attribute cache rely on it).
        listed = await store.list("")
        assert listed.objects and listed.observed_at is not None
        for obj in listed.objects:
            head = await store.head(obj.key)
            assert head.observed_at is not None
            assert obj.last_modified - timedelta(seconds=1) <= head.observed_at
    finally:
        await store.aclose()


@pytest.mark.interop
async def test_migrate_copies_an_encrypted_proxy_bucket_for_every_reader(
    moto_endpoint: str, bucket_name: str, tmp_path: Path
) -> None:
    """``dgfs migrate`` from a bucket the proxy wrote and encrypted (its key
    given): the copy is plain dgfs objects, which the DeltaGlider CLI reads,
    with the client's own metadata and without the encryption markers."""
    key = bytes(range(7, 39))
    (tmp_path / "proxy.key").write_text(key.hex())
    files = proxy_files()
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    dest_bucket = bucket_name + "-copy"
    client.create_bucket(Bucket=dest_bucket)
    writer = ProxyWriter(encryption=ProxyEncryption(key, chunked_passthrough=True))
    for path, data in files.items():
        for obj in writer.put(path, data, delta=path.endswith(".zip"), user={"ci": "7"}):
            client.put_object(Bucket=bucket_name, Key=obj.key, Body=obj.body, Metadata=obj.metadata)
    settings = Settings(
        endpoint_url=moto_endpoint,
        cache_dir=tmp_path / "cache",
        policy=Policy(min_delta_size=1024),
        proxy_key_file=tmp_path / "proxy.key",
    )
    source, dest = S3Location(bucket_name), S3Location(dest_bucket)
    async with open_migration(source, dest, settings) as (source_core, dest_core):
        plan = await plan_migration(source_core.store, dest_core.store, source, dest)
        report = await run_migration(source_core, dest_core, plan, concurrency=2)
    assert not report.failed and len(report.copied) == len(files)
    for path, data in files.items():
        out = tmp_path / hashlib.sha256(path.encode()).hexdigest()
        await trio.to_thread.run_sync(
            lambda p=path, o=out: run_deltaglider(
                moto_endpoint, "cp", f"s3://{dest_bucket}/{p}", str(o)
            )
        )
        assert out.read_bytes() == data, path
        stored_key = path + ".delta" if path.endswith(".zip") else path
        meta = client.head_object(Bucket=dest_bucket, Key=stored_key)["Metadata"]
        assert meta.get("user-ci") == "7" and "user-dg-encrypted" not in meta, path
    client.close()
