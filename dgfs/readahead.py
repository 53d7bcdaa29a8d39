"""The kernel's read-ahead for the mount: how much it asks for at a time.

The kernel gives every FUSE mount a read-ahead of 128 KiB, so a reader of a
12 MB file costs the daemon ~100 read requests, each a round trip through
pyfuse3 and trio. At 1 MiB the same file is ~12 requests (FUSE's largest
read, 256 pages): on the benchmark's wheels a warm re-read took 0.17 s
instead of 0.42 s and a cold read 0.66 s instead of 0.82 s.

The setting is the mount's backing device's ``read_ahead_kb`` in sysfs
(as ``blockdev --setra`` is for a disk). Its device number is read from
``/proc/self/mountinfo``, never by a ``stat`` of the mountpoint: the
daemon would be asking itself, before it serves. It is written after the
kernel has the daemon's answer to FUSE_INIT, which may only lower it
(dgfs/mount.py waits for that). Only root may write
sysfs; other users' mounts keep the kernel's value, which is logged.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_KIB = 1024
MOUNTINFO = Path("/proc/self/mountinfo")
BDI_ROOT = Path("/sys/class/bdi")


def _unescape(field: str) -> str:
    """A mountinfo path field: space, tab, newline and backslash come as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def fuse_device(mountpoint: Path, mountinfo: str) -> str | None:
    """The ``major:minor`` of the FUSE filesystem last mounted on ``mountpoint``, or None."""
    found = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if separator + 1 >= len(fields) or not fields[separator + 1].startswith("fuse"):
            continue
        if _unescape(fields[4]) == str(mountpoint):
            found = fields[2]  # later lines are mounts stacked on top
    return found


def set_read_ahead(
    mountpoint: Path, kib: int, *, mountinfo: Path = MOUNTINFO, bdi_root: Path = BDI_ROOT
) -> bool:
    """Set the read-ahead of the FUSE mount on ``mountpoint`` to ``kib`` KiB.

    Returns whether it was set; a failure is logged, never raised: the mount
    works with the kernel's default, only slower.
    """
    try:
        device = fuse_device(mountpoint, mountinfo.read_text())
    except OSError as exc:
        log.info("read_ahead_kb stays at the kernel's default: cannot read %s: %s", mountinfo, exc)
        return False
    if device is None:
        log.info(
            "read_ahead_kb stays at the kernel's default: %s is not in %s", mountpoint, mountinfo
        )
        return False
    setting = bdi_root / device / "read_ahead_kb"
    try:
        setting.write_text(f"{kib}\n")
    except OSError as exc:
        # Not root (or sysfs read-only in a container): nothing to fix, say why it is slower.
        why = "only root can" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        log.info(
            "read_ahead_kb stays at the kernel's default: cannot write %s (%s%s)",
            setting,
            exc.strerror or exc,
            f"; {why}" if why else "",
        )
        return False
    log.debug("read_ahead_kb of %s (%s) set to %d", mountpoint, device, kib)
    return True
