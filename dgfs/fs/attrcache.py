"""Persistent cache of object metadata keyed by (key, version).

An object's version is its ETag and its LastModified second (``version_of``):
the ETag alone does not change when only the metadata does (chmod, utime:
a server-side copy onto itself keeps the content's MD5). A HEAD answer
never changes for a given version of a key, so once seen it can be reused
across remounts: ``ls -l`` of a large directory after a remount costs one
LIST, not one HEAD per file. (A metadata change by another mount within
the second of the object's last write keeps the version: a row read in
that second is asked again after it, see ``AttrCache``.) Stored in SQLite
under the cache directory, one file per journal slot (``for_slot``).
``get``/``put`` work on an in-memory dict (trio thread only); ``flush``
writes new rows and is meant for a worker thread.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dgfs import format as fmt
from dgfs import posixmeta, proxymeta

log = logging.getLogger(__name__)


def version_of(etag: str, last_modified: datetime) -> str:
    """The version of an object a cache row belongs to, the same from LIST and
    HEAD (whole seconds: HEAD's Last-Modified has no finer ones)."""
    return f"{etag}@{int(last_modified.timestamp())}"


#: Part of the cache file's name: a new version starts empty (2: keeps the
#: ``dgfs-`` keys that tell deep objects apart; 3: rows keyed by
#: ``version_of``, and ``rdev`` kept).
# v4: keeps deltaglider_proxy's encryption markers; v5: client metadata; v6: settled
VERSION = "v6"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS heads (
    key TEXT NOT NULL,
    version TEXT NOT NULL,
    metadata TEXT NOT NULL,
    settled INTEGER NOT NULL,
    PRIMARY KEY (key, version)
)
"""


# Only these metadata keys matter to the mount; the rest is not kept.
def _relevant(name: str) -> bool:
    return (
        name.startswith(("dg-", "dg_", "dgfs-"))
        or name in fmt.FORMAT_KEYS
        or name in posixmeta.POSIX_KEYS
    )


def relevant_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The part of an object's user metadata the mount uses: the format's and
    POSIX keys, and an S3 client's own metadata as ``proxymeta.client_metadata``
    reads it (under its limits), which ``user.s3.*`` xattrs show."""
    kept = {k: v for k, v in metadata.items() if _relevant(k)}
    for name, value in proxymeta.client_metadata(metadata).items():
        kept[proxymeta.CLIENT_PREFIX + name] = value
    return kept


@dataclass(frozen=True)
class AttrChanges:
    """What ``AttrCache.write`` persists: keys whose rows go, rows (key,
    version, JSON, settled) to add."""

    forgotten: list[str]
    rows: list[tuple[str, str, str, int]]

    def __bool__(self) -> bool:
        return bool(self.forgotten or self.rows)


def for_slot(cache_dir: Path, slot: str) -> AttrCache:
    """The attribute cache of the mount that holds the journal slot ``slot``
    (whose lock keeps other mounts off its file). Files an earlier dgfs
    kept for that slot in an older format go: nothing reads them again."""
    current = cache_dir / f"attrs-{slot}.{VERSION}.sqlite"
    older = [*cache_dir.glob(f"attrs-{slot}.v*.sqlite*"), *cache_dir.glob(f"attrs-{slot}.sqlite*")]
    for old in older:
        if old.name.startswith(current.name):
            continue  # the current file's -wal, -shm and -journal
        try:
            old.unlink(missing_ok=True)
        except OSError as exc:  # a cache file left behind costs space, not the mount
            log.warning("cannot remove the old attribute cache %s: %s", old, exc)
    return AttrCache(current)


class AttrCache:
    """(key, version) -> user metadata, persisted in ``path`` (SQLite).

    A row is *settled* when it was read after its version's second was over
    (``dgfs.fs.dirindex.settled``): only such rows go into directory indexes,
    and a listing dated after that second asks the object of any other
    again (``Namespace._heads``).
    """

    def __init__(self, path: Path | None, max_entries: int = 1_000_000) -> None:
        self.path = path
        self.max_entries = max_entries
        self._rows: dict[str, dict[str, dict[str, str]]] = {}  # key -> version -> metadata
        self._count = 0
        self._dirty: dict[tuple[str, str], dict[str, str]] = {}
        self._settled: set[tuple[str, str]] = set()  # rows read after their second
        self._forgotten: set[str] = set()  # keys whose persisted rows go at the next write
        self._io_lock = threading.Lock()
        self._failing = False  # the last write failed (logged once, until one succeeds)
        if path is not None:
            self._load()

    def _connect(self) -> sqlite3.Connection:
        assert self.path is not None
        conn = sqlite3.connect(self.path, timeout=5)
        conn.execute(_SCHEMA)
        return conn

    def _load(self) -> None:
        try:
            with self._connect() as conn:
                rows = conn.execute("SELECT key, version, metadata, settled FROM heads")
                for key, version, meta, settled in rows:
                    self._rows.setdefault(key, {})[version] = json.loads(meta)
                    if settled:
                        self._settled.add((key, version))
                    self._count += 1
        except (sqlite3.Error, ValueError) as exc:
            log.warning("attribute cache %s unreadable (%s); starting empty", self.path, exc)
            self._rows.clear()
            self._settled.clear()
            self._count = 0
            if self.path is not None:
                self.path.unlink(missing_ok=True)

    def get(self, key: str, version: str) -> dict[str, str] | None:
        return self._rows.get(key, {}).get(version)

    def settled(self, key: str, version: str) -> bool:
        """Whether the row of that version was read after its second (see the class)."""
        return (key, version) in self._settled

    def get_by_etag(self, key: str, etag: str) -> dict[str, str] | None:
        """The row of the one version of ``key`` with this ETag, if exactly one is known."""
        rows = [m for v, m in self._rows.get(key, {}).items() if v.rpartition("@")[0] == etag]
        return rows[0] if len(rows) == 1 else None

    def knows(self, key: str) -> bool:
        """Whether some version of ``key`` has a row (one a new object under
        it could be taken for, if it has that ETag and second)."""
        return key in self._rows

    def forget(self, key: str) -> None:
        """Drop the rows of every version of ``key``: in memory now, on disk
        at the next ``write`` (a remount must not find them either)."""
        for version in self._rows.get(key, {}):
            self._settled.discard((key, version))
        self._count -= len(self._rows.pop(key, {}))
        for row in [r for r in self._dirty if r[0] == key]:
            del self._dirty[row]
        self._forgotten.add(key)

    def put(self, key: str, version: str, metadata: Mapping[str, str], *, settled: bool) -> None:
        """The metadata of ``key`` at ``version``; ``settled``: read after the
        version's second was over (a row that was replaces one that was not)."""
        kept = relevant_metadata(metadata)
        if self._count >= self.max_entries:
            self._rows.clear()  # crude bound; the store is the truth
            self._settled.clear()
            self._count = 0
        versions = self._rows.setdefault(key, {})
        self._count += version not in versions
        versions[version] = kept
        if settled:
            self._settled.add((key, version))
        else:
            self._settled.discard((key, version))
        self._dirty[(key, version)] = kept

    def take_dirty(self) -> AttrChanges:
        """Changes not yet persisted (call on the trio thread, then ``write``
        them in a worker)."""
        changes = AttrChanges(
            sorted(self._forgotten),
            [
                (k, e, json.dumps(m), int((k, e) in self._settled))
                for (k, e), m in self._dirty.items()
            ],
        )
        self._dirty.clear()
        self._forgotten.clear()
        return changes

    def write(self, changes: AttrChanges) -> bool:
        """Persist ``changes`` (blocking): forgotten keys' rows go, then new rows
        are added. False when that failed (a full disk): the caller gives the
        forgotten keys back (``unwritten``); the rows stay in memory only.
        The first failure is logged as a warning, the next ones quietly,
        until a write succeeds again."""
        if self.path is None or not changes:
            return True
        with self._io_lock:
            try:
                with self._connect() as conn:
                    conn.executemany(
                        "DELETE FROM heads WHERE key = ?", [(k,) for k in changes.forgotten]
                    )
                    conn.executemany(
                        "INSERT OR REPLACE INTO heads VALUES (?, ?, ?, ?)", changes.rows
                    )
            except sqlite3.Error as exc:
                level = logging.DEBUG if self._failing else logging.WARNING
                log.log(level, "could not persist attribute cache %s: %s", self.path, exc)
                self._failing = True
                return False
            if self._failing:
                log.info("attribute cache %s written again", self.path)
                self._failing = False
            return True

    def unwritten(self, changes: AttrChanges) -> None:
        """``changes`` failed to be written (trio thread): its forgotten keys go
        at the next write, so no remount finds their old rows (a new object
        could be taken for one: the same ETag within the second)."""
        self._forgotten.update(changes.forgotten)
