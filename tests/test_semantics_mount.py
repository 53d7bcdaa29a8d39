"""docs/SEMANTICS.md promises only a real mount can prove (tests/test_semantics.py
has the in-process ones)."""

from __future__ import annotations

import fcntl
import signal

import pytest

from tests.mountutil import Mounts, S3View, is_mounted, wait_until

pytestmark = pytest.mark.mount


def test_sigint_finishes_pending_uploads_before_the_daemon_exits(mounts: Mounts) -> None:
    """Durability: SIGINT does what ``umount`` and SIGTERM do: the kernel lets
    go, and the daemon finishes every pending upload before it exits."""
    mount = mounts.mount(upload_delay="30")  # certainly still pending when the signal comes
    view = S3View(mount.endpoint, mount.bucket)
    try:
        (mount / "a.txt").write_text("pending at SIGINT\n")
        assert not view.keys("")
        assert mount.proc is not None
        mount.proc.send_signal(signal.SIGINT)
        assert mount.wait_exit(30), mount.log_text()
        assert mount.returncode == 0, mount.log_text()
        assert not is_mounted(mount.mountpoint)
        assert view.get("a.txt") == b"pending at SIGINT\n"
    finally:
        view.close()


def test_file_locks_are_local_to_one_mount(mounts: Mounts) -> None:
    """Not supported: file locking across mounts. ``flock`` works within one
    mount (the kernel's), but a lock taken through one mount does not stop
    another mount of the bucket from taking the same lock."""
    first = mounts.mount()
    second = mounts.mount(first.bucket)
    try:
        (first / "locked.txt").write_text("lock me\n")
        first.settle(first / "locked.txt")
        assert wait_until(lambda: (second / "locked.txt").exists(), 15)
        with (
            open(first / "locked.txt", "rb") as holder,
            open(first / "locked.txt", "rb") as same_mount,
            open(second / "locked.txt", "rb") as other_mount,
        ):
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(BlockingIOError):
                fcntl.flock(same_mount, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(other_mount, fcntl.LOCK_EX | fcntl.LOCK_NB)  # not seen there
    finally:
        second.unmount()
        first.unmount()
