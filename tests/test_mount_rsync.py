"""Real mounts: rsync and cp -a, the way build servers publish releases.

rsync writes each file to a temporary ``.name.XXXXXX`` and renames it; the
stored objects must still end up under the final names, as deltas, with
the source's mtimes and modes, so that a second rsync has nothing to do.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.mountutil import DgfsMount, S3View, sha256_file, tree_digest
from testsupport.releases import write_series

pytestmark = pytest.mark.mount

needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A source tree: releases at the top and in a subdirectory, odd modes, old mtimes."""
    root = tmp_path / "dist"
    files = write_series(root, 6, size=512 << 10, seed=3)
    write_series(root / "nested", 3, size=512 << 10, seed=4)
    (root / "README.txt").write_text("release notes\n")
    (root / "empty.dat").write_bytes(b"")
    os.chmod(files[0], 0o600)
    os.chmod(root / "README.txt", 0o755)
    # Sub-second mtimes, in the past, different for every file.
    for index, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file())):
        ns = 1_600_000_000_123_456_789 + index * 1_000_000_007
        os.utime(path, ns=(ns, ns))
    return root


def _rsync(src: Path, dest: Path, *extra: str) -> str:
    result = subprocess.run(
        ["rsync", "-a", "--stats", *extra, f"{src}/", f"{dest}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _transferred(stats: str) -> int:
    match = re.search(r"Number of regular files transferred: ([\d,]+)", stats)
    assert match, stats
    return int(match.group(1).replace(",", ""))


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _assert_same_attrs(src_root: Path, dest_root: Path) -> None:
    for rel in _files(src_root):
        src, dest = os.stat(src_root / rel), os.stat(dest_root / rel)
        assert dest.st_size == src.st_size, rel
        # Nanoseconds survive: they travel as a decimal "mtime" in user metadata.
        assert dest.st_mtime_ns == src.st_mtime_ns, rel
        assert stat.S_IMODE(dest.st_mode) == stat.S_IMODE(src.st_mode), rel


@needs_rsync
def test_rsync_twice_transfers_nothing_the_second_time(
    shared: DgfsMount, s3: S3View, tree: Path
) -> None:
    dest = shared / "rsync"
    first = _rsync(tree, dest)
    count = len(_files(tree))
    assert _transferred(first) == count
    assert tree_digest(dest) == tree_digest(tree)
    _assert_same_attrs(tree, dest)

    # While uploads may still be pending, and again after they settled.
    assert _transferred(_rsync(tree, dest)) == 0
    shared.settle(*(dest / rel for rel in _files(tree)))
    assert _transferred(_rsync(tree, dest)) == 0

    # rsync's temp names are gone; the final names are stored as deltas.
    stored = s3.keys("rsync/")
    assert not [k for k in stored if re.search(r"/\.[^/]+\.[A-Za-z0-9]{6}(\.delta)?$", k)]
    for rel in _files(tree):
        key = f"rsync/{rel}"
        if rel.suffix == ".zip":
            assert f"{key}.delta" in stored and key not in stored, key
            meta = s3.metadata(f"{key}.delta")
            assert meta["dg-original-name"] == rel.name
            assert meta["dg-file-sha256"] == sha256_file(tree / rel)
        else:
            assert key in stored and f"{key}.delta" not in stored, key
    assert {k for k in stored if k.endswith("reference.bin")} == {
        "rsync/reference.bin",
        "rsync/nested/reference.bin",
    }

    # After a remount everything still matches, so rsync still has nothing to do.
    shared.remount()
    assert tree_digest(dest) == tree_digest(tree)
    _assert_same_attrs(tree, dest)
    assert _transferred(_rsync(tree, dest)) == 0


@needs_rsync
def test_rsync_updates_a_changed_file(shared: DgfsMount, tree: Path) -> None:
    dest = shared / "rsync-update"
    _rsync(tree, dest)
    target = sorted(tree.glob("*.zip"))[2]
    data = bytearray(target.read_bytes())
    data[1000:1010] = b"0123456789"
    target.write_bytes(bytes(data))
    stats = _rsync(tree, dest)
    assert _transferred(stats) == 1
    assert sha256_file(dest / target.name) == sha256_file(target)
    shared.settle(dest / target.name)
    shared.remount()
    assert tree_digest(dest) == tree_digest(tree)
    _assert_same_attrs(tree, dest)


@needs_rsync
def test_rsync_delete_removes_files(shared: DgfsMount, s3: S3View, tree: Path) -> None:
    dest = shared / "rsync-delete"
    _rsync(tree, dest)
    victim = sorted(tree.glob("*.zip"))[-1]
    victim.unlink()
    _rsync(tree, dest, "--delete")
    assert not (dest / victim.name).exists()
    assert tree_digest(dest) == tree_digest(tree)
    shared.remount()
    assert tree_digest(dest) == tree_digest(tree)
    assert not [k for k in s3.keys("rsync-delete/") if victim.name in k]


def test_cp_a_preserves_mtimes_modes_and_owners(shared: DgfsMount, tree: Path) -> None:
    os.chown(tree / "README.txt", 1234, 2345)
    dest = shared / "cp-a"
    subprocess.run(["cp", "-a", str(tree), str(dest)], check=True)
    assert tree_digest(dest) == tree_digest(tree)
    _assert_same_attrs(tree, dest)
    readme = os.stat(dest / "README.txt")
    assert (readme.st_uid, readme.st_gid) == (1234, 2345)
    shared.settle(*(dest / rel for rel in _files(tree)))
    shared.remount()
    assert tree_digest(dest) == tree_digest(tree)
    _assert_same_attrs(tree, dest)
    readme = os.stat(dest / "README.txt")
    assert (readme.st_uid, readme.st_gid) == (1234, 2345)


def test_chmod_and_utime_on_stored_file(shared: DgfsMount, tree: Path) -> None:
    dest = shared / "attrs"
    dest.mkdir()
    src = sorted(tree.glob("*.zip"))[1]
    shutil.copyfile(src, dest / "f.zip")
    shared.settle(dest / "f.zip")
    os.chmod(dest / "f.zip", 0o640)
    os.utime(dest / "f.zip", ns=(1_500_000_000_987_654_321, 1_500_000_000_987_654_321))
    shared.remount()
    info = os.stat(dest / "f.zip")
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_mtime_ns == 1_500_000_000_987_654_321
    assert sha256_file(dest / "f.zip") == sha256_file(src)


def test_attributes_changed_while_the_file_is_held_open(shared: DgfsMount) -> None:
    """chmod/utime after the upload finished but before the last close reach S3."""
    dest = shared / "held-open"
    dest.mkdir()
    mtime = 1_400_000_000_555_555_555
    fd = os.open(dest / "w.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"written")
        os.fsync(fd)  # in S3 now; the handle keeps the local copy alive
        os.fchmod(fd, 0o600)
        os.utime(fd, ns=(mtime, mtime))
    finally:
        os.close(fd)
    (dest / "r.txt").write_text("read")
    shared.settle(dest / "r.txt")
    reader = os.open(dest / "r.txt", os.O_RDONLY)
    try:
        os.chmod(dest / "r.txt", 0o640)
    finally:
        os.close(reader)

    def check() -> None:
        info = os.stat(dest / "w.txt")
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_mtime_ns == mtime
        assert stat.S_IMODE(os.stat(dest / "r.txt").st_mode) == 0o640

    check()
    time.sleep(2.5)  # past listing_ttl and attr_timeout: attributes come from S3 again
    check()
    shared.remount()
    check()
