"""Real mounts with ``-o deltas=deep``: archives stored by their expanded content.

- A series of Python-made ``.tar.gz`` files and zips with nested ``.gz``
  members copied in with ``cp`` reads back byte for byte, through the same
  mount, a fresh mount, and a mount in the default (DeltaGlider) mode.
- The bucket holds ``reference.deep`` and deep deltas far smaller than a
  DeltaGlider-mode directory of the same files.
- The stock DeltaGlider CLI refuses a deep file loudly and writes nothing.
- Deltas the stock DeltaGlider CLI made from gzip input (which it cannot
  read back itself) read back exactly through the mount.
- A directory keeps its mode: a DeltaGlider-mode mount writing into a deep
  directory adds deep deltas, and a deep mount writing into a DeltaGlider
  directory adds DeltaGlider deltas.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.mountutil import Mounts, S3View, daemon_env, dgfs_bin, sha256_file
from testsupport.dgcli import run_deltaglider

pytestmark = [pytest.mark.mount]


def _module(i: int, version: int) -> bytes:
    body = random.Random(i).randbytes(6000).hex().encode()
    if i % 7 == version % 7:
        body += f"\n# changed in {version}\n".encode()
    return body


def sdist(directory: Path, version: int) -> Path:
    """Like setuptools' sdist: a tar gzipped by Python's gzip at level 9."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(60):
            data = _module(i, version)
            info = tarfile.TarInfo(f"pkg-1.{version}/pkg/mod{i}.py")
            info.size, info.mtime = len(data), 1_700_000_000 + version
            tar.addfile(info, io.BytesIO(data))
    path = directory / f"pkg-1.{version}.tar.gz"
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=1_700_000_100 + version) as gz:
        gz.write(buf.getvalue())
    return path


def wheel(directory: Path, version: int) -> Path:
    """Like a botocore wheel: zip members, some of them gzip files themselves."""
    path = directory / f"pkg-1.{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(30):
            zf.writestr(f"pkg/mod{i}.py", _module(i, version))
            zf.writestr(f"pkg/data/{i}.json.gz", gzip.compress(_module(100 + i, version), mtime=0))
        zf.writestr("pkg-1.dist-info/METADATA", f"Version: 1.{version}\n")
    return path


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("deep-series")
    return [sdist(directory, v) for v in range(1, 5)] + [wheel(directory, v) for v in range(1, 5)]


def _stored_bytes(view: S3View, prefix: str) -> int:
    return sum(view.keys(prefix).values())


def test_deep_mount_stores_expanded_deltas_and_reads_back(
    mounts: Mounts, series: list[Path], tmp_path: Path
) -> None:
    bucket = mounts.new_bucket()
    mount = mounts.mount(bucket, deltas="deep")
    view = S3View(mounts.endpoint, bucket)
    try:
        for subdir, mode_mount in (("deep", mount), ("plain", None)):
            target = mount if mode_mount else mounts.mount(bucket)
            for kind in ("sdist", "wheel"):
                (target / subdir / kind).mkdir(parents=True)
            for path in series:
                kind = "wheel" if path.suffix == ".whl" else "sdist"
                subprocess.run(["cp", str(path), str(target / subdir / kind)], check=True)
            target.settle(
                *(
                    target / subdir / k / p.name
                    for k in ("sdist", "wheel")
                    for p in series
                    if (target / subdir / k / p.name).exists()
                )
            )
            if target is not mount:
                target.unmount()
        keys = view.keys()
        assert "deep/sdist/reference.deep" in keys and "deep/wheel/reference.deep" in keys
        assert "plain/wheel/reference.bin" in keys and "plain/sdist/reference.deep" not in keys
        meta = view.metadata("deep/sdist/pkg-1.3.tar.gz.delta")
        assert meta["dgfs-format"] == "deep-1"
        assert os.getxattr(mount / "deep/sdist/pkg-1.3.tar.gz", "user.dgfs.kind") == b"deep-delta"
        # Far smaller than the same files in a DeltaGlider-mode directory.
        for kind in ("sdist", "wheel"):
            deep_size = _stored_bytes(view, f"deep/{kind}/")
            plain_size = _stored_bytes(view, f"plain/{kind}/")
            assert deep_size < 0.6 * plain_size, (kind, deep_size, plain_size)
        names = sorted(p.name for p in series if p.suffix != ".whl")
        assert sorted(os.listdir(mount / "deep/sdist")) == names
        for path in series:
            kind = "wheel" if path.suffix == ".whl" else "sdist"
            assert (mount / "deep" / kind / path.name).stat().st_size == path.stat().st_size
            assert sha256_file(mount / "deep" / kind / path.name) == sha256_file(path)
        # A fresh mount in the default mode (another machine) reads the deep files too.
        # First a listing (attributes come from the listing's cache), then reads;
        # then again after a remount on the same cache (attributes from disk).
        other = mounts.mount(bucket, ro=None)
        cache_dir = other.cache_dir
        for _ in range(2):
            for kind in ("sdist", "wheel"):
                for entry in os.scandir(other / "deep" / kind):
                    entry.stat()
            for path in series:
                kind = "wheel" if path.suffix == ".whl" else "sdist"
                assert sha256_file(other / "deep" / kind / path.name) == sha256_file(path)
            other.unmount()
            other = mounts.mount(bucket, ro=None, cache_dir=cache_dir)
        other.unmount()
    finally:
        view.close()
        mount.unmount()


@pytest.mark.interop
def test_stock_deltaglider_refuses_deep_files_loudly(
    mounts: Mounts, series: list[Path], tmp_path: Path
) -> None:
    bucket = mounts.new_bucket()
    mount = mounts.mount(bucket, deltas="deep")
    try:
        (mount / "app").mkdir()
        for path in series[:2]:
            shutil.copy(path, mount / "app")
        mount.settle(*(mount / "app" / p.name for p in series[:2]))
    finally:
        mount.unmount()
    for path in series[:2]:
        out = tmp_path / f"dg-{path.name}"
        result = run_deltaglider(
            mounts.endpoint, "cp", f"s3://{bucket}/app/{path.name}", str(out), check=False
        )
        assert result.returncode != 0, result.stdout
        assert not out.exists() or sha256_file(out) == sha256_file(path)
    out = tmp_path / "dg-reference"
    result = run_deltaglider(
        mounts.endpoint, "cp", f"s3://{bucket}/app/reference.deep", str(out), check=False
    )
    assert result.returncode != 0 and not out.exists()
    listing = run_deltaglider(mounts.endpoint, "ls", f"s3://{bucket}/app/").stdout
    assert all(path.name in listing for path in series[:2]), listing


def test_directories_keep_their_mode(mounts: Mounts, series: list[Path]) -> None:
    bucket = mounts.new_bucket()
    view = S3View(mounts.endpoint, bucket)
    deep = mounts.mount(bucket, deltas="deep")
    try:
        (deep / "d").mkdir()
        shutil.copy(series[4], deep / "d")
        deep.settle(deep / "d" / series[4].name)
        deep.unmount()
        plain = mounts.mount(bucket)
        (plain / "g").mkdir()
        shutil.copy(series[4], plain / "g")
        shutil.copy(series[5], plain / "d")
        plain.settle(plain / "g" / series[4].name, plain / "d" / series[5].name)
        plain.unmount()
        deep = mounts.mount(bucket, deltas="deep")
        shutil.copy(series[5], deep / "g")
        deep.settle(deep / "g" / series[5].name)
        assert view.metadata(f"d/{series[5].name}.delta").get("dgfs-format") == "deep-1"
        assert "dgfs-format" not in view.metadata(f"g/{series[5].name}.delta")
        assert view.metadata(f"g/{series[5].name}.delta")["dg-ref-key"] == "g/reference.bin"
        for name in ("d", "g"):
            for path in series[4:6]:
                assert sha256_file(deep / name / path.name) == sha256_file(path)
    finally:
        view.close()
        deep.unmount()


@pytest.mark.interop
def test_stock_deltaglider_gzip_deltas_read_back_exactly(
    mounts: Mounts, series: list[Path], tmp_path: Path
) -> None:
    """The stock CLI (no XDELTA fix) stores .tar.gz files it cannot give back
    itself; the mount reads every one of them byte for byte, and verify says so."""
    bucket = mounts.new_bucket()
    sdists = [p for p in series if p.name.endswith(".tar.gz")][:3]
    for path in sdists:
        run_deltaglider(
            mounts.endpoint, "cp", str(path), f"s3://{bucket}/pkg/{path.name}", stock=True
        )
    view = S3View(mounts.endpoint, bucket)
    try:
        stored = view.keys()
        assert "pkg/reference.bin" in stored and f"pkg/{sdists[1].name}.delta" in stored
    finally:
        view.close()
    failed = run_deltaglider(
        mounts.endpoint,
        "cp",
        f"s3://{bucket}/pkg/{sdists[1].name}",
        str(tmp_path / "x"),
        check=False,
        stock=True,
    )
    assert failed.returncode != 0  # the known DeltaGlider 6.2.0 bug
    mount = mounts.mount(bucket, ro=None)
    try:
        for path in sdists:
            assert sha256_file(mount / "pkg" / path.name) == sha256_file(path), path.name
        env = {k: v for k, v in daemon_env().items() if k != "AWS_ENDPOINT_URL"}
        result = subprocess.run(
            [dgfs_bin(), "verify", str(mount / "pkg" / sdists[1].name)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "unreadable by DeltaGlider, recovered by dgfs" in result.stdout
    finally:
        mount.unmount()
