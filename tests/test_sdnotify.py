"""systemd readiness: the sd_notify messages a ``Type=notify`` unit relies on.

- ``Notifier`` sends one datagram per message to a path or an abstract
  ``@name`` socket, does nothing without ``NOTIFY_SOCKET``, and never
  raises when the socket is gone.
- A real mount sends ``READY=1`` only once the mount point is live, and
  ``STOPPING=1`` after the unmount, before its uploads are drained.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgfs.sdnotify import Notifier
from tests.mountutil import Mounts, is_mounted


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def messages(sock: socket.socket) -> Iterator[dict[str, str]]:
    while True:
        data = sock.recv(4096).decode()
        yield dict(line.split("=", 1) for line in data.splitlines())


def test_notifier_sends_one_datagram_per_message(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready("mounted s3://b on /mnt")
    notifier.status("2 upload(s) pending, 0 failed")
    notifier.extend_timeout(1.5, "draining")
    notifier.stopping("unmounted")
    got = messages(sock)
    assert next(got) == {
        "READY": "1",
        "STATUS": "mounted s3://b on /mnt",
        "MAINPID": str(os.getpid()),
    }
    assert next(got) == {"STATUS": "2 upload(s) pending, 0 failed"}
    assert next(got) == {"EXTEND_TIMEOUT_USEC": "1500000", "STATUS": "draining"}
    assert next(got) == {"STOPPING": "1", "STATUS": "unmounted"}


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"dgfs-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert sock.recv(100) == b"STATUS=hello"
    finally:
        sock.close()


def test_notifier_without_systemd_does_nothing(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    Notifier({}).ready("x")  # no socket: nothing happens
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    gone.ready("x")  # a vanished socket is not the mount's problem
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled


@pytest.mark.mount
def test_mount_is_ready_only_when_live_and_says_when_it_stops(
    mounts: Mounts, listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    mount = mounts.mount(start=False)
    mount.start()
    got = messages(sock)
    ready = next(got)
    assert ready["READY"] == "1" and is_mounted(mount.mountpoint)
    assert ready["STATUS"].startswith("mounted s3://") and ready["MAINPID"] == str(mount.pid)
    (mount / "a.txt").write_text("hello\n")
    started = time.monotonic()
    mount.unmount()
    stopping = next(got)
    assert stopping["STOPPING"] == "1", stopping
    extend = next(got)
    assert int(extend["EXTEND_TIMEOUT_USEC"]) > 0, extend
    assert time.monotonic() - started < 60


def test_listened_fds_are_named_and_only_for_this_process() -> None:
    """sd_listen_fds_with_names(3): descriptors from 3 on, by LISTEN_FDNAMES;
    variables meant for another process (LISTEN_PID) are ignored."""
    from dgfs.sdnotify import listened_fds

    mine = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "fuse:"}
    assert listened_fds(mine) == {"fuse": 3, "unknown": 4}
    assert listened_fds({**mine, "LISTEN_PID": str(os.getpid() + 1)}) == {}
    assert listened_fds({**mine, "LISTEN_FDS": "x"}) == {}
    assert listened_fds({}) == {}


def test_store_fd_needs_systemd() -> None:
    from dgfs.errors import ConfigError

    with pytest.raises(ConfigError, match="NOTIFY_SOCKET"):
        Notifier({}).store_fd(0, "fuse")


def test_store_fd_waits_for_systemd_to_confirm(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FDSTOREREMOVE then FDSTORE with the descriptor, then a barrier that fails
    the call when nobody closes its pipe (systemd never processed the messages)."""
    from dgfs import sdnotify
    from dgfs.errors import ConfigError

    sock, path = listener
    monkeypatch.setattr(sdnotify, "BARRIER_TIMEOUT", 0.5)
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ConfigError, match="did not confirm"):
            Notifier({"NOTIFY_SOCKET": path}).store_fd(read_end, "fuse")
        texts = []
        for _ in range(3):
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
            texts.append(data.decode())
            for _level, _kind, payload in ancillary:
                for index in range(0, len(payload) - len(payload) % 4, 4):
                    os.close(int.from_bytes(payload[index : index + 4], "little"))
        assert texts == [
            "FDSTOREREMOVE=1\nFDNAME=fuse",
            "FDSTORE=1\nFDNAME=fuse\nFDPOLL=0",
            "BARRIER=1",
        ]
    finally:
        os.close(read_end)
        os.close(write_end)
