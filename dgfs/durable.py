"""Making local changes durable: fsync of a file or a directory named by path."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    """Open ``path`` with ``flags`` (``O_DIRECTORY`` for a directory's entries,
    ``O_NOFOLLOW`` not to follow a symlink) and fsync it."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
