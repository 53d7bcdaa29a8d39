"""A cold read of a directory of deltas, file after file in name order (``cp -r``,
``sha256sum *``): the next files' rebuilds overlap the first file's download,
run in the order the reader opens them, and reuse the reference it
downloaded; and still no byte that fails its SHA-256 is returned.

In-process mounts over a ``MemoryStore`` (wrapped in a ``FaultyStore`` to
hold chosen calls), with real xdelta3 and a real clock: nothing is timed,
the tests look at which store calls were made while another was held.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from dgfs.cache import ContentCache
from dgfs.errors import FsError
from dgfs.fs.filesystem import FileSystem
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from tests.coreharness import flip_byte
from tests.fsharness import GID, ROOT, UID, close, create, lookup, mounted, read_file, write_file
from tests.test_streaming import new_dir
from testsupport.releases import ReleaseSeries

pytestmark = pytest.mark.timeout(60)

DIR = "rel"
REFERENCE = f"{DIR}/reference.bin"
#: Five releases of ~256 KiB: the first is the directory's reference, the rest deltas.
RELEASES = list(ReleaseSeries(size=256 << 10).zips(5))
NAMES = [name for name, _ in RELEASES]


def delta_key(index: int) -> str:
    return f"{DIR}/{NAMES[index]}.delta"


async def store_series(memory: MemoryStore, tmp_path: Path) -> None:
    """RELEASES in ``rel/``, the first one uploaded first: it is the reference."""
    async with mounted(memory, new_dir(tmp_path / "writer")) as m:
        d = await m.fs.mkdir(ROOT, DIR, 0o755, UID, GID)
        first, *rest = RELEASES
        fh = await create(m.fs, first[0], first[1], d.ino)
        await m.fs.fsync(fh)
        await close(m.fs, fh)
        for name, data in rest:
            await write_file(m.fs, name, data, parent=d.ino)
    assert all(delta_key(i) in memory.objects for i in range(1, len(RELEASES)))
    assert memory.objects[REFERENCE].body == RELEASES[0][1]


async def read_in_dir(fs: FileSystem, index: int) -> bytes:
    return await read_file(fs, NAMES[index], (await lookup(fs, DIR)).ino)


async def prefetches_done(fs: FileSystem) -> None:
    with trio.fail_after(30):  # a safety net, not a measurement
        while fs.prefetch._wanted:
            await trio.sleep(0.01)


def downloaded(store: FaultyStore) -> list[str]:
    """The keys of the store's downloads, in the order they were asked for."""
    return [call.keys[0] for call in store.log if call.operation == "download"]


async def test_the_next_deltas_download_while_the_first_file_waits_for_the_reference(
    tmp_path: Path,
) -> None:
    """Opening a directory's first file starts the walk's prefetch at once: the
    next files' deltas are fetched beside the reference, not after it."""
    memory = MemoryStore()
    await store_series(memory, tmp_path)
    store = FaultyStore(memory)
    held = store.hang("download", key=REFERENCE)
    async with mounted(store, new_dir(tmp_path / "reader")) as m:
        d = await lookup(m.fs, DIR)
        first: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def read_first() -> None:
                first.append(await read_file(m.fs, NAMES[0], d.ino))

            nursery.start_soon(read_first)
            # Held, the reference download cannot end: a delta download seen
            # meanwhile was started beside it (before the fix: never, and
            # this fails after 10 s).
            with trio.fail_after(10):
                while not [key for key in downloaded(store) if key.endswith(".delta")]:
                    await trio.sleep(0.005)
            assert store.in_flight("download", key=REFERENCE) == 1
            held.release()
        assert first == [RELEASES[0][1]]
        await prefetches_done(m.fs)
        for index in range(1, len(RELEASES)):
            assert await read_in_dir(m.fs, index) == RELEASES[index][1]
    assert downloaded(store).count(REFERENCE) == 1


@pytest.fixture(params=["as started", "reversed"])
def trio_batch_order(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trio runs the tasks woken together in their order or reversed, at random
    (``trio._core._run``, one coin per batch): each test runs once with each,
    so a test that passes cannot be relying on the coin. (Below 0.5 trio
    reverses the batch, then pops from its end: the tasks run as started.)"""
    coin = 0.0 if request.param == "as started" else 0.99
    monkeypatch.setattr(trio._core._run._r, "random", lambda: coin)


@pytest.mark.usefixtures("trio_batch_order")
async def test_a_walk_rebuilds_the_next_file_first(tmp_path: Path) -> None:
    """With one worker, the rebuilds a walk queues start in name order: the file
    the reader opens next is never behind the ones after it."""
    memory = MemoryStore()
    await store_series(memory, tmp_path)
    store = FaultyStore(memory)
    async with mounted(store, new_dir(tmp_path / "reader")) as m:
        m.fs.prefetch.workers = 1
        m.fs.prefetch.ahead = 3
        assert await read_in_dir(m.fs, 0) == RELEASES[0][1]
        await prefetches_done(m.fs)
        deltas = [key for key in downloaded(store) if key.endswith(".delta")]
        assert deltas == [delta_key(1), delta_key(2), delta_key(3)]
        for index in range(1, len(RELEASES)):
            assert await read_in_dir(m.fs, index) == RELEASES[index][1]


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The SHA-256 of every cache entry decrypted into a plain file."""
    seen: list[str] = []
    real = ContentCache.export

    def export(cache: ContentCache, sha256: str, dest: Path) -> bool:
        seen.append(sha256)
        return real(cache, sha256, dest)

    monkeypatch.setattr(ContentCache, "export", export)
    yield seen


async def test_the_reference_read_as_a_file_is_kept_plain_for_the_deltas(
    tmp_path: Path, exports: list[str]
) -> None:
    """The first file of a walk is the reference: the plain copy downloaded for
    it is what xdelta3 reads for the deltas after it, not a copy decrypted
    back out of the cache."""
    memory = MemoryStore()
    await store_series(memory, tmp_path)
    exports.clear()  # the writer's
    store = FaultyStore(memory)
    async with mounted(store, new_dir(tmp_path / "reader")) as m:
        for index, (_, data) in enumerate(RELEASES):
            assert await read_in_dir(m.fs, index) == data
        await prefetches_done(m.fs)
    assert exports == []
    assert downloaded(store).count(REFERENCE) == 1


@pytest.mark.expected_log(r"cannot read rel/")
async def test_a_corrupt_reference_fails_every_file_of_the_walk(tmp_path: Path) -> None:
    """A reference that no longer matches its SHA-256 gives EIO for its own file
    and every delta against it, prefetched or not, and no plain copy of it
    is kept for later reads."""
    memory = MemoryStore()
    await store_series(memory, tmp_path)
    flip_byte(memory, REFERENCE, lambda body: len(body) // 2)
    async with mounted(memory, new_dir(tmp_path / "reader")) as m:
        for index in range(len(RELEASES)):
            with pytest.raises(FsError) as exc:
                await read_in_dir(m.fs, index)
            assert exc.value.errno == errno.EIO
        await prefetches_done(m.fs)
        assert not list(m.fs.core.bench.scratch_dir.glob("*.ref"))


@pytest.mark.expected_log(r"cannot read rel/")
async def test_a_corrupt_delta_in_a_walk_fails_alone(tmp_path: Path) -> None:
    """A delta whose rebuild fails (here: its body altered) gives EIO, whether
    the prefetch or the reader rebuilt it first; the files around it read."""
    memory = MemoryStore()
    await store_series(memory, tmp_path)
    flip_byte(memory, delta_key(2), lambda body: len(body) // 2)
    async with mounted(memory, new_dir(tmp_path / "reader")) as m:
        for index, (_, data) in enumerate(RELEASES):
            if index == 2:
                with pytest.raises(FsError) as exc:
                    await read_in_dir(m.fs, index)
                assert exc.value.errno == errno.EIO
            else:
                assert await read_in_dir(m.fs, index) == data
        await prefetches_done(m.fs)
