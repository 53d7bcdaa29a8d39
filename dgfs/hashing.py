"""Hashing of local files in chunks (call from a worker thread)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int
    head: bytes  # the first ``head_bytes`` bytes, for content sniffing
    md5: str | None = None  # hex; deltaglider_proxy serves it as the ETag (``dg-md5``)


def digest_file(path: Path, head_bytes: int = 0) -> FileDigest:
    """SHA-256, MD5, size and leading bytes of ``path``, reading it once in chunks."""
    sha = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    head = b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            if len(head) < head_bytes:
                head += chunk[: head_bytes - len(head)]
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return FileDigest(sha.hexdigest(), size, head, md5.hexdigest())
