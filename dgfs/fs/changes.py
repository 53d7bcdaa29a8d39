"""What unlink, rename and chmod/chown/utimens do to S3 and the journal.

``FileSystem`` checks what POSIX asks of an operation (errnos, the
kernel's view) and calls ``StoredChanges`` for the rest: which objects
are deleted, copied or moved, which journal entries follow or go, and in
what order. The order is the point: a crash at any step leaves each file
under its old name or its new one with its newest acknowledged content,
never an older version and never neither (tests/test_crash_points.py,
tests/test_fs_model.py). S3 changes first; the journal entries that
S3's change supersedes go last.

Unlink and rename run inside ``UploadPipeline.hold`` (no upload starts
meanwhile) once uploads in flight of the files concerned have landed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging

from dgfs import format as fmt
from dgfs.core import Core
from dgfs.errors import FsError, NotFound
from dgfs.format import StoredFile
from dgfs.fs.entries import NodeKind
from dgfs.fs.namespace import Namespace
from dgfs.fs.nodes import Node, NodeTable
from dgfs.fs.uploads import UploadPipeline
from dgfs.renames import Copied
from dgfs.store.base import KEY_MAX

log = logging.getLogger(__name__)


class StoredChanges:
    """Unlink, rename and attribute changes of one mount, in S3 and in its
    journal (trio thread only)."""

    def __init__(
        self, core: Core, ns: Namespace, nodes: NodeTable, uploads: UploadPipeline
    ) -> None:
        self.core = core
        self.ns = ns
        self.nodes = nodes
        self.uploads = uploads
        self.versions = uploads.versions  # the journal entries that follow names and attributes
        self.key_of = ns.key_of

    async def unlink_file(self, node: Node) -> None:
        """``node`` (not a directory) loses its name: its object and journal entry go."""
        # An upload in flight lands first: finishing after the unlink it would
        # delete whatever a new file of the same name stored meanwhile.
        await self.uploads.wait_not_uploading(node)
        await self.versions.removals_durable()
        key = self.key_of(node.path)
        kept = await self.uploads.keep_for_open_handles(node)
        # S3 first, the journal after: a crash in between brings the file
        # back as it was (its newest version), never an older one. A file
        # with local content may be in S3 though this mount does not know
        # it (an upload whose reply was lost, an entry recovered from the
        # journal over an older version): the DELETE goes out anyway.
        if node.kind.is_single_object:
            await self.core.delete_plain(key)
        else:
            with contextlib.suppress(NotFound):
                await self.core.delete(key)
        await self.uploads.lost_name(node, kept=kept)
        self.ns.drop(node.path)
        self.nodes.unlink(node)

    async def remove_dir(self, node: Node) -> None:
        """rmdir of ``node``, which the mount shows empty. Its reference may be
        left (no deltas left): it goes with the directory, as nothing can use
        it any more. What the mount does not show stays, and so does the
        directory (``FsError(ENOTEMPTY)``)."""
        removable, kept = await self.core.dir_leftovers(self.ns.dir_prefix(node.path))
        if kept:
            log.info("rmdir %s: it holds objects the mount does not show: %s", node.path, kept[:5])
            raise FsError(errno.ENOTEMPTY)
        if not await self.core.remove_leftovers(removable):
            log.info("rmdir %s: another mount stored a file in it meanwhile", node.path)
            self.ns.forget(node.path)
            raise FsError(errno.ENOTEMPTY)
        self.ns.forget(node.path)
        self.ns.drop(node.path)
        self.ns.dir_removed(node.path)
        self.nodes.unlink(node)

    async def put_single_object(self, node: Node, body: bytes) -> None:
        """A new symlink or special file ``node``, in S3 once this returns (on
        failure the node goes again)."""
        try:
            await self.core.put_plain(self.key_of(node.path), body, node.posix_metadata())
        except BaseException:
            self.nodes.unlink(node)
            raise
        self.nodes.confirmed(node)
        self.ns.note_node(node)

    async def store_attributes(self, node: Node) -> None:
        """chmod, chown, utimens changed ``node``: its journal entry, its
        directory marker or its object's metadata (a copy onto itself) gets them."""
        if await self.versions.carries_attributes(node):
            return
        if node.kind is NodeKind.DIR:
            if node.path:
                await self.ns.write_marker(node.path, node.posix_metadata())
                # The parent's cached listing would otherwise give the old
                # attributes back once the kernel's attribute timeout ends.
                self.ns.note_node(node)
            return
        stored = await self.core.update_metadata(self.key_of(node.path), node.posix_metadata())
        await self.ns.metadata_changed(stored.stored_key)
        node.stored_as(stored)
        self.ns.note_node(node)

    async def move_file(self, node: Node, new_path: str, target: Node | None) -> None:
        """Move a file's S3 object or journal entry to ``new_path``, over ``target``.

        Ordered so that a crash at any point leaves the file under its old
        name or its new one, with its newest acknowledged content, never an
        older version under either (tests/test_crash_points.py): what S3
        holds changes first, and the journal entries that supersede it are
        dropped last. A replaced file's entry goes once S3 holds this file
        under the new name and before the old name goes there: a crash
        before would store the replaced file over the only copy.
        """
        await self.versions.removals_durable()
        old_key, new_key = self.key_of(node.path), self.key_of(new_path)
        replaced = target is not None and target is not node
        staged = node.staged
        if replaced and staged is not None and not staged.is_committed:
            # A file not closed yet replaces another: what it holds so far is
            # made durable first (as ext4's auto_da_alloc does), so a crash
            # after the rename shows it under the name, never neither file.
            # From here it moves as any file saved and not uploaded yet.
            await self.uploads.commit(node)
        # The replaced file: a local copy for its open handles is made while
        # its object is still there (not uploading: rename waited).
        kept = replaced and target is not None and await self.uploads.keep_for_open_handles(target)
        target_gone = False

        async def replaced_target_goes() -> None:
            nonlocal target_gone
            if replaced and target is not None and not target_gone:
                target_gone = True
                await self.uploads.lost_name(target, kept=kept)
                await self.versions.removals_durable()

        try:
            await self._move_file(node, old_key, new_key, target, replaced, replaced_target_goes)
        except BaseException:
            if target_gone and target is not None:
                # S3 holds this file under the new name: the replaced node
                # is no more, and what the names hold now is listed again.
                self.ns.drop(target.path)
                self.nodes.unlink(target)
                self.ns.forget(target.parent_path)
                self.ns.forget(node.parent_path)
            raise

    async def _move_file(
        self,
        node: Node,
        old_key: str,
        new_key: str,
        target: Node | None,
        replaced: bool,
        replaced_target_goes: Copied,
    ) -> None:
        """``move_file``'s steps by where the file's newest version is."""
        staged = node.staged
        if staged is not None and staged.needs_upload and not staged.is_failed:
            # Its newest acknowledged version is local, and will be uploaded
            # under the new name; an older one in S3 under the old name goes
            # first (a crash after it recovers the file under the old name),
            # known to this mount or not (see unlink).
            with contextlib.suppress(NotFound):
                await self.core.delete(old_key)
            node.stored_as(None)
            await self.versions.follow_rename(node, new_key)
            if target is not None and replaced and target.stored is not None:
                # Its object would show under the new name until the upload lands.
                with contextlib.suppress(NotFound):
                    await self.core.delete(new_key)
        elif staged is not None and node.stored is None:
            # Not closed yet and nothing in S3: only the name moves, and a
            # version it superseded, still in the journal, with it. That
            # version's upload may have stored it though its reply was lost:
            # the old name goes from S3 (as in unlink).
            if node.superseded:
                with contextlib.suppress(NotFound):
                    await self.core.delete(old_key)
            await self.versions.follow_rename(node, new_key)
        elif node.kind.is_single_object:
            await self.core.move_plain(old_key, new_key, copied=replaced_target_goes)
            await self.ns.metadata_changed(new_key)
        else:
            # What S3 holds is the acknowledged content (any local writes are
            # not closed yet): it moves, and the upload replaces it later.
            stored = await self.core.rename(old_key, new_key, copied=replaced_target_goes)
            node.stored_as(stored)
            # The copy can have the ETag and second of what the name held
            # before (same bytes): the attribute cache's row for that version
            # must be this file's now.
            await self.ns.metadata_changed(stored.stored_key)
            # An open file's uploaded staging file stays in the journal until
            # its last close: a crash must not recover it under the old name.
            await self.versions.follow_rename(node, new_key)
        await replaced_target_goes()

    async def move_dir(self, node: Node, new_path: str) -> None:
        old_prefix = self.key_of(node.path)
        new_prefix = self.key_of(new_path)
        for below in self.nodes.under(node.path):  # (files not uploaded yet too)
            new_key = new_prefix + self.key_of(below.path)[len(old_prefix) :]
            if len(new_key.encode()) + len(fmt.DELTA_SUFFIX) > KEY_MAX:
                raise FsError(errno.ENAMETOOLONG, f"{below.path}: too long under {new_path}")
        # Uploads in flight under the directory finish first, so nothing
        # lands under the old name after the move.
        busy = await self.uploads.wait_subtree(node.path)
        await self.versions.removals_durable()

        def pending() -> frozenset[str]:
            # Closed versions still to be stored, the newest or one a newer
            # version not closed yet replaced; not one stored already (an open
            # handle keeps its staging file), not one not closed (the stored
            # version is the file until then), not one in failed/.
            return frozenset(
                self.key_of(n.path)
                for n in self.nodes.under(node.path)
                if any(
                    version.needs_upload and not version.is_failed
                    for version in (n.staged, *n.superseded)
                    if version is not None
                )
            )

        await self.core.rename_prefix(old_prefix, new_prefix, pending=pending)
        # What the nodes below know of their objects moved too: reading (or
        # rewriting) one by its old key would find nothing there.
        for n in self.nodes.under(node.path):
            if n.stored is not None:  # new objects: the ETags listed for the old ones go
                n.stored_as(_moved(n.stored, old_prefix + "/", new_prefix + "/"))
        for n in busy:
            await self.versions.follow_rename(
                n, new_prefix + self.key_of(n.path)[len(old_prefix) :]
            )
        self.ns.dir_tree_moved(node.path, new_path)
        self.ns.forget_tree(node.path)
        self.ns.forget(node.parent_path)
        self.ns.forget(new_path.rpartition("/")[0])


def _moved(stored: StoredFile, old_root: str, new_root: str) -> StoredFile:
    """``stored`` after ``Core.rename_prefix(old_root, new_root)``: its keys, and
    its reference's when that moved with it, under the new prefix."""

    def move(key: str | None) -> str | None:
        if key is not None and key.startswith(old_root):
            return new_root + key[len(old_root) :]
        return key

    return dataclasses.replace(
        stored,
        stored_key=move(stored.stored_key) or stored.stored_key,
        visible_key=move(stored.visible_key) or stored.visible_key,
        ref_key=move(stored.ref_key),
    )
