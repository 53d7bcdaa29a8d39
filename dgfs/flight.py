"""Single-flight: one run of a job per key at a time (trio thread only)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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
