"""The control socket of a live mount: what ``dgfs status`` asks and how.

Channel: a unix stream socket ``status.sock`` in the mount's journal
directory (under its cache directory, mode 0700), itself mode 0600, so
only the user who mounted (or root) can connect; it is never on the
network. The mount's root directory names it in the read-only extended
attribute ``user.dgfs.status_socket``, so ``dgfs status MOUNTPOINT`` finds
it through the mount itself, whatever the mountpoint's spelling.

Protocol: one JSON request line (``{"request": "status"}``) per
connection, one JSON document back, then the daemon closes.

``status_document`` assembles the document on the trio thread from the
mount's live objects (the upload table and caches are not thread-safe)
and the counters in ``dgfs.telemetry``; the Prometheus endpoint
(dgfs/metrics.py) renders the same document.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import trio

from dgfs.cache import ContentCache
from dgfs.errors import ConfigError
from dgfs.fs.filesystem import FileSystem
from dgfs.fs.journal import Journal
from dgfs.serving import Endpoint, serve_requests
from dgfs.telemetry import Histogram, Snapshot, Telemetry

log = logging.getLogger(__name__)

SOCKET_NAME = "status.sock"
DOCUMENT_VERSION = 1
MAX_REQUEST = 64 * 1024
ENDPOINT = Endpoint(
    "the status socket", "a status request", max_connections=16, request_timeout=5.0
)
# Paths of unix sockets are limited to 107 bytes; longer ones are reached
# through the directory's /proc/self/fd entry.
_MAX_SUN_PATH = 100


@dataclass(frozen=True)
class MountFacts:
    """What does not change while mounted."""

    mountpoint: Path
    bucket: str
    prefix: str
    deltas: str
    read_only: bool
    metrics: str | None  # "host:port" of the Prometheus endpoint, or None


def public_endpoint(url: str | None) -> str:
    """``url`` without any user:password part (never shown, never a metric label)."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _histogram(h: Histogram) -> dict[str, Any]:
    return {
        "count": h.count,
        "sum": h.total,
        "buckets": [["+Inf" if b == float("inf") else b, n] for b, n in h.cumulative()],
    }


def status_document(
    facts: MountFacts, fs: FileSystem, journal: Journal, telemetry: Telemetry
) -> dict[str, Any]:
    """The status of the mount now (trio thread only): the ``dgfs status --json`` document."""
    snap = telemetry.snapshot()
    return {
        "version": DOCUMENT_VERSION,
        "mount": _mount_section(facts, fs, snap),
        "uploads": _uploads_section(facts.mountpoint, fs, snap),
        "bytes": {
            "written": snap.bytes_written,
            "uploaded_original": snap.uploaded_original_bytes,
            "uploaded_stored": snap.uploaded_stored_bytes,
            "ratio": None if snap.ratio is None else round(snap.ratio, 6),
        },
        "cache": _cache_section(fs.core.cache, snap),
        "s3": _s3_section(snap),
        "journal": _journal_section(journal, snap),
        "rebuilds": {
            "count": snap.rebuild_seconds.count,
            "seconds_total": round(snap.rebuild_seconds.total, 6),
            "seconds": _histogram(snap.rebuild_seconds),
        },
    }


def _mount_section(facts: MountFacts, fs: FileSystem, snap: Snapshot) -> dict[str, Any]:
    return {
        "mountpoint": str(facts.mountpoint),
        "bucket": facts.bucket,
        "prefix": facts.prefix,
        "endpoint": public_endpoint(fs.store.endpoint),
        "deltas": facts.deltas,
        "read_only": facts.read_only,
        "pid": os.getpid(),
        "started_at": datetime.fromtimestamp(snap.started_at, UTC).isoformat(),
        "uptime_seconds": round(snap.uptime_seconds, 3),
        "metrics": facts.metrics,
    }


def _uploads_section(root: Path, fs: FileSystem, snap: Snapshot) -> dict[str, Any]:
    counts = fs.uploads.counts()
    return {
        "pending": counts.pending,
        "in_flight": counts.in_flight,
        "failed": snap.uploads_failed,
        "open_unsaved": counts.open_unsaved,
        "uploaded": snap.uploaded_files,
        "uploaded_by_kind": dict(sorted(snap.uploads.items())),
        "retries": snap.upload_retries,
        "failed_files": [
            {
                "path": str(root / f.path),
                "key": f.key,
                "error": f.error,
                "errno": f.errno_name,
                "kept_in": f.kept_in,
                "at": datetime.fromtimestamp(f.at, UTC).isoformat(),
            }
            for f in snap.failed
        ],
        "retrying_files": [
            {"path": str(root / r.path), "error": r.error, "failures": r.failures}
            for r in fs.uploads.retrying()
        ],
        "seconds": _histogram(snap.upload_seconds),
    }


def _cache_section(cache: ContentCache, snap: Snapshot) -> dict[str, Any]:
    return {
        "directory": str(cache.directory),
        "size_bytes": cache.stored_bytes,
        "budget_bytes": cache.budget_bytes,
        "entries": cache.entry_count,
        "hits": snap.cache_hits,
        "misses": snap.cache_misses,
        "hit_rate": None if snap.cache_hit_rate is None else round(snap.cache_hit_rate, 6),
        "evictions": snap.cache_evictions,
        "evicted_bytes": snap.cache_evicted_bytes,
    }


def _s3_section(snap: Snapshot) -> dict[str, Any]:
    errors_by_kind: dict[str, int] = {}
    for (_operation, kind), n in snap.s3_errors.items():
        errors_by_kind[kind] = errors_by_kind.get(kind, 0) + n
    return {
        "requests": dict(sorted(snap.s3_requests.items())),
        "requests_total": sum(snap.s3_requests.values()),
        "errors": dict(sorted(errors_by_kind.items())),
        "errors_by_operation": [
            {"operation": op, "kind": kind, "count": n}
            for (op, kind), n in sorted(snap.s3_errors.items())
        ],
        "retries": snap.s3_retries,
    }


def _journal_section(journal: Journal, snap: Snapshot) -> dict[str, Any]:
    return {
        "directory": str(journal.directory),
        "slot": journal.slots.index(journal.directory),
        "slots": len(journal.slots),
        "slots_in_use": journal.slots_in_use(),
        "entries": journal.entry_count(),
        "failed_kept": journal.failed_count(),
        "commits": snap.journal_commits,
    }


# --- the socket --------------------------------------------------------------------


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """An address ``bind``/``connect`` accept for ``path``, however long it is."""
    if len(os.fsencode(path)) <= _MAX_SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def open_control_listener(path: Path) -> trio.SocketListener:
    """Listen on ``path`` (an earlier mount's stale socket is replaced), mode 0600."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(path) as address:
            await sock.bind(address)
        # The directory is 0700 already; the socket's own mode says the same
        # to anyone who copies the cache directory's permissions around.
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create the status socket {path}: {exc.strerror}") from None
    return trio.SocketListener(sock)


async def serve_control(
    listener: trio.SocketListener,
    document: Callable[[], dict[str, Any]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer status requests on ``listener`` until cancelled."""

    async def answer(stream: trio.SocketStream, request: bytes) -> None:
        reply = _answer(request, document)
        await stream.send_all(json.dumps(reply).encode() + b"\n")

    task_status.started()
    await serve_requests(
        [listener],
        _read_line,
        answer,
        ENDPOINT,
    )


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = bytearray()  # searched only where a chunk arrives (a client may send bytes one by one)
    while len(data) < MAX_REQUEST:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
        if b"\n" in chunk:
            break
    return bytes(data.split(b"\n", 1)[0])


def _answer(request: bytes, document: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        wanted = json.loads(request or b"{}").get("request", "status")
    except (ValueError, AttributeError, RecursionError):  # nesting: json recurses per level
        return {"error": "a request is one JSON object on one line"}
    if wanted != "status":
        return {"error": f"unknown request {wanted!r}"}
    try:
        return document()
    except Exception as exc:  # noqa: BLE001 - a bug here must not take the mount down
        log.exception("building the status document failed")
        return {"error": f"the daemon could not build its status: {exc!r}"}


def query(path: Path, timeout: float) -> dict[str, Any]:
    """Ask the daemon listening on ``path`` for its status (blocking).

    ``OSError`` (EACCES, ECONNREFUSED, ENOENT...) and ``TimeoutError`` are
    left to the caller, which knows how to explain them.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        with _address(path) as address:
            sock.connect(address)
        sock.sendall(b'{"request": "status"}\n')
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = json.loads(b"".join(chunks))
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a JSON object")
    return answer
