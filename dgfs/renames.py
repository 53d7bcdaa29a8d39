"""Renames, removals and metadata changes of stored files, and directory renames.

``Renamer`` changes where files are stored: a delta keeps its reference
when it stays in its deltaspace and is rebuilt and stored again when it
moves out; a directory rename moves its references with its deltas. It
writes the new name before removing the old, so a file is never lost
between them. It holds no state.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable, Mapping

import trio

from dgfs import format as fmt
from dgfs import gc, proxymeta
from dgfs.errors import (
    DgfsError,
    FormatError,
    FsError,
    KeyTooLong,
    NotFound,
    PreconditionFailed,
    TransientError,
)
from dgfs.format import Kind, StoredFile
from dgfs.forms import Forms
from dgfs.rebuild import Rebuilder
from dgfs.store.base import KEY_MAX, ObjectHead, ObjectInfo
from dgfs.workbench import Workbench
from dgfs.writer import FileWriter

log = logging.getLogger(__name__)


#: Renames and metadata updates raced by another writer's new version
#: (or other form) of the file before giving up.
UPDATE_ATTEMPTS = 3

#: The keys of files whose newer version is closed and not stored yet (it
#: will be, under the name the file has): asked when a directory rename fails.
Pending = Callable[[], frozenset[str]]

#: Called by a rename once the new name holds the file and before the old
#: name goes: what else the new name stood for (a replaced file's journal
#: entry) must stop coming back there after a crash before the file is only
#: under the new name.
Copied = Callable[[], Awaitable[None]]


class Renamer:
    """Delete, rename and re-label stored files; rename directories."""

    def __init__(
        self, bench: Workbench, forms: Forms, writer: FileWriter, rebuilder: Rebuilder
    ) -> None:
        self._store = bench.store
        self._bench = bench
        self._forms = forms
        self._writer = writer
        self._rebuilder = rebuilder

    async def delete(self, key: str) -> None:
        """Remove the file ``key`` in every form; the reference stays (as DeltaGlider does).
        Only the versions read go: one another writer stores meanwhile stays,
        as if stored after the removal."""
        forms = await self._forms.holders(key)
        if not forms:
            raise NotFound(f"no such file: {key}")
        etags = {stored_key: head.etag for stored_key, head in forms.items()}
        kept = await self._store.delete_many(list(forms), etags=etags)
        if kept:
            # As a directory rename's: what was removed still shows.
            log.warning("%s: another writer stored %s meanwhile; it stays", key, ", ".join(kept))
        log.info("deleted %s (%s)", key, ", ".join(sorted(set(forms) - set(kept))))

    async def rename(
        self, src_key: str, dst_key: str, *, copied: Copied | None = None
    ) -> StoredFile:
        """Move one file. A delta keeps its reference when it stays in its
        deltaspace; moved to another directory it is rebuilt and stored there.

        Another mount storing a new version of ``src_key`` meanwhile never
        loses it: the copy is made only while the file is the version read
        (else it is read again), so the new name never gets one version's
        bytes with another's metadata (every read would fail its SHA-256);
        and the old name is removed only while it is still that version, so
        a version stored after the copy stays there, as if stored after the
        rename. ``copied`` runs between the two (see ``Copied``)."""
        if fmt.is_hidden_name(fmt.split_key(dst_key)[1]) or fmt.is_internal_key(dst_key):
            raise FormatError(f"{dst_key}: name is reserved by the DeltaGlider format")
        if src_key == dst_key:
            return await self._forms.locate(src_key)

        async def move(stored: StoredFile, head: ObjectHead) -> None:
            await self._move_version(stored, head, src_key, dst_key)

        stored, head = await self._at_the_version_read(src_key, move)
        if copied is not None:
            await copied()
        try:
            await self._store.delete(stored.stored_key, version=head)
        except PreconditionFailed:
            log.warning(
                "%s: another mount stored a new version while it was renamed to %s; it stays",
                src_key,
                dst_key,
            )
        log.info("renamed %s -> %s", src_key, dst_key)
        return await self._forms.locate(dst_key)

    async def _move_version(
        self, stored: StoredFile, head: ObjectHead, src_key: str, dst_key: str
    ) -> None:
        """The version ``head`` of ``src_key`` under ``dst_key`` too
        (``PreconditionFailed``: ``src_key`` is another version now)."""
        same_space = fmt.split_key(src_key)[0] == fmt.split_key(dst_key)[0]
        # A delta moves as a delta only where ``dst.delta`` is free for it;
        # otherwise it is rebuilt and stored (direct, beside a foreign ``dst.delta``).
        try:
            await self._write_renamed(stored, head, src_key, dst_key, same_space)
        except TransientError:
            # S3 may have done it and lost the reply (the store's own retries
            # spent): with the file under both names, finish the rename
            # rather than report a failure that leaves a second name.
            moved = await self._holding(dst_key, stored.file_sha256)
            if moved is None:
                raise
            log.info("%s: stored as %s though the reply was lost; renaming on", src_key, dst_key)
            # And what the lost reply kept from running: the file the rename
            # replaced goes, in its other form (else it shows again once the
            # new one is renamed or removed).
            own = moved.stored_key
            other = fmt.delta_key(dst_key) if own == dst_key else dst_key
            await self._forms.drop_other_form(dst_key, own, other)

    async def _write_renamed(
        self, stored: StoredFile, head: ObjectHead, src_key: str, dst_key: str, same_space: bool
    ) -> None:
        """``rename``'s first half: the file under ``dst_key`` (a delta keeps
        its reference in its deltaspace, else it is rebuilt and stored)."""
        if stored.kind is Kind.DELTA and (
            not same_space or await self._forms.delta_form_taken(dst_key)
        ):
            async with self._bench.scratch() as plain:
                await self._rebuilder.rebuild(stored, plain)
                # Everything but the format's keys follows the file, as a copy does.
                await self._writer.put(
                    plain,
                    dst_key,
                    extra_metadata=fmt.user_metadata(head.metadata),
                    content_type=proxymeta.content_type_of(head.metadata, head.content_type),
                )
            return
        if stored.kind is Kind.DELTA:
            dst_stored = fmt.delta_key(dst_key)
            other_form = dst_key
        else:
            dst_stored, other_form = dst_key, fmt.delta_key(dst_key)
        meta = None
        if stored.kind in (Kind.DELTA, Kind.DIRECT):
            meta = fmt.with_original_name(head.metadata, fmt.split_key(dst_key)[1])
        await self._store.copy(stored.stored_key, dst_stored, meta, version=head)
        if other_form == dst_key:
            await self._store.delete(other_form)
        else:
            await self._forms.delete_delta_form(dst_key)

    async def _holding(self, key: str, sha256: str | None) -> StoredFile | None:
        """What ``key`` shows, if it is the file with ``sha256`` (None when unknown)."""
        if sha256 is None:
            return None
        try:
            found = await self._forms.locate(key)
        except (NotFound, TransientError):
            return None
        return found if found.file_sha256 == sha256 else None

    async def update_metadata(self, key: str, changes: Mapping[str, str]) -> StoredFile:
        """Merge ``changes`` (POSIX attributes) into the stored object's metadata in place.

        The copy is made only while the object is the version whose metadata
        was read (``version``): another mount's new version must never get
        the old one's ``dg-file-sha256`` (every read of it would fail its
        check). Replaced meanwhile, the object is read again and the changes
        merged into its own metadata."""

        async def relabel(stored: StoredFile, head: ObjectHead) -> None:
            meta = {**head.metadata, **changes}
            await self._store.copy(stored.stored_key, stored.stored_key, meta, version=head)

        return (await self._at_the_version_read(key, relabel))[0]

    async def _at_the_version_read(
        self, key: str, act: Callable[[StoredFile, ObjectHead], Awaitable[None]]
    ) -> tuple[StoredFile, ObjectHead]:
        """Locate the file ``key`` and ``act`` on that version; ``act`` raising
        ``PreconditionFailed`` (another writer stored a new version since the
        read) or ``NotFound`` (it stored the other form, removing this one)
        means read it again. Gone for good: ``NotFound`` from the read."""
        for _ in range(UPDATE_ATTEMPTS):
            stored, head = await self._forms.locate_with_head(key)
            try:
                await act(stored, head)
            except (PreconditionFailed, NotFound):
                continue
            return stored, head
        raise TransientError(
            f"{key}: changed by another writer {UPDATE_ATTEMPTS} times meanwhile; try again"
        )

    async def rename_prefix(
        self, src_prefix: str, dst_prefix: str, *, pending: Pending = lambda: frozenset()
    ) -> int:
        """Move every object under ``src_prefix/`` to ``dst_prefix/`` (a directory rename).

        References move with their deltas and the deltas' ``dg-ref-key`` is
        rewritten, so the moved tree stays readable by DeltaGlider. Sources
        are deleted only after every copy succeeded. Returns objects moved.
        ``pending()``: keys under ``src_prefix/`` whose newer version is not
        stored yet (it follows the name only once the rename returns), whose
        copies never stay behind a rename that fails; asked when it fails.
        """
        src_root, dst_root = src_prefix.rstrip("/") + "/", dst_prefix.rstrip("/") + "/"
        listing = await self._store.list(src_root, delimiter=None)
        for obj in listing.objects:
            if len(dst_root.encode()) + len(obj.key[len(src_root) :].encode()) > KEY_MAX:
                raise KeyTooLong(f"{obj.key} would be longer than S3 holds under {dst_root}")
        made = await self._copy_tree(listing.objects, src_root, dst_root)
        try:
            await self._delete_tree(listing.objects, src_root, dst_root)
        except DgfsError:
            await self._undo_copies(listing.objects, made, src_root, dst_root, pending)
            raise
        log.info("moved %d objects %s -> %s", len(listing.objects), src_root, dst_root)
        return len(listing.objects)

    async def _copy_tree(
        self, objects: list[ObjectInfo], src_root: str, dst_root: str
    ) -> dict[str, str]:
        """Copy ``objects`` from under ``src_root`` to under ``dst_root``, side
        by side; returns each copy's key and ETag. If one copy fails, the
        copies made go and its error is raised, so the rename fails whole
        rather than leaving two trees. A copy that failed may have been made
        all the same (its reply lost): it goes too, but only while it holds
        the source's ETag (another writer may have stored that name
        meanwhile, and what it stored stays; such a copy of a multipart
        object, whose ETag differs, stays too)."""
        copied: dict[str, str] = {}  # new key -> the ETag the copy returned
        maybe: dict[str, str] = {}  # new key -> the source's ETag
        failures: list[DgfsError] = []

        async def move_one(obj: ObjectInfo, limiter: trio.CapacityLimiter) -> None:
            new_key = dst_root + obj.key[len(src_root) :]
            async with limiter:
                try:
                    etag = await self._copy_tree_object(obj.key, new_key, src_root, dst_root)
                except NotFound:
                    return  # removed meanwhile (another mount): nothing to move
                except DgfsError as exc:
                    failures.append(exc)
                    maybe[new_key] = obj.etag
                    return
                except OSError as exc:  # the scratch disk (a marker's bytes)
                    failures.append(FsError(exc.errno or errno.EIO, f"{obj.key}: {exc.strerror}"))
                    return
            copied[new_key] = etag

        limiter = trio.CapacityLimiter(16)
        async with trio.open_nursery() as nursery:
            for obj in objects:
                nursery.start_soon(move_one, obj, limiter)
        if failures:
            with contextlib.suppress(DgfsError):
                await self._store.delete_many(list(copied), etags=copied)
            with contextlib.suppress(DgfsError):
                await self._store.delete_many(list(maybe), etags=maybe)
            raise failures[0]
        return copied

    async def _copy_tree_object(self, key: str, new_key: str, src_root: str, dst_root: str) -> str:
        """Copy one object of a directory rename; returns the copy's ETag."""
        if key.endswith("/"):
            # A directory marker is written anew: SeaweedFS answers
            # NoSuchKey to a CopyObject whose source key ends in "/". Bytes
            # it holds (any size: another tool's) go through a scratch file,
            # never whole in memory.
            async with self._bench.scratch() as body:
                head = await self._store.download(key, body)
                return await self._store.upload(new_key, body, head.metadata)
        meta, version = None, None
        if key.endswith(fmt.DELTA_SUFFIX):
            version = await self._store.head(key)
            ref_key = fmt.meta_value(version.metadata, "ref_key")
            if ref_key and ref_key.startswith(src_root):
                new_ref_key = dst_root + ref_key[len(src_root) :]
                meta = fmt.with_ref_key(version.metadata, new_ref_key)
        # Metadata read from one version lands on no other (a failed copy
        # fails the whole rename, and nothing is deleted).
        try:
            return await self._store.copy(key, new_key, meta, version=version)
        except PreconditionFailed:
            raise TransientError(f"{key}: changed by another writer meanwhile") from None

    async def _undo_copies(
        self,
        objects: list[ObjectInfo],
        made: dict[str, str],
        src_root: str,
        dst_root: str,
        pending: Pending,
    ) -> None:
        """Removing the old names failed. In a directory whose old names all
        still stand, the copies go (while they hold what was copied: the
        ETags ``made`` recorded), so it stands once, under the old name; in
        one where some went, every copy stays, its reference too (a moved
        delta needs it): that directory is moved, or stands twice, but for
        the copies of files whose newer version is pending (it is stored under
        the old name: an older one must not show under the new). Best effort:
        the error that stopped the rename is the one reported."""
        try:
            still = {obj.key for obj in (await self._store.list(src_root, delimiter=None)).objects}
            moved_from = {_directory_of(obj.key) for obj in objects if obj.key not in still}
            newer = pending()
            undo = {
                new_key: made[new_key]
                for obj in objects
                if (
                    _directory_of(obj.key) not in moved_from
                    or obj.key.removesuffix(fmt.DELTA_SUFFIX) in newer
                )
                and (new_key := dst_root + obj.key[len(src_root) :]) in made
            }
            await self._store.delete_many(list(undo), etags=undo)
        except DgfsError as exc:
            log.warning("%s: the copies of a failed rename stay: %s", dst_root, exc)

    async def _delete_tree(self, objects: list[ObjectInfo], src_root: str, dst_root: str) -> None:
        """Delete the versions of ``objects`` listed. One another writer stored
        meanwhile stays under the old name (it was copied, or came after the
        copy), and so does the reference of a delta that stays, or it could
        not be read: references go last, once what stays is known, and one
        a delta stored meanwhile turns out to need is put back from its copy
        (``gc.put_back_if_needed``)."""
        etags = {obj.key: obj.etag for obj in objects if obj.etag}
        keys = [obj.key for obj in objects]
        references = [key for key in keys if fmt.is_reference_key(key)]
        kept = await self._store.delete_many(
            [key for key in keys if not fmt.is_reference_key(key)], etags=etags
        )
        staying = {fmt.split_key(key)[0] for key in kept if key.endswith(fmt.DELTA_SUFFIX)}
        kept += [ref for ref in references if fmt.split_key(ref)[0] in staying]
        removing = [ref for ref in references if fmt.split_key(ref)[0] not in staying]
        # Each reference deleted is checked, even when the delete (or another
        # check) failed: a delta stored meanwhile would otherwise be lost.
        failure: DgfsError | None = None
        try:
            not_removed = await self._store.delete_many(removing, etags=etags)
        except DgfsError as exc:
            failure, not_removed = exc, []
        kept += not_removed
        for ref in removing:
            if ref in not_removed:
                continue
            copy = dst_root + ref[len(src_root) :]
            try:
                if await gc.put_back_if_needed(self._store, ref, copy) is gc.PutBack.PUT_BACK:
                    kept.append(ref)
            except DgfsError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        if kept:
            log.warning(
                "%d objects another writer changed meanwhile stay under %s: %s",
                len(kept),
                src_root,
                kept[:5],
            )

    async def move_plain(self, src_key: str, dst_key: str, *, copied: Copied | None = None) -> None:
        """Rename a symlink or special file (one plain object), over whatever
        file ``dst_key`` names: a delta it replaces goes too, or listings
        would show that (the delta wins a tie of Last-Modified seconds).
        ``copied`` as in ``rename``."""
        await self._store.copy(src_key, dst_key)
        await self._forms.delete_delta_form(dst_key)
        if copied is not None:
            await copied()
        await self._store.delete(src_key)


def _directory_of(key: str) -> str:
    """The directory an object belongs to: a marker's own, a file's parent."""
    return key[:-1] if key.endswith("/") else key.rpartition("/")[0]
