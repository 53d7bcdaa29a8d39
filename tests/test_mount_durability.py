"""Real mounts: nothing a writer was told is safe may be lost.

- ``umount`` right after writing (uploads still pending) finishes the
  uploads before the daemon exits.
- A daemon killed with SIGKILL after close() returned leaves the files in
  its journal; the next mount of the same bucket with the same cache_dir
  uploads them (renames and chmods made after close included).
- fsync() returns only once the object is in S3.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgfs.fs import dirindex
from tests.mountutil import (
    Mounts,
    S3View,
    is_mounted,
    sha256_bytes,
    sha256_file,
    wait_until,
)
from testsupport.releases import write_series
from testsupport.servers import MotoServer, make_bucket

pytestmark = pytest.mark.mount

LONG_DELAY = "30"  # seconds: uploads are certainly still pending when we act


@pytest.fixture
def mounts(moto_endpoint: str, tmp_path: Path) -> Iterator[Mounts]:
    with Mounts(moto_endpoint, tmp_path) as factory:
        yield factory


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("series"), 4, size=512 << 10, seed=21)


def _user_keys(view: S3View) -> set[str]:
    """Keys of files: not references, directory markers or directory indexes."""
    return {
        k
        for k in view.keys("")
        if not k.endswith(("/", "reference.bin")) and not k.startswith(dirindex.PREFIX)
    }


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def test_umount_waits_for_pending_uploads(mounts: Mounts, series: list[Path]) -> None:
    mount = mounts.mount(upload_delay=LONG_DELAY)
    view = S3View(mount.endpoint, mount.bucket)
    try:
        (mount / "rel").mkdir()
        for src in series:
            shutil.copyfile(src, mount / "rel" / src.name)
        (mount / "notes.txt").write_text("pending notes\n")
        assert _user_keys(view) == set(), "uploads should still be waiting"
        started = time.monotonic()
        mount.unmount()  # fusermount3 -u, then wait for the daemon to exit
        elapsed = time.monotonic() - started
        assert mount.returncode == 0, mount.log_text()
        # Unmounting starts the delayed uploads at once rather than sleeping them out.
        assert elapsed < float(LONG_DELAY) / 2, elapsed
        assert _user_keys(view) == {f"rel/{p.name}.delta" for p in series} | {"notes.txt"}
        mount.remount(upload_delay="0.2")
        for src in series:
            assert sha256_file(mount / "rel" / src.name) == sha256_file(src)
        assert (mount / "notes.txt").read_text() == "pending notes\n"
    finally:
        view.close()


def test_sigterm_unmounts_after_pending_uploads(mounts: Mounts, series: list[Path]) -> None:
    mount = mounts.mount(upload_delay=LONG_DELAY)
    view = S3View(mount.endpoint, mount.bucket)
    try:
        shutil.copyfile(series[0], mount / "a.zip")
        assert mount.proc is not None
        mount.proc.terminate()
        assert mount.wait_exit(30), mount.log_text()
        assert mount.returncode == 0, mount.log_text()
        assert not is_mounted(mount.mountpoint)
        assert _user_keys(view) == {"a.zip.delta"}
        mount.remount()
        assert sha256_file(mount / "a.zip") == sha256_file(series[0])
    finally:
        view.close()


def test_crash_after_close_is_recovered_from_the_journal(
    mounts: Mounts, series: list[Path]
) -> None:
    mount = mounts.mount(upload_delay=LONG_DELAY)
    view = S3View(mount.endpoint, mount.bucket)
    try:
        (mount / "rel").mkdir()
        for src in series[:3]:
            shutil.copyfile(src, mount / "rel" / src.name)
        (mount / "keep.txt").write_text("keep me\n")
        (mount / "gone.txt").write_text("deleted before the crash\n")
        # Changes after close() while the upload is pending go into the journal too.
        os.rename(mount / "rel" / series[2].name, mount / "rel" / "renamed.zip")
        os.chmod(mount / "keep.txt", 0o600)
        os.utime(mount / "keep.txt", ns=(1_234_567_890_123_456_789,) * 2)
        os.unlink(mount / "gone.txt")
        # Open and written, but never closed: not committed, may be lost.
        half = open(mount / "half-written.bin", "wb")  # noqa: SIM115 - must stay open
        half.write(b"x" * 1000)
        half.flush()
        assert _user_keys(view) == set()

        mount.expect_log(r"recovered \d+ file")
        mount.crash()
        with contextlib.suppress(OSError):
            half.close()  # ENOTCONN: its filesystem is gone
        assert not is_mounted(mount.mountpoint)
        assert _user_keys(view) == set(), "nothing could have been uploaded"

        mount.start()  # same bucket, same cache_dir, still the long delay
        expected = {
            "rel/" + series[0].name: sha256_file(series[0]),
            "rel/" + series[1].name: sha256_file(series[1]),
            "rel/renamed.zip": sha256_file(series[2]),
            "keep.txt": sha256_bytes(b"keep me\n"),
        }
        # Visible at once, from the journal, before they reach S3.
        for rel, digest in expected.items():
            assert sha256_file(mount / rel) == digest, rel
        assert not (mount / "gone.txt").exists()
        assert not (mount / "rel" / series[2].name).exists()
        mount.settle(*(mount / rel for rel in expected))
        assert _user_keys(view) == {
            "rel/" + series[0].name + ".delta",
            "rel/" + series[1].name + ".delta",
            "rel/renamed.zip.delta",
            "keep.txt",
        }
        assert "recovered 4 file" in mount.log_text()

        mount.remount(upload_delay="0.2")
        for rel, digest in expected.items():
            assert sha256_file(mount / rel) == digest, rel
        info = os.stat(mount / "keep.txt")
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_mtime_ns == 1_234_567_890_123_456_789
        assert not (mount / "gone.txt").exists()
        leftovers = [
            p.name
            for p in (mount.cache_dir / "journal").rglob("*")
            if p.suffix in (".json", ".data")
        ]
        assert leftovers == [], "the journal is drained"
    finally:
        view.close()


def test_crash_then_remount_drains_journal_without_delay(
    mounts: Mounts, series: list[Path]
) -> None:
    mount = mounts.mount(upload_delay=LONG_DELAY)
    view = S3View(mount.endpoint, mount.bucket)
    try:
        shutil.copyfile(series[0], mount / "a.zip")
        mount.expect_log(r"recovered \d+ file")
        mount.crash()
        mount.start()
        mount.unmount()  # no access at all: the recovered upload must still happen
        assert _user_keys(view) == {"a.zip.delta"}
    finally:
        view.close()


def test_fsync_returns_only_once_the_object_is_in_s3(mounts: Mounts, series: list[Path]) -> None:
    mount = mounts.mount(upload_delay=LONG_DELAY)
    view = S3View(mount.endpoint, mount.bucket)
    try:
        data = series[1].read_bytes()
        fd = os.open(mount / "f.zip", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            started = time.monotonic()
            os.fsync(fd)
            elapsed = time.monotonic() - started
            # Right after fsync returned, without waiting: the object is there.
            keys = _user_keys(view)
            assert keys == {"f.zip.delta"}, keys
            assert view.metadata("f.zip.delta")["dg-file-sha256"] == sha256_bytes(data)
            assert elapsed < float(LONG_DELAY) / 2, f"fsync waited out the upload delay ({elapsed})"
            # Written again after the fsync: the next fsync stores the new bytes.
            os.write(fd, b"tail")
            os.fsync(fd)
            (stored_key,) = _user_keys(view)
            assert view.metadata(stored_key)["dg-file-sha256"] == sha256_bytes(data + b"tail")
        finally:
            os.close(fd)
        # A text file, fsync'd through a read-only descriptor after close.
        (mount / "t.txt").write_text("text")
        mount.settle(mount / "t.txt")
        assert view.get("t.txt") == b"text"
    finally:
        view.close()


def test_fsync_of_a_directory_and_of_an_unmodified_file(mounts: Mounts) -> None:
    mount = mounts.mount()
    (mount / "d").mkdir()
    (mount / "d" / "f").write_text("f")
    mount.settle(mount / "d" / "f")
    mount.settle(mount / "d" / "f")  # nothing pending: returns at once
    fd = os.open(mount / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert wait_until(lambda: (mount / "d" / "f").read_text() == "f")


def test_full_cache_disk_is_reported_and_survived(
    mounts: Mounts, series: list[Path], tmp_path: Path
) -> None:
    """ENOSPC in cache_dir: writers get the errno, the daemon stays, uploads resume."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    tiny = tmp_path / "tiny-cache"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(tiny)], check=True)
    try:
        mount = mounts.mount(cache_dir=tiny)
        mount.expect_log(r"No space left|disk is full|close\(\) failed were not kept")
        (mount / "full").mkdir()
        outcomes = {}
        for src in series:
            try:
                shutil.copyfile(src, mount / "full" / src.name)
                outcomes[src.name] = True
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                outcomes[src.name] = False
            time.sleep(0.6)  # let its upload run: it needs room for deltas and references
        assert not all(outcomes.values()), "the cache disk never filled up"
        assert mount.alive, mount.log_text()
        # Room again: what close() accepted reaches S3 and reads back.
        subprocess.run(["mount", "-o", "remount,size=64m", str(tiny)], check=True)
        accepted = [src for src in series if outcomes[src.name]]
        assert accepted, "not even the first file fitted"

        # fsync reports the upload's last error until a retry (every 2 s) succeeds.
        def settled() -> bool:
            mount.settle(*(mount / "full" / src.name for src in accepted))
            return True

        assert wait_until(settled, 15), mount.log_text()
        for src in accepted:
            assert sha256_file(mount / "full" / src.name) == sha256_file(src)
        # And the filesystem still takes new files.
        retry = series[-1]
        shutil.copyfile(retry, mount / "full" / retry.name)
        mount.settle(mount / "full" / retry.name)
        mount.remount()
        for src in [*accepted, retry]:
            assert sha256_file(mount / "full" / src.name) == sha256_file(src)
        mount.unmount()
    finally:
        for candidate in mounts.mounts:
            if candidate.cache_dir == tiny:
                candidate.unmount()
        subprocess.run(["umount", str(tiny)], check=False)


def test_prefix_mount_writes_and_recovers_under_its_prefix(
    mounts: Mounts, series: list[Path]
) -> None:
    bucket = mounts.new_bucket()
    mount = mounts.mount(bucket, source=f"{bucket}/team/app", upload_delay=LONG_DELAY)
    view = S3View(mount.endpoint, bucket)
    try:
        (mount / "v1").mkdir()
        shutil.copyfile(series[0], mount / "v1" / series[0].name)
        shutil.copyfile(series[1], mount / "top.zip")
        mount.settle(mount / "top.zip")
        os.rename(mount / "top.zip", mount / "v1" / "moved.zip")
        shutil.copyfile(series[2], mount / "late.zip")
        mount.expect_log(r"recovered \d+ file")
        mount.crash()
        mount.start()
        mount.settle(mount / "late.zip", mount / "v1" / series[0].name)
        keys = set(view.keys())
        assert keys == {
            "team/app/v1/",
            "team/app/v1/reference.bin",
            f"team/app/v1/{series[0].name}.delta",
            "team/app/v1/moved.zip.delta",
            "team/app/reference.bin",
            "team/app/late.zip.delta",
        }, keys
        mount.remount(upload_delay="0.2")
        assert sha256_file(mount / "v1" / series[0].name) == sha256_file(series[0])
        assert sha256_file(mount / "v1" / "moved.zip") == sha256_file(series[1])
        assert sha256_file(mount / "late.zip") == sha256_file(series[2])
    finally:
        view.close()


def test_store_down_at_unmount_then_second_signal(tmp_path: Path, series: list[Path]) -> None:
    """S3 unreachable: umount keeps retrying; a second SIGTERM leaves the journal."""
    server = MotoServer()
    server.start()
    try:
        make_bucket(server.endpoint_url, "downbucket")
        with Mounts(server.endpoint_url, tmp_path) as factory:
            mount = factory.mount("downbucket", upload_delay=LONG_DELAY)
            mount.expect_log(
                r"failed .*retrying|second signal|kept in .* for the next mount"
                r"|recovered \d+ file|Could not connect|cannot reach"
            )
            shutil.copyfile(series[0], mount / "a.zip")
            (mount / "b.txt").write_text("bee")
            server.stop()
            assert mount.proc is not None
            mount.proc.terminate()
            assert wait_until(lambda: not is_mounted(mount.mountpoint), 10)
            time.sleep(3)  # it keeps trying while the store is down
            assert mount.alive, mount.log_text()
            mount.proc.terminate()
            assert mount.wait_exit(15), mount.log_text()
            assert "2 file(s) not uploaded; kept in" in mount.log_text()

            server = MotoServer(port=server.port)  # same endpoint, same journal
            server.start()
            make_bucket(server.endpoint_url, "downbucket")
            mount.start()
            mount.settle(mount / "a.zip", mount / "b.txt")
            assert sha256_file(mount / "a.zip") == sha256_file(series[0])
            assert (mount / "b.txt").read_text() == "bee"
            view = S3View(server.endpoint_url, "downbucket")
            try:
                assert {"a.zip.delta", "b.txt"} <= set(view.keys())
            finally:
                view.close()
    finally:
        server.stop()
