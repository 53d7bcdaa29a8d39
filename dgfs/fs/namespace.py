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

import contextlib
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import trio
from cachetools import TTLCache

from dgfs import format as fmt
from dgfs import posixmeta
from dgfs.background import contained
from dgfs.errors import (
    AccessDenied,
    CredentialsUnavailable,
    DgfsError,
    FsError,
    NotFound,
    PreconditionFailed,
    StoreError,
)
from dgfs.flight import SingleFlight
from dgfs.format import Kind
from dgfs.fs import dirindex
from dgfs.fs.attrcache import AttrCache, relevant_metadata, version_of
from dgfs.fs.entries import DirEntry, NodeKind
from dgfs.fs.nodes import Node
from dgfs.fs.upload_failures import refused_for_good
from dgfs.store.base import KEY_MAX, ObjectHead, ObjectInfo, ObjectStore, head_many

log = logging.getLogger(__name__)

#: A listing that must HEAD at least this many objects reads the directory's
#: index first (and, if still that many are unknown, writes a new one). One
#: GET costs what one HEAD does (by hand, 100 of each with boto3 on
#: SeaweedFS: ~0.9 ms of CPU, which the GIL serialises across concurrent
#: HEADs; a 404 as much): from 4 objects on, an index found saves 3 or more requests, one
#: missing costs 1 (until a mount that may write writes one: not on -o ro,
#: nor while no row is settled, ``dirindex.settled``).
INDEX_MIN_MISSES = 4
#: Seconds without an upload into a directory after which a mount that stored
#: at least INDEX_MIN_MISSES files there lists it, so the directory index gets
#: written by the writer, not by the first fresh mount that lists it.
INDEX_AFTER_QUIET = 5.0
NAME_MAX = 255  # bytes in one name, as statfs reports


def utf8_length(name: str) -> int | None:
    """The bytes of ``name`` in UTF-8, as an S3 key holds it; None for a name
    that has no UTF-8 form (bytes that are not UTF-8, as FUSE hands them
    over through ``os.fsdecode``: lone surrogates), which no key can hold."""
    try:
        return len(name.encode())
    except UnicodeEncodeError:
        return None


def _newer(head: ObjectHead, other: ObjectHead) -> bool:
    """Of two forms of one file, whether ``head`` is the one shown (``fmt.form_rank``)."""
    return fmt.form_rank(head.key, head.last_modified, head.metadata) > fmt.form_rank(
        other.key, other.last_modified, other.metadata
    )


@dataclass(frozen=True)
class _Marker:
    """What this mount knows of a directory's ``dir/`` marker."""

    metadata: dict[str, str]  # {} when the directory has no marker
    has_bytes: bool = False  # another tool's marker with a body, kept by write_marker


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
        write_indexes: bool = True,
    ) -> None:
        self.store = store
        self.write_indexes = write_indexes  # see dgfs.fs.dirindex
        self._indexes_due: dict[str, dirindex.Rows] = {}  # dir prefix -> rows to store
        # dir path -> (files this mount stored there since it last listed it for
        # its index, trio time of the last one)
        self._stored_into: dict[str, tuple[int, float]] = {}
        self.attr_cache = attr_cache
        self.root_prefix = root_prefix.strip("/")
        self.mounted_at_ns = mounted_at_ns
        # On trio's clock, like the nodes' freshness (``NodeTable.is_fresh``).
        self._listings: TTLCache[str, dict[str, DirEntry]] = TTLCache(
            maxsize=4096, ttl=max(listing_ttl, 0.001), timer=trio.current_time
        )
        self._listing_flights = SingleFlight()
        # Local changes noted while a directory's listing is being fetched: the
        # LIST may predate them (a file uploaded meanwhile), so they are laid
        # over its result. name -> entry, or None for a name dropped.
        self._flight_changes: dict[str, dict[str, DirEntry | None]] = {}
        # Directories whose listing was forgotten or replaced (``forget``,
        # ``set_empty``) while a fetch of it was in flight: that fetch may
        # describe the directory as it was before (renamed away, removed and
        # made anew), so its result goes to its callers but is not cached.
        self._flight_stale: set[str] = set()
        # marker key -> what is known of it; moved and dropped with the directory
        # (``dir_tree_moved``, ``dir_removed``), so nothing outlives its key.
        self._markers: dict[str, _Marker] = {}
        # Keys whose HEAD S3 refused for good (logged once each; ``_refused_head``).
        self._refused_heads: set[str] = set()

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
        """Keys under .deltaglider/ (and deltaglider_proxy's _dgp/) at the bucket
        root are the format's own, never shown."""
        return parent_path == "" and not self.root_prefix and name in fmt.RESERVED_ROOT_NAMES

    def check_new_name(self, parent_path: str, name: str) -> None:
        """Refuse a name a new entry of ``parent_path`` may not take (``FsError``)."""
        if not name or "/" in name or name in (".", ".."):
            raise FsError(errno.EINVAL, f"bad name {name!r}")
        if "\n" in name or "\r" in name:
            # S3 (AWS, moto) refuses a key holding a line break: its upload
            # could never succeed.
            raise FsError(errno.EINVAL, f"{name!r}: S3 keys cannot hold a line break")
        length = utf8_length(name)
        if length is None:  # as ZFS with utf8only=on refuses one
            raise FsError(errno.EILSEQ, f"{name!r}: not UTF-8, as S3 keys must be")
        if length > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        # S3 keys hold at most 1,024 bytes; the longest form of an entry is a
        # directory's marker ("/") or a delta (".delta").
        key = self.key_of(f"{parent_path}/{name}" if parent_path else name)
        if len(key.encode()) + len(fmt.DELTA_SUFFIX) > KEY_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if self.is_format_name(parent_path, name):
            raise FsError(errno.EINVAL, f"{name}: reserved by the DeltaGlider format")

    def is_format_name(self, parent_path: str, name: str) -> bool:
        """Whether dgfs may never store a file of this name (``x.delta``, the
        root's ``.deltaglider``): one another tool stored there is shown, read
        only."""
        return fmt.is_hidden_name(name) or self.is_reserved(parent_path, name)

    async def _fetch(self, path: str) -> dict[str, DirEntry]:
        prefix = self.dir_prefix(path)
        page = await self.store.list(prefix, "/")
        entries: dict[str, DirEntry] = {}
        subdirs = [
            sub
            for sub in page.prefixes
            if self.shows(path, sub[len(prefix) : -1]) and "/" not in sub[len(prefix) : -1]
        ]
        markers = await self._marker_metadata(subdirs)
        for sub in subdirs:
            name = sub[len(prefix) : -1]
            meta = markers.get(sub) or {}
            entries[name] = DirEntry(
                name,
                NodeKind.DIR,
                mtime_ns=posixmeta.parse_mtime_ns(meta, default=self.mounted_at_ns),
                atime_ns=posixmeta.parse_mtime_ns(meta, posixmeta.META_ATIME),
                mode=posixmeta.parse_int_meta(meta, posixmeta.META_MODE),
                uid=posixmeta.parse_int_meta(meta, posixmeta.META_UID),
                gid=posixmeta.parse_int_meta(meta, posixmeta.META_GID),
            )
        candidates = [
            obj
            for obj in page.objects
            if obj.key[len(prefix) :]
            and "/" not in obj.key[len(prefix) :]  # not the directory's own marker
            and fmt.visible_key(obj.key) is not None
        ]
        heads = await self._heads(prefix, candidates, page.observed_at)
        files: dict[str, ObjectHead] = {}
        for head in heads.values():
            # Which name an object shows under is known only from its metadata:
            # a ``.delta`` that is no usable delta shows under its own name.
            name = fmt.classify_shown(head.key, head.size, head.metadata).visible_key
            name = name[len(prefix) :]
            if not self.shows(path, name) or name in entries:
                continue  # a directory of that name wins; the object stays untouched
            other = files.get(name)
            # Both forms of one file (a writer died before removing the old one): the newer.
            if other is None or _newer(head, other):
                files[name] = head
        for name, head in files.items():
            entries[name] = self._entry_from_head(name, head)
        return entries

    def shows(self, parent_path: str, name: str) -> bool:
        """Whether an S3 name can be an entry of ``parent_path``.

        Not: the empty name (``a//b``, a leading ``/``), ``.`` and ``..``,
        names longer than NAME_MAX (255 bytes) or holding NUL, and
        ``.deltaglider`` and ``_dgp`` at the bucket root. Objects under such names stay
        in the bucket untouched (a directory holding them is not empty).
        """
        return (
            name not in ("", ".", "..")
            and "\0" not in name
            and len(name.encode()) <= NAME_MAX
            and not self.is_reserved(parent_path, name)
        )

    async def _marker_metadata(self, marker_keys: list[str]) -> dict[str, dict[str, str]]:
        """POSIX attributes of directories from their ``dir/`` markers.

        Fetched once per mount and then kept in step with this mount's own
        changes (a directory's attributes changed by another mount show
        after a remount). A directory without a marker gets ``{}``.
        """
        missing = [k for k in marker_keys if k not in self._markers]

        def headed(key: str, head: ObjectHead | None) -> None:
            self._refused_heads.discard(key)
            if head is None:
                self._markers[key] = _Marker({})
            else:
                self._markers[key] = _Marker(dict(head.metadata), has_bytes=head.size > 0)

        if missing:
            # A marker whose HEAD is refused: its directory shows the defaults
            # (nothing is kept: the next listing asks again).
            await self._head_many(missing, headed)
        return {k: self._markers[k].metadata if k in self._markers else {} for k in marker_keys}

    async def _head_many(
        self, keys: list[str], headed: Callable[[str, ObjectHead | None], None]
    ) -> dict[str, ObjectHead]:
        """``head_many`` for a listing: a HEAD that S3 refuses for good (a bucket
        policy denying GetObject on one key, an SSE-C object answering 400
        without its key) is logged once and left out of the result, so one such
        object never fails a listing; any other failure (throttling, 5xx,
        network, credentials not to be had) fails it, once every HEAD is done."""
        failures: list[DgfsError] = []

        def failed(key: str, exc: DgfsError) -> None:
            # The same test as an upload's: S3 refused the request itself.
            if not refused_for_good(exc, direct=False):
                failures.append(exc)
            elif key not in self._refused_heads:
                self._refused_heads.add(key)
                log.warning("%s: HEAD refused (%s); shown from its listing alone", key, exc)

        heads = await head_many(self.store, keys, on_head=headed, on_error=failed)
        if failures:
            raise failures[0]
        return heads

    async def _heads(
        self, prefix: str, objects: list[ObjectInfo], listed_at: datetime | None
    ) -> dict[str, ObjectHead]:
        """Metadata of a directory's ``objects``: from the attribute cache, else
        the directory's index, else a HEAD each (concurrently).

        A cached row read within its version's second is asked again once
        the listing (answered at ``listed_at``) shows that second is over:
        a chmod or utime by another mount in that second kept the version,
        and only a read after it tells (``dirindex.settled``). Such rows
        are HEADed, once each, and do not count towards reading or writing
        the index (a directory that takes new files now and then would
        otherwise rewrite a large index at every listing)."""
        heads: dict[str, ObjectHead] = {}
        missing: list[ObjectInfo] = []
        recheck: list[ObjectInfo] = []
        for obj in objects:
            version = version_of(obj.etag, obj.last_modified)
            meta = self.attr_cache.get(obj.key, version)
            if meta is None:
                missing.append(obj)
            elif not self.attr_cache.settled(obj.key, version) and dirindex.settled(
                obj.last_modified, listed_at
            ):
                recheck.append(obj)
            else:
                heads[obj.key] = ObjectHead(obj.key, obj.size, obj.etag, obj.last_modified, meta)
        if len(missing) < INDEX_MIN_MISSES:
            return heads | await self._head_each([*recheck, *missing], listed_at)
        indexed = await self._read_index(prefix)
        unknown: list[ObjectInfo] = []
        for obj in missing:
            version = version_of(obj.etag, obj.last_modified)
            row = indexed.get(obj.key)
            if row is not None and row[0] == version:
                self.attr_cache.put(obj.key, version, row[1], settled=True)  # as all in an index
                heads[obj.key] = ObjectHead(obj.key, obj.size, obj.etag, obj.last_modified, row[1])
            else:
                unknown.append(obj)
        heads |= await self._head_each([*recheck, *unknown], listed_at)
        # (Objects whose HEAD is refused stay unknown: they call for no index.)
        headed = [o for o in unknown if o.key not in self._refused_heads]
        if self.write_indexes and len(headed) >= INDEX_MIN_MISSES:
            # Missing or stale for many: the next fresh mount gets a full one,
            # of the rows no same-second change can have made stale (none of
            # those: an index would only replace one that may hold some).
            versions = {key: version_of(h.etag, h.last_modified) for key, h in heads.items()}
            rows = {
                key: (versions[key], dict(head.metadata))
                for key, head in heads.items()
                if self.attr_cache.settled(key, versions[key])
            }
            if rows:
                self._indexes_due[prefix] = rows
        return heads

    async def _head_each(
        self, objects: list[ObjectInfo], listed_at: datetime | None
    ) -> dict[str, ObjectHead]:
        """A HEAD of each object, asked after the listing answered at ``listed_at``.

        An object whose HEAD S3 refuses for good shows what the LIST says of
        it, with no metadata: a foreign file of its size and LastModified,
        with the default attributes (nothing is cached: the next listing
        asks again)."""

        def headed(key: str, head: ObjectHead | None) -> None:
            self._refused_heads.discard(key)
            if head is not None:
                self._keep(head, asked_after=listed_at)

        if not objects:
            return {}
        heads = await self._head_many([o.key for o in objects], headed)
        for obj in objects:
            if obj.key in self._refused_heads and obj.key not in heads:
                heads[obj.key] = ObjectHead(obj.key, obj.size, obj.etag, obj.last_modified, {})
        return heads

    async def _read_index(self, prefix: str) -> dirindex.Rows:
        """The rows of the directory's index; {} when it has none or it is unusable."""
        key = dirindex.index_key(prefix)
        try:
            # One byte more than an index may hold: a larger one is refused, not cut.
            body = await self.store.get_range(key, 0, dirindex.MAX_BYTES + 1)
            return await trio.to_thread.run_sync(dirindex.decode, prefix, body)
        except NotFound:
            return {}
        except (ValueError, StoreError) as exc:
            log.warning("%s: directory index not used (%s)", key, exc)
            return {}

    async def write_due_indexes(self) -> None:
        """Store the directory indexes that listings found missing or stale
        (each a job of its own: one that fails is logged, the others go on)."""
        while self._indexes_due and self.write_indexes:
            prefix, rows = self._indexes_due.popitem()
            key = dirindex.index_key(prefix)
            if len(rows) > dirindex.MAX_ENTRIES:
                continue  # readers would refuse it: such a directory is HEADed
            with contained(f"writing the directory index {key}", logger=log):
                relevant = {k: (v, relevant_metadata(m)) for k, (v, m) in rows.items()}
                body = await trio.to_thread.run_sync(dirindex.encode, prefix, relevant)
                try:
                    await self.store.put_bytes(key, body, {})
                except CredentialsUnavailable as exc:  # for a moment: tried next time
                    log.warning("%s: directory index not written (%s)", key, exc)
                except AccessDenied as exc:
                    log.warning(
                        "%s: cannot write directory indexes (%s); not trying again", key, exc
                    )
                    self.write_indexes = False
                except StoreError as exc:
                    log.warning("%s: directory index not written (%s)", key, exc)

    def _entry_from_head(self, name: str, head: ObjectHead) -> DirEntry:
        stored = fmt.classify_shown(head.key, head.size, head.metadata)
        meta = head.metadata
        raw_mode = posixmeta.parse_int_meta(meta, posixmeta.META_MODE)
        kind = NodeKind.FILE
        if raw_mode is not None and stored.kind is Kind.FOREIGN:
            # A plain object is a symlink, FIFO, device or socket when its
            # mode says so (s3fs's convention); a directory type on an object
            # is nonsense and the object stays a file.
            typed = NodeKind.of_mode(raw_mode)
            if typed is not None and typed.is_single_object:
                kind = typed
        mtime_ns = posixmeta.parse_mtime_ns(meta, default=int(head.last_modified.timestamp() * 1e9))
        return DirEntry(
            name,
            kind,
            size=stored.original_size,
            mtime_ns=mtime_ns,
            mode=raw_mode,
            uid=posixmeta.parse_int_meta(meta, posixmeta.META_UID),
            gid=posixmeta.parse_int_meta(meta, posixmeta.META_GID),
            stored=stored,
            etag=head.etag,
            rdev=posixmeta.parse_int_meta(meta, posixmeta.META_RDEV) or 0,
            atime_ns=posixmeta.parse_mtime_ns(meta, posixmeta.META_ATIME),
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
                found = entries
                if path not in self._flight_stale:
                    self._listings[path] = entries
                else:  # renamed or removed meanwhile: its index would describe what is gone
                    self._indexes_due.pop(self.dir_prefix(path), None)
            finally:
                del self._flight_changes[path]
                self._flight_stale.discard(path)

        await self._listing_flights.ensure(path, have, fetch)
        assert found is not None
        return found

    def cached(self, path: str) -> dict[str, DirEntry] | None:
        return self._listings.get(path)

    def forget(self, path: str) -> None:
        """Drop the cached listing of ``path``, and keep a fetch of it in
        flight from caching what it finds (it may predate the change)."""
        self._listings.pop(path, None)
        if path in self._flight_changes:
            self._flight_stale.add(path)

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
                rdev=node.rdev,
                atime_ns=node.atime_ns,
            )
            self.note(node.parent_path, entry)

    def set_empty(self, path: str) -> None:
        """A directory just made here is known to be empty."""
        self.forget(path)
        self._listings[path] = {}

    def forget_tree(self, path: str) -> None:
        """Drop cached listings of ``path`` and everything under it."""
        for cached in list(self._listings.keys()) + list(self._flight_changes):
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
        self._keep(head)

    def _keep(self, head: ObjectHead, *, asked_after: datetime | None = None) -> None:
        """A HEAD's answer into the attribute cache; ``asked_after``: a time by
        the store's clock before the HEAD was sent, for a store whose HEAD
        answers carry no ``Date``."""
        observed_at = head.observed_at or asked_after
        self.attr_cache.put(
            head.key,
            version_of(head.etag, head.last_modified),
            head.metadata,
            settled=dirindex.settled(head.last_modified, observed_at),
        )

    async def overwritten(self, key: str) -> None:
        """This mount stored a new object under ``key``. If the attribute cache
        has a row for an earlier one, the new one may match its version (the
        same bytes within the second): its row is fetched now. (A new key
        costs nothing: the next listing HEADs it, as any new object.)"""
        if not self.attr_cache.knows(key):
            return
        try:
            await self.metadata_changed(key)
        except DgfsError as exc:
            self.attr_cache.forget(key)
            log.info("attributes of %s not fetched after its upload (%s)", key, exc)

    def dir_removed(self, path: str) -> None:
        """The directory ``path`` is gone: its marker's attributes with it (a
        new directory of that name must not show them)."""
        self._markers.pop(self.dir_prefix(path), None)
        self._indexes_due.pop(self.dir_prefix(path), None)  # nothing to describe any more

    def dir_tree_moved(self, old_path: str, new_path: str) -> None:
        """A directory rename: the markers under ``old_path`` now stand under
        ``new_path``, and whatever was known under ``new_path`` is gone."""
        old, new = self.dir_prefix(old_path), self.dir_prefix(new_path)
        for key in [k for k in self._markers if k.startswith(new)]:
            del self._markers[key]
        for key in [k for k in self._markers if k.startswith(old)]:
            self._markers[new + key[len(old) :]] = self._markers.pop(key)
        # Indexes found due describe the keys of before: the next listings
        # find them due again, under the new names.
        for prefix in [p for p in self._indexes_due if p.startswith((old, new))]:
            del self._indexes_due[prefix]
        # Files stored there move too: the directories are listed for their
        # index under the new names (``list_written_dirs``).
        for path in [p for p in self._stored_into if _within(p, new_path)]:
            del self._stored_into[path]
        for path in [p for p in self._stored_into if _within(p, old_path)]:
            self._stored_into[new_path + path[len(old_path) :]] = self._stored_into.pop(path)

    async def write_marker(self, path: str, meta: dict[str, str]) -> None:
        """Store a directory's marker with its POSIX attributes."""
        key = self.dir_prefix(path)
        known = self._markers.get(key)
        # A marker whose HEAD S3 refused may hold bytes this mount cannot see:
        # only a copy onto itself keeps them (one S3 refuses too fails, EACCES).
        if key in self._refused_heads or (known is not None and known.has_bytes):
            # A marker another tool gave bytes: keep them, change the metadata only.
            try:
                await self.store.copy(key, key, meta)
            except NotFound:  # removed meanwhile (another mount): nothing left to keep
                pass
            else:
                self._markers[key] = _Marker(meta, has_bytes=True)
                return
        await self.store.put_bytes(key, b"", meta)
        self._markers[key] = _Marker(meta)

    async def put_back_marker(self, path: str, meta: dict[str, str]) -> None:
        """Store an empty marker for ``path`` only where none stands now
        (If-None-Match; a HEAD first where the store has no conditional PUT)."""
        key = self.dir_prefix(path)
        with contextlib.suppress(NotFound):
            await self.store.head(key)
            return
        with contextlib.suppress(PreconditionFailed):
            await self.store.put_bytes(key, b"", meta, if_none_match=True)
            self._markers[key] = _Marker(meta)

    async def persist_attr_cache(self) -> None:
        """Write new attribute-cache rows and due directory indexes every few
        seconds (run in a nursery; a round that fails is logged, the next
        one comes)."""
        while True:
            await trio.sleep(5)
            await self.flush_attr_cache()

    async def flush_attr_cache(self, *, unmounting: bool = False) -> None:
        """One round of ``persist_attr_cache``; raises nothing but cancellation."""
        await self.list_written_dirs(quiet_for=0.0 if unmounting else INDEX_AFTER_QUIET)
        with contained("writing the attribute cache", logger=log):
            # Rows that fail to be written stay in memory only: a remount HEADs them again.
            changes = self.attr_cache.take_dirty()
            if changes and not await trio.to_thread.run_sync(self.attr_cache.write, changes):
                self.attr_cache.unwritten(changes)
        await self.write_due_indexes()

    def stored_into(self, path: str) -> None:
        """This mount stored a file in directory ``path`` (see ``list_written_dirs``)."""
        if self.write_indexes:
            count, _ = self._stored_into.get(path, (0, 0.0))
            self._stored_into[path] = (count + 1, trio.current_time())

    async def list_written_dirs(self, quiet_for: float) -> None:
        """List the directories this mount stored many files in, once no upload
        came for ``quiet_for`` seconds: their new objects are HEADed now, in
        the background, and their index written (``_heads``), so the first
        fresh mount that lists them reads one index instead of a HEAD per file."""
        now = trio.current_time()
        for path, (count, last) in list(self._stored_into.items()):
            if count < INDEX_MIN_MISSES:
                continue
            if now - last < quiet_for:
                continue
            del self._stored_into[path]
            # Gone, or S3 down: a later reader pays (and sees why).
            with contained(f"listing {path!r} for its index", quiet=(DgfsError,), logger=log):
                await self.listing(path, fresh=True)


def _within(path: str, directory: str) -> bool:
    """Whether ``path`` is the directory ``directory`` or below it."""
    return path == directory or path.startswith(directory + "/")
