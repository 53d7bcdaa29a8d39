"""Answering one request per connection on the daemon's own sockets (the
metrics endpoint, the status socket) without letting clients hold it.

Any local user can open connections to the metrics port and never send a
byte. ``serve_requests`` bounds what that costs, as the socket's
``Endpoint`` says: at most ``max_connections`` are open at once (each is
a descriptor); a client has ``request_timeout`` seconds from being
accepted to send its request and as long again to take its answer; and
when the bound is reached, the connection that has been waiting longest
for its request is closed to make room, so a client that asks at once (a scrape, ``dgfs status``) is
answered even while many idle ones are open. Each connection is a
background job of its own (``dgfs.background.contained``).
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from dgfs.background import contained

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """One of the daemon's sockets: its names in the log, and what a client may cost."""

    #: The whole, in the log ("the metrics endpoint").
    name: str
    #: One connection, in the log ("a metrics scrape").
    job: str
    #: Connections open at once (idle ones make room for new ones).
    max_connections: int
    #: Seconds a client has from its connection to its request, and again for the answer.
    request_timeout: float


async def serve_requests(
    listeners: list[trio.SocketListener],
    read_request: Callable[[trio.SocketStream], Awaitable[T]],
    answer: Callable[[trio.SocketStream, T], Awaitable[None]],
    endpoint: Endpoint,
) -> None:
    """Serve ``listeners`` until cancelled: for each connection,
    ``answer(stream, await read_request(stream))``, within the bounds above.
    A failure of the listeners themselves ends this function with one log
    line, not the mount.
    """
    name, job = endpoint.name, endpoint.job
    max_connections, request_timeout = endpoint.max_connections, endpoint.request_timeout
    tokens = itertools.count()
    live: dict[int, trio.CancelScope] = {}  # connections open now
    waiting: OrderedDict[int, trio.CancelScope] = OrderedDict()  # not asked yet, oldest first

    async def handle(stream: trio.SocketStream) -> None:
        if len(live) >= max_connections:
            if not waiting:
                return  # every one is being answered: this one is closed unanswered
            evicted, scope = waiting.popitem(last=False)
            del live[evicted]
            scope.cancel()
        token = next(tokens)
        scope = live[token] = waiting[token] = trio.CancelScope(
            deadline=trio.current_time() + request_timeout
        )
        try:
            with contained(job, logger=log):
                try:
                    with scope:
                        request = await read_request(stream)
                    waiting.pop(token, None)
                    if scope.cancelled_caught:
                        return  # too slow, or made room for a newer connection
                    with trio.move_on_after(request_timeout):
                        await answer(stream, request)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the client went away: nobody to answer
        finally:
            waiting.pop(token, None)
            live.pop(token, None)

    with contained(name, logger=log):
        await trio.serve_listeners(handle, listeners)
