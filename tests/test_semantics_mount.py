"""docs/SEMANTICS.md promises only a real mount can prove (tests/test_semantics.py
has the in-process ones)."""

from __future__ import annotations

import signal

import pytest

from tests.mountutil import Mounts, S3View, is_mounted

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
