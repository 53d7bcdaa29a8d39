"""The crash-safe upload journal, without FUSE."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dgfs.errors import ConfigError
from dgfs.fs.journal import Journal, JournalEntry, journal_dir_for


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
