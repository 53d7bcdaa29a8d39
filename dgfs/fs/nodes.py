"""Inodes: what the kernel knows by number, and the paths they stand for.

Lifetimes follow the kernel: every reply that hands out an inode counts a
lookup, ``forget`` gives them back, and a node's state is dropped only when
the kernel has forgotten it and nothing local (an open handle, an upload
in flight) still needs it.

A node shows the attributes its directory listing gives it, the mount's
defaults filling what S3 does not hold; a file with local content shows
its own until that is in S3.

Who writes a ``Node``'s fields (everyone else only reads them):

================================  ==============================================
field                             written by
================================  ==============================================
ino, path, lookups, unlinked      ``NodeTable`` (new, move, looked_up/forget,
                                  unlink)
size, times, mode, uid, gid,      ``FileSystem``'s POSIX operations, through
rdev, symlink_target              ``content_changed`` and ``change_attributes``;
                                  ``NodeTable.refresh`` from a listing, only
                                  while the node has no local content;
                                  ``NodeTable.recovered`` from a journal entry
                                  at mount (before the kernel knows the node)
stored, etag                      whoever changed what S3 holds under the name,
                                  through ``stored_as``: ``UploadPipeline`` (an
                                  upload landed), ``StoredChanges`` (rename,
                                  chmod), ``NodeTable.refresh`` (a listing)
staged, lock                      ``UploadPipeline``; the ``StagedFile`` owns its
                                  descriptor and phase (dgfs/fs/staging.py)
superseded                        ``JournaledVersions`` (dgfs/fs/versions.py)
open_handles, writers             ``HandleTable`` (open, close)
checked_at                        ``NodeTable`` (``refresh``, ``confirmed``), for
                                  whoever confirmed the attributes with S3: a
                                  listing (``DirectoryView`` for a directory it
                                  does not show), mkdir, a symlink or special
                                  file stored (``StoredChanges``), an upload
                                  settling
dir_cookies                       ``DirectoryView`` (readdir's offsets)
entries_changed_ns                ``entries_changed`` (``FileSystem``: an entry
                                  added or removed), ``change_attributes`` (an
                                  explicit mtime)
================================  ==============================================
"""

from __future__ import annotations

import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict, Unpack

import trio

from dgfs import posixmeta
from dgfs.format import StoredFile
from dgfs.fs.entries import DirEntry, NodeKind

if TYPE_CHECKING:
    from dgfs.fs.options import FsOptions
    from dgfs.fs.staging import StagedFile

ROOT_INODE = 1


class AttributeChanges(TypedDict, total=False):
    """What chmod, chown and utimens set (None: left as it is)."""

    mode: int | None
    uid: int | None
    gid: int | None
    mtime_ns: int | None
    atime_ns: int | None


@dataclass
class Node:
    """One file, directory, symlink or special file of the mount."""

    ino: int
    path: str  # relative to the mount root; "" is the root
    kind: NodeKind
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    mode: int = 0o644  # permission bits only
    uid: int = 0
    gid: int = 0
    stored: StoredFile | None = None
    etag: str | None = None
    symlink_target: bytes | None = None
    rdev: int = 0  # device number of a character or block device
    atime_ns: int | None = None  # set by utimensat and kept; None: shows mtime
    # A directory's mtime from the last entry added or removed here: kept in
    # memory only (storing it would cost a PUT per new file), so a listing
    # that shows the stored, older mtime does not take it back.
    entries_changed_ns: int = 0
    lookups: int = 0
    open_handles: int = 0
    writers: int = 0  # open handles that may write; uploads wait until none is left
    staged: StagedFile | None = None  # local content not (all) in S3; the upload pipeline's
    # Older versions whose upload was in flight (or still to come) when
    # ``staged`` replaced them, in the journal as the file's acknowledged
    # content until ``staged`` is committed, or their flight ends after
    # that (see JournaledVersions.supersede).
    superseded: list[StagedFile] = field(default_factory=list)
    unlinked: bool = False
    checked_at: float | None = None  # trio.current_time() when attrs were last confirmed
    lock: trio.Lock = field(default_factory=trio.Lock)
    # A directory's readdir offsets (DirectoryView.readdir's): name -> a cookie
    # that stays the name's while it is listed, new names getting higher
    # ones, so a listing resumed after entries came or went skips and
    # repeats none (pyfuse3.readdir_reply's rule).
    dir_cookies: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def parent_path(self) -> str:
        return self.path.rpartition("/")[0]

    def entries_changed(self, now: int) -> None:
        """An entry of this directory was added, removed or renamed at ``now``:
        its mtime and ctime change (in memory; see ``entries_changed_ns``)."""
        self.mtime_ns = self.ctime_ns = self.entries_changed_ns = now

    def content_changed(self, size: int) -> None:
        """A write, truncate or O_TRUNC left the file ``size`` bytes long."""
        self.size = size
        self.mtime_ns = self.ctime_ns = time.time_ns()

    def change_attributes(self, **changes: Unpack[AttributeChanges]) -> bool:
        """chmod, chown, utimens: set what is given; True (and a new ctime) if
        anything changed."""
        mode, uid, gid = changes.get("mode"), changes.get("uid"), changes.get("gid")
        mtime_ns, atime_ns = changes.get("mtime_ns"), changes.get("atime_ns")
        changed = False
        if mode is not None and stat.S_IMODE(mode) != self.mode:
            self.mode = stat.S_IMODE(mode)
            changed = True
        if uid is not None and uid != self.uid:
            self.uid = uid
            changed = True
        if gid is not None and gid != self.gid:
            self.gid = gid
            changed = True
        if mtime_ns is not None and mtime_ns != self.mtime_ns:
            self.mtime_ns = mtime_ns
            self.entries_changed_ns = 0  # set explicitly: the stored one holds now
            changed = True
        if atime_ns is not None and atime_ns != self.atime_ns:
            self.atime_ns = atime_ns
            changed = True
        if changed:
            self.ctime_ns = time.time_ns()
        return changed

    def stored_as(self, stored: StoredFile | None) -> None:
        """S3 now holds ``stored`` under the node's name (None: nothing known);
        the ETag a listing showed for the old object no longer applies."""
        self.stored = stored
        self.etag = None

    def posix_metadata(self) -> dict[str, str]:
        """The attributes S3 lacks, as the user metadata that carries them."""
        is_device = self.kind in (NodeKind.CHAR_DEVICE, NodeKind.BLOCK_DEVICE)
        return posixmeta.posix_metadata(
            mtime_ns=self.mtime_ns,
            mode=self.kind.type_bits | self.mode,
            uid=self.uid,
            gid=self.gid,
            rdev=self.rdev if is_device else None,
            atime_ns=self.atime_ns,
        )


def child_path(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class NodeTable:
    """inode number <-> node <-> path, and the attributes nodes show."""

    def __init__(self, options: FsOptions, mounted_at_ns: int) -> None:
        self.options = options
        self.mounted_at_ns = mounted_at_ns
        root = Node(ino=ROOT_INODE, path="", kind=NodeKind.DIR)
        root.lookups = 1  # the kernel never forgets the root
        root.mode, root.uid, root.gid = options.shown_attributes(root.kind, None, None, None)
        root.mtime_ns = root.ctime_ns = mounted_at_ns
        self._by_ino: dict[int, Node] = {ROOT_INODE: root}
        self._by_path: dict[str, Node] = {"": root}
        self._next_ino = ROOT_INODE + 1

    def from_entry(self, parent_path: str, entry: DirEntry) -> Node:
        """The node for a listed entry (a new one if the kind changed), its
        attributes taken from the listing unless it has local content."""
        path = child_path(parent_path, entry.name)
        node = self._by_path.get(path)
        if node is not None and node.kind is not entry.kind and node.staged is None:
            self.unlink(node)
            node = None
        if node is None:
            node = self.new(path, entry.kind)
            node.ctime_ns = entry.mtime_ns
        if node.staged is None:
            self.refresh(node, entry)
        return node

    def refresh(self, node: Node, entry: DirEntry) -> None:
        """Take ``node``'s attributes from its listing entry; they are fresh now."""
        if node.kind is not NodeKind.DIR:
            if entry.etag != node.etag:
                node.symlink_target = None
            node.size = entry.size
            node.stored = entry.stored
            node.etag = entry.etag
            node.rdev = entry.rdev
        node.mtime_ns = entry.mtime_ns
        node.atime_ns = entry.atime_ns
        if node.entries_changed_ns:
            node.mtime_ns = max(node.mtime_ns, node.entries_changed_ns)
        node.mode, node.uid, node.gid = self.options.shown_attributes(
            node.kind, entry.mode, entry.uid, entry.gid
        )
        self.confirmed(node)

    def confirmed(self, node: Node) -> None:
        """``node``'s attributes are what S3 holds now (a listing showed them,
        or this mount just stored them): fresh for ``listing_ttl``."""
        node.checked_at = trio.current_time()

    def recovered(self, path: str, size: int, metadata: Mapping[str, str]) -> Node:
        """A file an earlier mount committed to its journal, ``size`` bytes
        long, with the attributes its journal entry's ``metadata`` carries."""
        node = self.new(path, NodeKind.FILE)
        node.size = size
        node.mtime_ns = node.ctime_ns = posixmeta.parse_mtime_ns(metadata, default=time.time_ns())
        node.atime_ns = posixmeta.parse_mtime_ns(metadata, posixmeta.META_ATIME)
        node.mode, node.uid, node.gid = self.options.shown_attributes(
            node.kind,
            posixmeta.parse_int_meta(metadata, posixmeta.META_MODE),
            posixmeta.parse_int_meta(metadata, posixmeta.META_UID),
            posixmeta.parse_int_meta(metadata, posixmeta.META_GID),
        )
        return node

    def is_fresh(self, node: Node) -> bool:
        """Whether ``node``'s attributes were confirmed within ``listing_ttl``."""
        checked = node.checked_at
        return checked is not None and trio.current_time() - checked < self.options.listing_ttl

    def new(self, path: str, kind: NodeKind) -> Node:
        """A node for ``path``, replacing whatever held that path before."""
        node = Node(ino=self._next_ino, path=path, kind=kind)
        self._next_ino += 1
        self._by_ino[node.ino] = node
        old = self._by_path.get(path)
        if old is not None:
            self._detach(old)
        self._by_path[path] = node
        return node

    def get(self, ino: int) -> Node | None:
        return self._by_ino.get(ino)

    def by_path(self, path: str) -> Node | None:
        return self._by_path.get(path)

    def under(self, path: str) -> list[Node]:
        """The nodes below the directory ``path`` (not itself) that hold a name."""
        prefix = path + "/" if path else ""
        return [n for p, n in self._by_path.items() if p.startswith(prefix) and p != path]

    def staged_nodes(self) -> list[Node]:
        """Nodes with local content (see ``dgfs.fs.uploads``)."""
        return [n for n in self._by_ino.values() if n.staged is not None]

    def local_children(self, path: str) -> dict[str, Node]:
        """Entries of the directory ``path`` that exist locally but maybe not yet in S3."""
        children: dict[str, Node] = {}
        prefix = path + "/" if path else ""
        for node in self.staged_nodes():
            if node.unlinked or not node.path.startswith(prefix):
                continue
            first, sep, _ = node.path[len(prefix) :].partition("/")
            if not sep:
                children[first] = node
            elif first not in children:
                # A local file deeper down implies the directory exists.
                dir_node = self._by_path.get(child_path(path, first))
                if dir_node is not None:
                    children[first] = dir_node
        return children

    def looked_up(self, node: Node) -> Node:
        """Count one lookup: a reply that hands the kernel ``node`` (see ``forget``)."""
        node.lookups += 1
        return node

    def _detach(self, node: Node) -> None:
        """The node no longer stands for its path (unlinked or replaced)."""
        if self._by_path.get(node.path) is node:
            del self._by_path[node.path]
        node.unlinked = True
        self._maybe_drop(node)

    def unlink(self, node: Node) -> None:
        self._detach(node)

    def move(self, node: Node, new_path: str) -> None:
        """Rename ``node`` (and, for a directory, everything under it)."""
        old_path = node.path
        victim = self._by_path.get(new_path)
        if victim is not None and victim is not node:
            self._detach(victim)
        moved = [node]
        if node.kind is NodeKind.DIR:
            prefix = old_path + "/" if old_path else ""
            moved += [n for p, n in self._by_path.items() if p.startswith(prefix) and n is not node]
        for n in moved:
            if self._by_path.get(n.path) is n:
                del self._by_path[n.path]
        for n in moved:
            n.path = new_path + n.path[len(old_path) :]
            self._by_path[n.path] = n

    def forget(self, ino: int, count: int) -> None:
        node = self._by_ino.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups or node.open_handles or node.staged is not None or node.superseded:
            return
        if node.ino == ROOT_INODE:
            return
        self._by_ino.pop(node.ino, None)
        if self._by_path.get(node.path) is node:
            del self._by_path[node.path]

    def release(self, node: Node) -> None:
        """Re-check whether ``node`` may go now (handle closed, upload done)."""
        self._maybe_drop(node)

    def __len__(self) -> int:
        return len(self._by_ino)
