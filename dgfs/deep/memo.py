"""A thread-safe LRU map with a byte budget whose entries are computed once."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: How long a thread waits for another one computing the same memo entry
#: before computing it too (a bound, not a timing: they normally finish first).
PEER_WAIT = 60.0


class Memo:
    """A thread-safe LRU map with a byte budget (shared by concurrent expansions
    and rebuilds), whose entries are computed once when asked for at once."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # key -> (set when its computation ends, the thread computing it)
        self._flights: dict[bytes, tuple[threading.Event, int]] = {}
        self.waits = 0
        """Lookups that waited for another thread's computation (tests, benchmarks)."""
        self.puts = 0
        """Entries put so far (``dgfs.deep.remember`` saves only when it grew)."""

    @contextmanager
    def computing(
        self, key: bytes, wait: float = PEER_WAIT, meanwhile: Callable[[], bool] | None = None
    ) -> Iterator[object | None]:
        """The value of ``key``; or None, and then the caller computes it and
        ``put``s it before leaving the block.

        Consecutive releases read or stored side by side (a prefetch beside a
        read, uploads in parallel) ask for the same entries at the same time:
        a thread that finds one being computed by another waits for it (at
        most ``wait`` seconds, then computes it too). Nested entries are
        computed inside outer ones; a thread never waits for itself, and
        the bound on the wait keeps a cycle (two archives nested in each
        other both ways) from blocking for good. While it waits, it calls
        ``meanwhile`` (if given) again and again, until that has nothing
        more to do (returns False) or the entry is there.
        """
        me = threading.get_ident()
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            flight = self._flights.get(key) if item is None else None
            claimed = item is None and flight is None
            if claimed:
                self._flights[key] = (threading.Event(), me)
        if item is not None:
            yield item[0]
            return
        if flight is not None:
            event, owner = flight
            if owner != me:
                self.waits += 1
                _wait(event, wait, meanwhile)
            yield self.get(key)
            return
        try:
            yield None
        finally:
            with self._lock:
                event, _ = self._flights.pop(key)
            event.set()

    def get(self, key: bytes) -> object | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: bytes, value: object, size: int) -> None:
        with self._lock:
            self.puts += 1
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                self._bytes -= self._items.popitem(last=False)[1][1]

    def snapshot(self) -> list[tuple[bytes, object]]:
        """Every entry, least recently used first."""
        with self._lock:
            return [(key, value) for key, (value, _) in self._items.items()]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def _wait(event: threading.Event, seconds: float, meanwhile: Callable[[], bool] | None) -> None:
    """Wait up to ``seconds`` for ``event``, doing ``meanwhile`` while it has work."""
    deadline = time.monotonic() + seconds
    while meanwhile is not None and not event.is_set() and time.monotonic() < deadline:
        if not meanwhile():
            break
    event.wait(max(0.0, deadline - time.monotonic()))
