"""An in-process mount for tests: ``FileSystem`` wired as ``dgfs.mount`` wires
one, without the kernel, and the POSIX-level steps tests drive it with.

``mounted`` runs a mount's lifetime (upload workers in a nursery, journal
recovery, drain at unmount, or a simulated crash); the helpers below do
what ``echo > name``, ``cat``, ``mv`` and friends would do through a real
mount. Files are small text, so a ``MemoryStore`` holds each one directly
under its key: ``bucket`` lets a test compare it byte for byte.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing

from dgfs.cache import ContentCache
from dgfs.core import Core
from dgfs.delta import DeltaEngine
from dgfs.errors import FsError
from dgfs.fs import dirindex
from dgfs.fs.attrcache import AttrCache
from dgfs.fs.filesystem import FileSystem, FsOptions
from dgfs.fs.journal import Journal
from dgfs.fs.nodes import Node
from dgfs.policy import Policy
from dgfs.store.base import ObjectStore
from dgfs.store.faulty import Fault
from dgfs.store.memory import MemoryStore
from testsupport.releases import ReleaseSeries

T = TypeVar("T")

ROOT = 1
UID, GID = os.getuid(), os.getgid()
OPTIONS = FsOptions(upload_delay=0.5, retry_delay=2.0)
#: Uploads at once and retries after 10 ms: for tests of several mounts on real time.
FAST_RETRIES = FsOptions(upload_delay=0.0, retry_delay=0.01)
#: ``OPTIONS``, but files over 1 MiB are read by ranges (the default is 32 MiB).
RANGED = replace(OPTIONS, verify_whole_below=1 << 20)
#: Three releases of a plugin, zips of ~250 KB: stored as deltas.
RELEASES = list(ReleaseSeries(size=512 << 10).zips(3))


# --- mounting -------------------------------------------------------------------------


@dataclass
class Mount:
    fs: FileSystem
    journal_dir: Path
    recovered: int  # entries an earlier mount left in the journal


@contextlib.asynccontextmanager
async def wired(
    store: ObjectStore,
    home: Path,
    options: FsOptions = OPTIONS,
    *,
    journal_type: type[Journal] = Journal,
    engine: DeltaEngine | None = None,
) -> AsyncIterator[tuple[FileSystem, Journal]]:
    """A ``FileSystem`` wired as ``dgfs.mount`` wires one, not started: a new
    core and cache, the journal in ``home/journal``. The core and cache are
    closed on the way out; ending the mount is the caller's (``end_mount``)."""
    run_dir = Path(tempfile.mkdtemp(dir=home, prefix="mount-"))
    cache = ContentCache(run_dir / "cache", 64 << 20)
    core = Core(store, cache, engine or DeltaEngine(), Policy(), scratch_dir=run_dir / "scratch")
    journal = journal_type(home / "journal")
    try:
        yield FileSystem(core, journal, AttrCache(None), options), journal
    finally:
        await core.aclose()
        cache.close()


async def end_mount(fs: FileSystem, journal: Journal, *, crashed: bool) -> None:
    """Close a mount's filesystem and journal; a ``crashed`` one only lets go
    of its descriptors, as the kernel does for a dead process."""
    if crashed:
        journal.close()
        close_fds_under(journal.directory)
    else:
        await fs.close()
        journal.close()


@contextlib.asynccontextmanager
async def mounted(
    store: ObjectStore,
    tmp_path: Path,
    options: FsOptions = OPTIONS,
    *,
    crash: bool = False,
    journal_type: type[Journal] = Journal,
    engine: DeltaEngine | None = None,
) -> AsyncIterator[Mount]:
    """A mount's lifetime as ``dgfs.mount`` runs it; the journal is ``tmp_path/journal``.

    Leaving the block unmounts: pending uploads are drained, then the
    filesystem and journal are closed. With ``crash`` the process "dies"
    instead: no drain, no close; the journal keeps what it holds.
    """
    async with wired(store, tmp_path, options, journal_type=journal_type, engine=engine) as (
        fs,
        journal,
    ):
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run_uploads)
                recovered = await fs.recover_journal()
                yield Mount(fs, journal.directory, recovered)
                if not crash:
                    await fs.unmounted()
                    await fs.wait_idle()
                nursery.cancel_scope.cancel()
        finally:
            await end_mount(fs, journal, crashed=crash)


def fds_under(directory: Path) -> dict[int, str]:
    """The descriptors this process holds open under ``directory`` (deleted
    files too), each with the path it is open on."""
    found: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            found[int(name)] = target
    return found


def close_fds_under(directory: Path) -> None:
    for fd in fds_under(directory):
        os.close(fd)


# --- POSIX-level helpers --------------------------------------------------------------


async def lookup(fs: FileSystem, name: str, parent: int = ROOT) -> Node:
    """``FileSystem.lookup`` counts the lookup it hands the kernel; these tests
    never send ``forget``, so a name a test used stays valid, as in a mount."""
    return await fs.lookup(parent, name)


async def create(fs: FileSystem, name: str, data: bytes, parent: int = ROOT) -> int:
    """open(O_CREAT|O_TRUNC) and write ``data``, left open; returns the handle."""
    handle, node = await fs.create(
        parent, name, 0o644, UID, GID, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    )
    await fs.write(handle.fh, 0, data)
    return handle.fh


async def close(fs: FileSystem, fh: int) -> None:
    await fs.flush(fh)
    await fs.release(fh)


async def write_file(fs: FileSystem, name: str, data: bytes, parent: int = ROOT) -> None:
    """What ``echo > name`` does: create, write, close."""
    await close(fs, await create(fs, name, data, parent))


async def write_stored(fs: FileSystem, name: str, data: bytes, parent: int = ROOT) -> Node:
    """``write_file``, then every upload lands; returns the file's node."""
    await write_file(fs, name, data, parent)
    await fs.wait_idle()
    return await lookup(fs, name, parent)


async def write_until_held(
    fs: FileSystem, name: str, data: bytes, held: Fault, clock: trio.testing.MockClock
) -> None:
    """``write_file``, then the upload delay passes and its upload starts,
    to be stopped by ``held`` (a ``FaultyStore.hang``) until released."""
    await write_file(fs, name, data)
    clock.jump(OPTIONS.upload_delay)
    await held.reached.wait()


async def open_for_rewrite(fs: FileSystem, name: str, data: bytes) -> int:
    """open(O_TRUNC) an existing file and write ``data``, left open; returns the handle."""
    node = await lookup(fs, name)
    handle = await fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
    await fs.write(handle.fh, 0, data)
    return handle.fh


async def read_file(fs: FileSystem, name: str, parent: int = ROOT) -> bytes:
    node = await lookup(fs, name, parent)
    handle = await fs.open(node.ino, os.O_RDONLY)
    try:
        return await fs.read(handle.fh, 0, 1 << 20)
    finally:
        await fs.release(handle.fh)


async def ino_of(fs: FileSystem, path: str) -> int:
    """The inode of the directory ``path`` (slash-separated, from the root)."""
    ino = ROOT
    for part in filter(None, path.split("/")):
        ino = (await lookup(fs, part, ino)).ino
    return ino


async def readdir(fs: FileSystem, path: str) -> dict[str, Node]:
    """name -> node of every entry of the directory ``path`` ("" for the root)."""
    found: dict[str, Node] = {}

    def reply(name: str, node: Node, offset: int) -> bool:
        found[name] = node
        return True

    await fs.readdir(await ino_of(fs, path), 0, reply)
    return found


async def rename(fs: FileSystem, old: str, new: str) -> None:
    await fs.rename(ROOT, old, ROOT, new, 0)


async def assert_absent(fs: FileSystem, name: str) -> None:
    with pytest.raises(FsError) as exc:
        await fs.lookup(ROOT, name)
    assert exc.value.errno == errno.ENOENT


def ticking_clock() -> Callable[[], datetime]:
    """A store clock one second later at every call: a mount's HEAD of what
    it wrote is answered after that second, as on a real store, where
    uploads are seconds apart from the listings that follow them
    (``dgfs.fs.dirindex.settled``)."""
    ticks = itertools.count()
    started = datetime.now(UTC)
    return lambda: started + timedelta(seconds=next(ticks))


def bucket(memory: MemoryStore) -> dict[str, bytes]:
    """Every object of the bucket and its body, but directory indexes."""
    return {key: obj.body for key, obj in without_indexes(memory.objects).items()}


def without_indexes(objects: Mapping[str, T]) -> dict[str, T]:
    """``objects`` but directory indexes: hints a mount writes where it listed
    or stored 4 or more files (``dgfs.fs.dirindex``), not files."""
    return {key: obj for key, obj in objects.items() if not key.startswith(dirindex.PREFIX)}


def journal_entries(journal_dir: Path) -> list[str]:
    """Staging files and manifests still in the journal (not counting failed/)."""
    return sorted(p.name for p in journal_dir.iterdir() if p.suffix in (".data", ".json"))


async def started(job: Callable[[], Awaitable[object]], nursery: trio.Nursery) -> trio.Event:
    """Start ``job`` in ``nursery`` and let it run until every task is blocked
    (one waiting for a worker thread counts as blocked); returns an event set
    when the job is done."""
    done = trio.Event()

    async def run() -> None:
        await job()
        done.set()

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return done


# --- several mounts of one bucket ----------------------------------------------------


def home(tmp_path: Path, mount: str) -> Path:
    """The directory of one mount's journal and cache."""
    path = tmp_path / mount
    path.mkdir(exist_ok=True)
    return path


async def read_fresh(memory: MemoryStore, tmp_path: Path, path: str) -> bytes:
    """``path`` as a third, fresh mount reads it."""
    async with mounted(memory, home(tmp_path, "reader")) as m:
        parent, _, name = path.rpartition("/")
        return await read_file(m.fs, name, (await lookup(m.fs, parent)).ino)


class GatedCommitJournal(Journal):
    """A journal whose commits wait (in their worker thread) until ``gate`` is
    set: a close (or fsync) held in its commit while other operations run."""

    gate = threading.Event()

    def commit(self, entry_id: str, key: str, metadata: Mapping[str, str]) -> None:
        self.gate.wait(timeout=20)
        super().commit(entry_id, key, metadata)


async def let_tasks_run() -> None:
    """Let every task run until all wait (ten rounds: a worker thread's reply
    wakes a task, which may start another)."""
    for _ in range(10):
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)


async def flush_outcome(fs: FileSystem, fh: int, outcome: dict[str, object]) -> None:
    """``close``'s flush of ``fh``; ``outcome["flush"]``: 0 or the errno's name."""
    try:
        await fs.flush(fh)
        outcome["flush"] = 0
    except FsError as exc:
        outcome["flush"] = errno.errorcode.get(exc.errno, exc.errno)
