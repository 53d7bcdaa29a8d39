"""Inodes: what the kernel knows by number, and the paths they stand for.

Lifetimes follow the kernel: every reply that hands out an inode counts a
lookup, ``forget`` gives them back, and a node's state is dropped only when
the kernel has forgotten it and nothing local (an open handle, an upload
in flight) still needs it.
"""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass, field
from pathlib import Path

import trio

from dgfs.errors import DgfsError
from dgfs.format import StoredFile

ROOT_INODE = 1


class NodeKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"

    @property
    def type_bits(self) -> int:
        return {
            NodeKind.FILE: stat.S_IFREG,
            NodeKind.DIR: stat.S_IFDIR,
            NodeKind.SYMLINK: stat.S_IFLNK,
        }[self]


@dataclass
class Pending:
    """Local content of a file that S3 does not hold yet (or not this version).

    ``generation`` counts writes; ``committed`` is the generation last made
    durable in the journal, ``uploaded`` the one last stored in S3.
    """

    entry_id: str
    staging: Path
    fd: int
    generation: int = 0
    committed: int = -1
    uploaded: int = -1
    uploading: bool = False
    queued: bool = False
    due: float = 0.0  # trio time after which a queued upload may start (close + delay)
    error: DgfsError | None = None
    quarantined: bool = False  # failed for good: moved to the journal's failed/
    changed: trio.Event = field(default_factory=trio.Event)
    hurry: trio.Event = field(default_factory=trio.Event)  # set: upload without delay

    @property
    def writable(self) -> bool:
        """Whether new writes may go into this staging file (not being
        uploaded, not moved to failed/); else the next version gets its own."""
        return not self.uploading and not self.quarantined

    @property
    def dirty(self) -> bool:
        """Written since the last commit."""
        return self.generation > self.committed

    @property
    def settled(self) -> bool:
        """Everything written is in S3."""
        return self.uploaded >= self.generation

    def notify(self) -> None:
        """Wake whoever waits for this file's upload state to change."""
        self.changed.set()
        self.changed = trio.Event()


@dataclass
class Node:
    """One file, directory or symlink of the mount."""

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
    lookups: int = 0
    open_handles: int = 0
    writers: int = 0  # open handles that may write; uploads wait until none is left
    pending: Pending | None = None
    unlinked: bool = False
    checked_at: float = 0.0  # trio.current_time() when attrs were last confirmed
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def parent_path(self) -> str:
        return self.path.rpartition("/")[0]


def child_path(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class NodeTable:
    """inode number <-> node <-> path."""

    def __init__(self) -> None:
        self._by_ino: dict[int, Node] = {}
        self._by_path: dict[str, Node] = {}
        self._next_ino = ROOT_INODE + 1

    def add_root(self, node: Node) -> Node:
        node.ino = ROOT_INODE
        node.lookups = 1  # the kernel never forgets the root
        self._by_ino[ROOT_INODE] = node
        self._by_path[""] = node
        return node

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

    def pending_nodes(self) -> list[Node]:
        return [n for n in self._by_ino.values() if n.pending is not None]

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
        if node.lookups or node.open_handles or node.pending is not None:
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
