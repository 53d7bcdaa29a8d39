"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram per message.

A unit with ``Type=notify`` learns from these messages when the mount is
live (``READY=1``), what it is doing (``STATUS=``), that it is stopping
(``STOPPING=1``), and that a drain of pending uploads still makes progress
(``EXTEND_TIMEOUT_USEC=``). Without ``NOTIFY_SOCKET`` in the environment
(not started by systemd) every call does nothing. A failure to send is
logged at debug level and otherwise ignored: the mount must not depend on
its supervisor's socket.

The descriptor store is the exception: ``store_fd`` hands systemd a file
descriptor to keep (``FDSTORE=1``), which it passes to the unit's main
process at start (``LISTEN_FDS``, read by :func:`listened_fds`). The
privileged step of a sandboxed mount sends the /dev/fuse descriptor that
way (:mod:`dgfs.handoff`); a failure there fails the start, so it raises.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
from collections.abc import Mapping

from dgfs import environment
from dgfs.errors import ConfigError

log = logging.getLogger(__name__)

#: sd_listen_fds(3): the first descriptor systemd passes.
LISTEN_FDS_START = 3
#: How long ``store_fd`` waits for systemd to have processed its message.
BARRIER_TIMEOUT = 10.0


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract one)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        address = environment.notify_socket(environ)
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> None:
        """One message: ``send(READY=1, STATUS="mounted")`` -> ``READY=1\\nSTATUS=mounted``."""
        if self.address is None:
            return
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(text.encode(), self.address)
        except OSError as exc:
            log.debug("cannot notify systemd (%s): %s", self.address.lstrip("\0"), exc)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float, status: str) -> None:
        """Ask for ``seconds`` more before systemd gives up on the start or stop."""
        self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000), STATUS=status)

    def store_fd(self, fd: int, name: str) -> None:
        """Give systemd a duplicate of ``fd`` to keep under ``name`` (replacing one
        kept under that name before), and return once systemd has it.

        Raises ``ConfigError`` without ``NOTIFY_SOCKET``, or when the message
        cannot be sent or systemd does not confirm it in time.
        """
        if self.address is None:
            raise ConfigError("no NOTIFY_SOCKET: systemd's descriptor store is out of reach")
        try:
            self._send_with_fds(f"FDSTOREREMOVE=1\nFDNAME={name}", [])
            self._send_with_fds(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", [fd])
            self._barrier()
        except OSError as exc:
            raise ConfigError(f"cannot hand a descriptor to systemd: {exc}") from None

    def remove_fd(self, name: str) -> None:
        """Ask systemd to close the descriptor it keeps under ``name`` (if any)."""
        self.send(FDSTOREREMOVE=1, FDNAME=name)

    def _send_with_fds(self, text: str, fds: list[int]) -> None:
        assert self.address is not None
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendmsg([text.encode()], ancillary, 0, self.address)

    def _barrier(self) -> None:
        """sd_notify_barrier(3): systemd closes the pipe's write end once it has
        processed every message sent before, which the read end sees as EOF."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self._send_with_fds("BARRIER=1", [write_end])
            finally:
                os.close(write_end)
            poller = select.poll()
            poller.register(read_end, select.POLLHUP)
            if not poller.poll(BARRIER_TIMEOUT * 1000):
                raise OSError(f"systemd did not confirm within {BARRIER_TIMEOUT:g} s")
        finally:
            os.close(read_end)


def listened_fds(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """The descriptors systemd passed to this process, by name (sd_listen_fds_with_names(3)).

    Empty when ``LISTEN_PID`` names another process (the variables were
    inherited) or nothing was passed; a descriptor without a name is
    ``"unknown"``, as systemd calls it.
    """
    pid, fds, fdnames = environment.listen_fds(environ)
    if pid != str(os.getpid()):
        return {}
    try:
        count = int(fds or "0")
    except ValueError:
        return {}
    names = fdnames.split(":")
    found: dict[str, int] = {}
    for index in range(max(0, count)):
        name = names[index] if index < len(names) and names[index] else "unknown"
        found.setdefault(name, LISTEN_FDS_START + index)
    return found
