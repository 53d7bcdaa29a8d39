"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram per message.

A unit with ``Type=notify`` learns from these messages when the mount is
live (``READY=1``), what it is doing (``STATUS=``), that it is stopping
(``STOPPING=1``), and that a drain of pending uploads still makes progress
(``EXTEND_TIMEOUT_USEC=``). Without ``NOTIFY_SOCKET`` in the environment
(not started by systemd) every call does nothing. A failure to send is
logged at debug level and otherwise ignored: the mount must not depend on
its supervisor's socket.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract one)."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
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
