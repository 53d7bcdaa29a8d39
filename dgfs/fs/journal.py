"""Crash-safe local journal of files written through the mount but not yet in S3.

A file being written lives in ``<id>.data`` inside the journal directory
(the staging file); its manifest ``<id>.json`` (target key and POSIX
metadata) makes it a committed entry. Entries that can never be uploaded
are kept in ``failed/`` the same way. Two rules make every operation
crash-safe:

- An entry is where its manifest is, and a manifest is only ever put where
  the entry's complete data already is. A manifest changes place by one
  rename, so an entry is never in two places. A ``.data`` without a
  manifest is uncommitted staging, or a spare link left by a move cut
  short: ``recover`` deletes it.
- Manifests and copies are written under a ``.tmp`` name, fsync'd,
  renamed into place, and the directory fsync'd; ``recover`` deletes any
  ``.tmp`` left.

What a crash at any step leaves, operation by operation:

- ``commit``: the data is fsync'd, then ``write_manifest``. Before the
  manifest's rename the file is uncommitted staging (its ``close()`` did
  not return); after it, the entry is committed.
- ``write_manifest``: the whole body is written (short writes continued)
  to a temp name of its own, fsync'd and renamed over the old manifest:
  the old manifest or the new one, never a part.
- ``remove``: the manifest goes first: the entry, or staging to delete.
- Moving an entry to another directory (``quarantine`` into ``failed/``;
  ``open_slot`` from a slot nobody holds into the one taken): (1) the data
  gets a second name in the destination (a hard link, or a copy where the
  filesystem has none), fsync'd; (2) the manifest is renamed into the
  destination and both directories fsync'd; (3) the source's data name is
  removed. Before (2) the entry is whole in the source and the destination
  holds a spare data name; from (2) on, the reverse. Each directory
  recovered on its own, by whichever mount takes it, is right, and a
  repeated move starts over safely.
- Every manifest carries its format ``version`` (``MANIFEST_VERSION``;
  none means 1). ``recover`` leaves one of a newer version than it knows,
  and its data, where they are, and logs it: a downgraded dgfs never
  uploads, quarantines or deletes an entry it cannot read, nor an older
  entry of the same key.
- ``recover`` only deletes what no entry needs, and quarantines an
  unreadable manifest with the move above. It also finishes what earlier
  versions of this module could leave half done, which moved the data
  before the manifest and quarantined the manifest before the data:
  ``open_slot`` brings a manifest and data left in different slots
  together in the slot taken, and ``recover`` moves data whose manifest is
  already in ``failed/`` there too.

The directory is locked (``flock``) by the mount that uses it; the next
mount of the same bucket finds the committed entries and uploads them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dgfs.durable import fsync_path
from dgfs.errors import ConfigError
from dgfs.telemetry import Telemetry

log = logging.getLogger(__name__)

#: The manifest format this code writes and the newest it reads. A manifest
#: without ``version`` is version 1 (the first format carried it already). One
#: with a newer version is left where it is, with its data, for the dgfs that
#: wrote it: never uploaded, quarantined or deleted by this one (a downgrade).
MANIFEST_VERSION = 1
#: Journals one bucket/prefix may have at once (mounts of it on this machine).
SLOTS = 8


@dataclass
class JournalEntry:
    """One committed file waiting for upload."""

    entry_id: str
    key: str
    metadata: dict[str, str] = field(default_factory=dict)
    # When its manifest was last written (ns): of two entries for one key, the
    # newer holds the file (0 in manifests older versions wrote).
    written_ns: int = 0


def journal_dir_for(root: Path, endpoint: str | None, bucket: str, prefix: str) -> Path:
    """The journal directory of one bucket/prefix on one endpoint, under ``root``."""
    ident = f"{endpoint or 'aws'}|{bucket}|{prefix}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return root / f"{bucket}-{digest}"


def failed_dir(directory: Path) -> Path:
    """Where a journal directory keeps the entries that failed for good."""
    return directory / "failed"


def committed_entries(directory: Path) -> int:
    """Committed entries of one journal directory (slot) waiting for upload; failed/ not counted."""
    return sum(1 for _ in directory.glob("*.json"))


def failed_entries(directory: Path) -> int:
    """Entries of one journal directory (slot) in its failed/."""
    return sum(1 for _ in failed_dir(directory).glob("*.data"))


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
    fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def _write_all(fd: int, body: bytes) -> None:
    """All of ``body``: ``os.write`` may write less than it was given."""
    view = memoryview(body)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write() wrote nothing")
        view = view[written:]


#: link() errors of a filesystem without hard links (vfat, some FUSE ones):
#: the data is copied instead.
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV}
)


def _place_copy(source: Path, dest: Path) -> None:
    """``dest`` becomes a durable second name of ``source``'s bytes (a hard
    link, else a copy); ``source`` stays. Whatever ``dest`` was is replaced:
    callers only place data where no manifest refers to it."""
    # Unlinked first: renaming a link over another link of the same file
    # (left by a move cut short) would do nothing and leave the temp name.
    _unlink(dest)
    try:
        os.link(source, dest)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        tmp = dest.with_name(f"{dest.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open(source, "rb") as reader:
                while chunk := reader.read(1 << 20):
                    _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    _fsync_dir(dest.parent)


def _unlink(path: Path) -> bool:
    """Removes ``path``; False if it was not there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def manifest_version(body: object) -> int:
    """The format version of a parsed manifest (1 when it names none).

    Raises ValueError or TypeError for a body that is no manifest of any version.
    """
    if not isinstance(body, dict):
        raise TypeError(f"a manifest is a JSON object, not {type(body).__name__}")
    version = body.get("version", 1)
    if type(version) is not int or version < 1:
        raise ValueError(f"manifest version {version!r}")
    return version


def _manifest_name(entry_id: str) -> str:
    return f"{entry_id}.json"


def _data_name(entry_id: str) -> str:
    return f"{entry_id}.data"


def _move_entry(entry_id: str, source: Path, dest: Path) -> None:
    """Moves what ``source`` holds of an entry into ``dest``; a crash at any
    step leaves the entry whole in one of the two (see the module docstring)."""
    data, manifest = _data_name(entry_id), _manifest_name(entry_id)
    if (source / data).exists():
        _place_copy(source / data, dest / data)
    if (source / manifest).exists():
        os.replace(source / manifest, dest / manifest)
        _fsync_dir(dest)
        _fsync_dir(source)
    _unlink(source / data)


class Journal:
    """The staging files and committed entries of one mount.

    Methods block on local disk; the filesystem calls them from worker
    threads. Only one process may hold a journal directory at a time.
    """

    def __init__(self, directory: Path, telemetry: Telemetry | None = None) -> None:
        self.directory = directory
        self.telemetry = telemetry or Telemetry()
        self.slots = [directory]  # every slot of this bucket/prefix (see open_slot)
        self._last_written_ns = 0
        self._removals_unsynced = False  # an entry removed since the directory was fsync'd
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException as exc:
            os.close(lock_fd)
            if isinstance(exc, BlockingIOError):
                raise ConfigError(
                    f"journal {directory} is in use by another dgfs mount of the same bucket;"
                    " give this mount its own cache_dir"
                ) from None
            raise
        self._lock_fd: int | None = lock_fd  # None once closed

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
        try:
            mine._adopt_orphans()
        except BaseException:
            mine.close()
            raise
        # Its stamps start after every manifest of every slot, those of live
        # mounts too: of two entries for one file a later recovery keeps the
        # one stamped last, whatever the clock did in between.
        mine._last_written_ns = max(mine._last_written_ns, _highest_stamp(candidates))
        return mine

    def _adopt_orphans(self) -> None:
        """Moves the entries of the slots nobody holds into this one."""
        others: list[Journal] = []
        try:
            for path in self.slots:
                if path == self.directory or not path.is_dir():
                    continue
                try:
                    others.append(type(self)(path))
                except ConfigError:
                    continue  # held by a live mount: it will finish its own entries
            found = {
                path.stem
                for other in others
                for pattern in ("*.json", "*.data")
                for path in other.directory.glob(pattern)
            }
            for entry_id in sorted(found):
                try:
                    self._gather(entry_id, [other.directory for other in others])
                except OSError as exc:
                    log.error(
                        "journal entry %s could not be moved into %s (%s); it stays where it is",
                        entry_id,
                        self.directory,
                        exc,
                    )
            for other in others:
                # What is left there: staging, spare links, unfinished writes.
                try:
                    left = other.recover()
                except OSError as exc:
                    log.error("journal %s could not be cleaned up: %s", other.directory, exc)
                    continue
                if left:
                    log.warning("%d journal entries stay in %s", len(left), other.directory)
        finally:
            for other in others:
                other.close()

    def _gather(self, entry_id: str, others: list[Path]) -> None:
        """Brings one entry from the slots ``others`` (held by this process)
        into this one, in the order the module docstring gives."""
        data, manifest = _data_name(entry_id), _manifest_name(entry_id)
        places = [self.directory, *others]
        with_manifest = [d for d in places if (d / manifest).exists()]
        with_data = [d for d in places if (d / data).exists()]
        if not with_manifest or not with_data:
            return  # staging, a spare link, or a manifest whose data is lost: recover() decides
        whole = [d for d in with_manifest if d in with_data]
        # Whole in one slot, or (left by an earlier version, which moved the
        # data first) the manifest in one slot and the data in another.
        home = whole[0] if whole else with_manifest[0]
        data_from = home if home in with_data else with_data[0]
        if data_from != self.directory:
            _place_copy(data_from / data, self.directory / data)
        if home != self.directory:
            os.replace(home / manifest, self.directory / manifest)
            _fsync_dir(self.directory)
            _fsync_dir(home)
        # Only spares are left in the other slots: their manifests (copies an
        # earlier version could leave) go before their data.
        for directory in others:
            if _unlink(directory / manifest):
                _fsync_dir(directory)
        for directory in others:
            _unlink(directory / data)

    def close(self) -> None:
        """Releases the journal (its lock). Closing it twice is a bug and raises:
        the descriptor's number may belong to another file by then."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            raise RuntimeError(f"journal {self.directory} closed twice")
        os.close(fd)

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
        return committed_entries(self.directory)

    def failed_count(self) -> int:
        """Entries in failed/: uploads that failed for good, kept for a person to look at."""
        return failed_entries(self.directory)

    @property
    def _failed_dir(self) -> Path:
        return failed_dir(self.directory)

    def data_path(self, entry_id: str) -> Path:
        return self.directory / _data_name(entry_id)

    def _manifest_path(self, entry_id: str) -> Path:
        return self.directory / _manifest_name(entry_id)

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
        # A temp name of its own: two threads rewriting one manifest must not
        # truncate each other's temp file.
        tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        entry.written_ns = self._next_written_ns()
        body = json.dumps(
            {
                "version": MANIFEST_VERSION,
                "key": entry.key,
                "metadata": entry.metadata,
                "written_ns": entry.written_ns,
            }
        ).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(self.directory)

    def remove(self, entry_id: str) -> None:
        """Forget an entry (uploaded, or its file deleted); the manifest goes
        first. Durable against a process crash at once; against a power loss
        once ``sync_removals`` ran."""
        _unlink(self._manifest_path(entry_id))
        _unlink(self.data_path(entry_id))
        self._removals_unsynced = True

    @property
    def removals_unsynced(self) -> bool:
        """An entry was removed since the directory was last fsync'd."""
        return self._removals_unsynced

    def sync_removals(self) -> None:
        """Make the removals so far survive a power loss: one fsync of the
        directory, only when there were any since the last.

        An entry whose removal is lost comes back at the next mount and is
        uploaded again: harmless while S3 holds that version, but after the
        file was deleted or renamed it would bring the old name back. So
        this runs before the mount deletes or moves an object.
        """
        if self._removals_unsynced:
            self._removals_unsynced = False  # before: a removal meanwhile sets it again
            _fsync_dir(self.directory)

    def quarantine(self, entry_id: str) -> Path:
        """Move an entry that can never be uploaded aside (never silently dropped)."""
        failed = self._failed_dir
        failed.mkdir(mode=0o700, exist_ok=True)
        _move_entry(entry_id, self.directory, failed)
        return failed / _data_name(entry_id)

    def recover(self) -> list[JournalEntry]:
        """Committed entries left by an earlier mount, each once; uncommitted
        staging, spare links and unfinished writes are removed."""
        for path in [*self.directory.glob("*.tmp"), *self._failed_dir.glob("*.tmp")]:
            _unlink(path)
        self._settle_failed()
        entries: list[JournalEntry] = []
        newer: dict[str, object] = {}  # entry id -> key (if readable) of newer-format manifests
        for path in sorted(self.directory.glob("*.json")):
            entry_id = path.stem
            try:
                body = json.loads(path.read_bytes())
                version = manifest_version(body)
                if version > MANIFEST_VERSION:
                    newer[entry_id] = body.get("key")
                    log.error(
                        "journal manifest %s has format version %d; this dgfs reads up to %d:"
                        " the entry stays, with its data, for a newer dgfs to upload",
                        path,
                        version,
                        MANIFEST_VERSION,
                    )
                    continue
                entry = JournalEntry(
                    entry_id,
                    str(body["key"]),
                    dict(body["metadata"]),
                    int(body.get("written_ns", 0)),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                log.error("journal manifest %s is unreadable; moved to failed/", path)
                self.quarantine(entry_id)
                continue
            if not self.data_path(entry_id).exists():
                log.error("journal entry %s lost its data; dropping the manifest", entry_id)
                _unlink(path)
                continue
            entries.append(entry)
        # Entries of a key a newer-format manifest names stay too: which of
        # them holds the file is for the newer dgfs to decide.
        # Stamps from now on come after these (see ``_highest_stamp``).
        self._last_written_ns = max([self._last_written_ns, *(e.written_ns for e in entries)])
        held = {e.entry_id for e in entries if e.key in newer.values()}
        for entry_id in sorted(held):
            log.error("journal entry %s stays: a newer dgfs's entry names the same file", entry_id)
        entries = self._newest_per_key([e for e in entries if e.entry_id not in held])
        keep = {e.entry_id for e in entries} | set(newer) | held
        for path in self.directory.glob("*.data"):
            if path.stem not in keep:
                _unlink(path)  # staging never committed, or a spare link of a move
        return entries

    def _newest_per_key(self, entries: list[JournalEntry]) -> list[JournalEntry]:
        """Of several entries for one key, the newest: the others were being
        replaced when the mount stopped (a rename over a file not uploaded
        yet writes the moved entry's manifest, then removes the replaced
        one's), and uploading them after it would bring back older bytes."""
        newest: dict[str, JournalEntry] = {}
        for entry in sorted(entries, key=lambda e: (e.written_ns, e.entry_id)):
            older = newest.get(entry.key)
            if older is not None:
                log.info("journal: %s was replaced by a newer entry; dropping it", entry.key)
                self.remove(older.entry_id)
            newest[entry.key] = entry
        return list(newest.values())

    def _next_written_ns(self) -> int:
        """A manifest's time, later than any this journal wrote before."""
        self._last_written_ns = max(time.time_ns(), self._last_written_ns + 1)
        return self._last_written_ns

    def _settle_failed(self) -> None:
        """Finishes or undoes what a crash left half moved into failed/."""
        failed = self._failed_dir
        found = {path.stem for pattern in ("*.json", "*.data") for path in failed.glob(pattern)}
        for entry_id in sorted(found):
            data, manifest = _data_name(entry_id), _manifest_name(entry_id)
            here = (self.directory / manifest).exists(), (self.directory / data).exists()
            there = (failed / manifest).exists(), (failed / data).exists()
            if all(here):
                if not there[0]:
                    _unlink(failed / data)  # the quarantine died before its manifest moved
            elif (here[0] or there[0]) and (here[1] or there[1]) and not all(there):
                # An earlier version moved the manifest first and died before the data.
                log.warning("finishing the move of journal entry %s into %s", entry_id, failed)
                _move_entry(entry_id, self.directory, failed)


def _highest_stamp(slots: list[Path]) -> int:
    """The highest ``written_ns`` of the manifests in ``slots`` (0 if none):
    a clock set back since they were written (a restart before NTP caught
    up) must not stamp a newer version of a file behind an older one."""
    highest = 0
    for slot in slots:
        for path in slot.glob("*.json") if slot.is_dir() else ():
            try:
                stamp = json.loads(path.read_bytes()).get("written_ns", 0)
            except (OSError, ValueError, AttributeError):
                continue  # unreadable: recovery deals with it
            if isinstance(stamp, int):
                highest = max(highest, stamp)
    return highest
