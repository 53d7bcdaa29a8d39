"""dgfs migrate: streaming copy, resume after a kill, dry run, filters, prefixes, shards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from dgfs import format as fmt
from dgfs.cli.main import EXIT_OK
from dgfs.cli.main import main as dgfs_main
from dgfs.convert import ConversionPlan, convert_in_place, plan_conversion
from dgfs.core import Core
from dgfs.errors import ConfigError
from dgfs.format import DeltaMode, Kind
from dgfs.migrate import (
    MigrationPlan,
    MigrationReport,
    SourceFile,
    effective_dest_prefix,
    open_migration,
    plan_migration,
    run_migration,
    selected,
)
from dgfs.runtime import S3Location, Settings, open_core
from dgfs.shard import Shard
from dgfs.store.base import ObjectHead
from dgfs.store.memory import MemoryStore
from tests.coreharness import Clock, deep_core, make_core, write
from tests.mountutil import dg_upload, dgfs_bin
from testsupport.releases import ReleaseSeries, directories_per_shard
from testsupport.servers import REGION, make_bucket, s3_client

# --- pure rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "dest", "preserve", "expected"),
    [
        ("a/b", "x", True, "x/b"),  # DeltaGlider: the last component is kept
        ("a/b/", "x/", True, "x/b"),
        ("prefix1", "", True, "prefix1"),
        ("", "x", True, "x"),
        ("", "", True, ""),
        ("a/b", "x", False, "x"),
        ("a/b", "", False, ""),
    ],
)
def test_prefix_rules(source: str, dest: str, preserve: bool, expected: str) -> None:
    assert effective_dest_prefix(source, dest, preserve) == expected


def test_shard_rule_is_a_stable_hash_of_the_directory_and_a_partition() -> None:
    spaces = ["", "a", "a/b", "releases/app", "é/ü", *(f"dir{i}" for i in range(300))]
    for count in (1, 2, 3, 5):
        shards = [Shard(k, count) for k in range(1, count + 1)]
        for space in spaces:
            owners = [shard for shard in shards if shard.owns_space(space)]
            assert len(owners) == 1  # every directory, exactly once
            # The documented rule, so that workers agree across machines and versions.
            digest = hashlib.sha256(space.encode()).digest()
            assert owners[0].index == int.from_bytes(digest[:8], "big") % count + 1
            # A directory's files and its references go with it; subdirectories need not.
            for name in ("x-1.zip", "x-1.zip.delta", "reference.bin", "reference.deep"):
                assert owners[0].owns(fmt.join_key(space, name))
    # Spread: 300 directories over 3 shards, about 100 each.
    sizes = [sum(Shard(k, 3).owns_space(f"dir{i}") for i in range(300)) for k in (1, 2, 3)]
    assert min(sizes) >= 70, sizes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0/3", "K must be between 1 and N"),
        ("3/2", "K must be between 1 and N"),
        ("1/0", "N (the number of workers) must be at least 1"),
        ("x/y", "give K/N"),
        ("2", "give K/N"),
        ("-1/3", "give K/N"),
        ("1/3/4", "give K/N"),
    ],
)
def test_bad_shard_values_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Shard.parse(text)


def test_filters() -> None:
    assert selected("app/x-1.zip")
    assert selected("app/x-1.zip", include=["*.zip"])
    assert not selected("app/x-1.tar", include=["*.zip"])
    assert not selected("app/x-1.zip", include=["*.zip"], exclude=["*-1.*"])
    assert selected("app/x-2.zip", include=["*.txt", "app/*"], exclude=["*-1.*"])
    assert not selected("notes.txt", exclude=["*.txt"])


# --- helpers ----------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_bucket(endpoint: str, tag: str) -> str:
    name = f"dgfs-mig-{tag}-{time.monotonic_ns() % 10**12}"
    make_bucket(endpoint, name)
    return name


def upload_series(
    endpoint: str, bucket: str, prefix: str, count: int, seed: int = 1
) -> dict[str, bytes]:
    """``count`` raw releases under ``prefix`` (with content type and user metadata)."""
    client = s3_client(endpoint)
    files = {}
    for name, data in ReleaseSeries(size=256 << 10, seed=seed).zips(count):
        client.put_object(
            Bucket=bucket,
            Key=f"{prefix}{name}",
            Body=data,
            ContentType="application/zip",
            Metadata={"owner": "ci", "build": name},
        )
        files[name] = data
    client.close()
    return files


def listing(endpoint: str, bucket: str) -> dict[str, dict[str, Any]]:
    client = s3_client(endpoint)
    found: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = obj
    client.close()
    return found


@pytest.fixture
def settings(moto_endpoint: str, tmp_path: Path) -> Settings:
    return Settings(endpoint_url=moto_endpoint, region=REGION, cache_dir=tmp_path / "cache")


@pytest.fixture
def buckets(moto_endpoint: str) -> Iterator[tuple[str, str]]:
    yield new_bucket(moto_endpoint, "src"), new_bucket(moto_endpoint, "dst")


@pytest.fixture
async def reader(
    moto_endpoint: str, buckets: tuple[str, str], tmp_path: Path
) -> AsyncIterator[Core]:
    """A core on the destination bucket, to read files back (verified)."""
    settings = Settings(endpoint_url=moto_endpoint, region=REGION, cache_dir=tmp_path / "read")
    async with open_core(S3Location(buckets[1]), settings) as core:
        yield core


async def read_back(core: Core, key: str, tmp_path: Path) -> bytes:
    out = tmp_path / "read-back"
    await core.get(key, out)
    return out.read_bytes()


# --- the copy itself ------------------------------------------------------------------


async def test_migrate_plain_bucket_keeps_names_metadata_and_content_type(
    moto_endpoint: str,
    buckets: tuple[str, str],
    settings: Settings,
    reader: Core,
    tmp_path: Path,
) -> None:
    src, dst = buckets
    files = upload_series(moto_endpoint, src, "a/b/", 5)
    client = s3_client(moto_endpoint)
    client.put_object(Bucket=src, Key="a/b/notes.txt", Body=b"notes " * 100)
    files["notes.txt"] = b"notes " * 100
    # Directory markers, as a mount's mkdir writes them (the source's own is not copied).
    client.put_object(Bucket=src, Key="a/b/", Body=b"")
    client.put_object(Bucket=src, Key="a/b/empty/", Body=b"", Metadata={"mode": "16877"})

    source, dest = S3Location(src, "a/b"), S3Location(dst, "x")
    async with open_migration(source, dest, settings) as (source_core, dest_core):
        plan = await plan_migration(source_core.store, dest_core.store, source, dest)
        assert plan.dest_prefix == "x/b"
        assert len(plan.to_copy) == 7 and plan.total_bytes == sum(map(len, files.values()))
        report = await run_migration(source_core, dest_core, plan, concurrency=4)
    assert not report.failed and len(report.copied) == 7
    assert report.stored_bytes < report.original_bytes
    kinds = {c.rel_key: c.kind for c in report.copied}
    assert kinds["notes.txt"] is Kind.DIRECT
    assert all(kind is Kind.DELTA for name, kind in kinds.items() if name.endswith(".zip"))
    marker = client.head_object(Bucket=dst, Key="x/b/empty/")
    assert marker["ContentLength"] == 0 and marker["Metadata"] == {"mode": "16877"}

    # Only final names: one object per file, plus the one reference.
    expected = {f"x/b/{n}.delta" for n in files if n.endswith(".zip")}
    expected |= {"x/b/notes.txt", "x/b/reference.bin", "x/b/empty/"}
    assert set(listing(moto_endpoint, dst)) == expected
    for name, data in files.items():
        assert await read_back(reader, f"x/b/{name}", tmp_path) == data
    name = sorted(files)[1]
    head = client.head_object(Bucket=dst, Key=f"x/b/{name}.delta")
    assert head["ContentType"] == "application/zip"
    assert head["Metadata"]["owner"] == "ci" and head["Metadata"]["build"] == name
    assert head["Metadata"]["dg-file-sha256"] == sha(files[name])
    client.close()


async def test_deltaglider_format_source_is_rehydrated_not_copied_as_deltas(
    moto_endpoint: str,
    buckets: tuple[str, str],
    settings: Settings,
    reader: Core,
    tmp_path: Path,
) -> None:
    src, dst = buckets
    files = {}
    src_settings = Settings(
        endpoint_url=moto_endpoint, region=REGION, cache_dir=tmp_path / "src-cache"
    )
    async with open_core(S3Location(src), src_settings) as writer:
        for name, data in ReleaseSeries(size=256 << 10, seed=9).zips(4):
            name = f"é-{name}"  # non-ASCII names travel RFC 2047-encoded in metadata
            path = tmp_path / name
            path.write_bytes(data)
            await writer.put(path, f"relé/{name}", extra_metadata={"mtime": "1700000000"})
            files[name] = data
    source, dest = S3Location(src, "relé"), S3Location(dst, "")
    async with open_migration(source, dest, settings) as (source_core, dest_core):
        plan = await plan_migration(
            source_core.store, dest_core.store, source, dest, preserve_prefix=False
        )
        # Sizes are the files' own, from the deltas' metadata, not the deltas'.
        assert {f.rel_key: f.size for f in plan.to_copy} == {n: len(d) for n, d in files.items()}
        report = await run_migration(source_core, dest_core, plan)
    assert not report.failed and len(report.copied) == 4
    keys = set(listing(moto_endpoint, dst))
    assert keys == {f"{n}.delta" for n in files} | {"reference.bin"}
    client = s3_client(moto_endpoint)
    for name, data in files.items():
        assert await read_back(reader, name, tmp_path) == data
        meta = client.head_object(Bucket=dst, Key=f"{name}.delta")["Metadata"]
        assert meta["dg-ref-key"] == "reference.bin"  # made against the destination's reference
        assert meta["mtime"] == "1700000000"
    client.close()


@pytest.mark.interop
async def test_bucket_written_by_deltaglider_migrates(
    moto_endpoint: str,
    buckets: tuple[str, str],
    settings: Settings,
    reader: Core,
    tmp_path: Path,
) -> None:
    src, dst = buckets
    files = {}
    for name, data in ReleaseSeries(size=256 << 10, seed=11).zips(3):
        path = tmp_path / name
        path.write_bytes(data)
        dg_upload(moto_endpoint, path, src, f"dg/{name}")
        files[name] = data
    source, dest = S3Location(src, "dg"), S3Location(dst, "")
    async with open_migration(source, dest, settings) as (source_core, dest_core):
        plan = await plan_migration(source_core.store, dest_core.store, source, dest)
        report = await run_migration(source_core, dest_core, plan)
    assert not report.failed
    assert {c.dest_key for c in report.copied} == {f"dg/{n}" for n in files}
    for name, data in files.items():
        assert await read_back(reader, f"dg/{name}", tmp_path) == data


@pytest.mark.expected_log("does not match its recorded SHA-256")
async def test_corrupt_source_file_is_reported_and_the_rest_is_copied(
    moto_endpoint: str, buckets: tuple[str, str], settings: Settings
) -> None:
    src, dst = buckets
    upload_series(moto_endpoint, src, "", 3)
    client = s3_client(moto_endpoint)
    # A direct object whose bytes no longer match its recorded SHA-256.
    meta = {"dg-file-sha256": sha(b"original"), "dg-file-size": "7", "dg-compression": "none"}
    client.put_object(Bucket=src, Key="bad.txt", Body=b"changed", Metadata=meta)
    client.close()
    source, dest = S3Location(src), S3Location(dst)
    async with open_migration(source, dest, settings) as (source_core, dest_core):
        plan = await plan_migration(source_core.store, dest_core.store, source, dest)
        report = await run_migration(source_core, dest_core, plan)
    assert [key for key, _ in report.failed] == ["bad.txt"]
    assert "SHA-256" in report.failed[0][1]
    assert len(report.copied) == 3
    assert "bad.txt" not in listing(moto_endpoint, dst)


async def test_resume_skips_same_size_and_replaces_different(
    moto_endpoint: str, buckets: tuple[str, str], settings: Settings, reader: Core, tmp_path: Path
) -> None:
    src, dst = buckets
    files = upload_series(moto_endpoint, src, "", 4)
    names = sorted(files)
    source, dest = S3Location(src), S3Location(dst)
    async with open_migration(source, dest, settings) as (source_core, dest_core):
        plan = await plan_migration(
            source_core.store, dest_core.store, source, dest, include=[names[0], names[1]]
        )
        assert plan.filtered_out == 2
        await run_migration(source_core, dest_core, plan)
        # The source's second file changes (another size) after it was copied.
        changed = files[names[1]] + b"appendix"
        s3_client(moto_endpoint).put_object(Bucket=src, Key=names[1], Body=changed)
        plan = await plan_migration(source_core.store, dest_core.store, source, dest)
        assert [f.rel_key for f in plan.present] == [names[0]]
        assert sorted(f.rel_key for f in plan.to_copy) == names[1:]
        assert [f.rel_key for f in plan.replacing] == [names[1]]
        report = await run_migration(source_core, dest_core, plan)
    assert not report.failed and report.skipped == 1
    assert await read_back(reader, names[1], tmp_path) == changed


async def test_overlapping_locations_are_refused(
    moto_endpoint: str, buckets: tuple[str, str], settings: Settings
) -> None:
    src, _ = buckets
    async with open_migration(S3Location(src), S3Location(src, "x"), settings) as (s, d):
        with pytest.raises(ConfigError, match="overlap"):
            await plan_migration(s.store, d.store, S3Location(src), S3Location(src, "x"))


# --- the command ------------------------------------------------------------------------


def dgfs(
    endpoint: str, cache: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dgfs_bin(), *args, "--endpoint-url", endpoint, "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_cli_dry_run_filters_and_prefixes(
    moto_endpoint: str, buckets: tuple[str, str], tmp_path: Path
) -> None:
    src, dst = buckets
    files = upload_series(moto_endpoint, src, "a/b/", 4)
    s3_client(moto_endpoint).put_object(Bucket=src, Key="a/b/notes.txt", Body=b"n")
    names = sorted(files)
    result = dgfs(
        moto_endpoint,
        tmp_path / "c",
        "migrate",
        "--dry-run",
        "--include",
        "*.zip",
        "--exclude",
        f"*{names[0]}",
        f"s3://{src}/a/b/",
        f"s3://{dst}/x/",
    )
    assert result.returncode == 0, result.stderr
    assert listing(moto_endpoint, dst) == {}  # nothing written
    for name in names[1:]:
        assert f"-> x/b/{name}" in result.stdout
    assert names[0] not in result.stdout and "notes.txt" not in result.stdout
    assert "to copy:          3 files" in result.stdout

    as_json = dgfs(
        moto_endpoint,
        tmp_path / "c",
        "migrate",
        "--dry-run",
        "--json",
        "--exclude",
        "*.txt",
        f"s3://{src}/a/b/",
        f"s3://{dst}/x/",
    )
    plan = json.loads(as_json.stdout)
    assert [f["dest_key"] for f in plan["to_copy"]] == [f"x/b/{n}" for n in names]
    assert plan["to_copy_bytes"] == sum(len(files[n]) for n in names)

    # Without confirmation on a non-terminal stdin: refused, nothing written.
    refused = dgfs(moto_endpoint, tmp_path / "c", "migrate", f"s3://{src}/a/b/", f"s3://{dst}/x/")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert listing(moto_endpoint, dst) == {}

    done = dgfs(
        moto_endpoint,
        tmp_path / "c",
        "migrate",
        "--yes",
        "--no-preserve-prefix",
        "--exclude",
        "*.txt",
        f"s3://{src}/a/b/",
        f"s3://{dst}/x/",
    )
    assert done.returncode == 0, done.stderr
    assert "saved:" in done.stdout and "files/s" in done.stdout
    assert set(listing(moto_endpoint, dst)) == {f"x/{n}.delta" for n in names} | {"x/reference.bin"}


def test_cli_resume_after_kill_copies_nothing_twice(
    moto_endpoint: str, buckets: tuple[str, str], tmp_path: Path
) -> None:
    src, dst = buckets
    total = 40
    files = upload_series(moto_endpoint, src, "rel/", total, seed=21)
    args = [
        dgfs_bin(),
        "migrate",
        "--yes",
        "--json",
        "--concurrency",
        "1",
        f"s3://{src}/rel/",
        f"s3://{dst}/",
        "--endpoint-url",
        moto_endpoint,
        "--cache-dir",
        str(tmp_path / "c1"),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            so_far = [k for k in listing(moto_endpoint, dst) if k != "rel/reference.bin"]
            if len(so_far) >= 5 or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the migration finished before it could be interrupted"
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)

    after_kill = listing(moto_endpoint, dst)
    landed = {k: v for k, v in after_kill.items() if k != "rel/reference.bin"}
    assert 5 <= len(landed) < total

    result = dgfs(
        moto_endpoint,
        tmp_path / "c2",
        "migrate",
        "--yes",
        "--json",
        f"s3://{src}/rel/",
        f"s3://{dst}/",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["skipped"] == len(landed)
    assert report["copied"] == total - len(landed)
    assert report["failed"] == []

    final = listing(moto_endpoint, dst)
    visible = [fmt.visible_key(key) or key for key in final if key != "rel/reference.bin"]
    assert sorted(visible) == sorted(f"rel/{n}" for n in files)  # each file exactly once
    for key, obj in landed.items():  # not rewritten by the second run
        assert (final[key]["ETag"], final[key]["LastModified"]) == (
            obj["ETag"],
            obj["LastModified"],
        )

    async def check() -> None:
        settings = Settings(endpoint_url=moto_endpoint, region=REGION, cache_dir=tmp_path / "check")
        async with open_core(S3Location(dst), settings) as core:
            for name, data in files.items():
                assert await read_back(core, f"rel/{name}", tmp_path) == data

    trio.run(check)


# --- shards: several workers, each its own directories ------------------------------------


@contextlib.asynccontextmanager
async def worker(
    store: MemoryStore, root: Path, deltas: DeltaMode = DeltaMode.DG
) -> AsyncIterator[Core]:
    """A core on ``store`` with its own cache and scratch, as one machine of a batch has."""
    core, cache = deep_core(store, root, deltas=deltas)
    try:
        yield core
    finally:
        await core.aclose()
        cache.close()


async def fill_raw(store: MemoryStore, spaces: list[str]) -> dict[str, bytes]:
    """Three raw zip releases in each directory of ``spaces``, and a file at the root."""
    files: dict[str, bytes] = {}
    for number, space in enumerate(spaces):
        for name, data in ReleaseSeries(size=64 << 10, seed=number).zips(3):
            key = f"{space}/{name}"
            await store.put_bytes(key, data, {"owner": "ci"}, content_type="application/zip")
            files[key] = data
    files["README.txt"] = b"read me\n" * 50
    await store.put_bytes("README.txt", files["README.txt"], {})
    return files


def visible_files(store: MemoryStore) -> set[str]:
    return {
        fmt.visible_key(key) or key
        for key in store.objects
        if not (fmt.is_reference_key(key) or fmt.is_internal_key(key))
    }


async def test_shards_together_migrate_every_file_once_each_directory_in_one(
    tmp_path: Path,
) -> None:
    source, dest = MemoryStore("src"), MemoryStore("dst")
    spaces = directories_per_shard(3, 2)
    files = await fill_raw(source, spaces)
    src_loc, dst_loc = S3Location("src"), S3Location("dst")
    shards = [Shard(k, 3) for k in (1, 2, 3)]
    # A batch: every worker plans before any copies, then all run at once.
    plans = [await plan_migration(source, dest, src_loc, dst_loc, shard=s) for s in shards]
    for shard, plan in zip(shards, plans, strict=True):
        assert plan.shard == shard and plan.to_copy
        assert len(plan.to_copy) + plan.other_shards == len(files)
        assert all(shard.owns(f.dest_key) for f in plan.to_copy)
    copied_by: dict[str, list[int]] = {}

    async def run_worker(shard: Shard, plan: MigrationPlan) -> None:
        root = tmp_path / f"worker{shard.index}"
        async with worker(source, root / "src") as source_core, worker(dest, root) as dest_core:
            report = await run_migration(source_core, dest_core, plan, concurrency=2)
        assert not report.failed and report.skipped == 0
        assert report.shard == shard and report.to_json()["shard"] == f"{shard.index}/3"
        for copied in report.copied:
            copied_by.setdefault(copied.dest_key, []).append(shard.index)

    async with trio.open_nursery() as nursery:
        for shard, plan in zip(shards, plans, strict=True):
            nursery.start_soon(run_worker, shard, plan)

    assert copied_by.keys() == files.keys()
    assert all(len(by) == 1 for by in copied_by.values())  # each file exactly once
    shards_of_space: dict[str, set[int]] = {}
    for key, by in copied_by.items():
        shards_of_space.setdefault(fmt.split_key(key)[0], set()).update(by)
    assert all(len(owners) == 1 for owners in shards_of_space.values())
    # One reference per directory, made by the one worker that had the directory.
    references = {key for key in dest.objects if fmt.is_reference_key(key)}
    assert references == {f"{space}/reference.bin" for space in spaces}
    assert visible_files(dest) == files.keys()
    async with worker(dest, tmp_path / "reader") as reader:
        for key, data in files.items():
            assert await read_back(reader, key, tmp_path) == data


async def test_a_shard_rerun_resumes_exactly(tmp_path: Path) -> None:
    source, dest = MemoryStore("src"), MemoryStore("dst")
    files = await fill_raw(source, directories_per_shard(3, 2))
    src_loc, dst_loc = S3Location("src"), S3Location("dst")
    shard = Shard(2, 3)
    mine = {key for key in files if shard.owns(key)}
    async with worker(source, tmp_path / "src") as source_core:
        async with worker(dest, tmp_path / "dst") as dest_core:
            plan = await plan_migration(source, dest, src_loc, dst_loc, shard=shard)
            assert {f.dest_key for f in plan.to_copy} == mine
            done: list[str] = []
            with trio.CancelScope() as scope:  # the worker is killed after two files

                def on_done(file: SourceFile, copied: object, error: str | None) -> None:
                    assert error is None
                    done.append(file.dest_key)
                    if len(done) == 2:
                        scope.cancel()

                await run_migration(source_core, dest_core, plan, concurrency=1, on_done=on_done)
            assert visible_files(dest) == set(done)
            landed = dict(dest.objects)

        # The same shard again (another machine, another cache): what is there is skipped.
        async with worker(dest, tmp_path / "dst2") as dest_core:
            resumed = await plan_migration(source, dest, src_loc, dst_loc, shard=shard)
            assert {f.dest_key for f in resumed.present} == set(done)
            assert {f.dest_key for f in resumed.to_copy} == mine - set(done)
            report = await run_migration(source_core, dest_core, resumed)
    assert not report.failed and report.skipped == 2 and len(report.copied) == len(mine) - 2
    for key, obj in landed.items():
        assert dest.objects[key] is obj  # not rewritten
    assert visible_files(dest) == mine  # nothing of the other shards
    final = await plan_migration(source, dest, src_loc, dst_loc, shard=shard)
    assert not final.to_copy and len(final.present) == len(mine)


def without_times(metadata: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in metadata.items() if name != "dg-created-at"}


async def test_in_place_conversion_by_shards_equals_one_worker(tmp_path: Path) -> None:
    one = MemoryStore("one")
    spaces = directories_per_shard(3, 2)
    files: dict[str, bytes] = {}
    async with worker(one, tmp_path / "writer") as writer:
        for number, space in enumerate(spaces):
            for name, data in ReleaseSeries(size=64 << 10, seed=number).zips(3):
                path = tmp_path / name
                path.write_bytes(data)
                assert (await writer.put(path, f"{space}/{name}")).stored.kind is Kind.DELTA
                files[f"{space}/{name}"] = data
    split = MemoryStore("split")
    split.objects = dict(one.objects)  # the same bucket twice

    async with worker(one, tmp_path / "single", DeltaMode.DEEP) as core:
        plan = await plan_conversion(one, S3Location("one"), DeltaMode.DEEP)
        single = await convert_in_place(core, plan, settle=0)
    assert not single.failed and len(single.copied) == len(files)

    location = S3Location("split")
    shards = [Shard(k, 3) for k in (1, 2, 3)]
    plans = [await plan_conversion(split, location, DeltaMode.DEEP, shard=s) for s in shards]
    planned: list[str] = []
    for shard, plan in zip(shards, plans, strict=True):
        assert plan.to_convert and plan.other_shards == len(files) - len(plan.to_convert)
        assert all(shard.owns(f.key) for f in plan.to_convert)
        assert plan.old_references and all(shard.owns(o.key) for o in plan.old_references)
        planned += [f.key for f in plan.to_convert]
    assert sorted(planned) == sorted(files)

    # Worker 1 alone first: it converts, and removes the references of, its directories only.
    before = dict(split.objects)
    async with worker(split, tmp_path / "w1", DeltaMode.DEEP) as core:
        first = await convert_in_place(core, plans[0], settle=0)
    assert not first.failed and first.to_json()["shard"] == "1/3"
    assert [g.key for g in first.references_removed] == [o.key for o in plans[0].old_references]
    for key, obj in before.items():
        if not shards[0].owns(key):
            assert split.objects[key] is obj
    assert first.stored_after == sum(
        len(o.body)
        for key, o in split.objects.items()
        if shards[0].owns(key) and not fmt.is_internal_key(key)
    )
    assert (await plan_conversion(split, location, DeltaMode.DEEP, shard=shards[0])).nothing_to_do
    assert not (await plan_conversion(split, location, DeltaMode.DEEP)).nothing_to_do

    # Then the two others at the same time, with the plans made at the start.
    async def run_worker(shard: Shard, plan: ConversionPlan) -> None:
        async with worker(split, tmp_path / f"w{shard.index}", DeltaMode.DEEP) as core:
            report = await convert_in_place(core, plan, settle=0)
        assert not report.failed and report.references_removed

    async with trio.open_nursery() as nursery:
        for shard, plan in zip(shards[1:], plans[1:], strict=True):
            nursery.start_soon(run_worker, shard, plan)

    # The bucket is the one a single worker leaves (gc's backups aside).
    def visible(store: MemoryStore) -> dict[str, tuple[bytes, dict[str, str]]]:
        return {
            key: (o.body, without_times(o.metadata))
            for key, o in store.objects.items()
            if not fmt.is_internal_key(key)
        }

    assert visible(split) == visible(one)
    assert not any(key.endswith("/reference.bin") for key in visible(split))
    assert (await plan_conversion(split, location, DeltaMode.DEEP)).nothing_to_do
    async with worker(split, tmp_path / "reader", DeltaMode.DEEP) as reader:
        for key, data in files.items():
            assert await read_back(reader, key, tmp_path) == data


def test_cli_shards_split_a_migration_and_say_so(
    moto_endpoint: str,
    buckets: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, dst = buckets
    files: set[str] = set()
    for number, space in enumerate(directories_per_shard(2, 1)):
        files |= {f"{space}/{n}" for n in upload_series(moto_endpoint, src, f"{space}/", 2, number)}
    common = ["--endpoint-url", moto_endpoint, "--cache-dir", str(tmp_path / "c")]
    locations = [f"s3://{src}/", f"s3://{dst}/"]

    assert dgfs_main(["migrate", "--dry-run", "--shard", "1/2", *locations, *common]) == EXIT_OK
    out = capsys.readouterr().out
    assert "(shard 1/2)" in out and "to copy:          2 files" in out
    assert "other shards:     2 files" in out
    for k in (1, 2):
        code = dgfs_main(["migrate", "--yes", "--json", "--shard", f"{k}/2", *locations, *common])
        report = json.loads(capsys.readouterr().out)
        assert code == EXIT_OK and report["shard"] == f"{k}/2"
        assert report["copied"] == 2 and report["skipped"] == 0 and report["failed"] == []
    # A rerun of a finished worker: nothing to copy, its plan says which shard it covers.
    code = dgfs_main(["migrate", "--yes", "--json", "--shard", "2/2", *locations, *common])
    plan = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK and plan["shard"] == "2/2"
    assert plan["to_copy"] == [] and plan["present"] == 2 and plan["other_shards"] == 2
    client = s3_client(moto_endpoint)
    keys = {obj["Key"] for obj in client.list_objects_v2(Bucket=dst).get("Contents", [])}
    client.close()
    assert {fmt.visible_key(k) or k for k in keys if not fmt.is_reference_key(k)} == files


# --- what a mount shows: x.delta files of their own, two forms, changed contents ----
# Each test failed before the fix it names.


@contextlib.asynccontextmanager
async def two_cores(
    tmp_path: Path, src: MemoryStore, dst: MemoryStore
) -> AsyncIterator[tuple[Core, Core]]:
    """Source and destination cores over in-memory stores."""
    source_core, source_cache = make_core(src, tmp_path / "s")
    dest_core, dest_cache = make_core(dst, tmp_path / "d")
    try:
        yield source_core, dest_core
    finally:
        await source_core.aclose()
        await dest_core.aclose()
        source_cache.close()
        dest_cache.close()


def zips(prefix: str, count: int) -> dict[str, bytes]:
    """``count`` releases of one series (each stored as a delta of the first)."""
    return {f"{prefix}/{n}": d for n, d in ReleaseSeries(size=64 << 10, seed=4).zips(count)}


async def migrate_all(
    src: MemoryStore, dst: MemoryStore, cores: tuple[Core, Core], dest_prefix: str
) -> tuple[MigrationPlan, MigrationReport]:
    """Plan and run ``s3://src/app/`` into ``s3://dst/{dest_prefix}/``."""
    source_core, dest_core = cores
    plan = await plan_migration(
        src, dst, S3Location("src", "app"), S3Location("dst", dest_prefix), preserve_prefix=False
    )
    return plan, await run_migration(source_core, dest_core, plan)


async def test_migrate_copies_a_foreign_dot_delta_file_beside_its_namesake(
    tmp_path: Path,
) -> None:
    """A plain object ``r.zip.delta`` (no DeltaGlider metadata) is a file of
    its own beside ``r.zip``, as a mount shows both. It was folded into
    ``r.zip`` by name and silently left behind: not copied, not failed.
    ``r.zip`` is stored direct: its delta would take the other file's name."""
    clock = Clock()
    src, dst = MemoryStore("src", clock=clock), MemoryStore("dst", clock=clock)
    [(key, data)] = zips("app", 1).items()  # alone: it would be a (zero-diff) delta
    await src.put_bytes(key + ".delta", b"my patch notes\n" * 10, {"mtime": "1700000000"})
    clock.tick()
    await src.put_bytes(key, data, {})
    clock.tick()
    shown = key.replace("app/", "app2/")
    async with two_cores(tmp_path, src, dst) as cores:
        _, report = await migrate_all(src, dst, cores, "app2")
        assert not report.failed
        assert {c.dest_key for c in report.copied} == {shown, shown + ".delta"}
        copied = dst.objects[shown + ".delta"]
        assert copied.body == b"my patch notes\n" * 10
        assert copied.metadata == {"mtime": "1700000000"}  # as it is: still a file of its own
        assert await read_back(cores[1], shown, tmp_path) == data
        _, rerun = await migrate_all(src, dst, cores, "app2")
        assert not rerun.copied and rerun.skipped == 2


async def test_migrate_copies_a_lone_foreign_dot_delta_file(tmp_path: Path) -> None:
    """Alone, the plain ``notes.delta`` was planned as the delta of ``notes``:
    "no such file" on every run (exit 1)."""
    src, dst = MemoryStore("src"), MemoryStore("dst")
    await src.put_bytes("app/notes.delta", b"my patch notes\n" * 10, {})
    async with two_cores(tmp_path, src, dst) as cores:
        _, report = await migrate_all(src, dst, cores, "app2")
        assert not report.failed, report.failed
        assert dst.objects["app2/notes.delta"].body == b"my patch notes\n" * 10


async def test_migrate_takes_back_a_name_its_destination_delta_holds(tmp_path: Path) -> None:
    """The destination holds ``notes`` as the delta ``notes.delta`` (an
    earlier run made it, before the source's own ``notes.delta`` was copied):
    ``notes`` is stored again direct, then the file ``notes.delta`` copied;
    both read back."""
    clock = Clock()
    src, dst = MemoryStore("src", clock=clock), MemoryStore("dst", clock=clock)
    files = zips("app", 2)
    async with two_cores(tmp_path, src, dst) as cores:
        for key, data in files.items():
            await cores[1].put(write(tmp_path / "in", data), key.replace("app/", "b/"))
        clock.tick()
        for key, data in files.items():
            await src.put_bytes(key, data, {})
        second = sorted(files)[1]
        await src.put_bytes(second + ".delta", b"not a delta\n", {})
        assert dst.objects[second.replace("app/", "b/") + ".delta"].metadata["dg-ref-key"]
        plan, report = await migrate_all(src, dst, cores, "b")
        assert [f.rel_key for f in plan.replacing] == [second.removeprefix("app/")]
        assert not report.failed
        shown = second.replace("app/", "b/")
        assert await read_back(cores[1], shown, tmp_path) == files[second]
        assert dst.objects[shown + ".delta"].body == b"not a delta\n"


async def test_migrate_copies_the_form_a_mount_shows_when_both_forms_share_a_second(
    tmp_path: Path,
) -> None:
    """A writer replaced the direct ``x.zip`` by ``x.zip.delta`` and died before
    deleting the direct one, within the same second (S3's Last-Modified has
    one-second resolution). A mount and ``Core.get`` show the delta (newer
    ``dg-created-at``: ``fmt.form_rank``); migrate copied the old direct one
    (the one listed first)."""
    clock = Clock()  # never ticks: every write in the same second
    src, dst = MemoryStore("src", clock=clock), MemoryStore("dst", clock=clock)
    files = zips("app", 2)
    first, new = sorted(files)
    async with two_cores(tmp_path, src, dst) as cores:
        source_core, dest_core = cores
        await source_core.put(write(tmp_path / "first", files[first]), first)
        await source_core.put(write(tmp_path / "old", b"old version\n" * 20), "app/x.zip")
        direct = src.objects["app/x.zip"]  # small: stored direct
        stored = (await source_core.put(write(tmp_path / "new", files[new]), "app/x.zip")).stored
        assert stored.kind is Kind.DELTA
        src.objects["app/x.zip"] = direct  # the delete of the old form never happened
        assert direct.last_modified == src.objects["app/x.zip.delta"].last_modified
        assert await read_back(source_core, "app/x.zip", tmp_path) == files[new]
        # The destination holds the same two forms: what it shows is what counts.
        await dest_core.put(write(tmp_path / "old", b"old version\n" * 20), "b/x.zip")
        dest_direct = dst.objects["b/x.zip"]
        await dest_core.put(write(tmp_path / "new", files[new]), "b/x.zip")
        dst.objects["b/x.zip"] = dest_direct
        plan, report = await migrate_all(src, dst, cores, "b")
        assert [f.rel_key for f in plan.present] == ["x.zip"]  # the delta shown is the same
        dst.objects.pop("b/x.zip.delta")  # now the destination shows the old direct form
        plan, report = await migrate_all(src, dst, cores, "b")
        assert not report.failed
        assert [f.rel_key for f in plan.replacing] == ["x.zip"]
        assert await read_back(dest_core, "b/x.zip", tmp_path) == files[new]


class HeadCountingStore(MemoryStore):
    """Records the keys HEADed."""

    def __init__(self, bucket: str) -> None:
        super().__init__(bucket)
        self.heads: list[str] = []

    async def head(self, key: str) -> ObjectHead:
        self.heads.append(key)
        return await super().head(key)


async def test_migrate_replaces_a_same_size_file_whose_recorded_sha256_differs(
    tmp_path: Path,
) -> None:
    """Both sides are dgfs direct objects recording ``dg-file-sha256``; their
    contents differ (a version string bumped, same length). Taken as already
    copied before: the destination kept the old content and the run said
    nothing. Only same-size direct objects are HEADed (one each side)."""
    src, dst = HeadCountingStore("src"), HeadCountingStore("dst")
    old, new = b'{"version": "1.2.3"}\n', b'{"version": "1.2.4"}\n'
    async with two_cores(tmp_path, src, dst) as cores:
        source_core, dest_core = cores
        await dest_core.put(write(tmp_path / "v", old), "app/version.json")
        await dest_core.put(write(tmp_path / "v", b"other size"), "app/other.json")
        await source_core.put(write(tmp_path / "v", new), "app/version.json")
        await source_core.put(write(tmp_path / "v", b"longer than that"), "app/other.json")
        await source_core.put(write(tmp_path / "v", b"same"), "app/same.json")
        await dest_core.put(write(tmp_path / "v", b"same"), "app/same.json")
        src.heads.clear()
        dst.heads.clear()
        location = S3Location("src", "app"), S3Location("dst", "app")
        plan = await plan_migration(src, dst, *location, preserve_prefix=False)
        assert [f.rel_key for f in plan.present] == ["same.json"]
        assert sorted(f.rel_key for f in plan.replacing) == ["other.json", "version.json"]
        assert sorted(src.heads) == sorted(dst.heads) == ["app/same.json", "app/version.json"]
        report = await run_migration(source_core, dest_core, plan)
        assert not report.failed
        assert await read_back(dest_core, "app/version.json", tmp_path) == new


@pytest.mark.expected_log(r"holds the delta of")
async def test_migrate_never_copies_a_foreign_dot_delta_over_its_namesakes_delta(
    tmp_path: Path,
) -> None:
    """The destination holds ``b/<zip2>`` as the delta ``b/<zip2>.delta``; the
    source holds only a plain file ``app/<zip2>.delta``. Copying that file
    over the delta destroyed the destination's ``<zip2>`` (migrate never
    deletes destination files): it is refused now, with a message saying
    what to copy first, and the destination's file still reads."""
    clock = Clock()
    src, dst = MemoryStore("src", clock=clock), MemoryStore("dst", clock=clock)
    files = zips("app", 2)
    first, second = sorted(files)
    shown = second.replace("app/", "b/")
    async with two_cores(tmp_path, src, dst) as cores:
        source_core, dest_core = cores
        for key, data in files.items():
            await dest_core.put(write(tmp_path / "in", data), key.replace("app/", "b/"))
        assert dst.objects[shown + ".delta"].metadata.get("dg-ref-key")
        clock.tick()
        await src.put_bytes(second + ".delta", b"not a delta\n", {})
        plan = await plan_migration(
            src, dst, S3Location("src", "app"), S3Location("dst", "b"), preserve_prefix=False
        )
        report = await run_migration(source_core, dest_core, plan)
        ((failed, why),) = report.failed
        assert failed.endswith(".zip.delta") and "holds the delta of" in why
        # the destination's own file still reads back
        assert await read_back(dest_core, shown, tmp_path) == files[second]


@pytest.mark.expected_log(r"holds the delta of")
async def test_migrate_include_filters_never_let_a_foreign_dot_delta_over_a_delta(
    tmp_path: Path,
) -> None:
    """A first run ``--include '*.zip'`` stores ``x.zip`` as a delta; a second
    ``--include '*.delta'`` copied the source's plain ``x.zip.delta`` over it,
    and the destination's ``x.zip`` was gone. It is refused now."""
    clock = Clock()
    src, dst = MemoryStore("src", clock=clock), MemoryStore("dst", clock=clock)
    files = zips("app", 2)
    first, second = sorted(files)
    async with two_cores(tmp_path, src, dst) as cores:
        source_core, dest_core = cores
        for key, data in files.items():
            await src.put_bytes(key, data, {})
        await src.put_bytes(second + ".delta", b"not a delta\n", {})
        loc = S3Location("src", "app"), S3Location("dst", "b")
        for include in (["*.zip"], ["*.delta"]):
            plan = await plan_migration(src, dst, *loc, include=include, preserve_prefix=False)
            report = await run_migration(source_core, dest_core, plan)
            assert [why for _, why in report.failed if "holds the delta of" not in why] == []
        shown = second.replace("app/", "b/")
        assert await read_back(dest_core, shown, tmp_path) == files[second]
