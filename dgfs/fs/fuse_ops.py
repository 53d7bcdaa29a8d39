"""The pyfuse3 adapter: converts arguments and results, nothing more.

Every handler delegates to ``FileSystem``; every ``DgfsError`` (and any
unexpected exception, logged once) becomes a ``FUSEError`` here and only
here.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

from dgfs.errors import DgfsError, FsError, errno_of
from dgfs.fs.entries import NodeKind
from dgfs.fs.filesystem import FileSystem
from dgfs.fs.namespace import NAME_MAX
from dgfs.fs.nodes import Node

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

BLOCK = 4096
# st_blksize, the "preferred I/O size": cp, rsync and stdio read and write in
# pieces of it (coreutils: at least 128 KiB). 1 MiB is FUSE's largest request,
# so a cp into or out of the mount costs the daemon 8x fewer round trips.
IO_SIZE = 1 << 20
# OS errors a request causes by itself (os.ftruncate to 2**63 - 1: EFBIG).
_CALLER_ERRNOS = frozenset({errno.EFBIG, errno.EINVAL, errno.ENAMETOOLONG, errno.EOVERFLOW})


def _fuse_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except DgfsError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno_of(exc)) from None
        except OSError as exc:
            # What the caller asked for (a file too large, say) is its own error,
            # not the mount's.
            level = logging.DEBUG if exc.errno in _CALLER_ERRNOS else logging.ERROR
            log.log(level, "%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


class FuseOperations(pyfuse3.Operations):
    """pyfuse3 entry points over a ``FileSystem``."""

    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, fs: FileSystem, *, attr_timeout: float = 1.0) -> None:
        super().__init__()
        self.fs = fs
        self.attr_timeout = attr_timeout

    def _attrs(self, node: Node) -> EntryAttributes:
        entry = EntryAttributes()
        entry.st_ino = node.ino
        entry.generation = 0
        entry.entry_timeout = self.attr_timeout
        entry.attr_timeout = self.attr_timeout
        entry.st_mode = node.kind.type_bits | node.mode
        # A directory's subdirectories are not counted (that would need its
        # listing); an unlinked file still open has no name left.
        entry.st_nlink = 2 if node.kind is NodeKind.DIR else 0 if node.unlinked else 1
        entry.st_uid = node.uid
        entry.st_gid = node.gid
        entry.st_rdev = node.rdev
        entry.st_size = node.size if node.kind is not NodeKind.DIR else BLOCK
        entry.st_blksize = IO_SIZE
        entry.st_blocks = (entry.st_size + 511) // 512
        entry.st_mtime_ns = node.mtime_ns
        entry.st_ctime_ns = node.ctime_ns or node.mtime_ns
        entry.st_atime_ns = node.mtime_ns if node.atime_ns is None else node.atime_ns
        return entry

    @_fuse_errors
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        return self._attrs(await self.fs.lookup(parent_inode, _name(name)))

    @_fuse_errors
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return self._attrs(await self.fs.getattr(inode))

    @_fuse_errors
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        node = await self.fs.setattr(
            inode,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
        )
        return self._attrs(node)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        self.fs.forget(list(inode_list))

    @_fuse_errors
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        self.fs.get_dir(inode)
        return inode

    @_fuse_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        def reply(name: str, node: Node, next_id: int) -> bool:
            return bool(pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), next_id))

        await self.fs.readdir(fh, start_id, reply)

    async def releasedir(self, fh: FileHandleT) -> None:
        return None

    @_fuse_errors
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        node = await self.fs.mkdir(parent_inode, _name(name), mode, ctx.uid, ctx.gid)
        return self._attrs(node)

    @_fuse_errors
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        await self.fs.rmdir(parent_inode, _name(name))

    @_fuse_errors
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        await self.fs.unlink(parent_inode, _name(name))

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        await self.fs.rename(
            parent_inode_old, _name(name_old), parent_inode_new, _name(name_new), flags
        )

    @_fuse_errors
    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        node = await self.fs.symlink(parent_inode, _name(name), target, ctx.uid, ctx.gid)
        return self._attrs(node)

    @_fuse_errors
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        return await self.fs.readlink(inode)

    @_fuse_errors
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        self.fs.link(inode, new_parent_inode, _name(new_name))

    @_fuse_errors
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        node = await self.fs.mknod(parent_inode, _name(name), mode, rdev, ctx.uid, ctx.gid)
        return self._attrs(node)

    @_fuse_errors
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        handle = await self.fs.open(inode, flags)
        return FileInfo(fh=handle.fh, keep_cache=False)

    @_fuse_errors
    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> tuple[FileInfo, EntryAttributes]:
        handle, node = await self.fs.create(
            parent_inode, _name(name), mode, ctx.uid, ctx.gid, flags
        )
        return FileInfo(fh=handle.fh), self._attrs(node)

    @_fuse_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @_fuse_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_fuse_errors
    async def flush(self, fh: FileHandleT) -> None:
        await self.fs.flush(fh)

    @_fuse_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_fuse_errors
    async def release(self, fh: FileHandleT) -> None:
        await self.fs.release(fh)

    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        return None

    @_fuse_errors
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        data = StatvfsData()
        data.f_bsize = BLOCK
        data.f_frsize = BLOCK
        # S3 has no capacity; report 1 PiB free like other S3 filesystems do.
        data.f_blocks = (1 << 50) // BLOCK
        data.f_bfree = data.f_blocks
        data.f_bavail = data.f_blocks
        data.f_files = 1 << 32
        data.f_ffree = data.f_files
        data.f_favail = data.f_files
        data.f_namemax = NAME_MAX
        return data

    @_fuse_errors
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        return await self.fs.getxattr(inode, _name(name))

    @_fuse_errors
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        return [os.fsencode(n) for n in await self.fs.listxattr(inode)]

    @_fuse_errors
    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext
    ) -> None:
        self.fs.setxattr(inode, _name(name), value)

    @_fuse_errors
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        self.fs.removexattr(inode, _name(name))
