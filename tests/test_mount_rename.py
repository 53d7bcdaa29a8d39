"""Real mounts: rename/mv of files and directories, unlink, mkdir/rmdir, symlinks.

A delta moved to another directory has to be stored against that
directory's reference (or become its reference), so both the mount and the
DeltaGlider CLI must read it back after the move.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.mountutil import (
    DgfsMount,
    Mounts,
    S3View,
    dg_download,
    sha256_bytes,
    sha256_file,
    tree_digest,
)
from testsupport.releases import write_series

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("series"), 6, size=512 << 10, seed=11)


def _stored_names(s3: S3View, prefix: str) -> set[str]:
    return {k[len(prefix) :] for k in s3.keys(prefix) if "/" not in k[len(prefix) :]}


def _populate(directory: Path, series: list[Path], *, settle: DgfsMount | None = None) -> None:
    directory.mkdir(parents=True)
    for src in series:
        shutil.copyfile(src, directory / src.name)
    if settle is not None:
        settle.settle(*(directory / src.name for src in series))


# --- files ----------------------------------------------------------------------------


@pytest.mark.parametrize("settled", [True, False], ids=["stored", "pending"])
def test_rename_file_in_same_directory(
    shared: DgfsMount, s3: S3View, series: list[Path], settled: bool
) -> None:
    base = f"same-{'stored' if settled else 'pending'}"
    _populate(shared / base, series, settle=shared if settled else None)
    old, new = shared / base / series[3].name, shared / base / "renamed.zip"
    os.rename(old, new)
    assert not old.exists()
    assert sha256_file(new) == sha256_file(series[3])
    assert series[3].name not in os.listdir(shared / base)
    shared.settle(new)
    names = _stored_names(s3, f"{base}/")
    assert "renamed.zip.delta" in names
    assert f"{series[3].name}.delta" not in names and series[3].name not in names
    meta = s3.metadata(f"{base}/renamed.zip.delta")
    assert meta["dg-original-name"] == "renamed.zip"
    shared.remount()
    assert sha256_file(new) == sha256_file(series[3])
    assert not old.exists()


@pytest.mark.parametrize("settled", [True, False], ids=["stored", "pending"])
@pytest.mark.interop  # reads back with the DeltaGlider CLI
def test_move_delta_to_another_directory(
    shared: DgfsMount, s3: S3View, series: list[Path], tmp_path: Path, settled: bool
) -> None:
    base = f"across-{'stored' if settled else 'pending'}"
    _populate(shared / base / "a", series, settle=shared if settled else None)
    (shared / base / "b").mkdir()
    shutil.copyfile(series[0], shared / base / "b" / "first.zip")  # b gets its own reference
    moved = shared / base / "b" / "moved.zip"
    os.rename(shared / base / "a" / series[4].name, moved)
    # Also into a directory without a reference yet.
    (shared / base / "c").mkdir()
    os.rename(shared / base / "a" / series[2].name, shared / base / "c" / series[2].name)
    assert sha256_file(moved) == sha256_file(series[4])
    shared.settle(moved, shared / base / "c" / series[2].name, shared / base / "b" / "first.zip")

    for key, src in (
        (f"{base}/b/moved.zip", series[4]),
        (f"{base}/c/{series[2].name}", series[2]),
    ):
        stored = s3.keys(f"{base}/")
        assert f"{key}.delta" in stored, sorted(stored)
        meta = s3.metadata(f"{key}.delta")
        ref_key = meta["dg-ref-key"]
        assert ref_key == key.rsplit("/", 1)[0] + "/reference.bin"
        assert ref_key in stored
        out = dg_download(shared.endpoint, shared.bucket, key, tmp_path / key.replace("/", "_"))
        assert sha256_file(out) == sha256_file(src)
    assert series[4].name not in os.listdir(shared / base / "a")
    shared.remount()
    assert sha256_file(moved) == sha256_file(series[4])
    assert sha256_file(shared / base / "c" / series[2].name) == sha256_file(series[2])
    # What stayed behind still reads.
    for src in (series[0], series[1], series[3], series[5]):
        assert sha256_file(shared / base / "a" / src.name) == sha256_file(src)


@pytest.mark.parametrize("settled", [True, False], ids=["stored", "pending"])
def test_mv_onto_existing_file_replaces_it(
    shared: DgfsMount, s3: S3View, series: list[Path], settled: bool
) -> None:
    base = f"replace-{'stored' if settled else 'pending'}"
    _populate(shared / base, series[:3], settle=shared if settled else None)
    (shared / base / "note.txt").write_text("old note\n")
    target = shared / base / series[0].name
    subprocess.run(["mv", str(shared / base / series[2].name), str(target)], check=True)
    assert sha256_file(target) == sha256_file(series[2])
    assert sorted(os.listdir(shared / base)) == sorted([series[0].name, series[1].name, "note.txt"])
    # A zip replaced by a text file: the other form must go.
    os.rename(shared / base / "note.txt", shared / base / series[1].name)
    assert (shared / base / series[1].name).read_text() == "old note\n"
    shared.settle(target, shared / base / series[1].name)
    names = _stored_names(s3, f"{base}/")
    assert names - {"", "reference.bin"} == {f"{series[0].name}.delta", series[1].name}
    shared.remount()
    assert sha256_file(target) == sha256_file(series[2])
    assert (shared / base / series[1].name).read_text() == "old note\n"
    assert sorted(os.listdir(shared / base)) == sorted([series[0].name, series[1].name])


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    result = libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags)
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def test_rename_noreplace_and_exchange(shared: DgfsMount) -> None:
    base = shared / "renameflags"
    base.mkdir()
    (base / "a").write_text("a")
    (base / "b").write_text("b")
    with pytest.raises(OSError) as info:
        _renameat2(base / "a", base / "b", RENAME_NOREPLACE)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(OSError) as info:
        _renameat2(base / "a", base / "b", RENAME_EXCHANGE)
    assert info.value.errno == errno.EINVAL
    assert (base / "a").read_text() == "a" and (base / "b").read_text() == "b"
    _renameat2(base / "a", base / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(base)) == ["b", "c"]
    assert (base / "c").read_text() == "a"


# --- directories --------------------------------------------------------------------


@pytest.mark.parametrize("settled", [True, False], ids=["stored", "pending"])
@pytest.mark.interop  # reads back with the DeltaGlider CLI
def test_mv_directory_with_deltas(
    shared: DgfsMount, s3: S3View, series: list[Path], tmp_path: Path, settled: bool
) -> None:
    base = f"mvdir-{'stored' if settled else 'pending'}"
    _populate(shared / base / "old" / "sub", series, settle=shared if settled else None)
    (shared / base / "old" / "top.txt").write_text("top\n")
    (shared / base / "old" / "emptydir").mkdir()
    before = tree_digest(shared / base / "old")
    os.rename(shared / base / "old", shared / base / "new")
    assert not (shared / base / "old").exists()
    assert tree_digest(shared / base / "new") == before
    assert (shared / base / "new" / "emptydir").is_dir()
    shared.settle(*(shared / base / "new" / "sub" / p.name for p in series))
    stored = s3.keys(f"{base}/")
    assert not [k for k in stored if k.startswith(f"{base}/old")], sorted(stored)
    for src in series:
        meta = s3.metadata(f"{base}/new/sub/{src.name}.delta")
        assert meta["dg-ref-key"] == f"{base}/new/sub/reference.bin"
    for src in (series[0], series[-1]):
        key = f"{base}/new/sub/{src.name}"
        out = dg_download(shared.endpoint, shared.bucket, key, tmp_path / src.name)
        assert sha256_file(out) == sha256_file(src)
    shared.remount()
    assert tree_digest(shared / base / "new") == before
    assert (shared / base / "new" / "emptydir").is_dir()
    assert not (shared / base / "old").exists()


def test_mv_directory_onto_empty_directory(shared: DgfsMount, series: list[Path]) -> None:
    base = shared / "mvdir-onto"
    _populate(base / "src", series[:2], settle=shared)
    (base / "dst").mkdir()
    os.rename(base / "src", base / "dst")
    assert sorted(os.listdir(base)) == ["dst"]
    assert sorted(os.listdir(base / "dst")) == sorted(p.name for p in series[:2])
    (base / "full").mkdir()
    (base / "full" / "x").write_text("x")
    with pytest.raises(OSError) as info:
        os.rename(base / "dst", base / "full")
    assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    with pytest.raises(OSError) as info:
        os.rename(base / "dst", base / "dst" / "inside")
    assert info.value.errno == errno.EINVAL


def test_unlink_and_rmdir(shared: DgfsMount, s3: S3View, series: list[Path]) -> None:
    base = shared / "unlink"
    _populate(base / "d", series[:3], settle=shared)
    with pytest.raises(OSError) as info:
        os.rmdir(base / "d")
    assert info.value.errno == errno.ENOTEMPTY
    os.unlink(base / "d" / series[1].name)
    assert sorted(os.listdir(base / "d")) == sorted([series[0].name, series[2].name])
    assert sha256_file(base / "d" / series[0].name) == sha256_file(series[0])
    assert sha256_file(base / "d" / series[2].name) == sha256_file(series[2])
    for src in (series[0], series[2]):
        os.unlink(base / "d" / src.name)
    # The reference stays while the directory does (as DeltaGlider leaves it).
    assert set(s3.keys("unlink/d/")) == {"unlink/d/", "unlink/d/reference.bin"}
    assert os.listdir(base / "d") == []
    os.rmdir(base / "d")
    assert not (base / "d").exists()
    assert not s3.keys("unlink/d/"), "rmdir leaves nothing (reference and marker go)"
    with pytest.raises(FileNotFoundError):
        os.unlink(base / "missing")
    with pytest.raises(IsADirectoryError):
        os.unlink(base)
    # Unlinking a file right after writing it (upload still pending) leaves nothing.
    (base / "quick.txt").write_text("gone soon")
    os.unlink(base / "quick.txt")
    shared.remount()
    assert os.listdir(base) == []
    assert set(s3.keys("unlink/")) <= {"unlink/"}


def test_mkdir_persists_across_remount(shared: DgfsMount, s3: S3View) -> None:
    base = shared / "dirs"
    (base / "a" / "b" / "c").mkdir(parents=True)
    (base / "empty").mkdir()
    with pytest.raises(FileExistsError):
        (base / "empty").mkdir()
    shared.remount()
    assert (base / "a" / "b" / "c").is_dir()
    assert (base / "empty").is_dir()
    assert sorted(os.listdir(base)) == ["a", "empty"]
    os.rmdir(base / "empty")
    shared.remount()
    assert sorted(os.listdir(base)) == ["a"]


def test_directory_attributes_survive_remount(shared: DgfsMount) -> None:
    base = shared / "dirattrs"
    base.mkdir()
    os.mkdir(base / "private", 0o700)
    (base / "dated").mkdir()
    os.utime(base / "dated", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    os.chmod(base / "dated", 0o750)
    shared.remount()
    private = os.stat(base / "private")
    dated = os.stat(base / "dated")
    assert stat.S_IMODE(private.st_mode) == 0o700
    assert stat.S_IMODE(dated.st_mode) == 0o750
    assert dated.st_mtime_ns == 1_600_000_000_123_456_789


def test_symlinks_survive_remount(shared: DgfsMount, s3: S3View, series: list[Path]) -> None:
    base = shared / "links"
    _populate(base, series[:1])
    os.symlink(series[0].name, base / "latest.zip")
    os.symlink("../nowhere/at/all", base / "dangling")
    assert os.readlink(base / "latest.zip") == series[0].name
    assert sha256_file(base / "latest.zip") == sha256_file(series[0])
    # Stored as s3fs does: the body is the target, the mode says S_IFLNK.
    assert s3.get("links/latest.zip") == series[0].name.encode()
    assert stat.S_ISLNK(int(s3.metadata("links/latest.zip")["mode"]))
    shared.remount()
    assert (base / "latest.zip").is_symlink()
    assert os.readlink(base / "latest.zip") == series[0].name
    assert os.readlink(base / "dangling") == "../nowhere/at/all"
    assert sha256_file(base / "latest.zip") == sha256_file(series[0])
    os.rename(base / "latest.zip", base / "current.zip")
    assert os.readlink(base / "current.zip") == series[0].name
    os.unlink(base / "dangling")
    shared.remount()
    assert sorted(os.listdir(base)) == sorted([series[0].name, "current.zip"])
    assert os.readlink(base / "current.zip") == series[0].name


def test_special_files_are_stored_as_s3fs_stores_them(shared: DgfsMount, s3: S3View) -> None:
    """FIFOs, devices and sockets: created, listed, stat'ed, chmod'ed, renamed,
    unlinked; in S3 an empty object whose ``mode`` carries the type and whose
    ``rdev`` carries the device number, as s3fs-fuse writes them."""
    base = shared / "special"
    base.mkdir()
    os.mkfifo(base / "fifo", 0o640)
    os.mknod(base / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(base / "blk", 0o660 | stat.S_IFBLK, os.makedev(259, 70000))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(base / "sock"))
    assert stat.S_ISFIFO(os.lstat(base / "fifo").st_mode)
    assert s3.get("special/chr") == b""
    meta = s3.metadata("special/chr")
    assert int(meta["mode"]) == stat.S_IFCHR | 0o600
    assert int(meta["rdev"]) == os.makedev(1, 3)
    assert stat.S_ISFIFO(int(s3.metadata("special/fifo")["mode"]))
    assert "rdev" not in s3.metadata("special/fifo")
    os.chmod(base / "fifo", 0o600)
    os.utime(base / "chr", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    os.rename(base / "blk", base / "disk")
    shared.remount()
    assert sorted(os.listdir(base)) == ["chr", "disk", "fifo", "sock"]
    fifo, chr_, disk, sock = (os.lstat(base / n) for n in ("fifo", "chr", "disk", "sock"))
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o600
    assert stat.S_ISCHR(chr_.st_mode) and chr_.st_rdev == os.makedev(1, 3)
    assert chr_.st_mtime_ns == 1_600_000_000_000_000_000
    assert stat.S_ISBLK(disk.st_mode) and disk.st_rdev == os.makedev(259, 70000)
    assert stat.S_ISSOCK(sock.st_mode)
    # The FIFO works as a pipe: the kernel, not dgfs, carries its data.
    reader = os.open(base / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with open(base / "fifo", "wb") as writer:
            writer.write(b"through the pipe")
        assert os.read(reader, 100) == b"through the pipe"
    finally:
        os.close(reader)
    for name in ("fifo", "chr", "disk", "sock"):
        os.unlink(base / name)
    assert os.listdir(base) == []
    assert set(s3.keys("special/")) <= {"special/"}


# --- renames and unlinks racing uploads -------------------------------------------------
#
# Whatever the timing, the end state must be the same: each name holds the
# bytes last written under it, and a name that was moved away or removed
# does not come back.


def _names_in_s3(s3: S3View, prefix: str) -> set[str]:
    return {
        k[len(prefix) :].removesuffix(".delta")
        for k in s3.keys(prefix)
        if k != prefix and not k.endswith("reference.bin")
    }


def test_rename_after_rewrite_of_a_stored_file(shared: DgfsMount, s3: S3View) -> None:
    """Log rotation: append to an uploaded file, then rename it before the upload."""
    base = shared / "rotate"
    base.mkdir()
    (base / "app.log").write_text("one\n")
    shared.settle(base / "app.log")
    with open(base / "app.log", "a") as handle:
        handle.write("two\n")
    os.rename(base / "app.log", base / "app.log.1")
    (base / "app.log").write_text("fresh\n")
    shared.settle(base / "app.log.1", base / "app.log")
    assert _names_in_s3(s3, "rotate/") == {"app.log", "app.log.1"}
    assert s3.get("rotate/app.log.1") == b"one\ntwo\n"
    assert s3.get("rotate/app.log") == b"fresh\n"
    shared.remount()
    assert (base / "app.log.1").read_text() == "one\ntwo\n"
    assert (base / "app.log").read_text() == "fresh\n"
    # Same without a new file under the old name: the old name must not come back.
    (base / "solo").write_text("v1")
    shared.settle(base / "solo")
    (base / "solo").write_text("v2")
    os.rename(base / "solo", base / "solo.moved")
    shared.settle(base / "solo.moved")
    shared.remount()
    assert sorted(os.listdir(base)) == ["app.log", "app.log.1", "solo.moved"]
    assert (base / "solo.moved").read_text() == "v2"


@pytest.mark.parametrize("delay", ["0", "0.05"])
def test_rename_unlink_and_replace_while_uploading(
    mounts: Mounts, tmp_path: Path, delay: str
) -> None:
    """Big files keep their uploads in flight while the names change under them."""
    # More workers than big files: the small new files can overtake the big uploads.
    mount = mounts.mount(upload_delay=delay, upload_workers="8")
    view = S3View(mount.endpoint, mount.bucket)
    try:
        big = {name: os.urandom(16 << 20) for name in ("a.bin", "b.bin", "c.bin", "d.bin")}
        for name, data in big.items():
            (mount / name).write_bytes(data)
        # a: renamed mid-upload, and a new file takes its old name at once.
        os.rename(mount / "a.bin", mount / "a-moved.bin")
        (mount / "a.bin").write_bytes(b"new a")
        # b: removed mid-upload, and made again.
        os.unlink(mount / "b.bin")
        (mount / "b.bin").write_bytes(b"new b")
        # c is replaced by d mid-upload of both.
        os.rename(mount / "d.bin", mount / "c.bin")
        expected = {
            "a-moved.bin": sha256_bytes(big["a.bin"]),
            "a.bin": sha256_bytes(b"new a"),
            "b.bin": sha256_bytes(b"new b"),
            "c.bin": sha256_bytes(big["d.bin"]),
        }

        def check() -> None:
            assert sorted(os.listdir(mount.mountpoint)) == sorted(expected)
            for name, digest in expected.items():
                assert sha256_file(mount / name) == digest, name

        check()
        mount.settle(*(mount / n for n in expected))
        mount.unmount()
        assert _names_in_s3(view, "") == set(expected)
        mount.remount(upload_delay="0.2")
        check()
    finally:
        view.close()


def test_unlinked_open_file_stays_usable(shared: DgfsMount, s3: S3View) -> None:
    """tempfile.TemporaryFile: created, unlinked at once, then written and read."""
    base = shared / "tmpfiles"
    base.mkdir()
    with tempfile.TemporaryFile(dir=base) as handle:
        handle.write(b"scratch data " * 1000)
        handle.flush()
        handle.seek(0)
        assert handle.read() == b"scratch data " * 1000
        assert os.listdir(base) == []
        handle.seek(6)
        handle.write(b"!")
        handle.seek(0)
        assert handle.read(13) == b"scratc! data "
    # Written, closed, reopened, unlinked while open: still readable, whether
    # its upload is still to come or done (then the bytes come from S3 first).
    (base / "open.txt").write_text("still here")
    (base / "stored.zip").write_bytes(b"PK\x03\x04" + b"stored bytes " * 10000)
    shared.settle(base / "stored.zip")
    with open(base / "open.txt", "rb") as reader, open(base / "stored.zip", "rb") as stored:
        os.unlink(base / "open.txt")
        os.unlink(base / "stored.zip")
        assert reader.read() == b"still here"
        assert stored.read() == b"PK\x03\x04" + b"stored bytes " * 10000
        assert os.listdir(base) == []
    # Replaced by a rename while open: the reader keeps the old bytes.
    (base / "old.txt").write_text("old content")
    (base / "new.txt").write_text("new content")
    shared.settle(base / "old.txt", base / "new.txt")
    with open(base / "old.txt", "rb") as reader:
        os.rename(base / "new.txt", base / "old.txt")
        assert reader.read() == b"old content"
    assert (base / "old.txt").read_text() == "new content"
    os.unlink(base / "old.txt")
    shared.remount()
    assert os.listdir(base) == []
    # Only the directory marker, and the reference stored.zip created, remain.
    assert set(s3.keys("tmpfiles/")) == {"tmpfiles/", "tmpfiles/reference.bin"}
