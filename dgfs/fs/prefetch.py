"""Rebuild the next deltas of a directory while a reader walks it in order.

``cp -r``, ``rsync``, ``sha256sum *`` and ``unzip`` loops open a
directory's files one after the other, in name order. A cold read of a
delta is CPU work (xdelta3, then hashing into the cache) that the reader
waits for; done for the next files while the current one is served, it
overlaps with the reading instead. An open of a directory's first file,
or two opens in increasing name order, count as a walk; the next
``ahead`` deltas are then materialized in the background, in name order,
at most ``workers`` at once (xdelta3 runs as its own process: one per
core). A prefetched rebuild is the same shared flight a later open joins, so
nothing is done twice; failures are left for the reader's own open to
report (an unexpected one, a full disk say, is also logged once:
``dgfs.background``). Nothing is prefetched that would make the files ahead crowd out
half of the cache.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict, deque

import trio

from dgfs.background import contained
from dgfs.core import Core
from dgfs.errors import DgfsError
from dgfs.format import Kind, StoredFile
from dgfs.fs.entries import DirEntry
from dgfs.fs.namespace import Namespace
from dgfs.fs.nodes import Node

log = logging.getLogger(__name__)


class Prefetcher:
    """Background rebuilds of the deltas a walking reader opens next (trio thread only)."""

    def __init__(
        self,
        core: Core,
        ns: Namespace,
        *,
        ahead: int = 4,
        workers: int | None = None,
        cache_budget: int,
    ) -> None:
        self.core = core
        self.ns = ns
        self.ahead = ahead
        self.cache_budget = cache_budget
        self.workers = workers or os.cpu_count() or 2
        # Rebuilds waiting for a worker, in the order the reader will want them.
        self._queue: deque[StoredFile] = deque()
        self._running = 0  # workers taking rebuilds from the queue
        self._last_opened: OrderedDict[str, str] = OrderedDict()  # dir path -> name
        self._sorted: dict[str, tuple[dict[str, DirEntry], list[str]]] = {}  # see _sorted_names
        self._wanted: set[str] = set()  # sha256 of rebuilds queued or running
        self._nursery: trio.Nursery | None = None
        self.started = 0  # rebuilds started here (tests, telemetry)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the background rebuilds until cancelled (in the mount's nursery)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def opened(self, node: Node) -> None:
        """``node`` (a stored file) is being read: prefetch what follows it if
        this directory is being walked in name order."""
        parent, name = node.parent_path, node.name
        last = self._last_opened.pop(parent, None)
        self._last_opened[parent] = name
        while len(self._last_opened) > 256:
            self._last_opened.popitem(last=False)
        listing = self.ns.cached(parent)
        if self._nursery is None or not listing or self.ahead <= 0:
            return
        names = self._sorted_names(parent, listing)
        walking = name > last if last is not None else name == names[0]
        if not walking:
            return
        start = bisect.bisect_right(names, name)
        for following in names[start : start + self.ahead]:
            entry = listing.get(following)  # the names may predate a local change
            stored = entry.stored if entry is not None else None
            if stored is not None and self._worth_it(stored):
                assert stored.file_sha256 is not None
                self._wanted.add(stored.file_sha256)
                self.started += 1
                self._queue.append(stored)
        while self._queue and self._running < self.workers:
            self._running += 1
            self._nursery.start_soon(self._work)

    def _sorted_names(self, parent: str, listing: dict[str, DirEntry]) -> list[str]:
        """The names of ``listing`` in order, sorted once per fetched listing
        (a directory of 100,000 files is opened file after file)."""
        known = self._sorted.get(parent)
        if known is None or known[0] is not listing:
            known = self._sorted[parent] = (listing, sorted(listing))
            while len(self._sorted) > 16:
                del self._sorted[next(iter(self._sorted))]
        return known[1]

    def _worth_it(self, stored: StoredFile) -> bool:
        # Only deltas cost CPU to read; a file that would crowd the cache
        # evicts what the reader is using.
        return (
            stored.kind is Kind.DELTA
            and stored.file_sha256 is not None
            and stored.file_sha256 not in self._wanted
            and stored.original_size * self.ahead * 2 <= self.cache_budget
            and not self.core.cache.contains(stored.file_sha256)
        )

    def rebuild_now(self, stored: StoredFile) -> trio.Event | None:
        """Rebuild ``stored`` in the background for a reader that opened it and
        is served while it is written (``dgfs.fs.readers.StreamReader``); not
        limited like prefetches: someone waits. Joins a rebuild already
        running. Returns an event set once it is over, None when not running."""
        if self._nursery is None:
            return None
        done = trio.Event()
        self._nursery.start_soon(self._rebuild_for_reader, stored, done)
        return done

    async def _rebuild_for_reader(self, stored: StoredFile, done: trio.Event) -> None:
        # The reader reports a dgfs error itself (its stream carries it); any
        # failure ends this rebuild only, never the mount.
        try:
            with contained(f"rebuild of {stored.visible_key}", quiet=(DgfsError,), logger=log):
                await self.core.materialize(stored, counted=False)
        finally:
            done.set()

    async def _work(self) -> None:
        """Rebuild what the queue holds, first in first out, until it is empty.

        Tasks started side by side run in no promised order (trio even
        shuffles them): a task per file, waiting on a limiter, rebuilt the
        files after the next one first while the reader waited for it."""
        try:
            while self._queue:
                await self._rebuild(self._queue.popleft())
        finally:
            self._running -= 1

    async def _rebuild(self, stored: StoredFile) -> None:
        assert stored.file_sha256 is not None
        try:
            with contained(f"prefetch of {stored.visible_key}", quiet=(DgfsError,), logger=log):
                await self.core.materialize(stored, counted=False)
        finally:
            self._wanted.discard(stored.file_sha256)
