"""A large delta served while it is rebuilt (``dgfs.fs.readers.StreamReader``), in-process.

Each test writes two versions of a file through one mount (the second is
stored as a delta of the first), then reads the second through a new mount
with an empty cache, whose xdelta3 decode is held halfway by the test: the
first half is written, the rest waits for ``release``. That makes "served
before the rebuild is done" something a test can see.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import random
from pathlib import Path

import pytest
import trio

from dgfs import rebuild
from dgfs.delta import DeltaEngine, DeltaEngineError
from dgfs.errors import FsError
from dgfs.fs import readers
from dgfs.fs.filesystem import FileSystem
from dgfs.fs.readers import StreamReader
from dgfs.store.memory import MemoryStore
from tests.fsharness import RANGED, close, create, lookup, mounted, write_file

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("streamed_over_1mib")]

SIZE = 3 << 20
HALF = SIZE // 2


@pytest.fixture
def streamed_over_1mib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deltas over RANGED's 1 MiB are verified as they are read: xdelta3 checks
    their windows, as it does over the default 32 MiB, and only such rebuilds
    are served while written."""
    monkeypatch.setattr(rebuild, "CHECKED_WHOLE_UP_TO", RANGED.verify_whole_below)


def versions() -> tuple[bytes, bytes]:
    rng = random.Random(5)
    v1 = bytearray(rng.randbytes(SIZE))
    v2 = bytearray(v1)
    for at in range(0, SIZE - 300, SIZE // 7):  # changes spread through the file
        v2[at : at + 300] = rng.randbytes(300)
    assert len(v2) == SIZE
    return bytes(v1), bytes(v2)


class HeldDecode:
    """Replaces ``DeltaEngine.decode``: the real decode, then its output written
    into ``out`` as xdelta3 does (same file, in order) but only half of it
    until ``release`` is set; ``fail`` makes the rest an xdelta3 error instead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.half_written = trio.Event()
        self.release = trio.Event()
        self.fail = False
        self.fail_with: BaseException | None = None  # what the decode raises instead
        real = DeltaEngine.decode
        held = self

        async def decode(
            engine: DeltaEngine, source: Path, delta: Path, out: Path, **limits: object
        ) -> None:
            full = out.with_name(out.name + ".full")
            await real(engine, source, delta, full, **limits)
            data = full.read_bytes()
            full.unlink()
            with open(out, "r+b") as f:
                f.truncate(0)
                f.write(data[:HALF])
            held.half_written.set()
            await held.release.wait()
            if held.fail_with is not None:
                raise held.fail_with
            if held.fail:
                raise DeltaEngineError(
                    "xdelta3 decode failed (exit 1): xdelta3: target window checksum mismatch"
                )
            with open(out, "r+b") as f:
                f.seek(HALF)
                f.write(data[HALF:])

        monkeypatch.setattr(DeltaEngine, "decode", decode)


def new_dir(path: Path) -> Path:
    path.mkdir()
    return path


async def store_versions(memory: MemoryStore, tmp_path: Path) -> bytes:
    v1, v2 = versions()
    async with mounted(memory, new_dir(tmp_path / "writer"), RANGED) as m:
        fh = await create(m.fs, "v1.tar", v1)
        await m.fs.fsync(fh)  # uploaded first: the reference
        await close(m.fs, fh)
        await write_file(m.fs, "v2.tar", v2)
    assert "v2.tar.delta" in memory.objects, sorted(memory.objects)
    return v2


async def open_v2(fs: FileSystem) -> int:
    node = await lookup(fs, "v2.tar")
    return (await fs.open(node.ino, os.O_RDONLY)).fh


async def read_from(fs: FileSystem, fh: int, offset: int, end: int = SIZE) -> bytes:
    pieces = []
    while offset < end:
        data = await fs.read(fh, offset, min(1 << 20, end - offset))
        assert data, f"short read at {offset}"
        pieces.append(data)
        offset += len(data)
    return b"".join(pieces)


def stream_reader(fs: FileSystem, fh: int) -> StreamReader:
    reader = fs.handles.get(fh).reader
    inner = getattr(reader, "inner", None)
    assert isinstance(inner, StreamReader), reader
    return inner


async def test_a_large_delta_is_served_while_it_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = MemoryStore()
    v2 = await store_versions(memory, tmp_path)
    held = HeldDecode(monkeypatch)
    async with mounted(memory, new_dir(tmp_path / "reader"), RANGED) as m:
        fh = await open_v2(m.fs)
        # Served from the first half while the rest is not decoded yet.
        assert await read_from(m.fs, fh, 0, HALF) == v2[:HALF]
        reader = stream_reader(m.fs, fh)
        assert held.half_written.is_set() and not reader.stream.complete
        held.release.set()
        assert await read_from(m.fs, fh, HALF) == v2[HALF:]
        await m.fs.release(fh)
        # ...and the rebuild went on into the cache, verified, for the next reader.
        with trio.fail_after(10):
            while not m.fs.core.cache.contains(_sha256(v2)):
                await trio.sleep(0.01)
        fh = await open_v2(m.fs)
        assert await read_from(m.fs, fh, 0) == v2
        assert not isinstance(getattr(m.fs.handles.get(fh).reader, "inner", None), StreamReader)
        await m.fs.release(fh)


async def test_a_read_far_ahead_is_served_from_the_verified_cached_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = MemoryStore()
    v2 = await store_versions(memory, tmp_path)
    held = HeldDecode(monkeypatch)
    monkeypatch.setattr(readers, "MAX_HELD_AHEAD", 256 << 10)
    async with mounted(memory, new_dir(tmp_path / "reader"), RANGED) as m:
        fh = await open_v2(m.fs)
        assert await m.fs.read(fh, 0, 4096) == v2[:4096]
        got: dict[str, bytes] = {}

        async def read_the_end() -> None:
            got["end"] = await m.fs.read(fh, SIZE - 4096, 4096)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_the_end)
            await trio.sleep(0.2)
            assert "end" not in got  # it waits for the whole rebuild, verified
            held.release.set()
        assert got["end"] == v2[-4096:]
        assert stream_reader(m.fs, fh)._cached is not None
        assert await m.fs.read(fh, 4096, 4096) == v2[4096:8192]  # from the cache now
        await m.fs.release(fh)


@pytest.mark.expected_log(r"cannot read v2\.tar\.delta")
async def test_bytes_that_fail_their_sha256_fail_the_read_that_completes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = MemoryStore()
    v2 = await store_versions(memory, tmp_path)
    delta = memory.objects["v2.tar.delta"]
    memory.objects["v2.tar.delta"] = dataclasses.replace(
        delta, metadata={**delta.metadata, "dg-file-sha256": "0" * 64}
    )
    HeldDecode(monkeypatch).release.set()
    async with mounted(memory, new_dir(tmp_path / "reader"), RANGED) as m:
        fh = await open_v2(m.fs)
        assert await read_from(m.fs, fh, 0, SIZE - 4096) == v2[: SIZE - 4096]
        with pytest.raises(FsError) as failed:
            await m.fs.read(fh, SIZE - 4096, 4096)
        assert failed.value.errno == errno.EIO
        with pytest.raises(FsError) as again:  # and every read after it
            await m.fs.read(fh, 0, 4096)
        assert again.value.errno == errno.EIO
        await m.fs.release(fh)
        assert not m.fs.core.cache.contains("0" * 64)


@pytest.mark.expected_log(r"cannot read v2\.tar\.delta")
async def test_a_decode_that_fails_midway_fails_the_reads_past_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = MemoryStore()
    v2 = await store_versions(memory, tmp_path)
    held = HeldDecode(monkeypatch)
    held.fail = True
    async with mounted(memory, new_dir(tmp_path / "reader"), RANGED) as m:
        fh = await open_v2(m.fs)
        assert await m.fs.read(fh, 0, 4096) == v2[:4096]
        held.release.set()
        with pytest.raises(FsError) as failed:
            await read_from(m.fs, fh, 4096)
        assert failed.value.errno == errno.EIO
        await m.fs.release(fh)


@pytest.mark.expected_log(r"rebuilding v2\.tar|No space left")
async def test_a_rebuild_stopped_by_a_local_error_fails_each_read_past_it_with_eio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scratch disk fills up while a streamed rebuild runs: the reads past
    what it wrote fail with EIO (the kernel and ``cat`` retry them), not with
    a bare dgfs error that the FUSE layer logs as an ERROR on every retry."""
    memory = MemoryStore()
    v2 = await store_versions(memory, tmp_path)
    held = HeldDecode(monkeypatch)
    held.fail_with = OSError(errno.ENOSPC, "No space left on device")
    async with mounted(memory, new_dir(tmp_path / "reader"), RANGED) as m:
        fh = await open_v2(m.fs)
        assert await m.fs.read(fh, 0, 4096) == v2[:4096]
        held.release.set()
        for _ in range(3):  # a read retried
            with pytest.raises(FsError) as failed:
                await read_from(m.fs, fh, HALF)
            assert failed.value.errno == errno.EIO
        await m.fs.release(fh)


async def test_small_deltas_are_verified_whole_before_the_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = MemoryStore()
    v2 = await store_versions(memory, tmp_path)
    HeldDecode(monkeypatch).release.set()
    whole = dataclasses.replace(RANGED, verify_whole_below=SIZE)
    async with mounted(memory, new_dir(tmp_path / "reader"), whole) as m:
        fh = await open_v2(m.fs)
        assert await read_from(m.fs, fh, 0) == v2
        assert not isinstance(getattr(m.fs.handles.get(fh).reader, "inner", None), StreamReader)
        await m.fs.release(fh)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
