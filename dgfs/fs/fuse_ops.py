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
import stat
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from dgfs.errors import DgfsError, FsError, errno_of
from dgfs.fs.filesystem import FileSystem
from dgfs.fs.nodes import Node, NodeKind

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

BLOCK = 4096


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
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


class FuseOperations(pyfuse3.Operations):  # type: ignore[misc]
    """pyfuse3 entry points over a ``FileSystem``."""

    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, fs: FileSystem, *, attr_timeout: float = 1.0) -> None:
        super().__init__()
        self.fs = fs
        self.attr_timeout = attr_timeout

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.ino
        entry.generation = 0
        entry.entry_timeout = self.attr_timeout
        entry.attr_timeout = self.attr_timeout
        entry.st_mode = node.kind.type_bits | node.mode
        entry.st_nlink = 2 if node.kind is NodeKind.DIR else 1
        entry.st_uid = node.uid
        entry.st_gid = node.gid
        entry.st_rdev = 0
        entry.st_size = node.size if node.kind is not NodeKind.DIR else BLOCK
        entry.st_blksize = BLOCK
        entry.st_blocks = (entry.st_size + 511) // 512
        entry.st_mtime_ns = node.mtime_ns
        entry.st_ctime_ns = node.ctime_ns or node.mtime_ns
        entry.st_atime_ns = node.mtime_ns
        return entry

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self._attrs(node)

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self._looked_up(await self.fs.lookup(parent_inode, _name(name)))

    @_fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attrs(await self.fs.getattr(inode))

    @_fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        node = await self.fs.setattr(
            inode,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._attrs(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.fs.forget(list(inode_list))

    @_fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        self.fs.get_dir(inode)
        return inode

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = await self.fs.readdir(fh)
        for index, (name, node) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), index):
                break
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        return None

    @_fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        node = await self.fs.mkdir(parent_inode, _name(name), mode, ctx.uid, ctx.gid)
        return self._looked_up(node)

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent_inode, _name(name))

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent_inode, _name(name))

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.fs.rename(
            parent_inode_old, _name(name_old), parent_inode_new, _name(name_new), flags
        )

    @_fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        node = await self.fs.symlink(parent_inode, _name(name), target, ctx.uid, ctx.gid)
        return self._looked_up(node)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.fs.readlink(inode)

    @_fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        self.fs.link()

    @_fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        if not stat.S_ISREG(mode):
            raise FsError(errno.EPERM, "only regular files, directories and symlinks")
        handle, node = await self.fs.create(
            parent_inode, _name(name), mode, ctx.uid, ctx.gid, os.O_CREAT | os.O_EXCL
        )
        await self.fs.release(handle.fh)
        return self._looked_up(node)

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        handle = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=False)

    @_fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        handle, node = await self.fs.create(
            parent_inode, _name(name), mode, ctx.uid, ctx.gid, flags
        )
        return pyfuse3.FileInfo(fh=handle.fh), self._looked_up(node)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_fuse_errors
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_fuse_errors
    async def statfs(self, ctx: Any) -> Any:
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK
        data.f_frsize = BLOCK
        # S3 has no capacity; report 1 PiB free like other S3 filesystems do.
        data.f_blocks = (1 << 50) // BLOCK
        data.f_bfree = data.f_blocks
        data.f_bavail = data.f_blocks
        data.f_files = 1 << 32
        data.f_ffree = data.f_files
        data.f_favail = data.f_files
        data.f_namemax = 255
        return data

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        try:
            return self.fs.getxattr(inode, _name(name))
        except FsError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        return [n.encode() for n in self.fs.listxattr(inode)]

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise FsError(errno.ENOTSUP, "extended attributes are read-only")

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise FsError(errno.ENOTSUP, "extended attributes are read-only")
