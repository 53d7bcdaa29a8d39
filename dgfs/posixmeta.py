"""POSIX attributes in object metadata, in the keys s3fs-fuse and rclone use
(``mtime``, ``atime``, ``mode``, ``uid``, ``gid``, ``rdev``). Pure, no I/O.

Metadata is untrusted (any writer of the bucket): the parsers here read it
under the bounds a kernel stat can carry and treat anything else as absent,
never as an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import overload

META_MTIME = "mtime"
META_MODE = "mode"
META_UID = "uid"
META_GID = "gid"
META_RDEV = "rdev"  # device number (st_rdev, decimal) of a character or block device
META_ATIME = "atime"  # written only when set explicitly (utimensat); as s3fs >= 1.91
# Symlinks, FIFOs, devices and sockets are objects as s3fs stores them: the
# type is in ``mode``, the body is a symlink's target (else empty).
POSIX_KEYS = (META_MTIME, META_MODE, META_UID, META_GID, META_RDEV, META_ATIME)


def posix_metadata(
    *,
    mtime_ns: int | None,
    mode: int | None,
    uid: int | None,
    gid: int | None,
    rdev: int | None = None,
    atime_ns: int | None = None,
) -> dict[str, str]:
    """POSIX attributes in s3fs/rclone spelling (times in seconds, may be fractional)."""
    times = {META_MTIME: mtime_ns, META_ATIME: atime_ns}
    numbers = {META_MODE: mode, META_UID: uid, META_GID: gid, META_RDEV: rdev}
    meta = {key: _seconds(ns) for key, ns in times.items() if ns is not None}
    meta.update((key, str(value)) for key, value in numbers.items() if value is not None)
    return meta


# What a kernel stat can carry. Metadata outside these bounds (written by
# some other tool, or garbled) is ignored, as if absent: one odd object
# must never make a directory unlistable (docs/SEMANTICS.md, "Buckets dgfs
# did not write").
_NS_MIN, _NS_MAX = -(2**63), 2**63 - 1  # st_mtime_ns is a signed 64-bit count
ID_MAX = 2**32 - 2  # uid_t; 2**32 - 1 is (uid_t)-1, "no owner" to chown(2)
_MODE_MAX = 0o177777
#: File types a ``mode`` may carry (0: permission bits only, as some tools write).
_FILE_TYPES = frozenset({0, 0o010000, 0o020000, 0o040000, 0o060000, 0o100000, 0o120000, 0o140000})
_MTIME = re.compile(r"(-?)(\d{1,20})(?:\.(\d{1,30}))?")
_DECIMAL = re.compile(r"\d{1,20}")
_OCTAL = re.compile(r"0(?:o)?([0-7]{1,20})")


def _seconds(ns: int) -> str:
    """``ns`` as decimal seconds, the sign in front of the whole number, as
    rclone writes it and ``parse_mtime_ns`` reads it: -0.5 s is "-0.5"."""
    if ns < 0:
        return "-" + _seconds(-ns)
    sec, frac = divmod(ns, 1_000_000_000)
    return f"{sec}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(sec)


@overload
def parse_mtime_ns(metadata: Mapping[str, str], key: str = "mtime") -> int | None: ...
@overload
def parse_mtime_ns(metadata: Mapping[str, str], key: str = "mtime", *, default: int) -> int: ...
def parse_mtime_ns(
    metadata: Mapping[str, str], key: str = "mtime", *, default: int | None = None
) -> int | None:
    """mtime (or, with ``key``, atime) from s3fs/rclone metadata (seconds,
    optional fraction), in ns.

    ``default`` if absent, not a plain decimal number, or outside what a
    stat can show. Times before 1970 are negative and kept; the epoch
    itself (0) is a time like any other, never "absent".
    """
    raw = metadata.get(key)
    match = _MTIME.fullmatch(raw.strip()) if raw else None
    if match is None:
        return default
    sign, sec, frac = match.groups()
    ns = int(sec) * 1_000_000_000 + (int(frac.ljust(9, "0")[:9]) if frac else 0)
    ns = -ns if sign else ns
    return ns if _NS_MIN <= ns <= _NS_MAX else default


def parse_int_meta(metadata: Mapping[str, str], key: str) -> int | None:
    """``mode``, ``uid``, ``gid`` or ``rdev`` from s3fs/rclone metadata; None if absent or unusable.

    s3fs writes decimal, rclone octal with a leading zero. Negative values,
    uid/gid/rdev beyond ``ID_MAX``, a mode beyond 16 bits or with a file type
    that does not exist count as absent.
    """
    raw = (metadata.get(key) or "").strip()
    if len(raw) > 1 and raw.startswith("0"):
        octal = _OCTAL.fullmatch(raw)
        if octal is None:
            return None
        value = int(octal.group(1), 8)
    elif _DECIMAL.fullmatch(raw):
        value = int(raw)
    else:
        return None
    if key == META_MODE:
        usable = value <= _MODE_MAX and value & 0o170000 in _FILE_TYPES
    else:
        usable = value <= ID_MAX
    return value if usable else None


# --- classification ------------------------------------------------------------
