"""One at a time per key (trio thread only): a job's run shared by
concurrent callers (``SingleFlight``), or a lock held in turn (``KeyedLocks``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import trio


class SingleFlight:
    """One run of a job per key at a time; concurrent callers share it.

    Callers do not receive a result: they ask again for the state the job
    produces (a cache entry, say).
    """

    def __init__(self) -> None:
        self._running: dict[str, trio.Event] = {}

    async def ensure(
        self, key: str, is_done: Callable[[], bool], job: Callable[[], Awaitable[object]]
    ) -> None:
        """Run ``job`` until ``is_done()``, sharing a run already in flight for ``key``.

        The caller that ran the job returns once it succeeds, without asking
        ``is_done`` again. A caller whose shared run failed runs the job
        itself, so every caller gets the error rather than silently nothing.
        """
        while not is_done():
            event = self._running.get(key)
            if event is not None:
                await event.wait()
                continue
            event = self._running[key] = trio.Event()
            try:
                await job()
            finally:
                del self._running[key]
                event.set()
            return


class KeyedLocks:
    """A lock per key, taken in turn (in order: trio's locks are fair), and
    forgotten once nobody holds or waits for it."""

    def __init__(self) -> None:
        # key -> its lock, and how many hold or wait for it
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def held(self, key: str) -> AsyncIterator[None]:
        """Hold ``key``'s lock while the block runs."""
        lock, users = self._locks.get(key) or (trio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        """Keys whose lock somebody holds or waits for."""
        return len(self._locks)

    def users(self, key: str) -> int:
        """How many hold or wait for ``key``'s lock."""
        return self._locks.get(key, (None, 0))[1]
