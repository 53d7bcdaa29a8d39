"""The daemon's own sockets bound what clients can hold (``dgfs.serving``).

Any local user can open connections to the metrics port and send nothing;
whoever may use the status socket, too. Held open, each is a descriptor of
the daemon, and they used to keep a scrape waiting: 400 idle connections
held 400 descriptors and blocked it. The endpoints are served in-process
here, as the mount serves them, and probed with plain sockets.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from dgfs import control, metrics

pytestmark = pytest.mark.timeout(60)


class _Gauge:
    def collect(self) -> Iterator[object]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily("dgfs_test_gauge", "a gauge", value=1)


def _registry() -> object:
    from prometheus_client.core import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Gauge())
    return registry


def still_open(sock: socket.socket) -> bool:
    """Whether the daemon still holds the other end of ``sock`` (non-blocking)."""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


async def scrape(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_a_scrape_is_answered_while_400_idle_connections_are_open() -> None:
    listeners = await metrics.open_metrics_listener(metrics.ListenAddress("127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    idle: list[socket.socket] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(metrics.serve_metrics, listeners, _registry())
            for _ in range(400):
                idle.append(socket.create_connection(("127.0.0.1", port)))
                await trio.sleep(0)  # the daemon accepts as they come
            with trio.fail_after(5):
                answer = await scrape(port)
            assert answer.startswith(b"HTTP/1.1 200 OK") and b"dgfs_test_gauge 1.0" in answer
            await trio.sleep(0.2)
            held = sum(still_open(sock) for sock in idle)
            assert held <= metrics.ENDPOINT.max_connections, f"{held} idle connections held open"
            nursery.cancel_scope.cancel()
    finally:
        for sock in idle:
            sock.close()


async def test_an_idle_metrics_connection_is_closed_after_the_request_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics, "ENDPOINT", replace(metrics.ENDPOINT, request_timeout=0.3))
    listeners = await metrics.open_metrics_listener(metrics.ListenAddress("127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics.serve_metrics, listeners, _registry())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            await trio.sleep(0.1)
            assert still_open(sock)
            await trio.sleep(0.5)
            assert not still_open(sock)
        nursery.cancel_scope.cancel()


async def test_dgfs_status_is_answered_while_many_idle_connections_are_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / control.SOCKET_NAME
    listener = await control.open_control_listener(path)
    idle: list[socket.socket] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve_control, listener, lambda: {"version": 1})
            for _ in range(100):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await trio.to_thread.run_sync(sock.connect, str(path))  # backlog 16: may wait
                idle.append(sock)
            with trio.fail_after(5):
                answer = await trio.to_thread.run_sync(control.query, path, 5.0)
            assert answer == {"version": 1}
            await trio.sleep(0.2)
            held = sum(still_open(sock) for sock in idle)
            assert held <= control.ENDPOINT.max_connections, f"{held} idle connections held open"
            nursery.cancel_scope.cancel()
    finally:
        for sock in idle:
            sock.close()
