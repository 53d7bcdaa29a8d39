"""Open file handles: what the kernel holds by ``fh`` between open and release.

A handle's access is fixed at open (``Access``). Handles that may write
count as the node's writers, and a file is uploaded only once the last of
them is gone (see ``FileSystem.flush``). Where a read comes from is the
node's business, not the handle's: a file with local content
(``Node.staged``) is read from its staging file by every handle; otherwise
a handle reads the stored object through the ``Reader`` it opens on its
first read and closes at release.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass, field

import trio

from dgfs.errors import FsError
from dgfs.fs.nodes import Node
from dgfs.fs.readers import Reader


class Access(enum.Enum):
    """What a handle was opened for."""

    READ = "read"  # O_RDONLY
    WRITE = "write"  # O_WRONLY or O_RDWR: one of the node's writers

    @classmethod
    def of_flags(cls, flags: int) -> Access:
        return cls.WRITE if (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR) else cls.READ


@dataclass(eq=False)
class Handle:
    """One open file."""

    fh: int
    node: Node
    access: Access
    reader: Reader | None = None  # the stored object's, opened on the first read of it
    # Held while ``reader`` is opened: the kernel sends reads of one handle
    # side by side (read-ahead), and each first read would open its own.
    opening: trio.Lock = field(default_factory=trio.Lock)

    @property
    def writable(self) -> bool:
        return self.access is Access.WRITE


class HandleTable:
    """fh -> handle; keeps each node's count of open handles and writers."""

    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1

    def open(self, node: Node, access: Access) -> Handle:
        handle = Handle(self._next_fh, node, access)
        self._next_fh += 1
        self._handles[handle.fh] = handle
        node.open_handles += 1
        node.writers += handle.writable
        return handle

    def get(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    async def close(self, fh: int) -> Handle | None:
        """Forget ``fh`` and close its reader; None if it was not open."""
        handle = self._handles.pop(fh, None)
        if handle is None:
            return None
        handle.node.open_handles -= 1
        handle.node.writers -= handle.writable
        if handle.reader is not None:
            await handle.reader.close()
        return handle

    def open_fhs(self) -> list[int]:
        return list(self._handles)
