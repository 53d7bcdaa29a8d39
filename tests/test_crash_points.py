"""Crash consistency: the process dies at every step of a write, upload and
rename sequence, and every acknowledged file comes back exactly.

A step is anything that changes what survives a crash: each S3 request
and each journal operation. The test first runs the sequence once to
count those steps, then once per step and side of it (the step not done,
or done and its reply lost), killing the mount there: from that moment
every S3 request and journal operation raises ``Crashed`` (a
``BaseException``, so no ``except Exception`` in dgfs can swallow it),
the mount is abandoned without its drain, and the next mount, on the same
bucket and journal directory, recovers what the journal holds. A fresh
mount then reads the bucket back.

What may come back: the files as the last acknowledged operation left
them — a close() that returned, a rename or unlink that returned — or, for
the operation the crash interrupted, as it would have left them (a rename
of a stored file may also leave both names, as its copy and delete are two
S3 requests; docs/SEMANTICS.md). Never an acknowledged file missing, and
never bytes that were not written.

Deterministic: trio's clock stands still (uploads start at ``wait_idle`` or
``fsync`` only) and one upload worker runs, so a run takes its steps in the
same order each time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest
import trio
import trio.testing

from dgfs.fs.filesystem import FileSystem, FsOptions
from dgfs.fs.journal import Journal, JournalEntry
from dgfs.store.faulty import FaultyStore, Operation
from dgfs.store.memory import MemoryStore
from tests.fsharness import (
    GID,
    ROOT,
    UID,
    close,
    end_mount,
    lookup,
    read_file,
    rename,
    wired,
    write_file,
)
from testsupport.releases import ReleaseSeries

pytestmark = pytest.mark.timeout(300)

OPTIONS = FsOptions(upload_delay=1.0, retry_delay=1.0, upload_workers=1)
RELEASES = list(ReleaseSeries(size=512 << 10).zips(2))  # two zips: a reference and a delta

Files = dict[str, bytes]  # path -> content


class Crashed(BaseException):
    """The process died here (nothing after it ran)."""


class CrashPlan:
    """Counts crash points; at point ``at`` the process dies, and stays dead."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.points = 0
        self.dead = False
        self.where = ""

    def point(self, what: str) -> None:
        if self.dead:
            raise Crashed(f"dead since {self.where}")
        if self.points == self.at:
            self.dead = True
            self.where = what
            raise Crashed(what)
        self.points += 1


class CrashingStore(FaultyStore):
    """Two crash points per S3 request: before it is sent, after it was done."""

    def __init__(self, inner: MemoryStore, plan: CrashPlan) -> None:
        super().__init__(inner)
        self.plan = plan

    @contextlib.asynccontextmanager
    async def _faults(self, operation: Operation, *keys: str) -> AsyncIterator[None]:
        self.plan.point(f"before {operation} {keys}")
        async with super()._faults(operation, *keys):
            yield
        self.plan.point(f"after {operation} {keys}")


def crashing_journal(plan: CrashPlan) -> type[Journal]:
    """A ``Journal`` with two crash points around each operation that changes it."""

    class CrashingJournal(Journal):
        def new_staging(self) -> tuple[str, Path]:
            plan.point("before journal new_staging")
            result = super().new_staging()
            plan.point("after journal new_staging")
            return result

        def commit(self, entry_id: str, key: str, metadata: Mapping[str, str]) -> None:
            plan.point(f"before journal commit {key}")
            super().commit(entry_id, key, metadata)
            plan.point(f"after journal commit {key}")

        def write_manifest(self, entry: JournalEntry) -> None:
            plan.point(f"before journal write_manifest {entry.key}")
            super().write_manifest(entry)
            plan.point(f"after journal write_manifest {entry.key}")

        def remove(self, entry_id: str) -> None:
            plan.point("before journal remove")
            super().remove(entry_id)
            plan.point("after journal remove")

        def quarantine(self, entry_id: str) -> Path:
            plan.point("before journal quarantine")
            where = super().quarantine(entry_id)
            plan.point("after journal quarantine")
            return where

    return CrashingJournal


class Model:
    """What the files may be: as the last acknowledged operation left them,
    or as the one in progress would leave them."""

    def __init__(self) -> None:
        self.acked: Files = {}
        self.alternatives: list[Files] = []

    @contextlib.contextmanager
    def op(
        self, changes: Mapping[str, bytes | None], partial: Files | None = None
    ) -> Iterator[None]:
        """An operation changing the files named in ``changes`` (None: removed);
        ``partial``: one more state a crash inside it may leave."""
        after = dict(self.acked)
        for path, content in changes.items():
            if content is None:
                after.pop(path, None)
            else:
                after[path] = content
        self.alternatives = [after] + ([partial] if partial is not None else [])
        yield
        self.acked, self.alternatives = after, []

    def allowed(self) -> list[Files]:
        return [self.acked, *self.alternatives]


async def upload_all(fs: FileSystem) -> None:
    """What fsync does, for every closed file: upload it now (``wait_idle``
    would leave the mount draining, every later upload without its delay)."""
    for node in fs.nodes.staged_nodes():
        await fs.uploads.wait_uploaded(node)


async def scenario(fs: FileSystem, model: Model) -> None:
    """Writes, uploads, an overwrite, renames over names, an unlink, deltas."""
    with model.op({"a.txt": b"A1\n"}):
        await write_file(fs, "a.txt", b"A1\n")
    with model.op({"b.txt": b"B1\n"}):
        await write_file(fs, "b.txt", b"B1\n")
    await upload_all(fs)
    with model.op({"a.txt": b"A2, longer\n"}):  # open(O_TRUNC) of a stored file
        node = await lookup(fs, "a.txt")
        handle = await fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
        await fs.write(handle.fh, 0, b"A2, longer\n")
        await close(fs, handle.fh)
    both = {**model.acked, "c.txt": b"A2, longer\n"}
    with model.op({"a.txt": None, "c.txt": b"A2, longer\n"}, partial=both):  # still local
        await rename(fs, "a.txt", "c.txt")
    await upload_all(fs)
    with model.op({"b.txt": b"B2\n"}):
        await write_file(fs, "b.txt", b"B2\n")  # create over a stored file
    with model.op({"b.txt": None}):
        await fs.unlink(ROOT, "b.txt")
    with model.op({"d.txt": b"D1\n"}):
        await write_file(fs, "d.txt", b"D1\n")
    await upload_all(fs)
    both = {**model.acked, "c.txt": b"D1\n"}
    with model.op({"d.txt": None, "c.txt": b"D1\n"}, partial=both):  # stored, over a stored one
        await rename(fs, "d.txt", "c.txt")
    with model.op({"e.txt": b"E1\n"}):
        await write_file(fs, "e.txt", b"E1\n")
    await upload_all(fs)
    with model.op({"e.txt": b"E2\n"}):
        await write_file(fs, "e.txt", b"E2\n")  # acknowledged, not uploaded
    with model.op({"f.txt": b"F1\n"}):
        await write_file(fs, "f.txt", b"F1\n")
    with model.op({"f.txt": None, "e.txt": b"F1\n"}):  # both local: journal entries only
        await rename(fs, "f.txt", "e.txt")
    await upload_all(fs)
    rel = await fs.mkdir(ROOT, "rel", 0o755, UID, GID)
    (first, first_data), (second, second_data) = RELEASES
    with model.op({f"rel/{first}": first_data}):
        await write_file(fs, first, first_data, parent=rel.ino)
    await upload_all(fs)  # the reference
    with model.op({f"rel/{second}": second_data}):
        await write_file(fs, second, second_data, parent=rel.ino)
    await upload_all(fs)  # its delta


async def run_crashing(memory: MemoryStore, home: Path, plan: CrashPlan, model: Model) -> bool:
    """The scenario on a mount that dies at ``plan.at``; True if it did."""
    store = CrashingStore(memory, plan)
    async with wired(store, home, OPTIONS, journal_type=crashing_journal(plan)) as (fs, journal):
        crashed = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run_uploads)
                await fs.recover_journal()
                await scenario(fs, model)
                await fs.unmounted()
                await fs.wait_idle()
                nursery.cancel_scope.cancel()
        except* Crashed:
            crashed = True
        if not crashed:
            try:
                await end_mount(fs, journal, crashed=False)
            except* Crashed:  # at unmount (listing for a directory index): dead there
                crashed = True
        if crashed:
            await end_mount(fs, journal, crashed=True)
        return crashed


async def read_back(memory: MemoryStore, home: Path) -> Files:
    """Recover the journal on a new mount, upload it all, then read every file
    through a fresh mount."""
    async with wired(memory, home, OPTIONS) as (fs, journal):
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run_uploads)
            await fs.recover_journal()
            await fs.wait_idle()
            nursery.cancel_scope.cancel()
        await fs.close()
        journal.close()
    assert not (home / "journal" / "failed").exists()
    found: Files = {}
    fresh = home / "fresh"
    fresh.mkdir()
    async with wired(memory, fresh, OPTIONS) as (fs, journal):
        for parent_path, parent_ino in (("", ROOT), ("rel", None)):
            if parent_ino is None:
                try:
                    parent_ino = (await lookup(fs, parent_path)).ino
                except Exception:
                    continue
            for name in await _names(fs, parent_ino):
                path = f"{parent_path}/{name}" if parent_path else name
                if path == "rel":
                    continue
                found[path] = await read_file(fs, name, parent_ino)
        await fs.close()
        journal.close()
    return found


async def _names(fs: FileSystem, ino: int) -> list[str]:
    names: list[str] = []
    await fs.readdir(ino, 0, lambda name, node, offset: names.append(name) or True)
    return names


def count_points(tmp_path: Path) -> int:
    plan = CrashPlan(None)

    async def main() -> None:
        memory = MemoryStore("crash-bucket")
        home = tmp_path / "count"
        home.mkdir()
        crashed = await run_crashing(memory, home, plan, Model())
        assert not crashed

    trio.run(main, clock=trio.testing.MockClock())
    return plan.points


def test_every_acknowledged_file_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    points = count_points(tmp_path)
    assert points > 50  # the sequence really makes S3 requests and journal entries
    failures: list[str] = []

    def crash_at(at: int) -> None:
        memory = MemoryStore("crash-bucket")
        home = tmp_path / f"crash-{at}"
        home.mkdir()
        plan, model = CrashPlan(at), Model()
        # The clock stands still while the mount runs (uploads start when the
        # scenario says); reading back runs on real time (a rebuild polls,
        # xdelta3 runs under a time limit).
        assert trio.run(run_crashing, memory, home, plan, model, clock=trio.testing.MockClock())
        found = trio.run(read_back, memory, home)
        if found not in model.allowed():
            expected = " or ".join(str(sorted(_short(a).items())) for a in model.allowed())
            failures.append(
                f"crash at point {at} ({plan.where}): found {sorted(_short(found).items())},"
                f" expected {expected}"
            )

    for at in range(points):
        crash_at(at)
    assert not failures, "\n".join(failures)


def _short(files: Files) -> dict[str, str]:
    """Files as a failure message shows them."""
    return {
        path: data.decode("latin-1") if len(data) < 100 else f"<{len(data)} bytes>"
        for path, data in files.items()
    }
