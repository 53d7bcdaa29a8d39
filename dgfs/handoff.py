"""The privileged half of a sandboxed mount: open /dev/fuse, mount it, hand it over.

systemd's sandboxing (``ProtectSystem=``, ``PrivateTmp=``, ...) runs a
service in a mount namespace of its own, where a mount it makes stays
invisible to the host, and ``NoNewPrivileges=`` stops the setuid
``fusermount3`` that libfuse would ask to mount. So the mount is made
before the sandbox exists, by root, in the host's namespace: the unit's
``ExecStartPre=+`` step (``dgfs mount --handoff USER``:
:func:`dgfs.mount.hand_over`, :func:`open_and_mount`) opens /dev/fuse, mounts it
on the mount point for the daemon's user and gives the descriptor to
systemd's descriptor store; systemd passes it to the sandboxed daemon
(``LISTEN_FDS``), which serves it through libfuse's ``/dev/fd/N`` mount
point (libfuse 3.3+) without ever touching /dev/fuse or mount(2)
itself. This step parses nothing from the bucket and talks to no
server: it checks the mount point, mounts, and exits.

The kernel ties a FUSE connection to the open file, not to a process: as
long as any copy of the descriptor is open the mount is served (or hangs
waiting for a reader). The daemon therefore tells systemd to close its
copy once it serves (``FDSTOREREMOVE=1``), so a daemon that dies leaves
a "not connected" mount, as before, instead of a hanging one.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path

from dgfs.errors import ConfigError

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
#: The name the descriptor has in systemd's store (``LISTEN_FDNAMES``).
FD_NAME = "fuse"

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_NOATIME = 1024
MNT_DETACH = 2

#: libfuse's mount options that are mount(2) flags.
_FLAGS = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
}
#: libfuse's mount options the FUSE kernel module itself takes.
_KERNEL = {"default_permissions", "allow_other"}


def kernel_mount(options: Iterable[str], fd: int, uid: int, gid: int) -> tuple[str, str, int, str]:
    """``(source, fstype, flags, data)`` for mount(2) of a FUSE connection on
    ``fd``, from the libfuse options ``options`` (as dgfs gives pyfuse3).

    ``uid``/``gid`` own the connection (``user_id``/``group_id``): without
    ``allow_other`` only that user may enter the mount. An option this
    module does not know is a ``ConfigError``, never silently dropped.
    """
    source, fstype, flags = "fuse", "fuse", 0
    data = [f"fd={fd}", f"rootmode={stat.S_IFDIR:o}", f"user_id={uid}", f"group_id={gid}"]
    for option in sorted(options):
        name, _, value = option.partition("=")
        if name == "fsname":
            source = value
        elif name == "subtype":
            fstype = f"fuse.{value}"
        elif name in _FLAGS:
            flags |= _FLAGS[name]
        elif name in _KERNEL:
            data.append(name)
        else:
            raise ConfigError(f"cannot hand over a mount with the FUSE option {option!r}")
    return source, fstype, flags, ",".join(data)


def user_ids(user: str) -> tuple[int, int]:
    """``(uid, gid)`` of ``user`` (a name or a number)."""
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ConfigError(f"no such user: {user!r}") from None
    return entry.pw_uid, entry.pw_gid


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.mount(
        source.encode(), os.fsencode(target), fstype.encode(), ctypes.c_ulong(flags), data.encode()
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def open_and_mount(mountpoint: Path, options: Iterable[str], uid: int, gid: int) -> int:
    """Open /dev/fuse and mount that connection on ``mountpoint`` (root only);
    return the descriptor, close-on-exec. ``ConfigError`` says why not."""
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open {FUSE_DEVICE}: {exc.strerror}") from None
    try:
        source, fstype, flags, data = kernel_mount(options, fd, uid, gid)
        _mount(source, mountpoint, fstype, flags, data)
    except OSError as exc:
        os.close(fd)
        hint = " (only root can: run it as ExecStartPre=+...)" if exc.errno == errno.EPERM else ""
        raise ConfigError(f"cannot mount on {mountpoint}: {exc.strerror}{hint}") from None
    except BaseException:
        os.close(fd)
        raise
    log.debug("mounted %s on %s for uid %d (fd %d)", source, mountpoint, uid, fd)
    return fd


def unmount_lazily(mountpoint: Path) -> None:
    """Detach ``mountpoint`` (``umount -l``); a failure is logged, not raised."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        log.warning("cannot detach %s: %s", mountpoint, os.strerror(ctypes.get_errno()))


def check_fuse_fd(fd: int) -> None:
    """``ConfigError`` unless ``fd`` is an open /dev/fuse; makes it close-on-exec,
    so no child process (xdelta3, zgz) inherits the connection."""
    try:
        st = os.fstat(fd)
        fuse = os.stat(FUSE_DEVICE).st_rdev if os.path.exists(FUSE_DEVICE) else None
    except OSError as exc:
        raise ConfigError(f"descriptor {fd} is not open: {exc.strerror}") from None
    # /dev/fuse is misc device 10:229; a sandbox (PrivateDevices=) may not show it.
    expected = fuse if fuse is not None else os.makedev(10, 229)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != expected:
        raise ConfigError(f"descriptor {fd} is not {FUSE_DEVICE}")
    os.set_inheritable(fd, False)


__all__ = [
    "FD_NAME",
    "check_fuse_fd",
    "kernel_mount",
    "open_and_mount",
    "unmount_lazily",
    "user_ids",
]
