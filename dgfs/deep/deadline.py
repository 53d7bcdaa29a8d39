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
    """The moment a rebuild must have ended by: ``seconds`` from now, or never
    (None); with ``started=False``, ``seconds`` from the first ``start``."""

    __slots__ = ("seconds", "_at")

    def __init__(self, seconds: float | None, *, started: bool = True) -> None:
        self.seconds = seconds
        self._at = math.inf
        if started:
            self.start()

    def start(self) -> None:
        """Count from now, unless counting already (a read's one limit starts
        when its first rebuild does: waiting for its turn, its download and
        xdelta3 are not counted)."""
        if self._at == math.inf and self.seconds is not None:
            self._at = time.monotonic() + self.seconds

    def check(self) -> None:
        """Raise ``DecodeLimit`` if the deadline has passed."""
        if time.monotonic() > self._at:
            raise DecodeLimit(f"rebuilding took over {self.seconds:g} s (expand_time)")

    def within(self, seconds: float) -> float:
        """``seconds``, or the time left if that is less (a child's timeout)."""
        return min(seconds, max(0.0, self._at - time.monotonic()))


#: For rebuilds without a time limit (``rebuild_digest``, the writer's checks).
NEVER = Deadline(None)
