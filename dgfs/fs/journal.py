"""Crash-safe local journal of files written through the mount but not yet in S3.

A file being written lives in ``<id>.data`` inside the journal directory
(the staging file). ``commit`` makes it durable: the data is fsync'd, then
a manifest ``<id>.json`` (target key and POSIX metadata) is written to a
temp name, fsync'd and renamed into place, and the directory is fsync'd.
An entry exists exactly when its manifest does; a ``.data`` without a
manifest is an uncommitted staging file and is discarded at start.

The directory is locked (``flock``) by the mount that uses it; the next
mount of the same bucket finds the committed entries and uploads them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dgfs.errors import ConfigError
from dgfs.telemetry import Telemetry

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
#: Journals one bucket/prefix may have at once (mounts of it on this machine).
SLOTS = 8


@dataclass
class JournalEntry:
    """One committed file waiting for upload."""

    entry_id: str
    key: str
    metadata: dict[str, str] = field(default_factory=dict)


def journal_dir_for(root: Path, endpoint: str | None, bucket: str, prefix: str) -> Path:
    """The journal directory of one bucket/prefix on one endpoint, under ``root``."""
    ident = f"{endpoint or 'aws'}|{bucket}|{prefix}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return root / f"{bucket}-{digest}"


def slot_paths(base: Path, slots: int = SLOTS) -> list[Path]:
    """The journal directories a bucket/prefix may use: ``base``, ``base.1``, ..."""
    return [base] + [base.with_name(f"{base.name}.{i}") for i in range(1, slots)]


def _flocked_files() -> set[tuple[int, int, int]]:
    """``(major, minor, inode)`` of every file somebody holds a flock() on."""
    held: set[tuple[int, int, int]] = set()
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return held
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; waiters have "->" after the id.
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        major, minor, inode = fields[5].split(":")
        held.add((int(major, 16), int(minor, 16), int(inode)))
    return held


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The staging files and committed entries of one mount.

    Methods block on local disk; the filesystem calls them from worker
    threads. Only one process may hold a journal directory at a time.
    """

    def __init__(self, directory: Path, telemetry: Telemetry | None = None) -> None:
        self.directory = directory
        self.telemetry = telemetry or Telemetry()
        self.slots = [directory]  # every slot of this bucket/prefix (see open_slot)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self._lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ConfigError(
                f"journal {directory} is in use by another dgfs mount of the same bucket;"
                " give this mount its own cache_dir"
            ) from None

    @classmethod
    def open_slot(
        cls, base: Path, slots: int = SLOTS, telemetry: Telemetry | None = None
    ) -> Journal:
        """The first free journal of ``base`` (``base``, ``base.1``, ...).

        A mount that finds the main journal held (an earlier mount of the
        same bucket still finishing its uploads) takes the next slot. Entries
        left in slots nobody holds are moved into the one taken, so the next
        mount always uploads them.
        """
        candidates = slot_paths(base, slots)
        mine: Journal | None = None
        for path in candidates:
            try:
                mine = cls(path, telemetry)
                break
            except ConfigError:
                continue
        if mine is None:
            raise ConfigError(f"all {slots} journals under {base.parent} are in use")
        mine.slots = candidates
        for path in candidates:
            if path == mine.directory or not path.is_dir():
                continue
            try:
                other = cls(path)
            except ConfigError:
                continue  # held by a live mount: it will finish its own entries
            try:
                for entry in other.recover():
                    os.replace(other.data_path(entry.entry_id), mine.data_path(entry.entry_id))
                    mine.write_manifest(entry)
                    other._manifest_path(entry.entry_id).unlink(missing_ok=True)
            finally:
                other.close()
        return mine

    def close(self) -> None:
        os.close(self._lock_fd)

    # --- for dgfs status ------------------------------------------------------------

    def slots_in_use(self) -> int:
        """How many of this bucket's journal slots live mounts hold (this one included).

        Read from /proc/locks, so asking takes no lock a starting mount could trip on.
        """
        held = _flocked_files()
        count = 0
        for path in self.slots:
            try:
                st = os.stat(path / "lock")
            except OSError:
                continue
            count += (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in held
        return max(count, 1)  # this mount's own, even where /proc/locks is unreadable

    def entry_count(self) -> int:
        """Committed entries waiting for upload (durable here, not in S3 yet)."""
        return sum(1 for _ in self.directory.glob("*.json"))

    def failed_count(self) -> int:
        """Entries in failed/: uploads that failed for good, kept for a person to look at."""
        return sum(1 for _ in (self.directory / "failed").glob("*.data"))

    def data_path(self, entry_id: str) -> Path:
        return self.directory / f"{entry_id}.data"

    def _manifest_path(self, entry_id: str) -> Path:
        return self.directory / f"{entry_id}.json"

    def new_staging(self) -> tuple[str, Path]:
        """A new empty staging file; returns ``(entry_id, path)``."""
        entry_id = uuid.uuid4().hex
        path = self.data_path(entry_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        return entry_id, path

    def commit(self, entry_id: str, key: str, metadata: Mapping[str, str]) -> None:
        """Make the staging file and its target durable (survives a crash)."""
        data = self.data_path(entry_id)
        fd = os.open(data, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.write_manifest(JournalEntry(entry_id, key, dict(metadata)))
        self.telemetry.journal_committed()

    def write_manifest(self, entry: JournalEntry) -> None:
        """Atomically (re)write an entry's manifest (after a rename or chmod, say)."""
        final = self._manifest_path(entry.entry_id)
        tmp = final.with_suffix(".json.tmp")
        body = json.dumps(
            {"version": MANIFEST_VERSION, "key": entry.key, "metadata": entry.metadata}
        ).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(self.directory)

    def remove(self, entry_id: str) -> None:
        """Forget an entry (uploaded, or its file deleted); the manifest goes first."""
        self._manifest_path(entry_id).unlink(missing_ok=True)
        self.data_path(entry_id).unlink(missing_ok=True)

    def quarantine(self, entry_id: str) -> Path:
        """Move an entry that can never be uploaded aside (never silently dropped)."""
        failed = self.directory / "failed"
        failed.mkdir(mode=0o700, exist_ok=True)
        for suffix in (".json", ".data"):
            src = self.directory / f"{entry_id}{suffix}"
            if src.exists():
                os.replace(src, failed / src.name)
        return failed / f"{entry_id}.data"

    def recover(self) -> list[JournalEntry]:
        """Committed entries left by an earlier mount; uncommitted staging is removed."""
        entries: list[JournalEntry] = []
        for path in sorted(self.directory.iterdir()):
            if path.suffix == ".tmp" or path.name.endswith(".json.tmp"):
                path.unlink(missing_ok=True)
            elif path.suffix == ".json":
                entry_id = path.stem
                try:
                    body = json.loads(path.read_bytes())
                    entry = JournalEntry(entry_id, str(body["key"]), dict(body["metadata"]))
                except (ValueError, KeyError, TypeError):
                    log.error("journal manifest %s is unreadable; moved to failed/", path)
                    self.quarantine(entry_id)
                    continue
                if not self.data_path(entry_id).exists():
                    log.error("journal entry %s lost its data; dropping the manifest", entry_id)
                    path.unlink()
                    continue
                entries.append(entry)
        committed = {e.entry_id for e in entries}
        for path in self.directory.glob("*.data"):
            if path.stem not in committed:
                path.unlink(missing_ok=True)
        return entries
