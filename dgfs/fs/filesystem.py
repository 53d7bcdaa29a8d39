"""The filesystem: POSIX operations over the storage core, without FUSE.

``FileSystem`` answers the kernel's requests in inodes, names and byte
strings, and raises only ``dgfs.errors`` exceptions; the pyfuse3 adapter
in ``fuse_ops`` converts arguments, results and errors, nothing more.
Tests drive this class directly (tests/test_filesystem.py).

It keeps the kernel's view consistent: every reply that hands out a node
counts a lookup (``forget`` gives them back, ``NodeTable`` drops a node
only then), and every refusal of what S3 cannot do (hard links, xattr
writes, ``RENAME_EXCHANGE``) is made here. Which node a name stands for
and what a directory lists come from ``DirectoryView`` (over
``Namespace``'s listings), open files from ``HandleTable``; what is
written goes to a staging file and reaches S3 through the
``UploadPipeline`` (close commits to the journal, fsync waits for the
upload); what unlink, rename, rmdir and chmod change in S3 and the
journal, in a crash-safe order, is ``StoredChanges``'s.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from typing import NoReturn, Unpack

import trio

from dgfs.core import Core
from dgfs.errors import DgfsError, FsError
from dgfs.format import StoredFile
from dgfs.fs import xattrs
from dgfs.fs.attrcache import AttrCache
from dgfs.fs.changes import StoredChanges
from dgfs.fs.dirview import DirectoryView, ReaddirReply
from dgfs.fs.entries import NodeKind
from dgfs.fs.handles import Access, Handle, HandleTable
from dgfs.fs.journal import Journal
from dgfs.fs.namespace import NAME_MAX, Namespace, utf8_length
from dgfs.fs.nodes import AttributeChanges, Node, NodeTable, child_path
from dgfs.fs.options import FsOptions
from dgfs.fs.prefetch import Prefetcher
from dgfs.fs.readers import Reader, StoredContent
from dgfs.fs.uploads import UploadPipeline

log = logging.getLogger(__name__)

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2

__all__ = ["FileSystem", "FsOptions", "ReaddirReply"]  # FsOptions: where callers import it


class FileSystem:
    """POSIX semantics over a ``Core`` rooted at ``root_prefix`` of its bucket."""

    def __init__(
        self,
        core: Core,
        journal: Journal,
        attr_cache: AttrCache,
        options: FsOptions,
        root_prefix: str = "",
    ) -> None:
        self.core = core
        self.store = core.store
        self.options = options
        self.mounted_at_ns = time.time_ns()
        self.nodes = NodeTable(options, self.mounted_at_ns)
        self.ns = Namespace(
            self.store,
            attr_cache,
            root_prefix=root_prefix,
            listing_ttl=options.listing_ttl,
            mounted_at_ns=self.mounted_at_ns,
            write_indexes=not options.read_only,
        )
        self.key_of = self.ns.key_of
        self.dirs = DirectoryView(self.nodes, self.ns)
        self.handles = HandleTable()
        self.disk_limiter = trio.CapacityLimiter(8)
        self.prefetch = Prefetcher(
            core, self.ns, ahead=options.prefetch, cache_budget=core.cache.budget_bytes
        )
        self.content = StoredContent(
            core,
            self.disk_limiter,
            verify_whole_below=options.verify_whole_below,
            background=self.prefetch.rebuild_now,
        )
        self.uploads = UploadPipeline(core, journal, self.ns, self.nodes, options, self.content)
        self.changes = StoredChanges(core, self.ns, self.nodes, self.uploads)
        self.client_metadata = xattrs.ClientMetadata(
            self.store, self.ns.attr_cache, options.listing_ttl
        )
        # Where ``dgfs status`` reaches the daemon (the root's user.dgfs.status_socket).
        self.status_socket: str | None = None

    def _new_node_attributes(self, node: Node, parent: Node, mode: int, uid: int, gid: int) -> None:
        """Mode and owner of a node made here. In a set-group-ID directory a
        new entry takes the directory's group, and a new directory the bit
        too (as Linux filesystems do)."""
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if node.kind is NodeKind.DIR:
                mode |= stat.S_ISGID
        node.mode, node.uid, node.gid = self.options.shown_attributes(node.kind, mode, uid, gid)

    def _check_writable(self, node: Node | None = None) -> None:
        """Refuse a change (EROFS) on a read-only mount, and new content
        (EPERM) for a file whose name the format reserves: another tool's
        ``x.delta`` is shown, but dgfs could never store it."""
        if self.options.read_only:
            raise FsError(errno.EROFS, "mounted read-only")
        if node is not None and self.ns.is_format_name(node.parent_path, node.name):
            raise FsError(errno.EPERM, f"{node.path}: a name the DeltaGlider format reserves")

    # --- nodes and lookups ------------------------------------------------------------

    def get_node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT, f"stale inode {ino}")
        return node

    def get_dir(self, ino: int) -> Node:
        node = self.get_node(ino)
        if node.kind is not NodeKind.DIR:
            raise FsError(errno.ENOTDIR)
        return node

    async def lookup(self, parent_ino: int, name: str) -> Node:
        """The node for ``name`` in a directory, handed to the kernel (one lookup)."""
        length = utf8_length(name)
        if length is None:
            raise FsError(errno.ENOENT)  # no S3 key holds it
        if length > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        return self.nodes.looked_up(await self.dirs.find(self.get_dir(parent_ino), name))

    async def getattr(self, ino: int) -> Node:
        return await self.dirs.refreshed(self.get_node(ino))

    def forget(self, items: list[tuple[int, int]]) -> None:
        """The kernel gives back lookups: a node may go once it holds none."""
        for ino, count in items:
            self.nodes.forget(ino, count)

    # --- directories --------------------------------------------------------------------

    async def readdir(self, ino: int, start: int, reply: ReaddirReply) -> None:
        """Hand the entries of a directory after offset ``start`` to ``reply``
        until it refuses one; each entry taken counts a lookup (offsets:
        ``DirectoryView.readdir``)."""
        await self.dirs.readdir(self.get_dir(ino), start, reply)

    async def mkdir(self, parent_ino: int, name: str, mode: int, uid: int, gid: int) -> Node:
        parent = await self._new_entry_in(parent_ino, name)
        node = self.nodes.new(child_path(parent.path, name), NodeKind.DIR)
        self._new_node_attributes(node, parent, mode, uid, gid)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        try:
            await self.ns.write_marker(node.path, node.posix_metadata())
        except BaseException:
            # Not in S3: a node left behind would show as a directory made here.
            self.nodes.unlink(node)
            raise
        parent.entries_changed(time.time_ns())
        self.nodes.confirmed(node)
        self.ns.note_node(node)
        self.ns.set_empty(node.path)
        return self.nodes.looked_up(node)

    async def _new_entry_in(self, parent_ino: int, name: str) -> Node:
        """The directory a new entry ``name`` goes into, once it may (else ``FsError``)."""
        self._check_writable()
        parent = self.get_dir(parent_ino)
        self.ns.check_new_name(parent.path, name)
        try:
            await self.dirs.find(parent, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return parent
            raise
        raise FsError(errno.EEXIST)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        self._check_writable()
        parent = self.get_dir(parent_ino)
        node = await self.dirs.find(parent, name)
        if node.kind is not NodeKind.DIR:
            raise FsError(errno.ENOTDIR)
        await self.dirs.check_empty(node)
        await self.changes.remove_dir(node)
        parent.entries_changed(time.time_ns())

    # --- files: create / open / read / write -------------------------------------------

    async def create(
        self, parent_ino: int, name: str, mode: int, uid: int, gid: int, flags: int
    ) -> tuple[Handle, Node]:
        """open(O_CREAT): a writable handle on a new or emptied file (one lookup)."""
        self._check_writable()
        parent = self.get_dir(parent_ino)
        self.ns.check_new_name(parent.path, name)
        node = await self.dirs.find_or_none(parent, name)
        if node is not None and flags & os.O_EXCL:
            raise FsError(errno.EEXIST)
        if node is not None and node.kind is NodeKind.DIR:
            raise FsError(errno.EISDIR)
        if node is not None and not flags & os.O_TRUNC:
            # Another writer made the name since the kernel's lookup found
            # none: it is opened as it is (only O_TRUNC empties a file).
            handle = await self.open(node.ino, flags & ~(os.O_CREAT | os.O_EXCL))
            return handle, self.nodes.looked_up(node)
        if node is None:
            node = self.nodes.new(child_path(parent.path, name), NodeKind.FILE)
            self._new_node_attributes(node, parent, mode, uid, gid)
            node.ctime_ns = time.time_ns()
            parent.entries_changed(time.time_ns())
        async with self._changing_unheld(node, copies=False):
            await self.uploads.stage_empty(node)
        node.content_changed(0)
        self.ns.note_node(node)
        return self.handles.open(node, Access.WRITE), self.nodes.looked_up(node)

    async def mknod(
        self, parent_ino: int, name: str, mode: int, rdev: int, uid: int, gid: int
    ) -> Node:
        """A regular file (created empty), FIFO, device or socket (one lookup)."""
        if stat.S_ISREG(mode):
            handle, node = await self.create(
                parent_ino, name, mode, uid, gid, os.O_CREAT | os.O_EXCL
            )
            await self.release(handle.fh)
            return node
        kind = NodeKind.of_mode(mode)
        if kind is None or not kind.is_special:
            raise FsError(errno.EINVAL, f"mknod of file type {stat.S_IFMT(mode):o}")
        return await self._make_single_object(parent_ino, name, kind, mode, uid, gid, rdev=rdev)

    async def open(self, ino: int, flags: int) -> Handle:
        node = self.get_node(ino)
        if node.kind is NodeKind.DIR:
            raise FsError(errno.EISDIR)
        access = Access.of_flags(flags)
        if access is Access.WRITE or flags & os.O_TRUNC:
            self._check_writable(node)
        if flags & os.O_TRUNC and access is Access.WRITE:
            async with self._changing_unheld(node, copies=False):
                await self.uploads.stage_empty(node)
            node.content_changed(0)
        return self.handles.open(node, access)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        node = handle.node
        if node.staged is not None:
            return await node.staged.pread(offset, size, self.disk_limiter)
        if handle.reader is None:
            async with handle.opening:
                if handle.reader is None:
                    handle.reader = await self._open_reader(node)
        return await handle.reader.read(offset, size)

    async def _open_reader(self, node: Node) -> Reader:
        async def open_version(stored: StoredFile, report: bool) -> Reader:
            # Before this file's own rebuild or download, so that the next
            # files' rebuilds start beside it, not after it (a cold directory's
            # first file waits for the reference; a second call for the same
            # file prefetches nothing).
            self.prefetch.opened(node)
            return await self.content.reader(stored, report=report, etag=node.etag)

        return await self.dirs.using_current(node, open_version, self.content.reported)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handles.get(fh)
        if not handle.writable:
            raise FsError(errno.EBADF)
        node = handle.node
        staged = await self.uploads.staging(node)
        written = await staged.pwrite(data, offset, self.disk_limiter)
        self.core.telemetry.wrote(written)
        node.content_changed(max(node.size, offset + written))
        return written

    async def truncate(self, node: Node, size: int, *, mark_times: bool = True) -> None:
        """``mark_times``: False when the caller sets the mtime itself."""
        self._check_writable(node)
        if node.kind is not NodeKind.FILE:
            raise FsError(errno.EISDIR if node.kind is NodeKind.DIR else errno.EINVAL)
        if size == node.size and node.staged is None:
            # No content to store, but ext4 and tmpfs mark the times of every
            # truncate (FUSE may send the size alone): the metadata gets them.
            if mark_times and node.change_attributes(mtime_ns=time.time_ns()):
                await self.changes.store_attributes(node)
            return
        async with self._changing_unheld(node, copies=size > 0):
            staged = await self.uploads.staging(node, keep_content=size > 0)
            await staged.truncate(size, self.disk_limiter)
            node.content_changed(size)
            if node.open_handles == 0:
                await self.uploads.commit(node)

    @contextlib.asynccontextmanager
    async def _changing_unheld(self, node: Node, *, copies: bool) -> AsyncIterator[None]:
        """Around a change of ``node``'s staging file that no open handle keeps
        (truncate by path, the O_TRUNC of open and create before the handle
        exists): an upload starting and landing meanwhile would retire that
        file under the change (EBADF, or the change lost), so none starts
        inside. When the change ``copies`` the current content, an upload in
        flight would retire its source as it lands: it lands first."""
        async with self.uploads.hold():
            if copies and node.open_handles == 0:
                await self.uploads.wait_not_uploading(node)
            yield

    async def flush(self, fh: int) -> None:
        """close(): make what was written durable (journal).

        The upload starts once no handle that may write is left open (at
        release), so a file still being written — a shell redirect whose
        duplicate descriptors close one by one — is not uploaded half done
        (the first file of a directory becomes its reference for good).
        With ``sync_upload`` the last writer's close waits for the upload.
        """
        handle = self.handles.get(fh)
        node = handle.node
        if node.staged is None:
            return
        await self.uploads.commit(node)
        if self.options.sync_upload and node.writers - handle.writable == 0:
            await self.uploads.wait_uploaded(node)

    async def fsync(self, fh: int) -> None:
        """fsync(): return only once the bytes are in S3 (or raise the upload's error)."""
        node = self.handles.get(fh).node
        if node.staged is not None:
            await self.uploads.commit(node)
            await self.uploads.wait_uploaded(node)  # even with writers open: a snapshot

    async def release(self, fh: int) -> None:
        handle = await self.handles.close(fh)
        if handle is None:
            return
        await self.uploads.released(handle.node)
        self.nodes.release(handle.node)

    # --- metadata ----------------------------------------------------------------------

    async def setattr(
        self,
        ino: int,
        *,
        size: int | None = None,
        **changes: Unpack[AttributeChanges],
    ) -> Node:
        """truncate (``size``), chmod, chown, utimens: what is given and not None."""
        node = self.get_node(ino)
        if any(v is not None for v in (size, *changes.values())):
            self._check_writable()
        if size is not None:
            await self.truncate(node, size, mark_times=changes.get("mtime_ns") is None)
        if node.change_attributes(**changes):
            await self.changes.store_attributes(node)
        return node

    # --- unlink / rename / links --------------------------------------------------------

    async def unlink(self, parent_ino: int, name: str) -> None:
        self._check_writable()
        parent = self.get_dir(parent_ino)
        node = await self.dirs.find(parent, name)
        if node.kind is NodeKind.DIR:
            raise FsError(errno.EISDIR)
        # No upload starts meanwhile: keeping a copy for open handles removes
        # the journal entry a queued upload would read.
        async with self.uploads.hold():
            await self.changes.unlink_file(node)
        node.ctime_ns = time.time_ns()  # open handles see the link count change
        parent.entries_changed(time.time_ns())

    async def rename(
        self, old_parent_ino: int, old_name: str, new_parent_ino: int, new_name: str, flags: int
    ) -> None:
        self._check_writable()
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        if flags & ~RENAME_NOREPLACE:
            raise FsError(errno.EINVAL, f"rename flags {flags:#x} are not supported")
        old_parent = self.get_dir(old_parent_ino)
        new_parent = self.get_dir(new_parent_ino)
        self.ns.check_new_name(new_parent.path, new_name)
        node = await self.dirs.find(old_parent, old_name)
        new_path = child_path(new_parent.path, new_name)
        if new_path == node.path:
            return
        if node.kind is NodeKind.DIR and (new_path + "/").startswith(node.path + "/"):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")
        target = await self._rename_target(node, new_parent, new_name, flags)
        async with self.uploads.hold():
            old_path = node.path
            if node.kind is NodeKind.DIR:
                try:
                    await self.changes.move_dir(node, new_path)
                except BaseException:
                    # Failed midway: what S3 holds now is listed anew.
                    self.ns.forget_tree(node.path)
                    self.ns.forget(old_parent.path)
                    self.ns.forget(new_parent.path)
                    if target is not None:  # removed by _rename_target: it comes back
                        with trio.CancelScope(shield=True):
                            await self._put_back_dir(target)
                    raise
            else:
                # Uploads in flight of either file land first, under the names
                # they were started for; then the move sees what S3 holds.
                await self.uploads.wait_not_uploading(node)
                if target is not None:
                    await self.uploads.wait_not_uploading(target)
                await self.changes.move_file(node, new_path, target)
            self.ns.drop(old_path)
            self.nodes.move(node, new_path)
            below = self.nodes.under(new_path) if node.kind is NodeKind.DIR else []
            await self.uploads.versions.names_moved([node, *below])
            self.ns.note_node(node)
        node.ctime_ns = time.time_ns()
        now = time.time_ns()
        old_parent.entries_changed(now)
        new_parent.entries_changed(now)

    async def _put_back_dir(self, removed: Node) -> None:
        """A rename over the empty directory ``removed`` failed: its marker is
        written again, with its attributes (a lookup then finds it), unless
        the rename got as far as a marker there (it failed removing the old
        names: the moved directory stands, and both trees show)."""
        try:
            await self.ns.put_back_marker(removed.path, removed.posix_metadata())
        except DgfsError as exc:
            log.error(
                "%s: removed for a rename that failed; putting it back failed: %s",
                removed.path,
                exc,
            )
        self.ns.forget(removed.parent_path)

    async def _rename_target(
        self, node: Node, new_parent: Node, new_name: str, flags: int
    ) -> Node | None:
        """The file a rename replaces (None if none); an empty directory it
        replaces is removed here, anything it may not replace refused."""
        target = await self.dirs.find_or_none(new_parent, new_name)
        if target is None:
            return None
        if flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        if node.kind is NodeKind.DIR:
            if target.kind is not NodeKind.DIR:
                raise FsError(errno.ENOTDIR)
            await self.dirs.check_empty(target)
            await self.rmdir(new_parent.ino, new_name)
        elif target.kind is NodeKind.DIR:
            raise FsError(errno.EISDIR)
        return target

    async def symlink(self, parent_ino: int, name: str, target: bytes, uid: int, gid: int) -> Node:
        return await self._make_single_object(
            parent_ino, name, NodeKind.SYMLINK, 0o777, uid, gid, body=target
        )

    async def _make_single_object(
        self,
        parent_ino: int,
        name: str,
        kind: NodeKind,
        mode: int,
        uid: int,
        gid: int,
        *,
        body: bytes = b"",
        rdev: int = 0,
    ) -> Node:
        """A symlink or special file, in S3 once this returns (one lookup)."""
        parent = await self._new_entry_in(parent_ino, name)
        node = self.nodes.new(child_path(parent.path, name), kind)
        self._new_node_attributes(node, parent, mode, uid, gid)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        node.size = len(body)
        node.rdev = rdev
        if kind is NodeKind.SYMLINK:
            node.symlink_target = body
        await self.changes.put_single_object(node, body)
        parent.entries_changed(time.time_ns())
        return self.nodes.looked_up(node)

    async def readlink(self, ino: int) -> bytes:
        node = self.get_node(ino)
        if node.kind is not NodeKind.SYMLINK:
            raise FsError(errno.EINVAL)
        if node.symlink_target is None:
            node.symlink_target = await self.core.read_symlink(self.key_of(node.path))
        return node.symlink_target

    def link(self, ino: int, new_parent_ino: int, new_name: str) -> NoReturn:
        raise FsError(errno.EPERM, "hard links are not supported on S3")

    # --- extended attributes ----------------------------------------------------------

    async def listxattr(self, ino: int) -> list[str]:
        node = self.get_node(ino)
        own = xattrs.names(node, self.store.endpoint, self.status_socket)
        return own + xattrs.client_names(await self.client_metadata.of(node))

    async def getxattr(self, ino: int, name: str) -> bytes:
        node = self.get_node(ino)
        if name.startswith(xattrs.CLIENT_PREFIX):
            return xattrs.client_value(await self.client_metadata.of(node), name)
        return xattrs.value(
            node,
            name,
            bucket=self.store.bucket,
            key=self.key_of(node.path),
            endpoint=self.store.endpoint,
            status_socket=self.status_socket,
        )

    def setxattr(self, ino: int, name: str, value: bytes) -> NoReturn:
        raise FsError(errno.ENOTSUP, "extended attributes are read-only")

    def removexattr(self, ino: int, name: str) -> NoReturn:
        raise FsError(errno.ENOTSUP, "extended attributes are read-only")

    # --- the mount's lifetime -------------------------------------------------------------

    async def run_uploads(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Background work (upload workers, attribute-cache writes); run in the
        mount's nursery until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.uploads.run)
            await nursery.start(self.prefetch.run)
            nursery.start_soon(self.ns.persist_attr_cache)
            task_status.started()

    async def recover_journal(self) -> int:
        """Queue uploads of what an earlier mount committed but did not upload."""
        return await self.uploads.recover()

    async def unmounted(self) -> None:
        """The kernel has let go: release the handles it never released.

        FUSE sends RELEASE asynchronously after close(2), and an unmount
        that comes right after a close ends the session before that
        request arrives: the file's close() returned, its content is
        committed, but its writer still counts and keeps the upload from
        being queued. No handle can be used any more, so each is released
        here, before the drain, and its file is uploaded like the rest.
        """
        for fh in self.handles.open_fhs():
            await self.release(fh)

    async def wait_idle(self) -> None:
        """Until every queued upload has finished (at unmount: without delays)."""
        await self.uploads.drain()

    async def close(self) -> None:
        """Release handles and file descriptors (after uploads are done)."""
        for fh in self.handles.open_fhs():
            await self.release(fh)
        self.uploads.close()
        await self.ns.flush_attr_cache(unmounting=True)
