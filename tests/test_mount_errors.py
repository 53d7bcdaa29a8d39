"""Real mounts: what is refused, with which errno, and mount-time mistakes.

Mount-time mistakes (missing bucket, bad mountpoint, unreachable endpoint,
unknown option) must fail fast with one clear line and exit status 2,
never a traceback.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.mountutil import (
    DgfsMount,
    Mounts,
    S3View,
    daemon_env,
    daemon_pids,
    dgfs_bin,
    fusermount,
    is_mounted,
    sha256_file,
)
from testsupport.releases import write_series
from testsupport.servers import free_port

pytestmark = pytest.mark.mount


def _errno_of(fn: object, *args: object) -> int:
    assert callable(fn)
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno or 0


# --- refused operations -------------------------------------------------------------


def test_hard_link_is_eperm(shared: DgfsMount) -> None:
    base = shared / "hardlink"
    base.mkdir()
    (base / "f").write_text("data")
    assert _errno_of(os.link, base / "f", base / "g") == errno.EPERM
    assert os.listdir(base) == ["f"]


@pytest.mark.parametrize("name", ["x.delta", "reference.bin", "app.zip.delta"])
def test_names_reserved_by_the_format_are_einval(shared: DgfsMount, name: str) -> None:
    base = shared / f"reserved-{name.replace('.', '-')}"
    base.mkdir()
    assert _errno_of(open, base / name, "wb") == errno.EINVAL
    assert _errno_of(os.mkdir, base / name) == errno.EINVAL
    assert _errno_of(os.symlink, "target", base / name) == errno.EINVAL
    (base / "ok.txt").write_text("ok")
    assert _errno_of(os.rename, base / "ok.txt", base / name) == errno.EINVAL
    assert sorted(os.listdir(base)) == ["ok.txt"]


def test_internal_prefix_cannot_be_created_at_the_root(shared: DgfsMount) -> None:
    assert ".deltaglider" not in os.listdir(shared.mountpoint)
    assert _errno_of(os.mkdir, shared / ".deltaglider") == errno.EINVAL
    assert _errno_of(open, shared / ".deltaglider", "wb") == errno.EINVAL
    assert ".deltaglider" not in os.listdir(shared.mountpoint)
    # Below the root the name is an ordinary one.
    (shared / "sub").mkdir(exist_ok=True)
    (shared / "sub" / ".deltaglider").mkdir()
    (shared / "sub" / ".deltaglider" / "f").write_text("f")
    shared.settle(shared / "sub" / ".deltaglider" / "f")
    assert (shared / "sub" / ".deltaglider" / "f").read_text() == "f"


def test_setxattr_is_enotsup_and_getxattr_of_unknown_is_enodata(shared: DgfsMount) -> None:
    path = shared / "xattr.txt"
    path.write_text("x")
    assert _errno_of(os.setxattr, path, "user.test", b"1") == errno.ENOTSUP
    assert _errno_of(os.removexattr, path, "user.dgfs.kind") == errno.ENOTSUP
    assert _errno_of(os.getxattr, path, "user.other") == errno.ENODATA
    # Outside user.: no labels, no ACLs (what makes ls -l stop asking).
    for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
        assert _errno_of(os.getxattr, path, name) == errno.EOPNOTSUPP, name


def test_missing_files(shared: DgfsMount) -> None:
    missing = shared / "does-not-exist"
    assert _errno_of(os.stat, missing) == errno.ENOENT
    assert _errno_of(open, missing, "rb") == errno.ENOENT
    assert _errno_of(os.rename, missing, shared / "x") == errno.ENOENT
    assert _errno_of(os.listdir, missing) == errno.ENOENT
    (shared / "file-not-dir").write_text("f")
    assert _errno_of(os.listdir, shared / "file-not-dir") == errno.ENOTDIR
    assert _errno_of(os.mkdir, shared / "file-not-dir" / "sub") == errno.ENOTDIR
    assert _errno_of(os.rmdir, shared / "file-not-dir") == errno.ENOTDIR


# --- a read-only mount ----------------------------------------------------------------


def test_read_only_mount(mounts: Mounts, tmp_path: Path) -> None:
    series = write_series(tmp_path / "src", 2, size=512 << 10)
    writer = mounts.mount()
    (writer / "dir").mkdir()
    for src in series:
        shutil.copyfile(src, writer / "dir" / src.name)
    writer.unmount()

    ro = mounts.mount(writer.bucket, ro=None)
    target = ro / "dir" / series[0].name
    assert sha256_file(target) == sha256_file(series[0])
    assert _errno_of(open, ro / "dir" / "new", "wb") == errno.EROFS
    assert _errno_of(open, target, "r+b") == errno.EROFS
    assert _errno_of(os.mkdir, ro / "newdir") == errno.EROFS
    assert _errno_of(os.unlink, target) == errno.EROFS
    assert _errno_of(os.rename, target, ro / "dir" / "x.zip") == errno.EROFS
    assert _errno_of(os.rmdir, ro / "dir") == errno.EROFS
    assert _errno_of(os.truncate, target, 0) == errno.EROFS
    assert _errno_of(os.chmod, target, 0o600) == errno.EROFS
    assert _errno_of(os.symlink, "x", ro / "link") == errno.EROFS
    assert sha256_file(target) == sha256_file(series[0])
    ro.unmount()
    view = S3View(ro.endpoint, ro.bucket)
    try:
        assert set(view.keys()) == {
            "dir/",
            "dir/reference.bin",
            *(f"dir/{p.name}.delta" for p in series),
        }
    finally:
        view.close()


# --- mount-time mistakes ------------------------------------------------------------------


def _dgfs_mount(*args: str, timeout: float = 30) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run(
        [dgfs_bin(), "mount", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=daemon_env(),
        check=False,
    )
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


def _assert_one_clear_line(output: str, *words: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    assert lines[0].startswith("dgfs mount: "), output
    for word in words:
        assert word in lines[0], output


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_missing_bucket_fails_fast(moto_endpoint: str, tmp_path: Path, foreground: bool) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["no-such-bucket-here", str(mnt), "-o", f"endpoint={moto_endpoint},cache_dir={tmp_path}"]
    code, output, elapsed = _dgfs_mount(*args, *(["-f"] if foreground else []))
    assert code == 2, output
    _assert_one_clear_line(output, "no-such-bucket-here", "does not exist")
    assert elapsed < 15
    assert not is_mounted(mnt)
    assert not daemon_pids(mnt)


def test_mountpoint_not_a_directory(moto_endpoint: str, tmp_path: Path) -> None:
    bucket = "irrelevant"
    (tmp_path / "file").write_text("x")
    code, output, _ = _dgfs_mount(bucket, str(tmp_path / "file"), "-o", f"endpoint={moto_endpoint}")
    assert code == 2
    _assert_one_clear_line(output, "not a directory")
    code, output, _ = _dgfs_mount(bucket, str(tmp_path / "nope"), "-o", f"endpoint={moto_endpoint}")
    assert code == 2
    _assert_one_clear_line(output, "does not exist")


def test_mountpoint_already_mounted(shared: DgfsMount, tmp_path: Path) -> None:
    code, output, _ = _dgfs_mount(
        shared.bucket,
        str(shared.mountpoint),
        "-o",
        f"endpoint={shared.endpoint},cache_dir={tmp_path}",
    )
    assert code == 2
    _assert_one_clear_line(output, "busy")
    assert is_mounted(shared.mountpoint)


def test_endpoint_unreachable(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    closed = f"http://127.0.0.1:{free_port()}"
    code, output, elapsed = _dgfs_mount(
        "bucket", str(mnt), "-o", f"endpoint={closed},cache_dir={tmp_path}"
    )
    assert code == 2, output
    _assert_one_clear_line(output, closed)
    assert elapsed < 20
    assert not is_mounted(mnt)


def test_mounting_over_a_dead_mount_says_what_to_do(mounts: Mounts) -> None:
    mount = mounts.mount()
    assert mount.pid is not None
    os.kill(mount.pid, signal.SIGKILL)  # the kernel keeps a dead mount behind
    mount.wait_exit(10)
    mount.expect_log(".")  # killed mid-run: whatever it logged is expected
    try:
        code, output, _ = _dgfs_mount(
            mount.bucket, str(mount.mountpoint), "-o", f"endpoint={mount.endpoint}"
        )
        assert code == 2, output
        _assert_one_clear_line(output, "dead FUSE mount", "fusermount3 -u")
    finally:
        fusermount("-uz", str(mount.mountpoint))


@pytest.mark.parametrize(
    "option, words",
    [
        ("bogus", ["bogus"]),
        ("upload_delay=soon", ["upload_delay"]),
        ("umask=999", ["umask"]),
        ("endpoint", ["endpoint"]),
        ("ro=1", ["ro"]),
        ("cache_size=lots", ["lots"]),
        ("endpoint=notaurl", ["notaurl", "endpoint"]),
    ],
)
def test_bad_options(tmp_path: Path, option: str, words: list[str]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code, output, elapsed = _dgfs_mount("bucket", str(mnt), "-o", option)
    assert code == 2, output
    _assert_one_clear_line(output, *words)
    assert elapsed < 10
    assert not is_mounted(mnt)


# --- integrity: never wrong bytes -------------------------------------------------------


def _read_errno(path: Path) -> int | None:
    try:
        sha256_file(path)
    except OSError as exc:
        return exc.errno
    return None


def test_replaced_reference_gives_eio_not_wrong_bytes(mounts: Mounts, tmp_path: Path) -> None:
    series = write_series(tmp_path / "src", 2, size=512 << 10, seed=71)
    writer = mounts.mount()
    (writer / "app").mkdir()
    for src in series:
        shutil.copyfile(src, writer / "app" / src.name)
    writer.unmount()
    view = S3View(writer.endpoint, writer.bucket)
    try:
        # Someone replaces the reference's bytes (metadata kept): every delta is now unusable.
        meta = view.metadata("app/reference.bin")
        view.put("app/reference.bin", series[1].read_bytes()[::-1], meta)
        # And a direct file's bytes, keeping its recorded SHA-256.
        (tmp_path / "note.txt").write_text("original note\n")
        text_meta = {
            "dg-file-sha256": sha256_file(tmp_path / "note.txt"),
            "dg-file-size": "14",
            "dg-compression": "none",
            "dg-original-name": "note.txt",
        }
        view.put("app/note.txt", b"tampered note\n", text_meta)
    finally:
        view.close()
    reader = mounts.mount(writer.bucket, ro=None)  # a fresh cache: nothing to fall back on
    reader.expect_log(r"reference\.bin|SHA-256|app/note\.txt|app/plugin")
    for src in series:
        assert _read_errno(reader / "app" / src.name) == errno.EIO, src.name
    assert _read_errno(reader / "app" / "note.txt") == errno.EIO
    assert "reference.bin" in reader.log_text()
    assert "app/note.txt" in reader.log_text()


def test_large_direct_file_tampered_fails_the_last_read(mounts: Mounts) -> None:
    data = random.Random(13).randbytes(33 << 20)
    writer = mounts.mount()
    (writer / "big.bin").write_bytes(data)
    writer.unmount()
    view = S3View(writer.endpoint, writer.bucket)
    try:
        meta = view.metadata("big.bin")
        tampered = bytearray(data)
        tampered[20 << 20] ^= 0xFF
        view.put("big.bin", bytes(tampered), meta)
    finally:
        view.close()
    reader = mounts.mount(writer.bucket, ro=None)
    reader.expect_log(r"big\.bin")
    assert _read_errno(reader / "big.bin") == errno.EIO
    # Reading only a range before the damage is allowed (not checked end to end).
    with open(reader / "big.bin", "rb") as handle:
        assert handle.read(1 << 20) == data[: 1 << 20]


def test_permanent_upload_failure_is_reported_and_kept(mounts: Mounts) -> None:
    """The bucket vanishes under the mount: fsync reports it, the data is kept aside."""
    mount = mounts.mount(upload_delay="30")
    (mount / "late.txt").write_text("never uploaded")
    fd = os.open(mount / "late.txt", os.O_RDONLY)
    view = S3View(mount.endpoint, mount.bucket)
    try:
        view.client.delete_bucket(Bucket=mount.bucket)
        mount.expect_log(r"late\.txt|NoSuchBucket|does not exist|could not be uploaded")
        with pytest.raises(OSError) as info:
            os.fsync(fd)
        assert info.value.errno not in (0, None)
        # Writing on after the failure still works: the next version gets a
        # staging file of its own (the failed one stays aside).
        with open(mount / "late.txt", "a") as again:
            again.write(", again")
        assert (mount / "late.txt").read_text() == "never uploaded, again"
        with pytest.raises(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
        view.close()
    mount.unmount()
    failed = list((mount.cache_dir / "journal").rglob("failed/*.data"))
    assert sorted(p.read_text() for p in failed) == ["never uploaded", "never uploaded, again"]
    log = mount.log_text()
    assert "file(s) could not be uploaded" in log and "/failed" in log
    assert "for the next mount" not in log  # no mount retries a failed entry
