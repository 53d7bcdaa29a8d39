"""How far expanding one file may go: ``ExpansionLimits`` and one expansion's ``Budget``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from dgfs.deep.segments import plain_form_size
from dgfs.errors import ExpansionLimit

#: Default of ``ExpansionLimits.max_bytes``.
DEFAULT_MAX_BYTES = 4 << 30
#: However small a file, its expansion may take this much.
MIN_ALLOWANCE = 1 << 20
#: Bytes one expansion may inflate, all attempts together, per byte it may
#: write: a stream is inflated again when its first candidate settings fail,
#: for GNU gzip, and once more inside a nested archive.
INFLATE_FACTOR = 4


@dataclass(frozen=True)
class ExpansionLimits:
    """How far expanding one file may go (docs/SECURITY.md; mount options in
    brackets). Past any of them ``expand_file`` raises ``ExpansionLimit`` and
    the file is stored without expansion. The defaults are far beyond any
    real release series: botocore wheels and Django sdists expand 6-8 times,
    in about a second."""

    ratio: float = 100.0
    """Expanded bytes per byte of the file (``expand_ratio``)."""
    max_bytes: int = DEFAULT_MAX_BYTES
    """Expanded bytes of any one file (``expand_max``); also the most a deep
    reference may decompress to."""
    members: int = 200_000
    """Zip entries and gzip members walked, at every depth (``expand_members``)."""
    seconds: float = 600.0
    """Wall time of one expansion, or of one rebuild when reading, or of the
    search for the gzip bytes of a stock DeltaGlider delta (``expand_time``)."""

    def allowance(self, size: int) -> int:
        """Bytes the expanded form of a ``size``-byte file may take, and the
        scratch space its expansion may hold at once."""
        return min(self.max_bytes, max(MIN_ALLOWANCE, int(self.ratio * size)))

    def expanded_cap(self, size: int) -> int:
        """The most the expanded form of a ``size``-byte file may hold when
        read back: its allowance, or the form that expands nothing (what a
        file over a limit gets) when that is larger."""
        return max(self.allowance(size), plain_form_size(size))

    def reference_cap(self, expanded_size: int | None, stored_size: int) -> int:
        """The most a deep reference stored in ``stored_size`` bytes, recording
        ``expanded_size`` (None: nothing usable), may decompress to: what it
        records, and no more than ``max_bytes`` unless it is compressed less
        than ``ratio`` times (the plain form of a large first file is; a bomb
        is not)."""
        cap = max(self.max_bytes, int(self.ratio * stored_size))
        return cap if expanded_size is None else min(expanded_size, cap)


class Budget:
    """What one expansion may still spend (used by the expansion's thread only)."""

    def __init__(self, limits: ExpansionLimits, original_size: int) -> None:
        self.limits = limits
        self.original_size = original_size
        self.max_bytes = limits.allowance(original_size)
        self.held = 0
        """Bytes on scratch now: the expanded form so far and open spools."""
        self.peak = 0
        self.inflated = 0
        self.members = 0
        self.deadline = time.monotonic() + limits.seconds

    def hold(self, size: int) -> None:
        """``size`` more bytes are written to scratch."""
        self.held += size
        self.peak = max(self.peak, self.held)
        if self.held > self.max_bytes:
            raise ExpansionLimit(
                f"its expanded form would pass {self.max_bytes} bytes (expand_ratio="
                f"{self.limits.ratio:g} × its {self.original_size} bytes, at most"
                f" expand_max={self.limits.max_bytes})"
            )
        self.check_time()

    def release(self, size: int) -> None:
        """``size`` bytes written before were removed from scratch."""
        self.held -= size

    def stream(self) -> Callable[[int], None]:
        """An ``on_inflate`` counter for one more deflate stream."""
        produced = 0

        def count(size: int) -> None:
            nonlocal produced
            produced += size
            self.inflated += size
            if produced > self.max_bytes:
                raise ExpansionLimit(
                    f"a stream in it inflates to more than {self.max_bytes} bytes"
                    " (expand_ratio × its size, at most expand_max)"
                )
            self._check_inflated()

        return count

    def _check_inflated(self) -> None:
        if self.inflated > INFLATE_FACTOR * self.max_bytes:
            raise ExpansionLimit(
                f"expanding it inflated more than {INFLATE_FACTOR * self.max_bytes} bytes"
                f" ({INFLATE_FACTOR} × expand_ratio × its size, at most expand_max)"
            )
        self.check_time()

    def charge(self, members: int, inflated: int) -> None:
        """What another thread's search spent for this expansion (a segment
        it made that this expansion takes, ``dgfs.deep.ahead``): counted as
        if spent here, with the same limits."""
        for _ in range(members):
            self.member()
        self.inflated += inflated
        self._check_inflated()

    def member(self) -> None:
        """One more zip entry or gzip member."""
        self.members += 1
        if self.members > self.limits.members:
            raise ExpansionLimit(
                f"it holds more than {self.limits.members} zip entries and gzip members"
                " (expand_members)"
            )
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise ExpansionLimit(f"expanding it took over {self.limits.seconds:g} s (expand_time)")

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())
