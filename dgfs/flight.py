"""Concurrency helpers (trio thread only): single-flight, one run of a job per
key at a time; and nurseries whose failures come out as plain exceptions."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from dgfs.errors import exception_leaves

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def plain_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that raises its first failure as itself, not in an exception
    group: callers of dgfs's cores expect plain ``dgfs.errors``. Further
    failures are logged at debug; a group of cancellations stays as it is
    (trio's cancel scopes handle it)."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        errors = [exc for exc in exception_leaves(group) if not isinstance(exc, trio.Cancelled)]
        if not errors:
            raise
        for other in errors[1:]:
            log.debug("further failure: %r", other)
        raise errors[0] from None


class SingleFlight:
    """One run of a job per key at a time; concurrent callers share it.

    Callers do not receive a result: they ask again for the state the job
    produces (a cache entry, say).
    """

    def __init__(self) -> None:
        self._running: dict[str, trio.Event] = {}

    async def ensure(
        self, key: str, is_done: Callable[[], bool], job: Callable[[], Awaitable[None]]
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
