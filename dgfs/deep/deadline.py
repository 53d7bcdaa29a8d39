"""A rebuild's time limit, checked where the work happens (``expand_time``).

An expanded form comes from the bucket: a hostile one can make every step
of its rebuild slow (scanning headers, spooling, compressing), not only the
steps that produce output. :class:`Deadline` is handed to each of them and
checked once per segment or chunk, never per byte.
"""

from __future__ import annotations

import math
import time

from dgfs.errors import DecodeLimit


class Deadline:
    """When a rebuild must have ended by: ``seconds`` of running, or never
    (None). It runs from its creation, or with ``started=False`` from the
    first ``start``; ``pause`` stops the count until the next ``start``."""

    __slots__ = ("seconds", "_left", "_since")

    def __init__(self, seconds: float | None, *, started: bool = True) -> None:
        self.seconds = seconds
        self._left = math.inf if seconds is None else seconds
        self._since: float | None = None
        if started:
            self.start()

    def start(self) -> None:
        """Count from now, unless counting already: a read's rebuilds share
        one limit, counted only while one of them runs (waiting for a turn,
        downloading and xdelta3 are not counted)."""
        if self._since is None:
            self._since = time.monotonic()

    def pause(self) -> None:
        """Stop counting until the next ``start``."""
        if self._since is not None:
            self._left -= time.monotonic() - self._since
            self._since = None

    def _remaining(self) -> float:
        running = time.monotonic() - self._since if self._since is not None else 0.0
        return self._left - running

    def check(self) -> None:
        """Raise ``DecodeLimit`` if the time is spent."""
        if self._remaining() < 0:
            raise DecodeLimit(f"rebuilding took over {self.seconds:g} s (expand_time)")

    def within(self, seconds: float) -> float:
        """``seconds``, or the time left if that is less (a child's timeout)."""
        return min(seconds, max(0.0, self._remaining()))


#: For rebuilds without a time limit (``rebuild_digest``, the writer's checks).
NEVER = Deadline(None)
