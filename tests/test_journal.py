"""The crash-safe upload journal, without FUSE."""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dgfs.errors import ConfigError
from dgfs.fs import journal as journal_module
from dgfs.fs.journal import (
    MANIFEST_VERSION,
    Journal,
    JournalEntry,
    journal_dir_for,
    slot_paths,
)


def staged(journal: Journal, data: bytes) -> str:
    entry_id, path = journal.new_staging()
    path.write_bytes(data)
    return entry_id


def test_committed_entries_survive_and_uncommitted_staging_does_not(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    kept = staged(journal, b"committed bytes")
    journal.commit(kept, "app/a.zip", {"mtime": "1700000000"})
    dropped = staged(journal, b"still being written")  # a crash before close()
    journal.close()  # the process dies

    again = Journal(tmp_path / "j")
    entries = again.recover()
    assert [(e.entry_id, e.key, e.metadata) for e in entries] == [
        (kept, "app/a.zip", {"mtime": "1700000000"})
    ]
    assert again.data_path(kept).read_bytes() == b"committed bytes"
    assert not again.data_path(dropped).exists()
    again.close()


def test_manifest_rewrite_follows_a_rename(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    entry_id = staged(journal, b"x")
    journal.commit(entry_id, "old.zip", {})
    journal.write_manifest(JournalEntry(entry_id, "new.zip", {"mode": "33188"}))
    assert [(e.key, e.metadata) for e in journal.recover()] == [("new.zip", {"mode": "33188"})]
    journal.remove(entry_id)
    assert journal.recover() == []
    journal.close()


def test_of_two_entries_for_one_key_the_newest_manifest_wins(tmp_path: Path) -> None:
    """A rename over a file not uploaded yet writes the moved entry's manifest,
    then removes the replaced entry; a crash between leaves both for one key.
    Whichever sorts first by id, the replaced one must not be uploaded last."""
    for order in ("moved-id-first", "moved-id-last"):
        journal = Journal(tmp_path / order)
        ids = sorted([staged(journal, b"replaced"), staged(journal, b"moved")])
        replaced, moved = ids if order == "moved-id-last" else ids[::-1]
        journal.data_path(replaced).write_bytes(b"replaced")
        journal.data_path(moved).write_bytes(b"moved")
        journal.commit(replaced, "e.txt", {})
        journal.commit(moved, "f.txt", {})
        journal.write_manifest(JournalEntry(moved, "e.txt", {}))  # then the crash
        (entry,) = journal.recover()
        assert (entry.entry_id, entry.key) == (moved, "e.txt")
        assert journal.data_path(moved).read_bytes() == b"moved"
        assert not journal.data_path(replaced).exists()
        journal.close()


@pytest.mark.expected_log("unreadable|lost its data")
def test_unreadable_manifest_and_lost_data_are_not_fatal(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    bad = staged(journal, b"data")
    journal.commit(bad, "k", {})
    (journal.directory / f"{bad}.json").write_text("{not json")
    lost = staged(journal, b"gone")
    journal.commit(lost, "k2", {})
    journal.data_path(lost).unlink()
    assert journal.recover() == []
    # The unreadable one is kept aside, never silently dropped.
    assert (journal.directory / "failed" / f"{bad}.data").read_bytes() == b"data"
    journal.close()


def test_quarantine_moves_both_files(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    entry_id = staged(journal, b"cannot upload")
    journal.commit(entry_id, "k", {})
    where = journal.quarantine(entry_id)
    assert where.read_bytes() == b"cannot upload"
    assert journal.recover() == []
    journal.close()


def test_directory_is_private(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    directory.mkdir(mode=0o755)
    journal = Journal(directory)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    journal.close()


def test_one_holder_per_journal_and_slots_adopt_orphans(tmp_path: Path) -> None:
    base = journal_dir_for(tmp_path, "http://127.0.0.1:9000", "bucket", "")
    first = Journal.open_slot(base)
    assert first.directory == base
    with pytest.raises(ConfigError, match="in use"):
        Journal(base)
    # A second mount while the first still finishes its uploads: next slot.
    second = Journal.open_slot(base)
    assert second.directory != base
    orphan = staged(second, b"left by a crashed second mount")
    second.commit(orphan, "x.zip", {})
    second.close()  # crashed: nobody holds its slot any more
    first.close()

    third = Journal.open_slot(base)  # takes the main slot and adopts the orphan
    assert third.directory == base
    entries = third.recover()
    assert [e.key for e in entries] == ["x.zip"]
    assert third.data_path(entries[0].entry_id).read_bytes() == b"left by a crashed second mount"
    third.close()


def test_journal_dir_depends_on_endpoint_bucket_and_prefix(tmp_path: Path) -> None:
    dirs = {
        journal_dir_for(tmp_path, None, "b", ""),
        journal_dir_for(tmp_path, "http://h:1", "b", ""),
        journal_dir_for(tmp_path, None, "b", "p"),
        journal_dir_for(tmp_path, None, "c", ""),
    }
    assert len(dirs) == 4
    assert journal_dir_for(tmp_path, None, "b", "") == journal_dir_for(tmp_path, None, "b", "")


# --- crash points: every multi-step operation, killed at each of its disk calls ----------

T = TypeVar("T")
#: What a recovered entry is made of: its key, its metadata and its data bytes.
Entry = tuple[str, dict[str, str], bytes]
#: The os functions through which the journal changes the disk (pathlib's
#: unlink and mkdir end in them too).
DISK_CALLS = ("open", "write", "fsync", "replace", "rename", "link", "unlink", "mkdir")


class Crash(BaseException):
    """The process died at this disk call: neither it nor anything after it happens."""


class Dying:
    """Runs an operation that dies at its disk call number ``at`` (from 0).

    After the death no disk call gets through (a dead process changes
    nothing), and the descriptors it left open are closed as the kernel
    closes them, which also drops its journal locks.
    """

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0
        self.dead = False
        self._open_fds: set[int] = set()

    def run(self, operation: Callable[[], T]) -> T | None:
        """The operation's result, or None if it died."""
        with pytest.MonkeyPatch.context() as patch:
            for name in DISK_CALLS:
                patch.setattr(os, name, self._hooked(name, getattr(os, name)))
            patch.setattr(os, "close", self._closing(os.close))
            try:
                return operation()
            except Crash:
                pass
        for fd in self._open_fds:
            os.close(fd)
        return None

    def _hooked(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def hooked(*args: Any, **kwargs: Any) -> Any:
            if self.dead or self.calls == self.at:
                self.dead = True
                raise Crash(f"died at os.{name} (disk call {self.at})")
            self.calls += 1
            result = call(*args, **kwargs)
            if name == "open":
                self._open_fds.add(result)
            return result

        return hooked

    def _closing(self, close: Callable[[int], None]) -> Callable[[int], None]:
        def closing(fd: int) -> None:
            self._open_fds.discard(fd)
            close(fd)

        return closing


def crash_at_every_step(tmp_path: Path, once: Callable[[Path, Dying], None]) -> int:
    """``once(directory, dying)`` with the operation dying at its first disk call,
    then its second, ... until it completes; returns how many calls it made."""
    for at in itertools.count():
        dying = Dying(at)
        once(tmp_path / f"crash-at-{at}", dying)
        if not dying.dead:
            return at
    raise AssertionError("unreachable")


def committed(journal: Journal, data: bytes, key: str, metadata: dict[str, str]) -> str:
    entry_id = staged(journal, data)
    journal.commit(entry_id, key, metadata)
    return entry_id


def recovered(journal: Journal) -> dict[str, Entry]:
    """What ``journal`` recovers (then closed), checking it left nothing else behind."""
    try:
        entries = journal.recover()
        found = {
            e.entry_id: (e.key, e.metadata, journal.data_path(e.entry_id).read_bytes())
            for e in entries
        }
        assert len(found) == len(entries), "an entry recovered twice"
        directory = journal.directory
        assert {p.name for p in directory.glob("*.json")} == {f"{i}.json" for i in found}
        assert {p.name for p in directory.glob("*.data")} == {f"{i}.data" for i in found}
        assert not list(directory.glob("**/*.tmp"))
        return found
    finally:
        journal.close()


def in_failed(directory: Path) -> dict[str, Entry]:
    """The entries kept in ``directory``/failed/, each with both its files."""
    failed = directory / "failed"
    found: dict[str, Entry] = {}
    for entry_id in {p.stem for p in failed.glob("*")}:
        body = json.loads((failed / f"{entry_id}.json").read_bytes())
        found[entry_id] = (
            body["key"],
            body["metadata"],
            (failed / f"{entry_id}.data").read_bytes(),
        )
    return found


def no_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without hard links (vfat, some FUSE ones): the journal copies."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)


A = ("a.zip", {"mtime": "1700000000"}, b"acknowledged bytes")
B = ("b.zip", {"mode": "33188", "mtime": "1700000001"}, b"the bytes of b")


def test_commit_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    def once(directory: Path, dying: Dying) -> None:
        journal = Journal(directory)
        a = committed(journal, A[2], A[0], A[1])
        b = staged(journal, B[2])
        dying.run(lambda: journal.commit(b, B[0], B[1]))
        journal.close()
        found = recovered(Journal(directory))
        assert found.pop(a) == A
        assert found == {b: B} if not dying.dead else found in ({}, {b: B})

    assert crash_at_every_step(tmp_path, once) >= 6


def test_manifest_rewrite_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    renamed = ("renamed/a.zip", {"mtime": "1700000000", "mode": "33261"}, A[2])

    def once(directory: Path, dying: Dying) -> None:
        journal = Journal(directory)
        a = committed(journal, A[2], A[0], A[1])
        b = committed(journal, B[2], B[0], B[1])
        dying.run(lambda: journal.write_manifest(JournalEntry(a, renamed[0], renamed[1])))
        journal.close()
        found = recovered(Journal(directory))
        assert found.pop(b) == B
        assert found == {a: renamed} if not dying.dead else found in ({a: A}, {a: renamed})

    assert crash_at_every_step(tmp_path, once) >= 5


def test_remove_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    def once(directory: Path, dying: Dying) -> None:
        journal = Journal(directory)
        a = committed(journal, A[2], A[0], A[1])
        b = committed(journal, B[2], B[0], B[1])
        dying.run(lambda: journal.remove(a))
        journal.close()
        found = recovered(Journal(directory))
        assert found.pop(b) == B
        assert found == {} if not dying.dead else found in ({}, {a: A})

    assert crash_at_every_step(tmp_path, once) >= 2


@pytest.mark.parametrize("links", [True, False], ids=["links", "no-links"])
def test_quarantine_survives_a_crash_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    """Either still an entry that is uploaded, or in failed/ with both files: never lost."""
    if not links:
        no_links(monkeypatch)

    def once(directory: Path, dying: Dying) -> None:
        journal = Journal(directory)
        a = committed(journal, A[2], A[0], A[1])
        b = committed(journal, B[2], B[0], B[1])
        dying.run(lambda: journal.quarantine(b))
        journal.close()
        found = recovered(Journal(directory))
        assert found.pop(a) == A
        outcome = (found, in_failed(directory))
        if dying.dead:
            assert outcome in (({b: B}, {}), ({}, {b: B}))
        else:
            assert outcome == ({}, {b: B})
        again = Journal(directory)
        assert again.failed_count() == len(outcome[1])
        again.close()

    assert crash_at_every_step(tmp_path, once) >= 4


@pytest.mark.parametrize("links", [True, False], ids=["links", "no-links"])
@pytest.mark.parametrize("restart", ["open_slot", "each_slot"])
def test_slot_adoption_survives_a_crash_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool, restart: str
) -> None:
    """Entries a crashed mount left in a second slot are moved into the one
    taken; dying anywhere in the move loses and duplicates none of them,
    whether the next mount takes the same slot or each slot is recovered
    by a mount of its own."""
    if not links:
        no_links(monkeypatch)

    def once(root: Path, dying: Dying) -> None:
        base = root / "j"
        orphans = Journal(slot_paths(base)[1])
        a = committed(orphans, A[2], A[0], A[1])
        b = committed(orphans, B[2], B[0], B[1])
        staged(orphans, b"never closed")  # its writer died before close()
        orphans.close()
        mine = dying.run(lambda: Journal.open_slot(base))
        if mine is not None:
            assert mine.directory == base
            mine.close()
        if restart == "open_slot":
            found = recovered(Journal.open_slot(base))
            assert not [p for p in slot_paths(base)[1:] for p in p.glob("*.[dj]*")]
        else:
            found = {}
            for path in slot_paths(base)[:2]:
                part = recovered(Journal(path))
                assert not part.keys() & found.keys(), "an entry recovered in two slots"
                found |= part
        assert found == {a: A, b: B}

    assert crash_at_every_step(tmp_path, once) >= 10


def test_manifest_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path / "j")
    a = staged(journal, A[2])
    write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, bytes(data)[:7]))
    journal.commit(a, "old/a.zip", {})
    journal.write_manifest(JournalEntry(a, A[0], A[1]))
    monkeypatch.undo()
    journal.close()
    assert recovered(Journal(tmp_path / "j")) == {a: A}


# --- journals the previous version left half-moved are finished, not deleted ---------------


def move(src: Path, dst_dir: Path) -> None:
    dst_dir.mkdir(mode=0o700, exist_ok=True)
    os.replace(src, dst_dir / src.name)


@pytest.mark.parametrize(
    "layout",
    [
        # (slot of the manifest, slot of the data, slot with a second copy of the manifest)
        (1, 0, None),  # died after moving the data from base.1 into base
        (2, 1, None),  # the same from base.2 into base.1; this mount takes base
        (0, 1, None),  # from base into base.1 (base was held when base.1 was taken)
        (1, 0, 0),  # died after writing the manifest into base, before unlinking base.1's
    ],
)
def test_a_slot_move_the_previous_version_left_half_done_is_finished(
    tmp_path: Path, layout: tuple[int, int, int | None]
) -> None:
    base = tmp_path / "j"
    slots = slot_paths(base)
    manifest_slot, data_slot, copy_slot = layout
    writer = Journal(slots[manifest_slot])
    a = committed(writer, A[2], A[0], A[1])
    writer.close()
    if copy_slot is not None:
        slots[copy_slot].mkdir(mode=0o700, exist_ok=True)
        (slots[copy_slot] / f"{a}.json").write_bytes(
            (slots[manifest_slot] / f"{a}.json").read_bytes()
        )
    if data_slot != manifest_slot:
        move(slots[manifest_slot] / f"{a}.data", slots[data_slot])
    assert recovered(Journal.open_slot(base)) == {a: A}


@pytest.mark.expected_log("finishing the move")
def test_a_quarantine_the_previous_version_left_half_done_is_finished(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    a = committed(journal, A[2], A[0], A[1])
    move(journal.directory / f"{a}.json", journal.directory / "failed")  # then it died
    journal.close()
    assert recovered(Journal(tmp_path / "j")) == {}
    assert in_failed(tmp_path / "j") == {a: A}


@pytest.mark.expected_log("unreadable|finishing the move")
def test_recover_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    """Recovering a journal with something of every kind in it, dying at each
    step, then recovering again: what was committed comes back, the rest is
    settled the same way as without the crash."""
    unreadable = b"{not json"

    def once(directory: Path, dying: Dying) -> None:
        journal = Journal(directory)
        a = committed(journal, A[2], A[0], A[1])
        staged(journal, b"never closed")
        bad = committed(journal, b"data of a broken manifest", "k", {})
        (directory / f"{bad}.json").write_bytes(unreadable)
        b = committed(journal, B[2], B[0], B[1])
        # A quarantine that died after the data's second name was made...
        (directory / "failed").mkdir(mode=0o700)
        os.link(journal.data_path(b), directory / "failed" / f"{b}.data")
        # ... one the previous version left with the manifest moved first ...
        old = committed(journal, b"half quarantined", "old.zip", {})
        move(directory / f"{old}.json", directory / "failed")
        # ... and a manifest write it left unfinished.
        (directory / f"{a}.json.tmp").write_bytes(b'{"version": 1, "ke')
        dying.run(journal.recover)
        journal.close()
        assert recovered(Journal(directory)) == {a: A, b: B}
        failed = directory / "failed"
        assert sorted(p.name for p in failed.iterdir()) == sorted(
            f"{i}.{s}" for i in (bad, old) for s in ("json", "data")
        )
        assert (failed / f"{bad}.json").read_bytes() == unreadable
        assert (failed / f"{bad}.data").read_bytes() == b"data of a broken manifest"
        assert (failed / f"{old}.data").read_bytes() == b"half quarantined"

    assert crash_at_every_step(tmp_path, once) >= 8


def test_closing_a_journal_twice_raises(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.close()
    with pytest.raises(RuntimeError, match="closed twice"):
        journal.close()  # the descriptor's number may be another file's by now
    Journal(tmp_path / "j").close()  # and the lock was released once


def test_slot_adoption_survives_a_crash_while_finishing_a_crashed_one(tmp_path: Path) -> None:
    """A mount dies moving an entry between slots, and the next one dies
    finishing the move, each at every step: the third still has it, once."""

    def orphan(root: Path) -> str:
        orphans = Journal(slot_paths(root / "j")[1])
        entry_id = committed(orphans, A[2], A[0], A[1])
        orphans.close()
        return entry_id

    def adopt(root: Path, dying: Dying) -> None:
        if (mine := dying.run(lambda: Journal.open_slot(root / "j"))) is not None:
            mine.close()

    def once(first_at: int, root: Path, dying: Dying) -> None:
        a = orphan(root)
        adopt(root, Dying(first_at))
        adopt(root, dying)
        assert recovered(Journal.open_slot(root / "j")) == {a: A}

    never = Dying(-1)
    orphan(tmp_path / "whole")
    adopt(tmp_path / "whole", never)
    assert never.calls >= 10
    for first_at in range(never.calls):
        crash_at_every_step(tmp_path / f"first-{first_at}", functools.partial(once, first_at))


@pytest.mark.expected_log("could not be moved|stay in")
def test_an_entry_that_cannot_be_moved_stays_in_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "j"
    orphans = Journal(slot_paths(base)[1])
    a = committed(orphans, A[2], A[0], A[1])
    b = committed(orphans, B[2], B[0], B[1])
    orphans.close()
    link = os.link

    def failing(source: Any, dest: Any) -> None:
        if str(source).endswith(f"{b}.data"):
            raise OSError(errno.EIO, "Input/output error")
        link(source, dest)

    monkeypatch.setattr(os, "link", failing)
    assert recovered(Journal.open_slot(base)) == {a: A}  # the mount starts all the same
    monkeypatch.undo()
    assert recovered(Journal(slot_paths(base)[1])) == {b: B}  # and b is still there


# --- the manifest's format version ------------------------------------------------


def test_manifests_carry_their_format_version(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    entry_id = staged(journal, b"bytes")
    journal.commit(entry_id, "app/a.zip", {})
    body = json.loads((journal.directory / f"{entry_id}.json").read_bytes())
    assert body["version"] == MANIFEST_VERSION == 1
    journal.close()


def test_a_manifest_without_a_version_is_read_as_version_1(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    entry_id = staged(journal, b"written by an older dgfs")
    journal.close()
    # The shape of a manifest that names no version.
    (directory / f"{entry_id}.json").write_text(
        json.dumps({"key": "app/old.zip", "metadata": {"mtime": "1700000000"}})
    )
    again = Journal(directory)
    assert [(e.entry_id, e.key, e.metadata, e.written_ns) for e in again.recover()] == [
        (entry_id, "app/old.zip", {"mtime": "1700000000"}, 0)
    ]
    again.close()


@pytest.mark.expected_log("format version 2; this dgfs reads up to 1|names the same file")
def test_a_newer_manifest_stays_with_its_data_and_its_key_s_older_entries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "j"
    journal = Journal(directory)
    newer = staged(journal, b"written by a newer dgfs")
    older_same_key = staged(journal, b"an older entry of the same file")
    journal.commit(older_same_key, "app/a.zip", {})
    other = staged(journal, b"another file")
    journal.commit(other, "app/b.zip", {})
    journal.close()
    # A format this code does not know, down to the fields it would need.
    newer_manifest = json.dumps(
        {"version": MANIFEST_VERSION + 1, "key": "app/a.zip", "chunks": ["x"], "written_ns": 9}
    )
    (directory / f"{newer}.json").write_text(newer_manifest)

    for _ in range(2):  # a downgraded mount, then the next one: nothing is lost
        again = Journal.open_slot(directory)
        assert [e.key for e in again.recover()] == ["app/b.zip"]
        again.close()
        assert (directory / f"{newer}.json").read_text() == newer_manifest
        assert (directory / f"{newer}.data").read_bytes() == b"written by a newer dgfs"
        assert (directory / f"{older_same_key}.data").exists()
        assert (directory / f"{older_same_key}.json").exists()
        assert not (directory / "failed").exists() or not any((directory / "failed").iterdir())
    assert f"{newer}.json has format version 2; this dgfs reads up to 1" in caplog.text


@pytest.mark.expected_log("format version 7")
def test_a_newer_manifest_without_its_data_is_not_dropped(tmp_path: Path) -> None:
    """A newer format may keep its data elsewhere: its manifest is never deleted."""
    directory = tmp_path / "j"
    Journal(directory).close()
    (directory / "abc.json").write_text(json.dumps({"version": 7}))
    again = Journal(directory)
    assert again.recover() == []
    again.close()
    assert json.loads((directory / "abc.json").read_text()) == {"version": 7}


@pytest.mark.expected_log("format version 3")
def test_a_newer_manifest_in_an_orphaned_slot_is_moved_not_lost(tmp_path: Path) -> None:
    base = tmp_path / "j"
    held = Journal(base)  # a live mount holds the main slot
    orphan_dir = slot_paths(base)[2]
    Journal(orphan_dir).close()
    (orphan_dir / "n.data").write_bytes(b"newer")
    (orphan_dir / "n.json").write_text(json.dumps({"version": 3, "key": "k"}))
    mine = Journal.open_slot(base)
    assert mine.recover() == []
    assert (mine.directory / "n.data").read_bytes() == b"newer"
    assert json.loads((mine.directory / "n.json").read_text())["version"] == 3
    mine.close()
    held.close()


@pytest.mark.expected_log("unreadable")
@pytest.mark.parametrize("version", ["2", 0, -1, None, 1.5, True])
def test_a_garbled_version_is_an_unreadable_manifest(tmp_path: Path, version: object) -> None:
    journal = Journal(tmp_path / "j")
    entry_id = staged(journal, b"data")
    journal.commit(entry_id, "k", {})
    path = journal.directory / f"{entry_id}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": version}))
    assert journal.recover() == []
    assert (journal.directory / "failed" / f"{entry_id}.data").read_bytes() == b"data"
    journal.close()


def test_removals_are_synced_once_and_only_when_there_were_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(journal_module, "_fsync_dir", synced.append)
    journal = Journal(tmp_path / "j")
    journal.sync_removals()
    assert synced == []  # nothing removed yet
    for _ in range(3):
        entry_id = staged(journal, b"x")
        journal.commit(entry_id, "k", {})
        journal.remove(entry_id)
    synced.clear()  # (commits fsync the directory too)
    journal.sync_removals()
    journal.sync_removals()
    assert synced == [journal.directory]
    journal.close()
