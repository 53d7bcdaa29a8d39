"""The upload pipeline: how a file written through the mount reaches S3.

A file's new content lives in a staging file of the journal; its
``StagedFile`` says how far it has come::

    staged --commit--> committed --(no writer left)--> queued --> uploading --> settled
                                                          ^            |
                                               retry wait +------------+--> failed (failed/)

Who owns what: ``StagedFile`` (dgfs/fs/staging.py) owns the staging file's
descriptor and its phase; this pipeline owns ``Node.staged`` and decides
when the newest version is settled, discarded or given up;
``JournaledVersions`` (dgfs/fs/versions.py) makes, commits, removes and
recovers journal entries, retires versions, keeps the superseded ones and
keeps the entries following names and attributes (the pipeline reaches the
journal only through it); the journal owns the files on disk. A journal entry that
holds a file's newest acknowledged content goes only after S3 holds what
replaces it (``lost_name``, the unlink and rename orders in
``StoredChanges``), so a crash at any point recovers the newest
acknowledged version (tests/test_crash_points.py).

- ``UploadPipeline.staging`` (``stage_empty``) gives a node a staging
  file; the filesystem writes into it and counts each write
  (``StagedFile.wrote``).
- ``commit`` (close) makes it durable in the journal and queues the
  upload once no handle that may write is left. A queued upload starts
  after ``upload_delay``, so what usually follows a close (rsync's utimes
  and rename) travels in the same upload; ``wait_uploaded`` (fsync) and
  ``drain`` (unmount) skip the delay.
- A worker stores the last committed version under the node's current
  name. ``hold`` keeps new uploads from starting while a rename runs, and
  ``wait_not_uploading`` lets a rename or unlink wait for one in flight.
- A failed upload is given up (its entry to the journal's ``failed/``),
  redone at once, or retried after a pause, the data kept in the journal;
  dgfs/fs/upload_failures.py holds the rules.
- A version replaced by a newer one while it uploads (``open(O_TRUNC)``)
  is never uploaded after it: it is retired when it lands, and if its
  upload fails its entry stays, following renames, only until the newer
  version is committed or the name goes (dgfs/fs/versions.py).
- Once everything written is in S3 and no handle is open, the staging
  file goes and the node is settled.
- ``recover`` adopts what an earlier mount committed; ``leftovers`` says
  what did not reach S3 when the pipeline stops.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio

from dgfs.core import Core
from dgfs.errors import DgfsError, FsError, NotFound, errno_of
from dgfs.format import StoredFile
from dgfs.fs import upload_failures as failures
from dgfs.fs.dirview import DirectoryView
from dgfs.fs.entries import NodeKind
from dgfs.fs.journal import Journal, JournalEntry
from dgfs.fs.namespace import Namespace
from dgfs.fs.nodes import Node, NodeTable
from dgfs.fs.options import FsOptions
from dgfs.fs.readers import StoredContent
from dgfs.fs.staging import Phase, StagedFile
from dgfs.fs.upload_failures import Next
from dgfs.fs.versions import JournaledVersions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadCounts:
    """Files with local content, by where their upload stands."""

    pending: int  # closed (committed), not in S3 yet, no upload running
    in_flight: int  # being stored right now
    failed: int  # failed for good and still known to the mount (data in failed/)
    open_unsaved: int  # written but not closed yet: nothing is promised for them


@dataclass(frozen=True)
class RetryingUpload:
    """A file whose upload failed and will be tried again (its data is in the journal)."""

    path: str
    error: str  # the last attempt's
    failures: int  # attempts failed in a row


@dataclass(frozen=True)
class Leftovers:
    """Files not in S3 when the pipeline stopped."""

    kept: int = 0  # committed: they stay in the journal for the next mount
    dropped: int = 0  # never committed (their close() failed): nothing was promised
    failed: int = 0  # failed for good: their data is in the journal's failed/

    def __bool__(self) -> bool:
        return bool(self.kept or self.dropped or self.failed)


class UploadPipeline:
    """The journal, the upload queue and its workers of one mount (trio thread only)."""

    def __init__(
        self,
        core: Core,
        journal: Journal,
        ns: Namespace,
        nodes: NodeTable,
        options: FsOptions,
        content: StoredContent,
    ) -> None:
        self.core = core
        self.ns = ns
        self.nodes = nodes
        self.options = options
        self.content = content
        self.telemetry = core.telemetry
        self.disk_limiter = content.limiter
        self.dirs = DirectoryView(nodes, ns)
        self.versions = JournaledVersions(journal, ns, self.disk_limiter, self.telemetry)
        send, receive = trio.open_memory_channel[Node](float("inf"))
        self._send = send
        self._receive = receive
        self._inflight = 0
        self._retry_timers: trio.Nursery | None = None  # set by run()
        self._draining = False  # unmounting: upload without delay
        self._idle = trio.Event()
        self._idle.set()
        # No upload starts while a rename runs: it would store under a name
        # the rename is taking away (see hold).
        self._renames = 0
        self._no_renames = trio.Event()
        self._no_renames.set()
        # One upload of a file at a time: a newer version's PUT must never be
        # overtaken by an older one still in flight (node id -> set when it ends).
        self._flights: dict[int, trio.Event] = {}

    # --- staging and commit ---------------------------------------------------------

    async def stage_empty(self, node: Node) -> StagedFile:
        """New content for ``node`` that starts empty (create, open with O_TRUNC)."""
        return await self._stage(node, keep_content=False)

    async def staging(self, node: Node, *, keep_content: bool = True) -> StagedFile:
        """The staging file writes to ``node`` go to: its current one while that
        takes writes, else a new one holding the file's current content (or
        nothing, without ``keep_content``)."""
        staged = node.staged
        if staged is not None and staged.is_writable:
            return staged
        return await self._stage(node, keep_content=keep_content)

    async def _stage(self, node: Node, *, keep_content: bool) -> StagedFile:
        async with node.lock:
            staged = node.staged
            if staged is not None and staged.is_writable:
                if not keep_content:
                    await staged.truncate(0, self.disk_limiter)
                return staged
            entry_id, path = await self.versions.new_entry()
            if keep_content:
                try:
                    await self._copy_current(node, path)
                except BaseException:
                    await self.versions.remove_entry(entry_id)
                    raise
            # Opened once the copy is done: a copy may put a new file at the
            # path (a verified download moved into place), and a descriptor
            # opened before would write to the empty one it replaced.
            new = StagedFile(entry_id, path, os.open(path, os.O_RDWR))
            # While the journal made the new file, the old one may have been
            # stored and settled (retired, node.staged None): it is not
            # retired again.
            old = node.staged
            node.staged = new
            if old is not None:
                self.versions.supersede(node, old)
            return new

    async def _copy_current(self, node: Node, dest: Path) -> None:
        """The file's current content into ``dest``: an older staging file's, else S3's."""
        if node.staged is not None:
            await node.staged.copy_to(dest, self.disk_limiter)
        elif node.stored is not None:  # (one listed empty: another writer may have filled it)
            # The version another mount stored meanwhile, if so (as a read would).
            async def copy_version(stored: StoredFile, report: bool) -> None:
                await self.content.copy(stored, self.ns.key_of(node.path), dest, report=report)

            await self.dirs.using_current(node, copy_version, self.content.reported)

    async def commit(self, node: Node) -> None:
        """Make what was written since the last commit durable in the journal,
        then queue its upload. Raises ``FsError`` when the journal cannot take
        it (ENOSPC, EIO).
        """
        staged = node.staged
        if staged is None or not staged.is_dirty or node.unlinked:
            return
        generation = staged.generation
        key = self.ns.key_of(node.path)
        meta = node.posix_metadata()
        try:
            await self.versions.commit_entry(staged, key, meta)
        except OSError as exc:
            if node.unlinked or staged.is_retired or not staged.in_journal:
                return  # the name went while the entry was written: nothing to keep
            raise FsError(exc.errno or errno.EIO, f"journal commit failed: {exc}") from exc
        if node.unlinked or staged.is_retired or not staged.in_journal:
            # Unlinked (or replaced by a rename) while the entry was written:
            # the manifest just written must not bring the name back.
            await self.versions.remove_entry(staged.entry_id)
            return
        staged.mark_committed(generation, key)
        self.versions.drop_superseded(node)
        current = self.ns.key_of(node.path)
        if current != key or node.posix_metadata() != meta:
            # Renamed or chmod'ed while the entry was written: the entry
            # follows (the rename rewrote the entries it found, and the
            # chmod counted on this commit, which had read the old mode).
            await self.versions.write_manifests(node, current)
        self.ns.note_node(node)
        self._request(node)

    async def wait_uploaded(self, node: Node) -> None:
        """Upload what was committed now (open writers or not, no delay) and
        return once it is in S3; raises the upload's error (fsync)."""
        while True:
            # Asked again each time: an upload that started during our commit
            # stored the version before it, and queues ours only once no
            # writer is left; the fsyncing handle is one.
            self._request(node, despite_writers=True)
            staged = node.staged
            if staged is None or not staged.needs_upload or node.unlinked:
                return  # stored, or nameless: unlinked while open, nothing goes to S3
            if staged.error is not None:
                raise staged.error
            staged.hurry()
            await staged.wait_changed()

    async def released(self, node: Node) -> None:
        """A handle of ``node`` was closed: commit what it left, upload once no writer is left."""
        staged = node.staged
        if staged is not None and staged.is_dirty and not node.unlinked:
            await self.commit(node)  # a writer that never flushed
        else:
            self._request(node)
        self._settle(node)

    # --- names changing under uploads ---------------------------------------------------

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """No upload starts inside: it would read a name that is being changed."""
        if self._renames == 0:
            self._no_renames = trio.Event()
        self._renames += 1
        try:
            yield
        finally:
            self._renames -= 1
            if self._renames == 0:
                self._no_renames.set()

    async def wait_not_uploading(self, node: Node) -> None:
        """Until no upload of ``node`` is in flight, of its newest version or
        of one it superseded (queued ones may wait)."""
        while (flight := self._flights.get(id(node))) is not None:
            await flight.wait()

    async def wait_subtree(self, path: str) -> list[Node]:
        """Until no upload under the directory ``path`` is in flight; returns
        the nodes there with local content (inside ``hold``, none starts)."""
        busy = [n for n in self.nodes.staged_nodes() if n.path.startswith(path + "/")]
        for node in busy:
            await self.wait_not_uploading(node)
        return busy

    def discard(self, node: Node) -> None:
        """``node`` lost its name and no handle uses it: its local content goes
        (unless an upload is in flight, which cleans up when it lands)."""
        staged = node.staged
        if staged is not None and not staged.is_uploading:
            node.staged = None
            self.versions.retire(staged)
        self.versions.drop_superseded(node)

    async def keep_for_open_handles(self, node: Node) -> bool:
        """Before ``node`` loses its name: True if open handles keep using a local copy.

        As POSIX has it, a file unlinked (or replaced by a rename) while open
        stays readable and writable through its handles (tempfile.TemporaryFile
        relies on it). The copy is made here, from S3 if need be, while the
        object is still there; ``lost_name`` then takes it out of the journal,
        so it is never uploaded and a crash does not bring it back.
        """
        if not node.open_handles or node.kind is not NodeKind.FILE:
            return False
        with contextlib.suppress(DgfsError, OSError):
            await self.staging(node)
        return True

    async def lost_name(self, node: Node, *, kept: bool) -> None:
        """``node``'s name is gone from S3 (unlinked, or replaced by a rename):
        its journal entry goes now, and not before, so a crash in between
        uploads it again under the name it still had. With ``kept`` (see
        ``keep_for_open_handles``) open handles go on using the local copy."""
        staged = node.staged
        if not kept:
            self.discard(node)
        elif staged is not None:
            staged.left_journal()  # a commit running now must not write it back
            await self.versions.remove_entry(staged.entry_id)
            self.versions.drop_superseded(node)

    # --- the queue and its workers --------------------------------------------------------

    def _request(self, node: Node, *, despite_writers: bool = False) -> None:
        """Queue the upload of what was committed; unless ``despite_writers``,
        only once no handle that may write is left (see ``FileSystem.flush``)."""
        staged = node.staged
        if staged is None or staged.phase is not Phase.IDLE or node.unlinked:
            return  # (a running upload queues again itself if more was committed)
        if not staged.needs_upload or (node.writers and not despite_writers):
            return
        staged.mark_queued(trio.current_time() + self.options.upload_delay)
        self._busy()
        self._send.send_nowait(node)

    def _busy(self) -> None:
        """One more upload queued, running or waiting for its retry (see ``drain``)."""
        if self._inflight == 0:
            self._idle = trio.Event()
        self._inflight += 1

    def _done(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The upload workers; run in the mount's nursery until cancelled."""
        async with trio.open_nursery() as nursery:
            self._retry_timers = nursery
            for _ in range(self.options.upload_workers):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        async for node in self._receive:
            try:
                staged = node.staged
                if (
                    staged is not None
                    and self.options.upload_delay
                    and not self.options.sync_upload
                    and not self._draining
                ):
                    # The delay runs from the close, not from when a worker
                    # got here; fsync() or an unmount cut it short.
                    await staged.wait_due()
                await self._upload(node)
            finally:
                self._done()

    async def drain(self) -> None:
        """Until every queued upload has finished (success or recorded failure).

        Called at unmount: uploads still in their delay start at once.
        """
        self._draining = True
        for node in self.nodes.staged_nodes():
            staged = node.staged
            if staged is not None:
                staged.hurry()
        while self._inflight:
            await self._idle.wait()

    async def _upload(self, node: Node) -> None:
        while True:
            if self._renames or id(node) in self._flights:
                await self._no_renames.wait()
                await self.wait_not_uploading(node)
            elif node.staged is not None and node.staged.being_written:
                # A write landing in a worker thread would change the file
                # under the upload's hash: it lands first (a later one goes
                # to a new staging file once this one is uploading).
                await node.staged.wait_writes_done()
            else:
                break
        # From here to start_upload() nothing awaits: a rename that starts
        # later waits for this upload to land.
        staged = node.staged
        if staged is None:
            return
        staged.take()
        if node.unlinked or not staged.needs_upload:
            staged.notify()  # an fsync or close waiting on it asks again
            return
        if node.writers and not staged.is_hurried:
            # Opened for writing again within the delay (``echo a > f;
            # cmd >> f``): what it holds now is not closed yet, and half a
            # file must not reach S3 (nor become its directory's
            # reference). The last writer's close queues it again; an fsync
            # waiting (a retry or redo of the upload it asked for) asks again.
            staged.notify()
            return
        key = self.ns.key_of(node.path)
        meta = node.posix_metadata()
        generation = staged.start_upload()
        flight = self._flights[id(node)] = trio.Event()
        try:
            await self._upload_version(node, staged, key, meta, generation)
        finally:
            del self._flights[id(node)]
            flight.set()

    async def _upload_version(
        self, node: Node, staged: StagedFile, key: str, meta: dict[str, str], generation: int
    ) -> None:
        """Store ``staged`` (its ``generation``) under ``key`` and record the outcome."""
        started = trio.current_time()
        direct = failures.store_whole(staged.local_failures)
        try:
            stored = (
                await self.core.put(staged.path, key, extra_metadata=meta, direct=direct)
            ).stored
        except Exception as exc:
            verdict = failures.judge(exc, direct=direct, races_lost=staged.races_lost)
            if verdict.unexpected:
                log.error("upload of %s failed unexpectedly", key, exc_info=exc)
            if node.staged is not staged:
                await self.versions.superseded_failed(node, staged, key, verdict)
            elif verdict.next is Next.GIVE_UP:
                await self.versions.quarantine(node, staged, key, verdict.error)
            else:
                self._again(node, staged, key, verdict)
            return
        self._uploaded(key, stored, trio.current_time() - started)
        if node.staged is staged:
            # What S3 holds now, before the follow-up awaits: readers go by
            # node.stored.
            node.stored_as(stored)
            # An object this mount already knew under that key may have had
            # the same bytes (ETag) within the same second: the row cached
            # for that version would show its attributes for this one.
            await self.ns.overwritten(stored.stored_key)
            failed = await self._follow_up(node, staged, key, meta)
            if (
                failed is not None
                and node.staged is staged
                and self._attributes_failed(node, staged, key, failed)
            ):
                return
        staged.landed(generation)
        self.ns.stored_into(node.parent_path)
        if node.staged is not staged:
            await self._superseded(node, staged, key, stored, meta)
            return
        if staged.needs_upload:
            self._request(node)  # written again meanwhile
        staged.notify()
        self._settle(node)

    async def _superseded(
        self, node: Node, staged: StagedFile, key: str, stored: StoredFile, meta: dict[str, str]
    ) -> None:
        """A newer staging file replaced ``staged`` while it uploaded; the newer
        one is queued on its own. What this upload stored is the file's S3
        version until then, with the attributes changed meanwhile (a crash,
        or a close of the newer that fails, leaves it as the file). Its
        journal entry stays until the newer version is committed, which then
        carries the attributes: one changed meanwhile, or one whose rewrite
        failed, is recovered with it after a crash."""
        if node.unlinked:
            self.versions.forget_superseded(node, staged)
            with contextlib.suppress(NotFound):
                await self.core.delete(key)
        else:
            node.stored_as(stored)
            failed = await self._follow_up(node, staged, key, meta)
            newest = node.staged
            if node.unlinked or newest is None or newest.is_committed:
                self.versions.forget_superseded(node, staged)
            elif failed is not None:
                log.warning(
                    "%s is stored, but storing its attributes failed (%s); its journal"
                    " entry keeps them until the newer version is committed",
                    key,
                    failed,
                )
            # Else too its entry stays until the newer version is committed
            # (``drop_superseded``): a chmod while the newer one is written
            # goes into it, and the follow-up stored at most what it saw.
        staged.notify()

    async def _follow_up(
        self, node: Node, staged: StagedFile, key: str, meta: dict[str, str]
    ) -> DgfsError | OSError | None:
        """The bytes are stored under ``key``: bring the name and attributes up
        to date, or remove them again if the file was unlinked meanwhile.
        Returns why the attributes could not be stored (the upload is not
        done then: its journal entry holds them); a failed removal or rename
        is logged only. Until this returns the upload is in flight, so a
        chmod meanwhile is left to it: the attributes are stored again until
        they are the ones the file shows, with nothing awaited between that
        check and the caller's ``landed``."""
        try:
            if node.unlinked:
                with contextlib.suppress(NotFound):
                    await self.core.delete(key)
                return None
            current_key = self.ns.key_of(node.path)
            if current_key != key:
                node.stored_as(await self.core.rename(key, current_key))
                return None
        except (DgfsError, OSError) as exc:
            # The bytes are stored; only a follow-up (name) is missing.
            log.error("%s is stored, but updating it afterwards failed: %s", key, exc)
            return None
        while node.posix_metadata() != meta and not node.unlinked:
            meta = node.posix_metadata()
            try:
                stored = await self.core.update_metadata(key, meta)
            except (DgfsError, OSError) as exc:
                return exc
            node.stored_as(stored)
            await self.ns.metadata_changed(stored.stored_key)
            if node.staged is not staged:
                break  # a newer version (being written) carries what changes next
        return None

    def _attributes_failed(
        self, node: Node, staged: StagedFile, key: str, error: DgfsError | OSError
    ) -> bool:
        """The bytes landed but the attributes changed meanwhile did not (their
        rewrite failed): True when the version counts as not uploaded and is
        stored again with them, as any failed upload is (its journal entry
        holds them meanwhile). False when they never can be: S3 refuses
        the rewrite for good, or the object is gone (another writer removed
        it); the upload is done, said once."""
        verdict = failures.judge(error, direct=True, races_lost=staged.races_lost)
        if verdict.next is Next.GIVE_UP or isinstance(error, NotFound):
            log.error("%s is stored, but storing its attributes failed: %s", key, error)
            return False
        self._again(node, staged, key, verdict)
        return True

    def _uploaded(self, key: str, stored: StoredFile, seconds: float) -> None:
        kind = ("deep-" if stored.deep else "") + stored.kind.value
        self.telemetry.uploaded(kind, stored.original_size, stored.stored_size, seconds)
        # One line per upload, for operators (no credentials: key and sizes only).
        log.info(
            "uploaded %s: %s%s, %d -> %d bytes (ratio %.3f) in %.2f s",
            key,
            "deep " if stored.deep else "",
            stored.kind.value,
            stored.original_size,
            stored.stored_size,
            stored.ratio,
            seconds,
        )

    def _again(self, node: Node, staged: StagedFile, key: str, verdict: failures.Verdict) -> None:
        """An attempt failed and is made again: at once (a race lost), or after a pause."""
        if verdict.next is Next.REDO:
            self._redo(node, staged, verdict.error)
        else:
            self._retry(node, staged, key, verdict)

    def _redo(self, node: Node, staged: StagedFile, error: DgfsError) -> None:
        """A race lost to another writer: queued again at once, fsync waiting on."""
        log.info("%s; storing it again at once", error)
        staged.lost_race()
        self._request(node, despite_writers=True)

    def _retry(self, node: Node, staged: StagedFile, key: str, verdict: failures.Verdict) -> None:
        """Report the error to fsync() waiters, then queue the upload again
        after a pause (``failures.retry_delay``). The data stays in the
        journal meanwhile, and the worker is free."""
        staged.failed_transiently(verdict.error, local=verdict.local)
        delay = failures.retry_delay(self.options.retry_delay, staged.failures)
        whole = verdict.local and staged.local_failures == failures.LOCAL_FAILURES_BEFORE_DIRECT
        log.warning(
            "upload of %s failed (%s, fsync sees %s); retrying in %.0fs%s",
            key,
            verdict.error,
            errno.errorcode.get(errno_of(verdict.error), "EIO"),
            delay,
            ", storing it whole (its delta failed on this machine twice)" if whole else "",
        )
        self.telemetry.upload_retried()
        self._retry_later(node, staged, delay)

    def _retry_later(self, node: Node, staged: StagedFile, delay: float) -> None:
        assert self._retry_timers is not None  # workers run only inside run()
        self._busy()  # a retry waiting counts as in flight: unmount waits for it
        self._retry_timers.start_soon(self._retry_after, node, staged, delay)

    async def _retry_after(self, node: Node, staged: StagedFile, delay: float) -> None:
        """After the pause, queue the upload again, unless the staging file was
        discarded or superseded meanwhile (see ``JournaledVersions.supersede``: it is then
        never uploaded again)."""
        try:
            await trio.sleep(delay)
            staged.retrying()
            if node.staged is staged and not staged.is_retired:
                self._request(node, despite_writers=True)
        finally:
            self._done()

    def _settle(self, node: Node) -> None:
        """Drop local content once it is all in S3 and no handle is open."""
        staged = node.staged
        if staged is None or staged.is_uploading or node.open_handles:
            return
        if node.unlinked:
            node.staged = None
            self.versions.retire(staged)
        elif staged.is_settled and not staged.being_written:
            # (a truncate or write landing in a worker thread has not counted
            # its new version yet: the file is not settled)
            node.staged = None
            self.nodes.confirmed(node)
            self.versions.retire(staged)
            self.ns.note_node(node)
        self.nodes.release(node)

    # --- start and stop -------------------------------------------------------------------

    async def recover(self) -> int:
        """Queue uploads of what an earlier mount committed but did not upload."""
        entries = await self.versions.recover()
        for entry in entries:
            self._adopt(entry)
        if entries:
            log.info("recovered %d file(s) from the journal; uploading", len(entries))
        return len(entries)

    def _adopt(self, entry: JournalEntry) -> None:
        path = self.ns.path_of(entry.key)
        if path is None:
            log.error("journal entry %s is outside this mount; kept", entry.key)
            return
        staging = self.versions.data_path(entry.entry_id)
        fd = os.open(staging, os.O_RDWR)
        node = self.nodes.recovered(path, os.fstat(fd).st_size, entry.metadata)
        node.staged = StagedFile(entry.entry_id, staging, fd, committed_as=entry.key)
        self._request(node)

    def backlog(self) -> tuple[int, int]:
        """``(pending, failed)``: closed files not in S3 yet, and those that failed for good."""
        counts = self.counts()
        return counts.pending + counts.in_flight, counts.failed

    def counts(self) -> UploadCounts:
        """Where the files with local content stand right now."""
        staged = [n.staged for n in self.nodes.staged_nodes() if n.staged is not None]
        return UploadCounts(
            pending=sum(
                1 for s in staged if s.needs_upload and not (s.is_failed or s.is_uploading)
            ),
            in_flight=sum(1 for s in staged if s.is_uploading),
            failed=sum(1 for s in staged if s.is_failed),
            open_unsaved=sum(1 for s in staged if not s.is_committed and not s.is_failed),
        )

    def retrying(self) -> list[RetryingUpload]:
        """Files whose last upload attempt failed and that will be tried again."""
        return [
            RetryingUpload(n.path, str(n.staged.error), n.staged.failures)
            for n in self.nodes.staged_nodes()
            if n.staged is not None and n.staged.failures and not n.staged.is_failed
        ]

    def leftovers(self) -> Leftovers:
        """What is not in S3 (call once the workers have stopped)."""
        nodes = self.nodes.staged_nodes()
        left = [n.staged for n in nodes if n.staged is not None]
        failed = sum(1 for s in left if s.is_failed)
        dropped = sum(1 for s in left if not s.is_committed and not s.is_failed)
        # A superseded version is kept when the newer one was never committed.
        kept = len(left) - failed - dropped + sum(len(n.superseded) for n in nodes)
        return Leftovers(kept=kept, dropped=dropped, failed=failed)

    def close(self) -> None:
        """Close the staging files' descriptors (after the workers have stopped)."""
        for node in self.nodes.staged_nodes():
            for older in node.superseded:
                older.close()
            if node.staged is not None:
                node.staged.close()
