"""The read-only ``user.dgfs.*`` extended attributes: how and where a file is stored.

``dgfs verify PATH`` reads ``bucket``, ``key`` and ``endpoint`` to reach
the same object the mount shows. The mount's root also has
``status_socket``: where ``dgfs status`` reaches the daemon (dgfs/control.py).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

from dgfs.errors import FsError
from dgfs.fs.entries import NodeKind
from dgfs.fs.nodes import ROOT_INODE, Node

PREFIX = "user.dgfs."
FILE_FIELDS = ("kind", "stored_size", "original_size", "ratio", "sha256", "bucket", "key")
DIR_FIELDS = ("bucket", "key")
STATUS_SOCKET = PREFIX + "status_socket"


def names(node: Node, endpoint: str | None, status_socket: str | None = None) -> list[str]:
    """The attribute names ``node`` has (``endpoint`` only when the store has one,
    ``status_socket`` only on the root of a mount that serves one)."""
    fields = list(DIR_FIELDS if node.kind is NodeKind.DIR else FILE_FIELDS)
    if endpoint:
        fields.append("endpoint")
    if status_socket and node.ino == ROOT_INODE:
        fields.append("status_socket")
    return [PREFIX + f for f in fields]


def value(
    node: Node,
    name: str,
    *,
    bucket: str,
    key: str,
    endpoint: str | None,
    status_socket: str | None = None,
) -> bytes:
    """The value of attribute ``name`` of ``node``; ``FsError(ENODATA)`` if it has none.

    Names outside ``user.`` give EOPNOTSUPP, as on a filesystem without
    security labels or ACLs: ``ls -l`` asks every entry for
    ``security.selinux`` until it sees that answer once, then stops asking
    for the whole filesystem (gnulib's per-device cache), which halves the
    requests of a warm ``ls -l``.
    """
    if not name.startswith("user."):
        raise FsError(errno.EOPNOTSUPP)
    if name not in names(node, endpoint, status_socket):
        raise FsError(errno.ENODATA)
    field = name[len(PREFIX) :]
    where = {
        "bucket": bucket,
        "key": key,
        "endpoint": endpoint or "",
        "status_socket": status_socket or "",
    }
    if field in where:
        return where[field].encode()
    return str(_storage(node)[field]).encode()


def _storage(node: Node) -> Mapping[str, object]:
    """What ``node``'s content looks like in S3 (or, while it is local, "pending")."""
    if node.staged is not None and not node.staged.is_settled:
        return {
            "kind": "pending",
            "stored_size": 0,
            "original_size": node.size,
            "ratio": "",
            "sha256": "",
        }
    stored = node.stored
    if stored is None:
        raise FsError(errno.ENODATA)
    return {
        # A deep delta (dgfs's extension) is told apart from a DeltaGlider one.
        "kind": f"deep-{stored.kind.value}" if stored.deep else stored.kind.value,
        "stored_size": stored.stored_size,
        "original_size": stored.original_size,
        "ratio": f"{stored.ratio:.4f}",
        "sha256": stored.file_sha256 or "",
    }
