"""dgfs verify: tampered deltas, references and direct objects are caught."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from dgfs import format as fmt
from dgfs.cli.main import main as dgfs_main
from dgfs.core import Core
from dgfs.format import Kind
from dgfs.runtime import S3Location, Settings, open_core
from dgfs.shard import Shard
from dgfs.verify import Status, mount_location, verify_all, verify_key
from testsupport.releases import ReleaseSeries, directories_per_shard
from testsupport.servers import REGION, s3_client

pytestmark = pytest.mark.expected_log(
    "SHA-256|cannot be decoded|xdelta3 decode failed|does not match"
)

COUNT = 4


@pytest.fixture
async def core(moto_endpoint: str, bucket_name: str, tmp_path: Path) -> AsyncIterator[Core]:
    settings = Settings(endpoint_url=moto_endpoint, region=REGION, cache_dir=tmp_path / "cache")
    async with open_core(S3Location(bucket_name), settings) as core:
        yield core


@pytest.fixture
async def filled(core: Core, tmp_path: Path) -> list[str]:
    """COUNT releases as deltas in app/, a direct text file, a foreign object."""
    keys = []
    for name, data in ReleaseSeries(size=256 << 10, seed=3).zips(COUNT):
        path = tmp_path / name
        path.write_bytes(data)
        result = await core.put(path, f"app/{name}")
        assert result.stored.kind is Kind.DELTA
        keys.append(f"app/{name}")
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"release notes\n" * 100)
    assert (await core.put(notes, "app/notes.txt")).stored.kind is Kind.DIRECT
    await core.store.put_bytes("app/foreign.bin", b"someone else's", {})
    await core.store.put_bytes("app/empty/", b"", {})  # a directory marker: not verified
    return keys


def tamper(endpoint: str, bucket: str, key: str) -> None:
    """Flip bytes in the middle of an object, keeping its metadata."""
    client = s3_client(endpoint)
    head = client.head_object(Bucket=bucket, Key=key)
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    middle = len(body) // 2
    body[middle : middle + 8] = bytes(b ^ 0xFF for b in body[middle : middle + 8])
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body), Metadata=head["Metadata"])
    client.close()


async def test_intact_bucket_verifies(core: Core, filled: list[str]) -> None:
    report = await verify_all(core)
    assert report.ok
    assert report.count(Status.OK) == COUNT + 2  # deltas, direct, reference
    assert [r.stored_key for r in report.results if r.status is Status.SKIPPED] == [
        "app/foreign.bin"
    ]
    single = await verify_key(core, filled[1])
    assert single.status is Status.OK and single.kind is Kind.DELTA
    assert single.actual_sha256 == single.expected_sha256


async def test_tampered_delta_fails(
    core: Core, filled: list[str], moto_endpoint: str, bucket_name: str
) -> None:
    tamper(moto_endpoint, bucket_name, fmt.delta_key(filled[2]))
    result = await verify_key(core, filled[2])
    assert result.status is Status.FAILED
    report = await verify_all(core)
    assert [r.visible_key for r in report.failures] == [filled[2]]
    assert report.count(Status.OK) == COUNT + 1


async def test_tampered_reference_fails_even_when_cached(
    core: Core, filled: list[str], moto_endpoint: str, bucket_name: str
) -> None:
    # The core that wrote the files holds the reference in its cache already.
    await core.materialize(await core.locate(filled[1]))
    tamper(moto_endpoint, bucket_name, "app/reference.bin")
    report = await verify_all(core)
    failed = {r.stored_key: r.message for r in report.failures}
    assert set(failed) == {"app/reference.bin", *(fmt.delta_key(k) for k in filled)}
    assert "replaced or corrupted" in failed[fmt.delta_key(filled[1])]
    assert (await verify_key(core, filled[3])).status is Status.FAILED


async def test_tampered_direct_object_fails(
    core: Core, filled: list[str], moto_endpoint: str, bucket_name: str
) -> None:
    tamper(moto_endpoint, bucket_name, "app/notes.txt")
    result = await verify_key(core, "app/notes.txt")
    assert result.status is Status.FAILED and "SHA-256" in result.message


async def test_missing_reference_fails(core: Core, filled: list[str]) -> None:
    await core.store.delete("app/reference.bin")
    result = await verify_key(core, filled[0])
    assert result.status is Status.FAILED and "missing" in result.message


def run_cli(*args: str) -> int:
    return dgfs_main(list(args))


@pytest.fixture
def cli_bucket(moto_endpoint: str, bucket_name: str, tmp_path: Path) -> list[str]:
    """Three releases in app/, written by the core (a sync fixture: the CLI runs trio itself)."""

    async def fill() -> list[str]:
        settings = Settings(
            endpoint_url=moto_endpoint, region=REGION, cache_dir=tmp_path / "fill-cache"
        )
        async with open_core(S3Location(bucket_name), settings) as core:
            keys = []
            for name, data in ReleaseSeries(size=256 << 10, seed=5).zips(3):
                path = tmp_path / name
                path.write_bytes(data)
                await core.put(path, f"app/{name}")
                keys.append(f"app/{name}")
            return keys

    return trio.run(fill)


def test_cli_exit_codes(
    cli_bucket: list[str],
    moto_endpoint: str,
    bucket_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = ["--endpoint-url", moto_endpoint, "--cache-dir", str(tmp_path / "c")]
    assert run_cli("verify", "--all", f"s3://{bucket_name}", *common) == 0
    assert "failed:  0" in capsys.readouterr().out
    assert run_cli("verify", f"s3://{bucket_name}/{cli_bucket[0]}", *common) == 0
    assert capsys.readouterr().out.startswith("OK")
    tamper(moto_endpoint, bucket_name, fmt.delta_key(cli_bucket[1]))
    assert run_cli("verify", "--all", f"s3://{bucket_name}/app", *common) == 1
    out = capsys.readouterr().out
    assert "failed:  1" in out and cli_bucket[1] in out
    assert run_cli("verify", f"s3://{bucket_name}/{cli_bucket[1]}", *common) == 1
    assert run_cli("verify", f"s3://{bucket_name}/app/nope.zip", *common) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_verifies_a_path_inside_a_mount_by_its_xattrs(
    cli_bucket: list[str],
    moto_endpoint: str,
    bucket_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A stand-in for a file in a mount: the mount answers these xattrs.
    path = tmp_path / "in-mount.zip"
    path.write_bytes(b"")
    try:
        os.setxattr(path, "user.dgfs.bucket", bucket_name.encode())
        os.setxattr(path, "user.dgfs.key", cli_bucket[2].encode())
    except OSError as exc:
        pytest.skip(f"user xattrs not supported here: {exc}")
    located = mount_location(path)
    assert (located.bucket, located.key) == (bucket_name, cli_bucket[2])
    common = ["--endpoint-url", moto_endpoint, "--cache-dir", str(tmp_path / "c")]
    assert run_cli("verify", str(path), *common) == 0
    assert f"s3://{bucket_name}/{cli_bucket[2]}" in capsys.readouterr().out
    plain = tmp_path / "elsewhere.zip"
    plain.write_bytes(b"x")
    assert run_cli("verify", str(plain), *common) == 2
    assert "not inside a dgfs mount" in capsys.readouterr().err


async def test_non_ascii_directory_and_names_verify(core: Core, tmp_path: Path) -> None:
    for name, data in ReleaseSeries(size=256 << 10, seed=8).zips(2):
        path = tmp_path / name
        path.write_bytes(data)
        await core.put(path, f"relé/日本語-{name}")
    report = await verify_all(core, "relé")
    assert report.ok and report.count(Status.OK) == 3


async def fill_spaces(core: Core, tmp_path: Path, spaces: list[str]) -> None:
    """Two releases (a reference and a delta) in each directory, a direct file at the root."""
    for number, space in enumerate(spaces):
        for name, data in ReleaseSeries(size=256 << 10, seed=number).zips(2):
            path = tmp_path / name
            path.write_bytes(data)
            assert (await core.put(path, f"{space}/{name}")).stored.kind is Kind.DELTA
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"release notes\n" * 100)
    assert (await core.put(notes, "notes.txt")).stored.kind is Kind.DIRECT


async def test_shards_verify_every_object_once_each_directory_in_one(
    core: Core, moto_endpoint: str, bucket_name: str, tmp_path: Path
) -> None:
    spaces = directories_per_shard(3, 2)
    await fill_spaces(core, tmp_path, spaces)
    broken = fmt.delta_key(next(k for k in await keys_of(core) if k.startswith(spaces[3])))
    tamper(moto_endpoint, bucket_name, broken)
    whole = await verify_all(core)
    checked_by: dict[str, list[int]] = {}
    for shard in (Shard(k, 3) for k in (1, 2, 3)):
        report = await verify_all(core, shard=shard, concurrency=4)
        assert report.shard == shard and report.to_json()["shard"] == str(shard)
        assert report.results and all(shard.owns(r.stored_key) for r in report.results)
        for result in report.results:
            checked_by.setdefault(result.stored_key, []).append(shard.index)
        # A failure is reported by the worker that has its directory, and by that one only.
        expected = [broken] if shard.owns(broken) else []
        assert [r.stored_key for r in report.failures] == expected
    assert sorted(checked_by) == [r.stored_key for r in whole.results]
    assert all(len(by) == 1 for by in checked_by.values())  # every object exactly once
    for space in spaces:  # a directory, its reference included, in one shard
        owners = {by[0] for key, by in checked_by.items() if fmt.split_key(key)[0] == space}
        assert len(owners) == 1
        assert f"{space}/reference.bin" in checked_by


async def keys_of(core: Core) -> list[str]:
    """The visible keys of the deltas under the bucket."""
    listing = await core.store.list("", delimiter=None)
    return sorted(
        fmt.visible_key(o.key) or o.key for o in listing.objects if o.key.endswith(".delta")
    )


def test_cli_verify_all_by_shard(
    moto_endpoint: str, bucket_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spaces = directories_per_shard(2, 1)

    async def fill() -> None:
        settings = Settings(endpoint_url=moto_endpoint, region=REGION, cache_dir=tmp_path / "w")
        async with open_core(S3Location(bucket_name), settings) as core:
            await fill_spaces(core, tmp_path, spaces)

    trio.run(fill)
    common = ["--endpoint-url", moto_endpoint, "--cache-dir", str(tmp_path / "c")]
    objects = 0
    for k in (1, 2):
        code = run_cli(
            "verify", "--all", "--shard", f"{k}/2", "--json", f"s3://{bucket_name}", *common
        )
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and report["shard"] == f"{k}/2" and report["failed"] == 0
        objects += len(report["results"])
    assert objects == 2 * 3 + 1  # each directory: its reference and two deltas; the root file
    assert run_cli("verify", "--all", "--shard", "2/2", f"s3://{bucket_name}", *common) == 0
    assert f"Verified s3://{bucket_name} (shard 2/2):" in capsys.readouterr().out
    # --shard splits a --all run; on one file it is a usage error.
    assert run_cli("verify", "--shard", "1/2", f"s3://{bucket_name}/notes.txt", *common) == 2
    assert "--all" in capsys.readouterr().err
