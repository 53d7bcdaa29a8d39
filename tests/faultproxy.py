"""A fault-injecting HTTP proxy in front of a local S3 server (moto_server, SeaweedFS).

Clients talk to ``proxy.endpoint_url`` as if it were the S3 endpoint. Each
request is forwarded byte for byte (head, then the body as it streams in,
Content-Length or chunked; ``Expect: 100-continue`` is answered by the
proxy itself) over a fresh connection to the upstream server, and the
response comes back the same way, unless the seeded ``FaultSchedule``
picks a fault for it:

================  ==============================================================
kind              what the client sees
================  ==============================================================
``500``           ``500 InternalError`` with an S3 XML error body; S3 did nothing
``503``           ``503 ServiceUnavailable``; S3 did nothing
``slowdown``      ``503 SlowDown`` (S3's throttling answer); S3 did nothing
``reset-request`` the connection is reset while the request body arrives;
                  S3 never sees the request
``reset-response`` S3 did the work; the connection is reset halfway through the
                  response (its body, or its head when it has no body)
``truncate``      S3 did the work; the response announces its full
                  Content-Length, sends half the body and closes (FIN)
``stall``         S3 did the work; nothing more is sent for ``stall_seconds``
                  (set it past the client's read timeout), then the proxy closes
``no-such-upload`` ``404 NoSuchUpload`` (only by ``inject``: AWS's answer to a
                  retried CompleteMultipartUpload that had succeeded)
================  ==============================================================

The proxy counts requests and the faults it injected by kind. Faults are
drawn from ``random.Random(seed)`` in the order requests arrive: with
several client threads the same seed gives the same sequence of decisions,
though not always on the same requests.

Plain module (threads and sockets, no pytest), bound to 127.0.0.1 on a
free port.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import BinaryIO, Self
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
RELAY_CHUNK = 256 * 1024


class FaultKind(enum.Enum):
    ERROR_500 = "500"
    ERROR_503 = "503"
    SLOW_DOWN = "slowdown"
    RESET_REQUEST = "reset-request"
    RESET_RESPONSE = "reset-response"
    TRUNCATE = "truncate"
    STALL = "stall"
    # Only by ``inject``: what AWS may answer to a retried CompleteMultipartUpload
    # whose first attempt succeeded ("NoSuchUpload: ... might have been completed").
    NO_SUCH_UPLOAD = "no-such-upload"


#: Faults that leave S3 untouched, and those S3 has applied when the client sees them.
BEFORE_S3 = frozenset(
    {FaultKind.ERROR_500, FaultKind.ERROR_503, FaultKind.SLOW_DOWN, FaultKind.RESET_REQUEST}
)
AFTER_S3 = frozenset({FaultKind.RESET_RESPONSE, FaultKind.TRUNCATE, FaultKind.STALL})
#: Every kind a schedule draws from but ``stall`` (which costs a client read timeout each time).
QUICK_FAULTS = BEFORE_S3 | {FaultKind.RESET_RESPONSE, FaultKind.TRUNCATE}
ALL_FAULTS = BEFORE_S3 | AFTER_S3

_ERRORS = {
    FaultKind.ERROR_500: (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    FaultKind.ERROR_503: (
        503,
        "Service Unavailable",
        "ServiceUnavailable",
        "Please reduce your request rate.",
    ),
    FaultKind.SLOW_DOWN: (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    FaultKind.NO_SUCH_UPLOAD: (
        404,
        "Not Found",
        "NoSuchUpload",
        "The specified multipart upload does not exist.",
    ),
}


@dataclass
class FaultSchedule:
    """Which requests fail: each one with probability ``rate``, of a kind
    drawn uniformly from ``kinds``; ``random.Random(seed)`` decides."""

    seed: int
    rate: float
    kinds: frozenset[FaultKind] = QUICK_FAULTS
    _rng: random.Random = field(init=False, repr=False)
    _order: list[FaultKind] = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._order = sorted(self.kinds, key=lambda kind: kind.value)

    def next(self) -> FaultKind | None:
        with self._lock:
            if not self._order or self._rng.random() >= self.rate:
                return None
            return self._rng.choice(self._order)


NO_FAULTS = FaultSchedule(seed=0, rate=0.0, kinds=frozenset())


@dataclass
class _Planned:
    """A fault for chosen requests (``FaultProxy.inject``)."""

    kind: FaultKind
    method: str
    needle: str
    times: int


class _Closed(Exception):
    """A peer went away; this connection is done."""


@dataclass
class _Head:
    raw: bytes
    start_line: str
    headers: dict[str, str]  # lower-case names; the last value wins

    @property
    def status(self) -> int:
        return int(self.start_line.split(" ", 2)[1])


def _read_head(rfile: BinaryIO) -> _Head | None:
    """The next message head (start line and headers, raw bytes kept), None at a clean EOF."""
    raw = bytearray()
    while True:
        line = rfile.readline(MAX_HEAD)
        if not line:
            if raw:
                raise _Closed("EOF inside a message head")
            return None
        raw += line
        if len(raw) > MAX_HEAD:
            raise _Closed("message head too large")
        if line in (b"\r\n", b"\n"):
            if len(raw) == len(line):  # stray blank line between messages
                raw.clear()
                continue
            break
    lines = bytes(raw).decode("latin-1").split("\r\n")
    headers = {}
    for text in lines[1:]:
        name, sep, value = text.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return _Head(bytes(raw), lines[0], headers)


class _Body:
    """A message body's framing: ``length`` bytes, chunked, until close, or none."""

    def __init__(self, length: int | None, chunked: bool, to_close: bool) -> None:
        self.length = length
        self.chunked = chunked
        self.to_close = to_close

    @classmethod
    def of_request(cls, head: _Head) -> _Body:
        if "chunked" in head.headers.get("transfer-encoding", "").lower():
            return cls(None, True, False)
        return cls(int(head.headers.get("content-length", "0") or 0), False, False)

    @classmethod
    def of_response(cls, head: _Head, method: str) -> _Body:
        status = head.status
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return cls(0, False, False)
        if "chunked" in head.headers.get("transfer-encoding", "").lower():
            return cls(None, True, False)
        if "content-length" in head.headers:
            return cls(int(head.headers["content-length"]), False, False)
        return cls(None, False, True)

    @property
    def empty(self) -> bool:
        return self.length == 0

    def relay(self, rfile: BinaryIO, out: socket.socket | None, limit: int | None = None) -> int:
        """Copy the body from ``rfile`` to ``out`` (None: discard), stopping after
        ``limit`` bytes when given; returns the bytes copied."""
        if self.chunked:
            return _relay_chunked(rfile, out, limit)
        copied = 0
        remaining = self.length
        while remaining is None or remaining > 0:
            want = RELAY_CHUNK if remaining is None else min(RELAY_CHUNK, remaining)
            if limit is not None:
                want = min(want, limit - copied)
                if want <= 0:
                    break
            chunk = rfile.read1(want) if hasattr(rfile, "read1") else rfile.read(want)
            if not chunk:
                if remaining is None:
                    break
                raise _Closed("EOF inside a body")
            if out is not None:
                out.sendall(chunk)
            copied += len(chunk)
            if remaining is not None:
                remaining -= len(chunk)
        return copied


def _relay_chunked(rfile: BinaryIO, out: socket.socket | None, limit: int | None) -> int:
    """Relay chunked framing as it is (sizes, extensions, trailers)."""
    copied = 0

    def send(data: bytes) -> None:
        nonlocal copied
        if limit is not None and copied + len(data) > limit:
            data = data[: max(0, limit - copied)]
        if out is not None and data:
            out.sendall(data)
        copied += len(data)

    while True:
        size_line = rfile.readline(MAX_HEAD)
        if not size_line:
            raise _Closed("EOF inside a chunked body")
        send(size_line)
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the blank line
                trailer = rfile.readline(MAX_HEAD)
                if not trailer:
                    raise _Closed("EOF inside chunked trailers")
                send(trailer)
                if trailer in (b"\r\n", b"\n"):
                    return copied
        remaining = size + 2  # the data and its CRLF
        while remaining:
            chunk = rfile.read(min(RELAY_CHUNK, remaining))
            if not chunk:
                raise _Closed("EOF inside a chunk")
            send(chunk)
            remaining -= len(chunk)
        if limit is not None and copied >= limit:
            return copied


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed middlebox would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _error_response(kind: FaultKind, target: str) -> bytes:
    status, reason, code, message = _ERRORS[kind]
    resource = target.split("?", 1)[0]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "x-amz-request-id: faultproxy\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


class FaultProxy:
    """The proxy: ``start()``/``stop()`` or a context manager.

    ``schedule`` may be replaced at any time (``NO_FAULTS`` for a clean
    phase). ``faults`` counts injected faults by kind, ``requests`` every
    request received; ``injected`` lists ``(kind, method, path)``.
    """

    def __init__(
        self,
        upstream_url: str,
        schedule: FaultSchedule = NO_FAULTS,
        *,
        stall_seconds: float = 5.0,
    ) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.schedule = schedule
        self.stall_seconds = stall_seconds
        self.faults: collections.Counter[FaultKind] = collections.Counter()
        self.injected: list[tuple[FaultKind, str, str]] = []
        self.requests = 0
        self._planned: list[_Planned] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            # shutdown wakes the thread blocked in accept() (close alone does not)
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def inject(self, kind: FaultKind, method: str, target_contains: str, times: int = 1) -> None:
        """The next ``times`` requests ``method`` whose target (path and query)
        contains ``target_contains`` get fault ``kind``, whatever the schedule says."""
        with self._lock:
            self._planned.append(_Planned(kind, method, target_contains, times))

    def _choose(self, method: str, target: str) -> FaultKind | None:
        with self._lock:
            for planned in self._planned:
                if planned.times and planned.method == method and planned.needle in target:
                    planned.times -= 1
                    return planned.kind
        return self.schedule.next()

    def summary(self) -> str:
        """``"N requests, M faults (kind: n, ...)"`` for test output."""
        with self._lock:
            total = sum(self.faults.values())
            kinds = ", ".join(
                f"{k.value}: {n}"
                for k, n in sorted(self.faults.items(), key=lambda item: item[0].value)
            )
            return f"{self.requests} requests, {total} faults ({kinds or 'none'})"

    # --- internals -------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.add(client)
                self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(
                target=self._serve_connection, args=(client,), name="faultproxy-conn", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _serve_connection(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = client.makefile("rb")
        try:
            while not self._stopping.is_set():
                if not self._serve_request(client, rfile):
                    break
        except (_Closed, OSError, ValueError, IndexError) as exc:
            log.debug("faultproxy connection ended: %r", exc)
        finally:
            with self._lock:
                self._clients.discard(client)
            rfile.close()
            client.close()

    def _record(self, kind: FaultKind, method: str, target: str) -> None:
        with self._lock:
            self.faults[kind] += 1
            self.injected.append((kind, method, target.split("?", 1)[0]))

    def _serve_request(self, client: socket.socket, rfile: BinaryIO) -> bool:
        """Serve one request; False when the client connection must close."""
        head = _read_head(rfile)
        if head is None:
            return False
        method, target = head.start_line.split(" ", 2)[:2]
        with self._lock:
            self.requests += 1
        fault = self._choose(method, target)
        body = _Body.of_request(head)
        expects = head.headers.get("expect", "").lower() == "100-continue"
        if fault is not None:
            self._record(fault, method, target)
            log.debug("faultproxy: %s for %s %s", fault.value, method, target)

        if fault in _ERRORS:
            if expects:
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body.relay(rfile, None)
            client.sendall(_error_response(fault, target))
            return False
        if fault is FaultKind.RESET_REQUEST:
            if expects:
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if body.length:
                body.relay(rfile, None, limit=body.length // 2)
            _reset(client)
            return False

        with socket.create_connection(self.upstream, timeout=60) as upstream:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.sendall(head.raw)
            if expects:
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body.relay(rfile, upstream)
            up_rfile = upstream.makefile("rb")
            try:
                response = _read_head(up_rfile)
                while response is not None and 100 <= response.status < 200:
                    response = _read_head(up_rfile)  # interim answers: we sent our own
                if response is None:
                    raise _Closed("upstream closed without a response")
                reply = _Body.of_response(response, method)
                return self._answer(client, up_rfile, response, reply, fault)
            finally:
                up_rfile.close()

    def _answer(
        self,
        client: socket.socket,
        up_rfile: BinaryIO,
        response: _Head,
        reply: _Body,
        fault: FaultKind | None,
    ) -> bool:
        if fault is None:
            client.sendall(response.raw)
            reply.relay(up_rfile, client)
            closes = response.headers.get("connection", "").lower() == "close"
            return not (closes or reply.to_close)
        if fault is FaultKind.STALL:
            reply.relay(up_rfile, None)  # S3 has answered; the client hears nothing
            self._stopping.wait(self.stall_seconds)
            return False
        half = (reply.length or 0) // 2
        if half:
            client.sendall(response.raw)
            reply.relay(up_rfile, client, limit=half)
        else:
            # No body to cut (HEAD, an empty 200, a chunked or unsized one): cut the head.
            client.sendall(response.raw[: len(response.raw) // 2])
        if fault is FaultKind.RESET_RESPONSE:
            _reset(client)
        else:  # TRUNCATE: a clean close, short of the announced length
            client.shutdown(socket.SHUT_WR)
            time.sleep(0.05)  # let the FIN go out before the socket is closed
        return False


__all__ = [
    "AFTER_S3",
    "ALL_FAULTS",
    "BEFORE_S3",
    "FaultKind",
    "FaultProxy",
    "FaultSchedule",
    "NO_FAULTS",
    "QUICK_FAULTS",
]
