"""The read-only extended attributes of the mount.

``user.dgfs.*``: how and where a file is stored. ``dgfs verify PATH``
reads ``bucket``, ``key`` and ``endpoint`` to reach the same object the
mount shows. The mount's root also has ``status_socket``: where ``dgfs
status`` reaches the daemon (dgfs/control.py).

``user.s3.<k>``: an S3 client's own metadata ``k`` on a stored file, as
deltaglider_proxy keeps it (``user-<k>``, ``proxymeta.client_metadata``):
what an S3 client reading the file through the proxy gets as
``x-amz-meta-<k>``. ``ClientMetadata`` takes it from the attribute cache
row of the version the listing showed, else HEADs the file's object.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping

import trio
from cachetools import TTLCache

from dgfs import proxymeta
from dgfs.errors import FsError, NotFound
from dgfs.format import StoredFile
from dgfs.fs.attrcache import AttrCache
from dgfs.fs.entries import NodeKind
from dgfs.fs.nodes import ROOT_INODE, Node
from dgfs.store.base import ObjectStore

PREFIX = "user.dgfs."
CLIENT_PREFIX = "user.s3."
FILE_FIELDS = ("kind", "stored_size", "original_size", "ratio", "sha256", "bucket", "key")
DIR_FIELDS = ("bucket", "key")
STATUS_SOCKET = PREFIX + "status_socket"


def names(node: Node, endpoint: str | None, status_socket: str | None = None) -> list[str]:
    """The attribute names ``node`` has (``endpoint`` only when the store has one,
    ``status_socket`` only on the root of a mount that serves one)."""
    # Storage fields for files only: a symlink or special file is one plain
    # object with nothing of its own to report (getxattr would say ENODATA).
    fields = list(FILE_FIELDS if node.kind is NodeKind.FILE else DIR_FIELDS)
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


def client_names(metadata: Mapping[str, str]) -> list[str]:
    """The ``user.s3.*`` names of a file whose client metadata is ``metadata``
    (``proxymeta.client_metadata``'s result: names already checked)."""
    return [CLIENT_PREFIX + name for name in metadata]


def client_value(metadata: Mapping[str, str], name: str) -> bytes:
    """The value of ``user.s3.<k>``, UTF-8; ``FsError(ENODATA)`` if the file has no ``k``."""
    value = metadata.get(name[len(CLIENT_PREFIX) :])
    if value is None:
        raise FsError(errno.ENODATA)
    return value.encode("utf-8", "replace")


class ClientMetadata:
    """The client metadata of the mount's stored files, HEADed when asked.

    Owns its cache (trio thread only: cachetools is not thread-safe). An
    entry serves the node it was read for while the node still shows the
    same stored object (the same ``StoredFile`` and ETag) and for at most
    ``ttl`` seconds, the mount's listing TTL: another writer's change shows
    as soon as a listing would show it.
    """

    def __init__(
        self, store: ObjectStore, attr_cache: AttrCache, ttl: float, maxsize: int = 4096
    ) -> None:
        self._store = store
        self._attr_cache = attr_cache
        self._cache: TTLCache[int, tuple[StoredFile, str | None, dict[str, str]]] = TTLCache(
            maxsize=maxsize, ttl=max(ttl, 0.001), timer=trio.current_time
        )

    async def of(self, node: Node) -> dict[str, str]:
        """``node``'s client metadata (empty for a directory, a special file,
        a file not in S3 yet, or one whose object is gone since it was listed)."""
        stored = node.stored
        pending = node.staged is not None and not node.staged.is_settled
        if node.kind is not NodeKind.FILE or stored is None or pending:
            return {}
        cached = self._cache.get(node.ino)
        if cached is not None and cached[0] is stored and cached[1] == node.etag:
            return cached[2]
        # The listing that showed this version HEADed it (or read its
        # directory's index) and kept the metadata: no HEAD per file when
        # ``ls -l`` asks every file for its attribute names (coreutils 9.4+).
        row = self._attr_cache.get_by_etag(stored.stored_key, node.etag) if node.etag else None
        if row is not None:
            return proxymeta.client_metadata(row)
        try:
            head = await self._store.head(stored.stored_key)
        except NotFound:
            return {}
        found = proxymeta.client_metadata(head.metadata)
        if node.stored is stored:  # not replaced while the HEAD ran
            self._cache[node.ino] = (stored, node.etag, found)
        return found
