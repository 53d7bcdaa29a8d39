"""What one search for a file's gzip settings may spend, and the ``Budget`` that counts it.

Bodies compressed (``MAX_BODIES``), headers hashed per body
(``MAX_HEADERS``), bytes hashed in all (:func:`hash_budget`, from
``HASH_RATIO`` and ``HASH_FLOOR``) and wall time (the mount's
``expand_time``). The size and SHA-256 the search aims at come from
metadata whoever writes the bucket chose, so every one of these bounds a
hostile object. Tests patch ``HASH_FLOOR`` here, where it is read.
"""

from __future__ import annotations

import time

from dgfs.errors import DecodeLimit

#: Deflate bodies computed (each a full compression) before giving up.
MAX_BODIES = 4
#: Header candidates hashed per body of the right length before giving up.
MAX_HEADERS = 2000
#: Bytes one search may hash in all, per byte of the file (its recorded size)...
HASH_RATIO = 64
#: ...and at least this many (~9 s of SHA-256 here): a file up to 8 MiB
#: keeps its MAX_HEADERS candidates per body, so DeltaGlider's own gzip
#: deltas of such files are found as before. A hostile one costs at most
#: this (or expand_time), one recovery at a time (``Workbench.search``).
HASH_FLOOR = 16 << 30

#: Bytes read (or compressed) at a time.
CHUNK = 1 << 20


def hash_budget(size: int) -> int:
    """Bytes one search for a ``size``-byte file may hash in all."""
    return max(HASH_FLOOR, HASH_RATIO * size)


class Budget:
    """What one search may still spend: wall time, and bytes hashed.

    Both are checked before the work they count (a hash, the next piece of
    a compression); past either, ``DecodeLimit`` names the limit.
    """

    def __init__(self, seconds: float, max_hashed: int) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.max_hashed = max_hashed
        self.hashed = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise DecodeLimit(
                f"searching its gzip settings took over {self.seconds:g} s (expand_time)"
            )

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def charge_hash(self, size: int) -> None:
        """Count one SHA-256 of ``size`` bytes, before it is computed."""
        self.check_time()
        if self.hashed + size > self.max_hashed:
            raise DecodeLimit(
                f"searching its gzip settings would hash more than {self.max_hashed} bytes,"
                f" the limit for this object ({HASH_RATIO} × its dg-file-size,"
                f" at least {HASH_FLOOR >> 20} MiB)"
            )
        self.hashed += size
