"""Buckets written by dgfs read in the real DeltaGlider CLI, and the other way round."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgfs.core import Core
from dgfs.format import Kind
from dgfs.store.s3 import S3Store
from testsupport.dgcli import run_deltaglider
from testsupport.releases import ReleaseSeries

pytestmark = pytest.mark.interop


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    out = tmp_path / "dist"
    out.mkdir()
    paths = []
    for name, data in ReleaseSeries(size=384 << 10, seed=3).zips(5):
        (out / name).write_bytes(data)
        paths.append(out / name)
    notes = out / "NOTES.txt"
    notes.write_bytes(b"release notes, plain text\n" * 300)
    return [*paths, notes]


async def test_dgfs_writes_deltaglider_reads(
    moto_core: Core, moto_endpoint: str, bucket_name: str, series: list[Path], tmp_path: Path
) -> None:
    kinds = {}
    for path in series:
        kinds[path.name] = (await moto_core.put(path, f"app/{path.name}")).stored.kind
    assert kinds["NOTES.txt"] is Kind.DIRECT
    assert sum(k is Kind.DELTA for k in kinds.values()) == 5
    for path in series:
        out = tmp_path / f"dg-{path.name}"
        run_deltaglider(moto_endpoint, "cp", f"s3://{bucket_name}/app/{path.name}", str(out))
        assert out.read_bytes() == path.read_bytes(), path.name


async def test_deltaglider_writes_dgfs_reads(
    moto_core: Core, moto_endpoint: str, bucket_name: str, series: list[Path], tmp_path: Path
) -> None:
    for path in series:
        # 6.2.0 drops a trailing-slash prefix: give the full key.
        run_deltaglider(moto_endpoint, "cp", str(path), f"s3://{bucket_name}/app/{path.name}")
    store = moto_core.store
    assert isinstance(store, S3Store)
    listing = await store.list("app/")
    names = sorted(o.key for o in listing.objects)
    assert "app/reference.bin" in names
    assert sum(n.endswith(".delta") for n in names) == 5
    for path in series:
        out = tmp_path / f"dgfs-{path.name}"
        stored = await moto_core.get(f"app/{path.name}", out)
        assert out.read_bytes() == path.read_bytes(), path.name
        assert stored.original_size == path.stat().st_size


#: What dgfs adds to DeltaGlider's keys so that deltaglider_proxy reads its objects
#: (``content-type``: the type it serves, on deltas and direct objects).
PROXY_KEYS = {
    "dg-ref-path",
    "dg-note",
    "dg-md5",
    "dg-original-name",
    "dg-file-size",
    "content-type",
}


async def test_metadata_keys_match_what_deltaglider_writes(
    moto_core: Core, moto_endpoint: str, bucket_name: str, series: list[Path]
) -> None:
    zips, notes = series[:2], series[-1]
    for path in (*zips, notes):
        run_deltaglider(moto_endpoint, "cp", str(path), f"s3://{bucket_name}/dg/{path.name}")
        await moto_core.put(path, f"ours/{path.name}")
    for suffix in ("reference.bin", f"{zips[0].name}.delta", f"{zips[1].name}.delta", notes.name):
        theirs = (await moto_core.store.head(f"dg/{suffix}")).metadata
        ours = (await moto_core.store.head(f"ours/{suffix}")).metadata
        # Every key DeltaGlider writes, and only deltaglider_proxy's besides
        # (tests/test_format_proxy.py checks those with the proxy's rules).
        assert set(theirs) <= set(ours), suffix
        assert set(ours) - set(theirs) <= PROXY_KEYS, suffix
        for key, value in theirs.items():
            # Tool, time and pointer differ by nature; the delta bytes differ
            # because dgfs encodes with -D -R -A (no recompression, no app header).
            if key in ("dg-tool", "dg-created-at", "dg-ref-key", "dg-delta-size"):
                continue
            assert ours[key] == value, (suffix, key)
        assert ours.get("dg-ref-key", "").replace("ours/", "dg/") == theirs.get("dg-ref-key", "")


async def test_mixed_writers_share_one_deltaspace(
    moto_core: Core, moto_endpoint: str, bucket_name: str, series: list[Path], tmp_path: Path
) -> None:
    first, second, third, fourth = series[:4]
    run_deltaglider(moto_endpoint, "cp", str(first), f"s3://{bucket_name}/mix/{first.name}")
    await moto_core.put(second, f"mix/{second.name}")
    run_deltaglider(moto_endpoint, "cp", str(third), f"s3://{bucket_name}/mix/{third.name}")
    await moto_core.put(fourth, f"mix/{fourth.name}")
    refs = [o.key for o in (await moto_core.store.list("mix/")).objects if o.key.endswith(".bin")]
    assert refs == ["mix/reference.bin"]
    for path in (first, second, third, fourth):
        via_dg = tmp_path / f"dg-{path.name}"
        run_deltaglider(moto_endpoint, "cp", f"s3://{bucket_name}/mix/{path.name}", str(via_dg))
        assert via_dg.read_bytes() == path.read_bytes()
        via_dgfs = tmp_path / f"dgfs-{path.name}"
        await moto_core.get(f"mix/{path.name}", via_dgfs)
        assert via_dgfs.read_bytes() == path.read_bytes()


async def test_renamed_delta_stays_readable_by_deltaglider(
    moto_core: Core, moto_endpoint: str, bucket_name: str, series: list[Path], tmp_path: Path
) -> None:
    for path in series[:3]:
        await moto_core.put(path, f"r/{path.name}")
    await moto_core.rename(f"r/{series[1].name}", "r/renamed.zip")
    await moto_core.rename(f"r/{series[2].name}", "elsewhere/moved.zip")
    await moto_core.rename_prefix("r", "r2")
    for key, path in (("r2/renamed.zip", series[1]), ("elsewhere/moved.zip", series[2])):
        out = tmp_path / "out"
        run_deltaglider(moto_endpoint, "cp", f"s3://{bucket_name}/{key}", str(out))
        assert out.read_bytes() == path.read_bytes(), key
