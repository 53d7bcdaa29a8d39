"""dgfs verify: tampered deltas, references and direct objects are caught."""

from __future__ import annotations

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
from dgfs.verify import Status, mount_location, verify_all, verify_key
from tests.releases import ReleaseSeries
from tests.servers import REGION, s3_client

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
        assert result.kind is Kind.DELTA
        keys.append(f"app/{name}")
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"release notes\n" * 100)
    assert (await core.put(notes, "app/notes.txt")).kind is Kind.DIRECT
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
