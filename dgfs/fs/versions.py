"""The journal entries of a file's versions, from commit to their end.

Each version of a file written through the mount is a staging file
(``StagedFile``, dgfs/fs/staging.py): ``Node.staged`` holds the newest (the
upload pipeline's), ``Node.superseded`` older ones a newer version replaced
(``open(O_TRUNC)``) while their upload was in flight or still to come.
``JournaledVersions`` keeps the journal entries of these versions true:

- They follow the file's name and attributes (``follow_rename``,
  ``names_moved``, ``carries_attributes``), superseded ones written first:
  a crash recovers the newest acknowledged version under the newest name.
- A superseded version is never uploaded after the newer one: it is
  retired when it lands, and if its upload fails its entry stays,
  following renames, only until the newer version is committed or the
  name goes (``supersede``, ``drop_superseded``, ``superseded_failed``).
- A version nothing will store or read again is retired here, its entry
  removed with it (``retire``); one the bucket refuses for good has its
  entry moved to the journal's failed/ here (``quarantine``).

It is the only writer of ``Node.superseded``, the only caller of
``StagedFile.retire``, and the upload pipeline's only way to the journal:
entries are made, committed, removed and recovered here (``new_entry``,
``commit_entry``, ``remove_entry``, ``recover``); the journal owns the
files on disk. Who calls it:
``UploadPipeline`` (dgfs/fs/uploads.py), which decides when the newest
version is stored, settled, discarded or failed; ``StoredChanges``
(dgfs/fs/changes.py) and ``FileSystem.rename`` for entries that follow a
name or attributes (and ``removals_durable`` before S3 changes). It knows
nothing of the upload queue (trio thread only).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import trio

from dgfs.errors import DgfsError, errno_of
from dgfs.fs import upload_failures as failures
from dgfs.fs.journal import Journal, JournalEntry
from dgfs.fs.namespace import Namespace
from dgfs.fs.nodes import Node
from dgfs.fs.staging import StagedFile
from dgfs.fs.upload_failures import Next
from dgfs.telemetry import FailedUpload, Telemetry

log = logging.getLogger(__name__)


class JournaledVersions:
    """The journal entries of one mount's file versions (trio thread only)."""

    def __init__(
        self, journal: Journal, ns: Namespace, limiter: trio.CapacityLimiter, telemetry: Telemetry
    ) -> None:
        self.journal = journal
        self.ns = ns
        self.limiter = limiter  # the mount's limiter of disk work in threads
        self.telemetry = telemetry

    # --- entries --------------------------------------------------------------------

    async def new_entry(self) -> tuple[str, Path]:
        """A new, empty journal entry for a staging file: its id and data path."""
        return await trio.to_thread.run_sync(self.journal.new_staging)

    async def commit_entry(self, staged: StagedFile, key: str, meta: dict[str, str]) -> None:
        """Make ``staged`` durable as the file ``key`` with ``meta`` (OSError if
        the journal cannot take it)."""
        await trio.to_thread.run_sync(
            self.journal.commit, staged.entry_id, key, meta, limiter=self.limiter
        )

    async def remove_entry(self, entry_id: str) -> None:
        """Remove an entry no version needs (never made a file, or its name went)."""
        await trio.to_thread.run_sync(self.journal.remove, entry_id)

    async def recover(self) -> list[JournalEntry]:
        """What an earlier mount committed and did not upload."""
        return await trio.to_thread.run_sync(self.journal.recover)

    def data_path(self, entry_id: str) -> Path:
        return self.journal.data_path(entry_id)

    # --- versions ---------------------------------------------------------------------

    def retire(self, staged: StagedFile) -> None:
        """Forget a staging file nothing will store or read again (one being
        uploaded retires itself when it lands)."""
        if not staged.is_uploading:
            staged.retire()
            self.journal.remove(staged.entry_id)

    def supersede(self, node: Node, old: StagedFile) -> None:
        """``old`` gave way to a newer staging file: it was being uploaded (or
        had failed for good) when ``UploadPipeline._stage`` began, and may have
        failed, been stored or been queued again since (the journal made the
        new file in a thread meanwhile). One whose upload is in flight or
        still to come stays in ``node.superseded``, its journal entry the
        file's acknowledged content until the newer version is committed; it
        is never uploaded again (it would land after the newer), but a crash
        before that commit recovers it. It leaves when it lands
        (``UploadPipeline._superseded``), when the newer version is
        committed, or when the name goes (``drop_superseded``); until then it
        follows renames and attribute changes."""
        if old.is_uploading or (old.needs_upload and not old.is_failed):
            node.superseded.append(old)
        else:
            self.retire(old)

    def drop_superseded(self, node: Node) -> None:
        """The superseded versions leave the journal: the newest version is
        committed, or the name is gone (see ``supersede``). Not one in
        flight, nor one being moved to failed/: each goes when that ends."""
        for older in [s for s in node.superseded if not (s.is_uploading or s.is_failed)]:
            self.forget_superseded(node, older)

    def forget_superseded(self, node: Node, staged: StagedFile) -> None:
        """``staged`` leaves ``node.superseded`` and is retired, by whoever
        takes it out of the list (two may try: a failed-for-good upload and
        a commit that drops it meanwhile)."""
        if staged in node.superseded:
            node.superseded.remove(staged)
            self.retire(staged)

    async def superseded_failed(
        self, node: Node, staged: StagedFile, key: str, verdict: failures.Verdict
    ) -> None:
        """The upload of ``staged``, superseded while in flight, failed. It is
        not tried again: the newer version is stored instead, and uploading
        this one after it would bring older bytes back. Its entry stays only
        while the newer version is not committed (then it is the file's
        acknowledged content, and one the bucket refuses for good goes to
        failed/ as any other)."""
        newest = node.staged
        needed = not node.unlinked and newest is not None and not newest.is_committed
        if needed and verdict.next is Next.GIVE_UP:
            await self.quarantine(node, staged, key, verdict.error)
            self.forget_superseded(node, staged)  # its entry is in failed/ now
            return
        log.info("upload of %s failed (%s); a newer version replaces it", key, verdict.error)
        staged.stopped()
        if not needed:
            self.forget_superseded(node, staged)
        staged.notify()  # an fsync waiting on it asks about the newest version

    async def quarantine(self, node: Node, staged: StagedFile, key: str, error: DgfsError) -> None:
        """The bucket refuses this file for good: its entry goes to failed/."""
        staged.failed_for_good(error)
        where = await trio.to_thread.run_sync(self.journal.quarantine, staged.entry_id)
        seen = errno.errorcode.get(errno_of(error), "EIO")
        log.error(
            "upload of %s failed for good (%s, users see %s); the data is kept in %s",
            key,
            error,
            seen,
            where,
        )
        self.telemetry.upload_failed(
            FailedUpload(node.path, key, str(error), seen, str(where), time.time())
        )
        staged.notify()

    async def write_manifests(self, node: Node, key: str, *, in_flight: bool = True) -> None:
        """Rewrite the journal entries of ``node``'s committed versions with
        ``key`` and its attributes now (of those in flight only with
        ``in_flight``). Superseded ones only while the newest is not
        committed, and first: of two entries for one key, a crash recovers
        the one written last (``Journal.recover``), which must never be an
        older version than a committed one."""
        meta = node.posix_metadata()
        newest = node.staged
        older = node.superseded if newest is None or not newest.is_committed else []
        for version in [*older, newest]:
            if version is None or not version.is_committed or version.is_retired:
                continue
            if version.is_failed or (version.is_uploading and not in_flight):
                continue
            entry = JournalEntry(version.entry_id, key, meta)
            await trio.to_thread.run_sync(self.journal.write_manifest, entry)
            version.journaled_as(key)
            if version.is_retired:
                # Stored and forgotten while the manifest was written: that
                # write brought back an entry whose data is gone.
                await trio.to_thread.run_sync(self.journal.remove, version.entry_id)

    async def carries_attributes(self, node: Node) -> bool:
        """After a chmod/chown/utimes of ``node``: True when an upload still to
        come stores the new attributes (the journal entry has them now), False
        when the stored object itself must be changed."""
        if node.unlinked:
            return True  # only its open handles see it: nothing to store, no entry to write
        staged = node.staged
        if staged is None:
            return False
        # The entries get them now, also while an upload is in flight: that
        # upload stores the old ones (its follow-up changes them once it
        # lands), and a crash before it lands recovers an entry as it is.
        await self.write_manifests(node, self.ns.key_of(node.path))
        if not staged.is_committed:
            return True  # nothing durable yet: the commit writes the attributes with the data
        current = node.staged
        # None, or settled meanwhile: no upload follows, the object gets them.
        return current is not None and (
            current is not staged
            or current.is_uploading
            or current.is_dirty
            or current.needs_upload
        )

    async def names_moved(self, moved: Iterable[Node]) -> None:
        """A rename gave ``moved`` their new paths: an entry one of them
        committed during the rename, after the rename rewrote what it found,
        still names the old key and follows now (else a crash would bring
        the old name back after the rename returned)."""
        for node in moved:
            if node.unlinked:
                continue
            key = self.ns.key_of(node.path)
            versions = [v for v in (node.staged, *node.superseded) if v is not None]
            if any(v.is_committed and not v.is_retired and v.journal_key != key for v in versions):
                await self.write_manifests(node, key, in_flight=False)

    async def follow_rename(self, node: Node, new_key: str) -> None:
        """The journal entries follow the name: a crash recovers the file under it."""
        if node.unlinked:
            return  # its entry left the journal with its name (open handles keep a copy)
        await self.write_manifests(node, new_key, in_flight=False)

    async def removals_durable(self) -> None:
        """Before an object is deleted or moved in S3: journal entries removed
        so far (uploads that landed) stay removed after a power loss, so none
        comes back to restore the old name (``Journal.sync_removals``)."""
        if self.journal.removals_unsynced:  # most unlinks and renames: no thread hop
            await trio.to_thread.run_sync(self.journal.sync_removals, limiter=self.limiter)
