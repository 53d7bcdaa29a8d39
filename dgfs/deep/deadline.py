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
    """The moment a rebuild must have ended by: ``seconds`` from now, or never (None)."""

    __slots__ = ("seconds", "_at")

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._at = math.inf if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        """Raise ``DecodeLimit`` if the deadline has passed."""
        if time.monotonic() > self._at:
            raise DecodeLimit(f"rebuilding took over {self.seconds:g} s (expand_time)")

    def within(self, seconds: float) -> float:
        """``seconds``, or the time left if that is less (a child's timeout)."""
        return min(seconds, max(0.0, self._at - time.monotonic()))


#: For rebuilds without a time limit (``rebuild_digest``, the writer's checks).
NEVER = Deadline(None)
