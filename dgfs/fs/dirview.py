"""What a directory shows: S3's listing merged with this mount's own nodes.

``DirectoryView`` answers what the POSIX operations ask of names, from
``Namespace``'s listings and the ``NodeTable``: which node a name in a
directory stands for (``find``: a node with local content, or one whose
attributes are fresh, wins over the listing), whether a node still holds
its attributes (``refreshed``), whether a directory is empty
(``check_empty``), and what ``readdir`` hands the kernel, with offsets
that stay a name's while it is listed.

It also says which version of a file to use once the one this mount
knew is gone or changed (``using_current``): reads and a first write's
copy of the file go by that one rule.

It is the only writer of ``Node.dir_cookies`` (readdir's offsets). It
counts a lookup only for an entry ``readdir`` hands over; every other
lookup is counted by its caller. It holds no state of its own: ``FileSystem``
(dgfs/fs/filesystem.py) and the upload pipeline each hold one (trio thread only).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dgfs.errors import FormatError, FsError, IntegrityError, NotFound
from dgfs.format import StoredFile
from dgfs.fs.entries import DirEntry, NodeKind
from dgfs.fs.namespace import Namespace
from dgfs.fs.nodes import ROOT_INODE, Node, NodeTable, child_path

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# (name, node, next offset) -> whether the kernel took the entry (pyfuse3.readdir_reply)
ReaddirReply = Callable[[str, Node, int], bool]
# Uses a stored version of a file; ``report``: an object found broken is EIO, logged.
UseVersion = Callable[[StoredFile, bool], Awaitable[_T]]
# What an object found broken becomes (EIO, logged once: StoredContent.reported).
Broken = Callable[[StoredFile, IntegrityError | FormatError], FsError]


class DirectoryView:
    """Names and listings of one mount's directories, as the kernel sees them."""

    def __init__(self, nodes: NodeTable, ns: Namespace) -> None:
        self.nodes = nodes
        self.ns = ns

    async def using_current(self, node: Node, use: UseVersion[_T], broken: Broken) -> _T:
        """``use`` the version of ``node`` this mount knows; if S3 holds
        another now, the one a fresh listing shows, which the node then shows.
        Another mount replaced the file in its other form (``NotFound``) or
        in the same form (bytes that fail what this mount knew of it): the
        new version is used, never EIO. Only an object the listing still
        shows unchanged is broken: ``broken`` says so. Gone (another writer
        removed the file this handle has open): ``EIO``, as read(2) and write(2)
        report a file whose bytes are lost, never ``ENOENT``."""
        known = node.stored
        listing = None
        if known is not None:
            try:
                return await use(known, False)
            except NotFound:
                pass  # replaced in its other form, or removed
            except (IntegrityError, FormatError) as exc:
                listing = await self.ns.listing(node.parent_path, fresh=True)
                found = listing.get(node.name)
                if found is not None and found.stored == known and found.etag == node.etag:
                    raise broken(known, exc) from None
            log.info("%s changed in S3 under this mount; using it anew", node.path)
        if listing is None:
            listing = await self.ns.listing(node.parent_path, fresh=True)
        entry = listing.get(node.name)
        if entry is None or entry.stored is None:
            raise _removed(node)
        self.nodes.refresh(node, entry)
        try:
            return await use(entry.stored, True)
        except NotFound:
            raise _removed(node) from None

    async def _node_at(self, path: str) -> Node:
        """The node of the directory ``path``, looked up from the root."""
        node = self.nodes.get(ROOT_INODE)
        assert node is not None  # the kernel never forgets the root: it is never dropped
        for name in path.split("/") if path else []:
            node = await self.find(node, name)
        return node

    async def find(self, parent: Node, name: str) -> Node:
        """The node for ``name`` in ``parent``, or ``FsError(ENOENT)``; counts nothing."""
        if name == ".":
            return parent
        if name == "..":
            if not parent.path:
                return parent  # the root's parent is the root
            # Its parent may have been forgotten (NFS export reconnects a
            # directory this way): found again from the root down.
            return self.nodes.by_path(parent.parent_path) or await self._node_at(parent.parent_path)
        node = self.nodes.by_path(child_path(parent.path, name))
        if node is not None and (node.staged is not None or self.nodes.is_fresh(node)):
            return node
        if self.ns.is_reserved(parent.path, name):
            raise FsError(errno.ENOENT)
        local = self.nodes.local_children(parent.path).get(name)
        if local is not None:
            return local
        entry = (await self.ns.listing(parent.path)).get(name)
        if entry is None:
            if node is not None and node.kind is NodeKind.DIR and node.checked_at is None:
                return node  # made here, S3 shows it only once something is inside
            raise FsError(errno.ENOENT)
        return self.nodes.from_entry(parent.path, entry)

    async def find_or_none(self, parent: Node, name: str) -> Node | None:
        with contextlib.suppress(FsError):
            return await self.find(parent, name)
        return None

    async def refreshed(self, node: Node) -> Node:
        """``node``, its attributes taken from a listing once they are no longer
        fresh; ``FsError(ENOENT)`` if another writer removed it or replaced it
        by another kind (and no handle has it open)."""
        if node.ino == ROOT_INODE or node.staged is not None or node.unlinked:
            return node
        if self.nodes.is_fresh(node):
            return node
        entry = (await self.ns.listing(node.parent_path)).get(node.name)
        if entry is not None and entry.kind is node.kind:
            self.nodes.refresh(node, entry)
        elif node.kind is NodeKind.DIR and (entry is None or self.nodes.local_children(node.path)):
            # Not listed: an empty directory made here, or one this mount's
            # files not uploaded yet imply (they take it back from a file of
            # its name that another mount stored meanwhile: S3 lists the directory).
            self.nodes.confirmed(node)
        elif node.open_handles == 0:
            # Removed or replaced by another kind: the next lookup finds what S3 holds.
            raise FsError(errno.ENOENT, "removed or replaced by another writer")
        return node

    async def check_empty(self, node: Node) -> None:
        """``FsError(ENOTEMPTY)`` unless the directory ``node`` holds nothing,
        here or in S3 (asked afresh)."""
        if self.nodes.local_children(node.path):
            raise FsError(errno.ENOTEMPTY)
        if await self.ns.listing(node.path, fresh=True):
            raise FsError(errno.ENOTEMPTY)

    async def readdir(self, node: Node, start: int, reply: ReaddirReply) -> None:
        """Hand the entries of the directory ``node`` after offset ``start`` to
        ``reply`` until it refuses one; each entry taken counts a lookup.

        Offsets are cookies that stay a name's while it is listed (the first
        listing hands them out in name order, later names get higher ones),
        so a listing resumed after entries came or went (``rm -r`` unlinks
        between calls) skips and repeats none. Nodes are made only for the
        entries the kernel takes."""
        listing = await self.ns.listing(node.path)
        entries: dict[str, Node | DirEntry] = {}
        for name, entry in listing.items():
            existing = self.nodes.by_path(child_path(node.path, name))
            has_local = existing is not None and existing.staged is not None
            entries[name] = existing if has_local and existing else entry
        entries.update(self.nodes.local_children(node.path))
        cookies = node.dir_cookies
        for gone in [name for name in cookies if name not in entries]:
            del cookies[gone]
        last = max(cookies.values(), default=0)
        for name in sorted(n for n in entries if n not in cookies):
            last += 1
            cookies[name] = last
        for cookie, name in sorted((cookies[n], n) for n in entries):
            if cookie <= start:
                continue
            item = entries[name]
            child = item if isinstance(item, Node) else self.nodes.from_entry(node.path, item)
            if not reply(name, child, cookie):
                self.nodes.release(child)  # not handed to the kernel: it may go
                break
            self.nodes.looked_up(child)


def _removed(node: Node) -> FsError:
    """A file another writer removed since this handle opened it: its bytes are
    lost to the handle (EIO, as read(2) and write(2) report it, never ENOENT)."""
    return FsError(errno.EIO, f"{node.path}: removed by another writer since it was opened")
