"""A one-line progress bar on stderr, and human-readable sizes.

Plain text, no dependency. The bar draws only when its stream is a
terminal; piped or redirected output stays clean (the final summary is the
caller's business). Call it from one thread (the trio thread).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from dgfs.closing import Closing
from dgfs.printable import printable

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(size: float) -> str:
    """``1536`` -> ``"1.50 KiB"`` (binary units, two decimals; bytes stay whole)."""
    value = float(size)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``; ``3725`` -> ``"1:02:05"``."""
    whole = max(0, int(seconds + 0.5))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress(Closing):
    """Files and bytes done out of a known total, with rate and ETA.

    ``advance`` is cheap: the line is redrawn at most every
    ``min_interval`` seconds. ``note`` prints a message on its own line
    (above the bar) whether or not the bar is shown.
    """

    def __init__(
        self,
        label: str,
        total_files: int,
        total_bytes: int = 0,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        min_interval: float = 0.2,
        width: int = 24,
    ) -> None:
        self.label = label
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.files_done = 0
        self.bytes_done = 0
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.min_interval = min_interval
        self.width = width
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        self.files_done += files
        self.bytes_done += nbytes
        now = time.monotonic()
        if self.enabled and (
            now - self._last_draw >= self.min_interval or self.files_done >= self.total_files
        ):
            self._draw(now)

    def note(self, message: str) -> None:
        """A line above the bar; ``message`` (it names keys) is shown ``printable``."""
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(printable(message) + "\n")
        if self.enabled and self._drawn:
            self._draw(time.monotonic())
        self.stream.flush()

    def line(self) -> str:
        """The bar as text (what is drawn)."""
        elapsed = max(self.elapsed, 1e-6)
        if self.total_bytes:
            fraction = self.bytes_done / self.total_bytes
        else:
            fraction = self.files_done / self.total_files if self.total_files else 1.0
        fraction = min(max(fraction, 0.0), 1.0)
        filled = int(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        parts = [
            f"{self.label} [{bar}] {fraction * 100:5.1f}%",
            f"{self.files_done}/{self.total_files} files",
        ]
        if self.total_bytes:
            parts.append(f"{human_bytes(self.bytes_done)}/{human_bytes(self.total_bytes)}")
        parts.append(f"{human_bytes(self.bytes_done / elapsed)}/s")
        parts.append(f"{self.files_done / elapsed:.1f} files/s")
        if 0 < fraction < 1:
            parts.append(f"ETA {human_duration(elapsed * (1 - fraction) / fraction)}")
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        self._last_draw = now
        self._drawn = True
        self.stream.write("\r\x1b[K" + self.line())
        self.stream.flush()

    def close(self) -> None:
        """Finish the bar's line (no-op when nothing was drawn)."""
        if self.enabled and self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
