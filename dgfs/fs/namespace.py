"""What S3 says each directory holds.

``Namespace`` turns ``ListObjectsV2`` pages into directory entries with the
attributes ``ls -l`` shows: delta sizes, mtimes and modes need a HEAD per
object, fetched concurrently and kept in the persistent attribute cache by
ETag (a remount does not HEAD unchanged objects again); directories take
their attributes from their ``dir/`` markers. Listings are cached for
``listing_ttl`` and kept in step with this mount's own changes. Paths are
relative to the mount root; ``key_of`` maps them to S3 keys.
"""

from __future__ import annotations

import errno
import logging
import stat
from dataclasses import dataclass

import trio
from cachetools import TTLCache

from dgfs import format as fmt
from dgfs.errors import DgfsError, FsError, NotFound
from dgfs.flight import SingleFlight
from dgfs.format import Kind, StoredFile
from dgfs.fs.attrcache import AttrCache, version_of
from dgfs.fs.nodes import Node, NodeKind
from dgfs.store.base import ObjectHead, ObjectInfo, ObjectStore, head_many

log = logging.getLogger(__name__)


@dataclass
class DirEntry:
    """One name in a directory listing, with the attributes it will show."""

    name: str
    kind: NodeKind
    size: int = 0
    mtime_ns: int = 0
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    stored: StoredFile | None = None
    etag: str | None = None


class Namespace:
    """Directory listings of one mount (trio thread only: cachetools is not thread-safe)."""

    def __init__(
        self,
        store: ObjectStore,
        attr_cache: AttrCache,
        *,
        root_prefix: str,
        listing_ttl: float,
        mounted_at_ns: int,
    ) -> None:
        self.store = store
        self.attr_cache = attr_cache
        self.root_prefix = root_prefix.strip("/")
        self.mounted_at_ns = mounted_at_ns
        self._listings: TTLCache[str, dict[str, DirEntry]] = TTLCache(
            maxsize=4096, ttl=max(listing_ttl, 0.001)
        )
        self._listing_flights = SingleFlight()
        # Local changes noted while a directory's listing is being fetched: the
        # LIST may predate them (a file uploaded meanwhile), so they are laid
        # over its result. name -> entry, or None for a name dropped.
        self._flight_changes: dict[str, dict[str, DirEntry | None]] = {}
        self._dir_meta: dict[str, dict[str, str]] = {}  # marker key -> its metadata

    def key_of(self, path: str) -> str:
        """The user-visible S3 key of a mount path."""
        return fmt.join_key(self.root_prefix, path) if path else self.root_prefix

    def dir_prefix(self, path: str) -> str:
        """The listing prefix of a directory (with trailing slash, or "" at bucket root)."""
        key = self.key_of(path)
        return key + "/" if key else ""

    def path_of(self, key: str) -> str | None:
        """The mount path of a file's S3 key; None when the key is outside the mount."""
        if not self.root_prefix:
            return key
        if not key.startswith(self.root_prefix + "/"):
            return None
        return key[len(self.root_prefix) + 1 :]

    def is_reserved(self, parent_path: str, name: str) -> bool:
        """Keys under .deltaglider/ at the bucket root are DeltaGlider's own, never shown."""
        return parent_path == "" and not self.root_prefix and name == ".deltaglider"

    def check_new_name(self, parent_path: str, name: str) -> None:
        """Refuse a name a new entry of ``parent_path`` may not take (``FsError``)."""
        if not name or "/" in name or name in (".", ".."):
            raise FsError(errno.EINVAL, f"bad name {name!r}")
        if len(name.encode()) > 255:
            raise FsError(errno.ENAMETOOLONG)
        if fmt.is_hidden_name(name) or self.is_reserved(parent_path, name):
            raise FsError(errno.EINVAL, f"{name}: reserved by the DeltaGlider format")

    async def _fetch(self, path: str) -> dict[str, DirEntry]:
        prefix = self.dir_prefix(path)
        page = await self.store.list(prefix, "/")
        entries: dict[str, DirEntry] = {}
        subdirs = [
            sub
            for sub in page.prefixes
            if sub[len(prefix) : -1]
            and "/" not in sub[len(prefix) : -1]
            and not (not prefix and sub == fmt.INTERNAL_PREFIX)
        ]
        markers = await self._marker_metadata(subdirs)
        for sub in subdirs:
            name = sub[len(prefix) : -1]
            meta = markers.get(sub) or {}
            entries[name] = DirEntry(
                name,
                NodeKind.DIR,
                mtime_ns=fmt.parse_mtime_ns(meta) or self.mounted_at_ns,
                mode=fmt.parse_int_meta(meta, fmt.META_MODE),
                uid=fmt.parse_int_meta(meta, fmt.META_UID),
                gid=fmt.parse_int_meta(meta, fmt.META_GID),
            )
        candidates: dict[str, ObjectInfo] = {}
        for obj in page.objects:
            rel = obj.key[len(prefix) :]
            if not rel or "/" in rel:
                continue  # the directory's own marker, or an odd key
            visible = fmt.visible_key(obj.key)
            if visible is None or fmt.is_internal_key(obj.key):
                continue
            name = visible[len(prefix) :]
            if not name or name in entries:
                continue
            other = candidates.get(name)
            if other is None or obj.last_modified > other.last_modified:
                candidates[name] = obj
        heads = await self._heads(list(candidates.values()))
        for name, obj in candidates.items():
            head = heads.get(obj.key)
            if head is None:
                continue  # vanished between LIST and HEAD
            entry = self._entry_from_head(name, head)
            if entry is not None:
                entries[name] = entry
        return entries

    async def _marker_metadata(self, marker_keys: list[str]) -> dict[str, dict[str, str]]:
        """POSIX attributes of directories from their ``dir/`` markers.

        Fetched once per mount and then kept in step with this mount's own
        changes (a directory's attributes changed by another mount show
        after a remount). A directory without a marker gets ``{}``.
        """
        missing = [k for k in marker_keys if k not in self._dir_meta]

        def headed(key: str, head: ObjectHead | None) -> None:
            self._dir_meta[key] = dict(head.metadata) if head is not None else {}

        if missing:
            await head_many(self.store, missing, on_head=headed)
        return {k: self._dir_meta.get(k, {}) for k in marker_keys}

    async def _heads(self, objects: list[ObjectInfo]) -> dict[str, ObjectHead]:
        """HEAD what the attribute cache does not know, concurrently."""
        heads: dict[str, ObjectHead] = {}
        missing: list[str] = []
        for obj in objects:
            meta = self.attr_cache.get(obj.key, version_of(obj.etag, obj.last_modified))
            if meta is None:
                missing.append(obj.key)
            else:
                heads[obj.key] = ObjectHead(obj.key, obj.size, obj.etag, obj.last_modified, meta)

        def headed(key: str, head: ObjectHead | None) -> None:
            if head is not None:
                self.attr_cache.put(key, version_of(head.etag, head.last_modified), head.metadata)

        if missing:
            heads.update(await head_many(self.store, missing, on_head=headed))
        return heads

    def _entry_from_head(self, name: str, head: ObjectHead) -> DirEntry | None:
        try:
            stored = fmt.classify(head.key, head.size, head.metadata)
        except DgfsError as exc:
            log.warning("%s: %s; hiding it", head.key, exc)
            return None
        meta = head.metadata
        raw_mode = fmt.parse_int_meta(meta, fmt.META_MODE)
        kind = NodeKind.FILE
        if raw_mode is not None and stat.S_ISLNK(raw_mode) and stored.kind is Kind.FOREIGN:
            kind = NodeKind.SYMLINK
        mtime_ns = fmt.parse_mtime_ns(meta) or int(head.last_modified.timestamp() * 1e9)
        return DirEntry(
            name,
            kind,
            size=stored.original_size,
            mtime_ns=mtime_ns,
            mode=raw_mode,
            uid=fmt.parse_int_meta(meta, fmt.META_UID),
            gid=fmt.parse_int_meta(meta, fmt.META_GID),
            stored=stored,
            etag=head.etag,
        )

    async def listing(self, path: str, *, fresh: bool = False) -> dict[str, DirEntry]:
        """The directory's entries as S3 has them (cached for ``listing_ttl``)."""
        found: dict[str, DirEntry] | None = None

        def have() -> bool:
            # A fresh request skips the cache, yet takes the result of a
            # fetch it waited for.
            nonlocal found, fresh
            if not fresh:
                found = self._listings.get(path)
            fresh = False
            return found is not None

        async def fetch() -> None:
            nonlocal found
            changes = self._flight_changes[path] = {}
            try:
                entries = await self._fetch(path)
                for name, entry in changes.items():
                    if entry is None:
                        entries.pop(name, None)
                    else:
                        entries[name] = entry
                self._listings[path] = found = entries
            finally:
                del self._flight_changes[path]

        await self._listing_flights.ensure(path, have, fetch)
        assert found is not None
        return found

    def cached(self, path: str) -> dict[str, DirEntry] | None:
        return self._listings.get(path)

    def forget(self, path: str) -> None:
        self._listings.pop(path, None)

    def drop(self, path: str) -> None:
        """Remove ``path`` from its parent's cached listing."""
        parent, _, name = path.rpartition("/")
        listing = self.cached(parent)
        if listing is not None:
            listing.pop(name, None)
        changes = self._flight_changes.get(parent)
        if changes is not None:
            changes[name] = None

    def note(self, parent_path: str, entry: DirEntry) -> None:
        """Put a locally made or changed entry into its parent's cached listing."""
        listing = self.cached(parent_path)
        if listing is not None:
            listing[entry.name] = entry
        changes = self._flight_changes.get(parent_path)
        if changes is not None:
            changes[entry.name] = entry

    def note_node(self, node: Node) -> None:
        """Keep the parent's cached listing in step with a local change to ``node``."""
        if node.path:
            entry = DirEntry(
                node.name,
                node.kind,
                node.size,
                node.mtime_ns,
                node.mode,
                node.uid,
                node.gid,
                node.stored,
            )
            self.note(node.parent_path, entry)

    def set_empty(self, path: str) -> None:
        """A directory just made here is known to be empty."""
        self._listings[path] = {}

    def forget_tree(self, path: str) -> None:
        """Drop cached listings of ``path`` and everything under it."""
        for cached in list(self._listings.keys()):
            if cached == path or cached.startswith(path + "/"):
                self.forget(cached)

    async def metadata_changed(self, key: str) -> None:
        """This mount rewrote the metadata of object ``key``: cache what it holds
        now, as the next listing will find it (the old row may have the same
        version when the change came within the second of the last write)."""
        try:
            head = await self.store.head(key)
        except NotFound:
            return  # removed meanwhile: no row to bring up to date
        self.attr_cache.put(key, version_of(head.etag, head.last_modified), head.metadata)

    async def write_marker(self, path: str, meta: dict[str, str]) -> None:
        """Store a directory's marker with its POSIX attributes."""
        key = self.dir_prefix(path)
        await self.store.put_bytes(key, b"", meta)
        self._dir_meta[key] = meta

    async def persist_attr_cache(self) -> None:
        """Write new attribute-cache rows every few seconds (run in a nursery)."""
        while True:
            await trio.sleep(5)
            await self.flush_attr_cache()

    async def flush_attr_cache(self) -> None:
        rows = self.attr_cache.take_dirty()
        if rows:
            await trio.to_thread.run_sync(self.attr_cache.write, rows)
