"""``dgfs status MOUNTPOINT [--json]``: what a live mount is doing.

The mount's root names the daemon's control socket in the extended
attribute ``user.dgfs.status_socket`` (see dgfs/control.py); the socket
lets in only the user who mounted (or root). Every way this can fail
ends in one line that says what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from dgfs.control import query
from dgfs.errors import ConfigError, DgfsError
from dgfs.fs.xattrs import PREFIX, STATUS_SOCKET
from dgfs.printable import printable

#: Seconds to wait for the daemon (through the mount, then on its socket).
TIMEOUT = 10.0


HELP = "show what a live mount is doing (uploads, bytes, cache, S3 requests)"
DESCRIPTION = (
    "Ask the daemon serving MOUNTPOINT for its state: pending and failed "
    "uploads, bytes written and stored, cache use, S3 requests and errors, journal. "
    "Only the user who mounted it (or root) may ask."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="a dgfs mount (or a path in one)")
    parser.add_argument("--json", action="store_true", help="print the full JSON document")
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT, help=f"seconds to wait (default {TIMEOUT:g})"
    )


def run(args: argparse.Namespace) -> int:
    root = mount_root(Path(args.mountpoint))
    socket_path = find_socket(root, args.timeout)
    document = ask(root, socket_path, args.timeout)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(render(document))
    return 0


# --- finding the daemon ------------------------------------------------------------


def _with_timeout(fn: Any, timeout: float) -> Any:
    """``fn()`` in a thread: a hung daemon blocks a FUSE request, not this command."""
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError
    if "error" in result:
        raise result["error"]
    return result["value"]


def _dead_mount(path: Path) -> ConfigError:
    return ConfigError(
        f"{path}: Transport endpoint is not connected: the dgfs daemon of this mount is gone;"
        f" run `fusermount3 -u {path}` and mount again (files it had not uploaded are in"
        " its journal and the next mount uploads them)"
    )


def _not_allowed(path: Path) -> ConfigError:
    return ConfigError(
        f"{path}: permission denied: it is mounted by another user without allow_other"
        " (only that user can use it, or ask for its status)"
    )


def _is_dgfs_mountpoint(path: Path) -> bool:
    """Whether /proc/self/mountinfo lists ``path`` as a dgfs mount (no access needed)."""
    target = os.fsencode(path.absolute())
    try:
        with open("/proc/self/mountinfo", "rb") as info:
            for line in info:
                before, _, after = line.partition(b" - ")
                fields = before.split()
                # Paths there escape space, tab, newline and backslash as \ooo.
                point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
                if point == target and after.split()[:1] == [b"fuse.dgfs"]:
                    return True
    except (OSError, IndexError):
        return False
    return False


def mount_root(path: Path) -> Path:
    """The mount point ``path`` is in (``path`` itself for a mount point)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file or directory") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise _dead_mount(path) from None
        if exc.errno == errno.EACCES and _is_dgfs_mountpoint(path):
            raise _not_allowed(path) from None
        raise ConfigError(f"{path}: {exc.strerror}") from None
    current = path.absolute()
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return current


def find_socket(root: Path, timeout: float) -> Path:
    """The control socket the daemon serving ``root`` names, or a clear ``ConfigError``."""
    try:
        value = _with_timeout(lambda: os.getxattr(root, STATUS_SOCKET), timeout)
    except TimeoutError:
        raise ConfigError(
            f"{root}: the dgfs daemon is not answering (no reply within {timeout:g} s);"
            " see its log (journalctl -u 'dgfs@*' or syslog)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise _dead_mount(root) from None
        if exc.errno == errno.EACCES:
            raise _not_allowed(root) from None
        if exc.errno == errno.ENODATA and _is_dgfs(root):
            raise ConfigError(
                f"{root}: this mount's daemon predates dgfs status; remount it to use status"
            ) from None
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise ConfigError(f"{root} is not a dgfs mount") from None
        raise ConfigError(f"{root}: {exc.strerror}") from None
    return Path(os.fsdecode(value))


def _is_dgfs(root: Path) -> bool:
    try:
        os.getxattr(root, PREFIX + "bucket")
    except OSError:
        return False
    return True


def ask(root: Path, socket_path: Path, timeout: float) -> dict[str, Any]:
    """The daemon's status document; a clear ``DgfsError`` for each way it can fail."""
    try:
        document = query(socket_path, timeout)
    except PermissionError:
        owner = ""
        with contextlib.suppress(OSError):
            owner = f" (uid {os.stat(root).st_uid})"
        raise ConfigError(
            f"{root}: permission denied: only the user who mounted it{owner} or root may read"
            f" its status (socket {socket_path})"
        ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise DgfsError(
            f"{root}: the dgfs daemon is not answering: nothing listens on {socket_path}"
            " (is it shutting down?)"
        ) from None
    except TimeoutError:
        raise DgfsError(
            f"{root}: the dgfs daemon did not answer within {timeout:g} s on {socket_path}"
        ) from None
    except OSError as exc:
        raise DgfsError(f"{root}: cannot reach the daemon on {socket_path}: {exc}") from None
    except ValueError:
        raise DgfsError(f"{root}: the daemon's answer is not readable JSON") from None
    if "error" in document:
        raise DgfsError(f"{root}: the daemon says: {document['error']}")
    return document


# --- the human form ------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {s:02d}s"
    return f"{minutes}m {s:02d}s" if minutes else f"{seconds:.1f}s"


def _counts(items: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(items.items(), key=lambda i: -i[1]))


def render(doc: dict[str, Any]) -> str:
    """``dgfs status`` without ``--json``: a few lines an operator reads at a glance."""
    m, up, b = doc["mount"], doc["uploads"], doc["bytes"]
    c, s3, j, rb = doc["cache"], doc["s3"], doc["journal"], doc["rebuilds"]
    source = f"s3://{m['bucket']}/{m['prefix']}" if m["prefix"] else f"s3://{m['bucket']}"
    lines = [
        f"{m['mountpoint']}: {source} at {m['endpoint']}",
        f"  mode:     deltas={m['deltas']}, {'ro' if m['read_only'] else 'rw'};"
        f" pid {m['pid']}, up {_duration(m['uptime_seconds'])}"
        + (f"; metrics on {m['metrics']}" if m["metrics"] else ""),
    ]
    kinds = f" ({_counts(up['uploaded_by_kind'])})" if up["uploaded_by_kind"] else ""
    lines.append(
        f"  uploads:  {up['pending']} pending, {up['in_flight']} in flight,"
        f" {up['failed']} failed; {up['uploaded']} uploaded{kinds}, {up['retries']} retried"
    )
    for retrying in up.get("retrying_files", []):
        lines.append(
            f"    RETRYING  {retrying['path']}: {retrying['error']}"
            f" ({retrying['failures']} attempts failed; the data waits in the journal)"
        )
    for failed in up["failed_files"]:
        lines.append(
            f"    FAILED  {failed['path']}: {failed['error']} (writers saw {failed['errno']});"
            f" data kept in {failed['kept_in']}"
        )
    ratio = "" if b["ratio"] is None else f" (ratio {b['ratio']:.3f})"
    lines.append(
        f"  bytes:    {_size(b['written'])} written; {_size(b['uploaded_original'])} uploaded,"
        f" stored as {_size(b['uploaded_stored'])}{ratio}"
    )
    rate = "no reads yet" if c["hit_rate"] is None else f"hit rate {c['hit_rate']:.1%}"
    budget = c["budget_bytes"]
    share = f" ({c['size_bytes'] / budget:.0%})" if budget else ""
    lines.append(
        f"  cache:    {_size(c['size_bytes'])} of {_size(budget)}{share}, {c['entries']} entries;"
        f" {rate} ({c['hits']} hits, {c['misses']} misses), {c['evictions']} evictions"
    )
    errors = _counts(s3["errors"]) if s3["errors"] else "none"
    lines.append(
        f"  s3:       {s3['requests_total']} requests ({_counts(s3['requests']) or 'none'});"
        f" errors: {errors}; {s3['retries']} retried"
    )
    lines.append(
        f"  journal:  slot {j['slot']} ({j['slots_in_use']} of {j['slots']} in use),"
        f" {j['entries']} waiting, {j['failed_kept']} in failed/; {j['directory']}"
    )
    lines.append(f"  rebuilds: {rb['count']} ({rb['seconds_total']:.2f} s)")
    # Paths, keys and errors name files anyone who can write the bucket named.
    return "\n".join(printable(line) for line in lines)
