"""Real mounts and the real DeltaGlider CLI: each reads what the other wrote.

- A bucket written only by ``deltaglider cp`` (several versions in one
  prefix, a text file stored direct, a foreign object) mounts, lists the
  original names and sizes, and reads back byte for byte.
- The mount adds files to a deltaspace DeltaGlider created (using its
  reference), and DeltaGlider reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.mountutil import (
    Mounts,
    S3View,
    dg_download,
    dg_upload,
    sha256_bytes,
    sha256_file,
)
from testsupport.releases import ReleaseSeries

pytestmark = [pytest.mark.mount, pytest.mark.interop]


@pytest.fixture(scope="module")
def dg_bucket(
    mounts: Mounts, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, Path]]:
    """A bucket filled by the DeltaGlider CLI only: key -> local original."""
    bucket = mounts.new_bucket()
    local = tmp_path_factory.mktemp("dg-src")
    files: dict[str, Path] = {}
    series = ReleaseSeries(size=512 << 10, seed=31)
    for _ in range(4):
        name, data = series.next_zip()
        (local / name).write_bytes(data)
        files[f"releases/app/{name}"] = local / name
    name, data = series.next_tar()
    (local / name).write_bytes(data)
    files[f"releases/app/{name}"] = local / name
    (local / "CHANGES.txt").write_text("1.0: first\n1.1: second\n")
    files["releases/app/CHANGES.txt"] = local / "CHANGES.txt"
    for key, path in files.items():
        dg_upload(mounts.endpoint, path, bucket, key)
    # A foreign object (no DeltaGlider metadata) beside them.
    view = S3View(mounts.endpoint, bucket)
    try:
        view.put("releases/README", b"written by someone else\n")
    finally:
        view.close()
    (local / "README").write_bytes(b"written by someone else\n")
    files["releases/README"] = local / "README"
    return bucket, files


def test_layout_written_by_deltaglider(
    mounts: Mounts, dg_bucket: tuple[str, dict[str, Path]]
) -> None:
    bucket, files = dg_bucket
    view = S3View(mounts.endpoint, bucket)
    try:
        keys = view.keys()
    finally:
        view.close()
    # The premise of the next test: DeltaGlider really stored deltas and a reference.
    assert "releases/app/reference.bin" in keys
    assert sum(k.endswith(".zip.delta") for k in keys) == 4
    assert "releases/app/CHANGES.txt" in keys


def test_bucket_written_by_deltaglider_mounts_and_reads(
    mounts: Mounts, dg_bucket: tuple[str, dict[str, Path]]
) -> None:
    bucket, files = dg_bucket
    mount = mounts.mount(bucket, ro=None)
    try:
        assert sorted(os.listdir(mount / "releases")) == ["README", "app"]
        app_names = sorted(k.rsplit("/", 1)[1] for k in files if k.startswith("releases/app/"))
        assert sorted(os.listdir(mount / "releases" / "app")) == app_names
        for key, src in files.items():
            assert (mount / key).stat().st_size == src.stat().st_size, key
            assert sha256_file(mount / key) == sha256_file(src), key
        kind = os.getxattr(mount / next(k for k in files if k.endswith(".zip")), "user.dgfs.kind")
        assert kind == b"delta"
        # With a prefix as the mount root.
        sub = mounts.mount(bucket, source=f"{bucket}/releases/app", ro=None)
        assert sorted(os.listdir(sub.mountpoint)) == app_names
        for key, src in files.items():
            if key.startswith("releases/app/"):
                assert sha256_file(sub / key.rsplit("/", 1)[1]) == sha256_file(src), key
    finally:
        mount.unmount()


def test_mount_extends_a_deltaspace_deltaglider_made(mounts: Mounts, tmp_path: Path) -> None:
    bucket = mounts.new_bucket()
    series = ReleaseSeries(size=512 << 10, seed=33)
    originals: dict[str, bytes] = {}
    for _ in range(2):
        name, data = series.next_zip()
        (tmp_path / name).write_bytes(data)
        dg_upload(mounts.endpoint, tmp_path / name, bucket, f"app/{name}")
        originals[name] = data
    view = S3View(mounts.endpoint, bucket)
    try:
        ref_before = view.metadata("app/reference.bin")
        mount = mounts.mount(bucket)
        name, data = series.next_zip()
        target = mount / "app" / name
        target.write_bytes(data)
        mount.settle(target)
        # Stored against DeltaGlider's reference, which is untouched.
        meta = view.metadata(f"app/{name}.delta")
        assert meta["dg-ref-key"] == "app/reference.bin"
        assert meta["dg-ref-sha256"] == ref_before["dg-file-sha256"]
        assert view.metadata("app/reference.bin") == ref_before
        out = dg_download(mounts.endpoint, bucket, f"app/{name}", tmp_path / f"out-{name}")
        assert sha256_file(out) == sha256_bytes(data)

        # A DeltaGlider file renamed and edited in the mount still reads with DeltaGlider.
        first = sorted(originals)[0]
        moved = mount / "moved.zip"
        os.rename(mount / "app" / first, moved)
        with open(moved, "ab") as handle:
            handle.write(b"trailer")
        mount.settle(moved)
        out = dg_download(mounts.endpoint, bucket, "moved.zip", tmp_path / "moved.zip")
        assert sha256_file(out) == sha256_bytes(originals[first] + b"trailer")
        assert not view.exists(f"app/{first}.delta")
    finally:
        view.close()


def test_deltaglider_adds_to_a_directory_the_mount_made(mounts: Mounts, tmp_path: Path) -> None:
    mount = mounts.mount()
    series = ReleaseSeries(size=512 << 10, seed=41)
    (mount / "pkg").mkdir()
    written = {}
    for _ in range(2):
        name, data = series.next_zip()
        (mount / "pkg" / name).write_bytes(data)
        written[name] = data
    mount.settle(*(mount / "pkg" / n for n in written))
    view = S3View(mounts.endpoint, mount.bucket)
    ref = view.metadata("pkg/reference.bin")
    name, data = series.next_zip()
    (tmp_path / name).write_bytes(data)
    dg_upload(mounts.endpoint, tmp_path / name, mount.bucket, f"pkg/{name}")
    written[name] = data
    meta = view.metadata(f"pkg/{name}.delta")
    view.close()
    assert meta["dg-ref-sha256"] == ref["dg-file-sha256"], "DeltaGlider used our reference"
    mount.remount()
    assert sorted(os.listdir(mount / "pkg")) == sorted(written)
    for fname, fdata in written.items():
        assert sha256_file(mount / "pkg" / fname) == sha256_bytes(fdata), fname
