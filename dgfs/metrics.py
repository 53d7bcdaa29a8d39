"""Prometheus metrics of a mount (``-o metrics=127.0.0.1:9464``).

The metrics are the ``dgfs status`` document (dgfs/control.py) rendered by
``prometheus_client`` from a private ``CollectorRegistry``: both always
agree. The HTTP endpoint is served by trio in the mount's nursery rather
than by prometheus_client's thread, because building the document reads
the upload table and caches, which belong to the trio thread.

Only a loopback address is accepted unless an IP address is written out:
``metrics=9464`` and ``metrics=localhost:9464`` listen on 127.0.0.1;
``metrics=0.0.0.0:9464`` (or another literal IP) is taken as the
operator's explicit wish and logged; host names are refused. No label
carries a credential: the endpoint label has any user:password removed.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from dgfs.errors import ConfigError
from dgfs.serving import Endpoint, serve_requests

log = logging.getLogger(__name__)

DEFAULT_PORT = 9464
MAX_REQUEST_HEAD = 16 * 1024
ENDPOINT = Endpoint(
    "the metrics endpoint", "a metrics scrape", max_connections=32, request_timeout=10.0
)

Document = Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class ListenAddress:
    host: str  # a literal IP address
    port: int

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """``PORT``, ``localhost:PORT``, ``IP:PORT`` or ``[IPv6]:PORT`` -> ``ListenAddress``."""
    text = text.strip()
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"option metrics: bad address {text!r}; use [IPv6]:PORT")
        host, port_text = inner, rest[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ConfigError(f"option metrics: bad port {port_text!r} (1-65535)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"option metrics: {host!r} is not an IP address; metrics listen on loopback"
            " (metrics=PORT) unless an address such as 0.0.0.0:PORT is written out"
        ) from None
    return ListenAddress(host, port)


def make_registry(document: Document) -> Any:
    """A private ``CollectorRegistry`` holding one collector that reads ``document``."""
    from prometheus_client.core import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(document))
    return registry


#: Metrics read straight from one field of the status document (control.py):
#: ``(gauge or counter, name, help, section, field)``, in groups kept in the
#: order ``_StatusCollector.collect`` exposes them between the labelled ones.
_Plain = tuple[str, str, str, str, str]
_UPLOAD_METRICS: tuple[_Plain, ...] = (
    ("gauge", "dgfs_uptime_seconds", "Seconds since the mount started", "mount", "uptime_seconds"),
    ("gauge", "dgfs_uploads_pending", "Closed files not in S3 yet and not being uploaded",
     "uploads", "pending"),
    ("gauge", "dgfs_uploads_in_flight", "Files being uploaded now", "uploads", "in_flight"),
    ("counter", "dgfs_uploads_failed",
     "Uploads that failed for good (data kept in the journal's failed/)", "uploads", "failed"),
    ("counter", "dgfs_upload_retries", "Uploads that failed transiently and were queued again",
     "uploads", "retries"),
)  # fmt: skip
_BYTES_AND_CACHE_METRICS: tuple[_Plain, ...] = (
    ("counter", "dgfs_written_bytes", "Bytes users wrote through the mount", "bytes", "written"),
    ("counter", "dgfs_uploaded_original_bytes", "Original size of the files uploaded",
     "bytes", "uploaded_original"),
    ("counter", "dgfs_uploaded_stored_bytes",
     "Bytes those files take in S3 (delta or direct object)", "bytes", "uploaded_stored"),
    ("gauge", "dgfs_cache_size_bytes", "Bytes the cache holds on disk", "cache", "size_bytes"),
    ("gauge", "dgfs_cache_budget_bytes", "The cache's budget (cache_size)",
     "cache", "budget_bytes"),
    ("gauge", "dgfs_cache_entries", "Entries in the cache", "cache", "entries"),
    ("counter", "dgfs_cache_hits", "Opens whose content was in the cache", "cache", "hits"),
    ("counter", "dgfs_cache_misses", "Opens whose content had to be fetched or rebuilt",
     "cache", "misses"),
    ("counter", "dgfs_cache_evictions", "Entries evicted to keep the budget",
     "cache", "evictions"),
)  # fmt: skip
_S3_AND_JOURNAL_METRICS: tuple[_Plain, ...] = (
    ("counter", "dgfs_s3_retries", "S3 requests retried after a transient error",
     "s3", "retries"),
    ("gauge", "dgfs_journal_slots_in_use",
     "Journal slots of this bucket held by live mounts on this machine",
     "journal", "slots_in_use"),
    ("gauge", "dgfs_journal_entries", "Closed files durable in the journal, waiting for upload",
     "journal", "entries"),
    ("gauge", "dgfs_journal_failed_entries", "Files in the journal's failed/ directory",
     "journal", "failed_kept"),
)  # fmt: skip


class _StatusCollector:
    def __init__(self, document: Document) -> None:
        self._document = document

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        doc = self._document()
        uploads, s3 = doc["uploads"], doc["s3"]
        yield _mount_info(doc["mount"])
        yield from _plain(doc, _UPLOAD_METRICS)
        by_kind = uploads["uploaded_by_kind"]
        yield _labelled(
            "dgfs_uploads", "Files stored in S3, by how they are stored", ["kind"], by_kind
        )
        yield _histogram(
            HistogramMetricFamily,
            "dgfs_upload_duration_seconds",
            "Seconds from the start of a file's upload until it was stored",
            uploads["seconds"],
        )
        yield from _plain(doc, _BYTES_AND_CACHE_METRICS)
        yield _labelled(
            "dgfs_s3_requests", "S3 requests sent (each attempt)", ["operation"], s3["requests"]
        )
        yield _labelled(
            "dgfs_s3_errors",
            "S3 requests that failed, by error kind",
            ["operation", "kind"],
            {(row["operation"], row["kind"]): row["count"] for row in s3["errors_by_operation"]},
        )
        yield from _plain(doc, _S3_AND_JOURNAL_METRICS)
        yield _histogram(
            HistogramMetricFamily,
            "dgfs_rebuild_duration_seconds",
            "Seconds to reconstruct a delta for a read that found it in no cache",
            doc["rebuilds"]["seconds"],
        )


def _mount_info(mount: dict[str, Any]) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    info = GaugeMetricFamily(
        "dgfs_mount_info",
        "The mount: bucket, prefix, endpoint (without credentials), delta mode; always 1",
        labels=["bucket", "prefix", "endpoint", "deltas", "mountpoint"],
    )
    labels = ("bucket", "prefix", "endpoint", "deltas", "mountpoint")
    info.add_metric([mount[label] for label in labels], 1)
    return info


def _labelled(
    name: str, text: str, labels: list[str], values: Mapping[tuple[str, ...] | str, float]
) -> Any:
    """A counter with one sample per label tuple (a plain string: the one label's value)."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, text, labels=labels)
    for label_values, value in values.items():
        family.add_metric(
            [label_values] if isinstance(label_values, str) else list(label_values), value
        )
    return family


def _plain(doc: dict[str, Any], metrics: tuple[_Plain, ...]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for kind, name, text, section, key in metrics:
        family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        yield family(name, text, value=doc[section][key])


def _histogram(family: Any, name: str, text: str, data: dict[str, Any]) -> Any:
    buckets = [
        (str(float(bound)) if bound != "+Inf" else "+Inf", n) for bound, n in data["buckets"]
    ]
    return family(name, text, buckets=buckets, sum_value=data["sum"])


# --- the HTTP endpoint ---------------------------------------------------------------


async def open_metrics_listener(address: ListenAddress) -> list[trio.SocketListener]:
    """Bind now, so a taken port fails the mount before it is reported ready."""
    if not address.is_loopback:
        log.warning(
            "serving metrics on %s: reachable from the network, not only this machine", address
        )
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror}") from None


async def serve_metrics(
    listeners: list[trio.SocketListener],
    registry: Any,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET /metrics`` (and ``/``) in Prometheus' text format until cancelled."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    async def read_request(stream: trio.SocketStream) -> tuple[str, str] | None:
        """(method, path) of the request; None when it is no HTTP request."""
        try:
            return _request_line(await _read_head(stream))
        except ValueError:
            return None

    async def answer(stream: trio.SocketStream, request: tuple[str, str] | None) -> None:
        if request is None:
            await _respond(stream, 400, b"bad request\n", "text/plain", "GET")
            return
        method, path = request
        if method not in ("GET", "HEAD"):
            await _respond(stream, 405, b"only GET\n", "text/plain", method)
        elif path.split("?", 1)[0] not in ("/metrics", "/"):
            await _respond(stream, 404, b"see /metrics\n", "text/plain", method)
        else:
            body = generate_latest(registry)  # on the trio thread: see above
            await _respond(stream, 200, body, CONTENT_TYPE_LATEST, method)

    task_status.started()
    await serve_requests(
        listeners,
        read_request,
        answer,
        ENDPOINT,
    )


async def _read_head(stream: trio.SocketStream) -> bytes:
    # Only the bytes just received (and the 3 before) are searched: a client
    # sending one byte at a time made each look again at all of them, half
    # a second of the trio thread per 16 KiB head.
    data = bytearray()
    while True:
        if len(data) > MAX_REQUEST_HEAD:
            raise ValueError("request head too large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        tail = max(0, len(data) - 3)
        data += chunk
        if b"\r\n\r\n" in data[tail:] or b"\n\n" in data[tail:]:
            break
    return bytes(data)


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\n", 1)[0].decode("latin-1").split()
    if len(parts) < 2:
        raise ValueError("no request line")
    return parts[0], parts[1]


async def _respond(
    stream: trio.SocketStream, status: int, body: bytes, content_type: str, method: str
) -> None:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    await stream.send_all(head if method == "HEAD" else head + body)
