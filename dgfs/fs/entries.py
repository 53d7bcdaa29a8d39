"""What a name in a directory is: its kind (``NodeKind``) and what a listing
says of it (``DirEntry``). The bottom of ``dgfs.fs``: it imports nothing
of the package, so nodes, listings and options all build on it."""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass

from dgfs.format import StoredFile


class NodeKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    FIFO = "fifo"
    CHAR_DEVICE = "char device"
    BLOCK_DEVICE = "block device"
    SOCKET = "socket"

    @property
    def type_bits(self) -> int:
        return _TYPE_BITS[self]

    @classmethod
    def of_mode(cls, mode: int) -> NodeKind | None:
        """The kind a full ``st_mode`` names (None for no known file type)."""
        return _KIND_OF_TYPE.get(stat.S_IFMT(mode))

    @property
    def is_special(self) -> bool:
        """A FIFO, device or socket: only a name and attributes, its I/O is the
        kernel's (FUSE never sees an open of one)."""
        return self in (NodeKind.FIFO, NodeKind.CHAR_DEVICE, NodeKind.BLOCK_DEVICE, NodeKind.SOCKET)

    @property
    def is_single_object(self) -> bool:
        """Stored as one plain object written at once (a symlink's body is its
        target, a special file's is empty), never staged or stored as a delta."""
        return self is NodeKind.SYMLINK or self.is_special


_TYPE_BITS = {
    NodeKind.FILE: stat.S_IFREG,
    NodeKind.DIR: stat.S_IFDIR,
    NodeKind.SYMLINK: stat.S_IFLNK,
    NodeKind.FIFO: stat.S_IFIFO,
    NodeKind.CHAR_DEVICE: stat.S_IFCHR,
    NodeKind.BLOCK_DEVICE: stat.S_IFBLK,
    NodeKind.SOCKET: stat.S_IFSOCK,
}
_KIND_OF_TYPE = {bits: kind for kind, bits in _TYPE_BITS.items()}


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
    rdev: int = 0
    atime_ns: int | None = None
