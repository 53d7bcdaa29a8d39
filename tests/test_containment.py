"""Background jobs contain their failures: one job fails, the mount stays up.

Each test injects what dgfs does not raise on purpose (a full disk, no
descriptors left, a ``RecursionError``, a ``MemoryError``) into one
background job of an in-process mount (``tests.fsharness.mounted``)
or into a listener the mount runs (metrics, status socket), then checks
that the job's failure is one log line, that the mount's nursery is still
running (leaving ``mounted`` unmounts it in order) and that other
operations, and the same job run again, still work.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from dgfs import control, metrics
from dgfs.delta import DeltaEngine
from dgfs.errors import errno_of
from dgfs.fs import dirindex
from dgfs.fs.attrcache import AttrCache
from dgfs.fs.filesystem import FileSystem
from dgfs.fs.namespace import Namespace
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from tests.fsharness import OPTIONS, RANGED, lookup, mounted, ticking_clock, write_file
from tests.test_streaming import (
    HALF,
    new_dir,
    open_v2,
    read_from,
    store_versions,
    streamed_over_1mib,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.expected_log(r"failed \(the mount goes on\)"),
]

FAILURES = {
    "ENOSPC": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "EMFILE": lambda: OSError(errno.EMFILE, os.strerror(errno.EMFILE)),
    "RecursionError": lambda: RecursionError("maximum recursion depth exceeded"),
    "MemoryError": MemoryError,
}


@pytest.fixture(params=sorted(FAILURES))
def failure(request: pytest.FixtureRequest) -> Callable[[], BaseException]:
    """Makes the exception to inject (a new one for each raise, as in real life)."""
    return FAILURES[request.param]


def failed_jobs(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ERROR lines of background jobs that failed, in order."""
    return [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.levelno >= logging.ERROR and "failed (the mount goes on)" in r.getMessage()
    ]


# --- the filesystem's own jobs -----------------------------------------------------------


async def read_whole(fs: FileSystem, name: str) -> bytes:
    handle = await fs.open((await lookup(fs, name)).ino, os.O_RDONLY)
    try:
        return await read_from(fs, handle.fh, 0)
    finally:
        await fs.release(handle.fh)


async def test_a_prefetch_that_fails_unexpectedly_fails_alone(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Callable[[], BaseException],
) -> None:
    memory = MemoryStore()
    v2 = await store_versions(memory, tmp_path)
    real_decode = DeltaEngine.decode

    async def decode(
        engine: DeltaEngine, source: Path, delta: Path, out: Path, **limits: object
    ) -> None:
        raise failure()

    monkeypatch.setattr(DeltaEngine, "decode", decode)
    async with mounted(memory, new_dir(tmp_path / "reader"), OPTIONS) as m:
        # Opening a directory's first file is a walk: v2.tar is rebuilt ahead.
        v1 = await read_whole(m.fs, "v1.tar")
        assert m.fs.prefetch.started == 1
        with trio.fail_after(10):
            while m.fs.prefetch._wanted:
                await trio.sleep(0.01)
        [line] = failed_jobs(caplog)
        assert line.startswith("prefetch of v2.tar failed (the mount goes on): ")
        assert type(failure()).__name__ in line
        # The mount goes on: the file read by a reader, another one written.
        monkeypatch.setattr(DeltaEngine, "decode", real_decode)
        assert await read_whole(m.fs, "v2.tar") == v2
        await write_file(m.fs, "after.txt", b"still mounted\n")
        assert await read_whole(m.fs, "v1.tar") == v1
    assert memory.objects["after.txt"].body == b"still mounted\n"


@pytest.mark.usefixtures(streamed_over_1mib.__name__)
async def test_a_streamed_rebuild_that_fails_unexpectedly_fails_its_reader_alone(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Callable[[], BaseException],
) -> None:
    memory = MemoryStore()
    v2 = await store_versions(memory, tmp_path)
    real_decode = DeltaEngine.decode
    half_written, release = trio.Event(), trio.Event()

    async def decode(
        engine: DeltaEngine, source: Path, delta: Path, out: Path, **limits: Any
    ) -> None:
        # xdelta3 wrote half of the file, then the disk filled up (or worse).
        full = out.with_name(out.name + ".full")
        await real_decode(engine, source, delta, full, **limits)
        out.write_bytes(full.read_bytes()[:HALF])
        full.unlink()
        half_written.set()
        await release.wait()
        raise failure()

    monkeypatch.setattr(DeltaEngine, "decode", decode)
    async with mounted(memory, new_dir(tmp_path / "reader"), RANGED) as m:
        fh = await open_v2(m.fs)
        assert await m.fs.read(fh, 0, 4096) == v2[:4096]
        await half_written.wait()
        release.set()
        with pytest.raises(Exception) as failed:  # noqa: PT011 - its errno is what counts
            await read_from(m.fs, fh, 4096)
        assert errno_of(failed.value) == errno.EIO
        await m.fs.release(fh)
        [line] = failed_jobs(caplog)
        assert line.startswith("rebuild of v2.tar failed (the mount goes on): ")
        # The mount goes on: the same file opened again, another one written.
        monkeypatch.setattr(DeltaEngine, "decode", real_decode)
        assert await read_whole(m.fs, "v2.tar") == v2
        await write_file(m.fs, "after.txt", b"still mounted\n")
    assert memory.objects["after.txt"].body == b"still mounted\n"


async def test_the_periodic_index_and_attribute_cache_writer_survives_its_failures(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    idle_jump_clock: trio.testing.MockClock,  # noqa: F811 - rounds every 5 s, at no cost
    failure: Callable[[], BaseException],
) -> None:
    """The mount's periodic job (``Namespace.persist_attr_cache``) lists the
    directories it stored many files in once uploads go quiet and writes
    their indexes and the attribute cache: one listing fails (reading the
    old index), one index write fails, the attribute cache's write fails.
    Each is one line; the next rounds still run."""
    memory = MemoryStore(clock=ticking_clock())
    store = FaultyStore(memory)
    ns = Namespace(store, AttrCache(None), root_prefix="", listing_ttl=60, mounted_at_ns=1)
    store.fail("get_range", key=dirindex.index_key("listed/"), error=lambda _: failure())
    store.fail("put_bytes", key=dirindex.index_key("indexed/"), error=lambda _: failure())
    real_write = AttrCache.write

    def write(cache: AttrCache, rows: list[tuple[str, str, str]]) -> None:
        monkeypatch.setattr(AttrCache, "write", real_write)  # once
        raise failure()

    monkeypatch.setattr(AttrCache, "write", write)

    async def stored_many(directory: str) -> None:
        """What the upload pipeline tells the namespace when it stores files."""
        for i in range(20):
            await memory.put_bytes(f"{directory}/f-{i}.txt", b"x", {"mtime": "1700000000"})
            ns.stored_into(directory)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ns.persist_attr_cache)
        await stored_many("listed")
        await stored_many("indexed")
        with trio.fail_after(60):
            while len(failed_jobs(caplog)) < 3:
                await trio.sleep(1)
        assert sorted(line.partition(" failed")[0] for line in failed_jobs(caplog)) == [
            "listing 'listed' for its index",
            "writing the attribute cache",
            f"writing the directory index {dirindex.index_key('indexed/')}",
        ]
        assert not [k for k in memory.objects if k.startswith(dirindex.PREFIX)]
        # Later rounds run: the listings work, a third directory gets its index.
        assert len(await ns.listing("indexed")) == 20
        await stored_many("later")
        with trio.fail_after(60):
            while dirindex.index_key("later/") not in memory.objects:
                await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(failed_jobs(caplog)) == 3


# --- the listeners: metrics endpoint and status socket ---------------------------------


class _Gauge:
    """A collector with one gauge, the whole registry of these tests."""

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily("dgfs_test_gauge", "a gauge", value=1)


async def _scrape(port: int) -> bytes:
    """The answer to one ``GET /metrics``; b"" when the connection is closed without one."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    async with stream:
        try:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:  # reset: closed before reading the request
            return b""
    return data


async def test_a_metrics_scrape_that_fails_unexpectedly_fails_alone(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Callable[[], BaseException],
) -> None:
    from prometheus_client.core import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Gauge())
    real_read_head = metrics._read_head
    calls = 0

    async def read_head(stream: trio.SocketStream) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise failure()
        return await real_read_head(stream)

    monkeypatch.setattr(metrics, "_read_head", read_head)
    listeners = await metrics.open_metrics_listener(metrics.ListenAddress("127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(metrics.serve_metrics, listeners, registry)
        assert await _scrape(port) == b""  # that scrape's connection is closed
        assert b"dgfs_test_gauge 1.0" in await _scrape(port)  # the next one is answered
        nursery.cancel_scope.cancel()
    [line] = failed_jobs(caplog)
    assert line.startswith("a metrics scrape failed (the mount goes on): ")


async def test_a_status_request_that_fails_unexpectedly_fails_alone(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Callable[[], BaseException],
) -> None:
    real_read_line = control._read_line
    calls = 0

    async def read_line(stream: trio.SocketStream) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise failure()
        return await real_read_line(stream)

    monkeypatch.setattr(control, "_read_line", read_line)
    path = tmp_path / control.SOCKET_NAME
    listener = await control.open_control_listener(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve_control, listener, lambda: {"version": 1})
        with pytest.raises((OSError, ValueError)):  # closed without an answer (or reset)
            await trio.to_thread.run_sync(control.query, path, 5.0)
        assert await trio.to_thread.run_sync(control.query, path, 5.0) == {"version": 1}
        nursery.cancel_scope.cancel()
    [line] = failed_jobs(caplog)
    assert line.startswith("a status request failed (the mount goes on): ")


# --- the mount's own helpers (dgfs/mount.py) -----------------------------------------------


async def test_the_mounts_systemd_reports_and_read_ahead_fail_alone(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    idle_jump_clock: trio.testing.MockClock,  # noqa: F811 - the read-ahead thread ends first
    failure: Callable[[], BaseException],
) -> None:
    from dgfs import mount, readahead

    class Uploads:
        def backlog(self) -> tuple[int, int]:
            raise failure()

    class Fs:
        uploads = Uploads()

    def set_read_ahead(mountpoint: Path, kib: int) -> None:
        raise failure()

    monkeypatch.setattr(readahead, "set_read_ahead", set_read_ahead)
    notifier = mount.Notifier({})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mount._report_status, Fs(), notifier, trio.CancelScope())
        nursery.start_soon(mount._report_drain, Fs(), notifier, trio.CancelScope())
        nursery.start_soon(mount._set_read_ahead, Path("/nonexistent"), 1024)
        await trio.sleep(3 * mount.STATUS_INTERVAL)
        nursery.cancel_scope.cancel()
    assert sorted(line.partition(" failed")[0] for line in failed_jobs(caplog)) == [
        "reporting the drain to systemd",
        "reporting the status to systemd",
        "setting read_ahead_kb",
    ]
