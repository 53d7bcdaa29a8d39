"""``FaultyStore``: an ObjectStore wrapper that fails, delays or holds chosen calls.

For deterministic tests of the layers above the store (the filesystem's
upload pipeline above all): a test says which call of which operation
goes wrong, and how, instead of waiting for real time or a real outage.

- ``fail(op, nth=2)``: the 2nd ``op`` call from now raises ``TransientError``
  (what ``S3Store`` raises once its own retries are exhausted, and what the
  filesystem retries) or, with ``transient=False``, ``StoreError`` (a
  failure for good); ``error=`` gives any other exception.
- ``delay(op, seconds)``: the call sleeps first (trio time: free under
  ``MockClock``'s autojump).
- ``hang(op)``: the call waits until ``fault.release()``; ``fault.reached``
  is set as soon as a call is held, so a test knows the operation is in
  flight without sleeping.
- ``after=True`` acts once the wrapped store has done the work (the object
  is written, then the reply fails or is held), as when S3 applies a PUT
  whose response is lost.

Calls are numbered per fault, counting only the calls it matches
(operation, and ``key`` when given), from the moment it is added. Every
call is counted per operation (``calls``, ``count``) and logged with its
trio time (``log``); ``in_flight`` tells how many have not finished yet
and ``wait_calls`` waits until a number of them has. Operations are the store's
method names; ``list_pages`` (and so ``list``) is ``"list"``, ``delete``
and ``delete_many`` are distinct.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import trio

from dgfs.errors import StoreError, TransientError
from dgfs.store.base import (
    CopyRequest,
    ListPage,
    MultipartUpload,
    NewObject,
    ObjectHead,
    ObjectStore,
)

Operation = Literal[
    "list",
    "head",
    "get_range",
    "download",
    "upload",
    "put_bytes",
    "copy",
    "delete",
    "delete_many",
    "list_multipart_uploads",
    "abort_multipart_upload",
]


@dataclass(frozen=True)
class Call:
    """One call the store received: its operation, the keys it names, and when (trio time)."""

    operation: Operation
    keys: tuple[str, ...]
    at: float


@dataclass(eq=False)
class Fault:
    """What happens to some calls of one operation; returned by the ``FaultyStore`` methods.

    Applies to the ``first``-th matching call and the ``times - 1`` after
    it (every later one when ``times`` is None). ``hits`` counts the calls
    it acted on; ``reached`` is set when it first acts.
    """

    operation: Operation
    key: str | None
    first: int
    times: int | None
    after: bool
    error: Callable[[str], BaseException] | None = None
    delay: float = 0.0
    gate: trio.Event | None = None
    seen: int = 0
    hits: int = 0
    reached: trio.Event = field(default_factory=trio.Event)

    def matches(self, call: Call) -> bool:
        return call.operation == self.operation and (self.key is None or self.key in call.keys)

    def claims(self, call: Call) -> bool:
        """Count ``call`` (which it matches) and say whether this fault acts on it."""
        self.seen += 1
        return self.seen >= self.first and (
            self.times is None or self.seen < self.first + self.times
        )

    def release(self) -> None:
        """Let calls held by this fault go on, now and from now on."""
        if self.gate is not None:
            self.gate.set()

    async def act(self, call: Call) -> None:
        self.hits += 1
        self.reached.set()
        if self.delay:
            await trio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            where = " ".join(call.keys)
            raise self.error(
                f"injected failure: {call.operation} {where} (call {self.seen} since the fault)"
            )


class Calls(TypedDict, total=False):
    """Which calls of an operation a fault acts on: the ``nth`` matching call
    from now (default 1) and the ``times - 1`` after it (default 1; None:
    every later one); ``key``: only calls naming that key; ``after``: it
    acts once the inner store has done the call (a reply lost, an upload
    held once stored), not before."""

    nth: int
    times: int | None
    key: str | None
    after: bool


def _fault(operation: Operation, calls: Calls, **action: Any) -> Fault:
    return Fault(
        operation,
        calls.get("key"),
        calls.get("nth", 1),
        calls.get("times", 1),
        calls.get("after", False),
        **action,
    )


class FaultyStore(ObjectStore):
    """``inner`` with failures, delays and holds injected on chosen calls."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.bucket = inner.bucket
        self.faults: list[Fault] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self.log: list[Call] = []
        self._finished: list[Call] = []
        self._progress = trio.Event()

    @property
    def endpoint(self) -> str | None:
        """The wrapped store's endpoint, if it has one."""
        endpoint = getattr(self.inner, "endpoint", None)
        return endpoint if isinstance(endpoint, str) else None

    # --- choosing faults -----------------------------------------------------------

    def _add(self, fault: Fault) -> Fault:
        if fault.first < 1 or (fault.times is not None and fault.times < 1):
            raise ValueError("nth and times count from 1")
        self.faults.append(fault)
        return fault

    def fail(
        self,
        operation: Operation,
        *,
        transient: bool = True,
        error: Callable[[str], BaseException] | None = None,
        **calls: Unpack[Calls],
    ) -> Fault:
        """Make the matching calls (``Calls``) raise.

        ``TransientError`` by default, ``StoreError`` when not ``transient``;
        ``error`` (an exception class, or any callable of the message) wins
        over both.
        """
        chosen = error or (TransientError if transient else StoreError)
        return self._add(_fault(operation, calls, error=chosen))

    def delay(self, operation: Operation, seconds: float, **calls: Unpack[Calls]) -> Fault:
        """Make the matching calls (``Calls``) take ``seconds`` more (of trio time)."""
        return self._add(_fault(operation, calls, delay=seconds))

    def hang(self, operation: Operation, **calls: Unpack[Calls]) -> Fault:
        """Hold the matching calls (``Calls``) until ``release()`` (cancellation
        ends them too)."""
        return self._add(_fault(operation, calls, gate=trio.Event()))

    def clear(self) -> None:
        """Remove every fault and release the calls held."""
        for fault in self.faults:
            fault.release()
        self.faults.clear()

    # --- observing calls -----------------------------------------------------------------

    def count(self, operation: Operation, key: str | None = None) -> int:
        """Calls of ``operation`` received so far (naming ``key``, when given)."""
        if key is None:
            return self.calls[operation]
        return sum(1 for c in self.log if c.operation == operation and key in c.keys)

    def in_flight(self, operation: Operation, key: str | None = None) -> int:
        """Calls of ``operation`` (naming ``key``) started and not finished yet."""
        finished = sum(
            1 for c in self._finished if c.operation == operation and (key is None or key in c.keys)
        )
        return self.count(operation, key) - finished

    async def wait_calls(self, operation: Operation, count: int, *, key: str | None = None) -> None:
        """Until ``count`` calls of ``operation`` (naming ``key``) have finished, in any way."""
        while self.count(operation, key) - self.in_flight(operation, key) < count:
            await self._progress.wait()

    @contextlib.asynccontextmanager
    async def _faults(self, operation: Operation, *keys: str) -> AsyncIterator[None]:
        call = Call(operation, keys, trio.current_time())
        self.calls[operation] += 1
        self.log.append(call)
        # Numbered now, in call order, whatever the faults then await.
        acting = [f for f in self.faults if f.matches(call) and f.claims(call)]
        try:
            for fault in acting:
                if not fault.after:
                    await fault.act(call)
            yield
            for fault in acting:
                if fault.after:
                    await fault.act(call)
        finally:
            self._finished.append(call)
            self._progress.set()
            self._progress = trio.Event()

    # --- the store interface ---------------------------------------------------------------

    async def list_pages(
        self, prefix: str = "", delimiter: str | None = "/"
    ) -> AsyncIterator[ListPage]:
        async with self._faults("list", prefix):
            pages = [page async for page in self.inner.list_pages(prefix, delimiter)]
        for page in pages:
            yield page

    async def head(self, key: str) -> ObjectHead:
        async with self._faults("head", key):
            return await self.inner.head(key)

    async def get_range(
        self, key: str, start: int, length: int, *, if_match: str | None = None
    ) -> bytes:
        async with self._faults("get_range", key):
            return await self.inner.get_range(key, start, length, if_match=if_match)

    async def download(self, key: str, dest: Path) -> ObjectHead:
        async with self._faults("download", key):
            return await self.inner.download(key, dest)

    async def write(self, key: str, body: bytes | Path, new: NewObject) -> str:
        operation: Operation = "upload" if isinstance(body, Path) else "put_bytes"
        async with self._faults(operation, key):
            return await self.inner.write(key, body, new)

    async def copy_object(self, src_key: str, dst_key: str, request: CopyRequest) -> str:
        async with self._faults("copy", src_key, dst_key):
            return await self.inner.copy_object(src_key, dst_key, request)

    async def delete(self, key: str, *, version: ObjectHead | None = None) -> None:
        async with self._faults("delete", key):
            await self.inner.delete(key, version=version)

    async def delete_many(
        self, keys: builtins.list[str], *, etags: Mapping[str, str] | None = None
    ) -> builtins.list[str]:
        async with self._faults("delete_many", *keys):
            return await self.inner.delete_many(keys, etags=etags)

    async def list_multipart_uploads(self, prefix: str = "") -> builtins.list[MultipartUpload]:
        async with self._faults("list_multipart_uploads", prefix):
            return await self.inner.list_multipart_uploads(prefix)

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        async with self._faults("abort_multipart_upload", key):
            await self.inner.abort_multipart_upload(key, upload_id)

    async def aclose(self) -> None:
        await self.inner.aclose()
