"""GNU gzip's deflate, through pristine-tar's ``zgz``, for streams zlib cannot reproduce.

GNU gzip shares zlib's match finder but splits blocks by its own rules,
so a large stream it made rarely comes back from zlib: in a botocore
wheel, 102 of the 833 nested ``.json.gz`` members (59% of their bytes)
are GNU gzip ``-6`` output that no zlib setting reproduces. Debian's
``pristine-tar`` package ships ``zgz``, a frozen copy of GNU gzip 1.3.12's
compressor made for exactly this; ``zgz --gnu -N -n`` writes a gzip
member whose deflate body is GNU gzip's at level N (the 10-byte header and
8-byte trailer are ours to drop).

It is optional (``DGFS_ZGZ=`` turns it off, ``DGFS_ZGZ=/path/zgz`` picks
one): without ``zgz`` such streams simply stay compressed, and
an expanded form that needs it cannot be rebuilt here (a clear error, and
never wrong bytes: every rebuild is checked by SHA-256).

It runs by the absolute path found once, with a minimal environment, and
is stopped at its time limit (:mod:`dgfs.children`).
"""

from __future__ import annotations

import select
import subprocess
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from dgfs import children, environment
from dgfs.errors import DecodeLimit, DeltaEngineError

#: The zgz binary: ``DGFS_ZGZ`` names another one, or (empty) none at all.
ZGZ_ENV = "DGFS_ZGZ"
INSTALL_HINT = "install Debian's pristine-tar package (apt install pristine-tar) for zgz"
_HEADER = 10
_TRAILER = 8
_READ = 1 << 20

#: GNU gzip levels tried, most likely first (6 is gzip's default).
LEVELS = (6, 9, 1)


@cache
def zgz_path() -> str | None:
    """Where ``zgz`` is (``$DGFS_ZGZ``, else ``zgz`` on PATH), or None."""
    name = environment.zgz()
    return children.resolve(name) if name else None


def gnu_deflate(level: int, payload: Path, timeout: float | None = None) -> Iterator[bytes]:
    """GNU gzip's raw deflate of the file ``payload`` at ``level``, in pieces.

    Raises ``DeltaEngineError`` if ``zgz`` is missing or fails, and
    ``DecodeLimit`` if it runs longer than ``timeout`` seconds (by default
    the time limit for the payload's size, :func:`dgfs.children.timeout_for`).
    """
    binary = zgz_path()
    if binary is None:
        raise DeltaEngineError(f"this file needs GNU gzip's compressor to rebuild: {INSTALL_HINT}")
    if timeout is None:
        timeout = children.timeout_for(2 * payload.stat().st_size)
    deadline = time.monotonic() + timeout
    with open(payload, "rb") as stdin:
        proc = subprocess.Popen(
            [binary, "--gnu", f"-{level}", "-n", "-q"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=children.child_env(),
            bufsize=0,  # read() returns what the pipe holds: the deadline is checked in between
        )
    assert proc.stdout is not None
    poller = select.poll()
    poller.register(proc.stdout, select.POLLIN)
    finished = False
    try:
        skip = _HEADER
        held = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise DecodeLimit(f"zgz --gnu -{level} stopped after {timeout:.0f} s (time limit)")
            chunk = proc.stdout.read(_READ)
            if not chunk:
                finished = True
                break
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            held += chunk
            if len(held) > _TRAILER:
                yield held[:-_TRAILER]
                held = held[-_TRAILER:]
    finally:
        proc.stdout.close()
        if not finished:  # stopped early (time limit, or the caller saw enough)
            proc.kill()
        code = proc.wait()
    if code != 0 or len(held) != _TRAILER:
        raise DeltaEngineError(f"zgz --gnu -{level} failed (exit {code})")


def gnu_matches(
    level: int, payload: Path, original: Iterator[bytes], timeout: float | None = None
) -> bool:
    """Whether GNU gzip at ``level`` turns ``payload`` into exactly ``original``'s
    bytes within ``timeout`` seconds (as :func:`gnu_deflate`)."""
    pending = b""
    source = iter(original)
    try:
        for piece in gnu_deflate(level, payload, timeout):
            while len(pending) < len(piece):
                more = next(source, None)
                if more is None:
                    return False
                pending += more
            if pending[: len(piece)] != piece:
                return False
            pending = pending[len(piece) :]
    except (DeltaEngineError, DecodeLimit):
        return False
    return not pending and next(source, None) is None
