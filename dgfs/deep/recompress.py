"""Rebuilding the original bytes from an expanded form: every DEFLATE, GNU and
SPLIT segment re-compressed, small subtrees side by side and remembered.

Rebuilding refuses nesting deeper than ``MAX_NESTING`` and, in
``rebuild_file``, more output or time than the caller allows
(``DecodeLimit``). The time limit is a :class:`Deadline` that every step
checks (scanning, spooling, compressing, in every thread), not only the
steps that produce output: a hostile form can make any of them slow.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from dgfs import children
from dgfs.deep import gnuzip
from dgfs.deep.deadline import NEVER, Deadline
from dgfs.deep.deflate import Payload, deflate_chunks, deflate_pieces
from dgfs.deep.memo import Memo
from dgfs.deep.segments import (
    COMPRESSING,
    MAGIC,
    MAX_NESTING,
    MIN_PIECE,
    TAG_DEFLATE,
    TAG_END,
    TAG_SPLIT,
    Reader,
    SplitRecipe,
)
from dgfs.deep.spans import InReference
from dgfs.errors import DecodeLimit, FormatError

#: Rebuilding: a DEFLATE, GNU or SPLIT segment that takes up to this many bytes
#: of the form (its uncompressed bytes, and its headers: a hostile form may be
#: all headers) is read whole, and at the top level compressed in a worker
#: thread; at most _IN_FLIGHT such bytes wait for the threads. Larger ones
#: are streamed.
PARALLEL_PAYLOAD = 4 << 20
_IN_FLIGHT = 16 << 20
#: What a subtree waiting in the queue holds besides its bytes (its future,
#: work item and result list: ~1.7 KB measured): a form of tiny subtrees
#: behind a slow one queues at most _IN_FLIGHT / _ENTRY of them.
_ENTRY = 2 << 10


class _Rebuilder(Reader):
    """A reader that rebuilds the original bytes as it goes."""

    def __init__(
        self,
        src: BinaryIO,
        scratch_dir: Path | None,
        depth: int = 0,
        workers: int = 1,
        deadline: Deadline = NEVER,
        place: InReference | None = None,
    ) -> None:
        super().__init__(src, depth, deadline)
        self.scratch_dir = scratch_dir
        self.workers = workers
        """Threads a SPLIT segment's pieces are compressed by."""
        self.place = place
        """Where its bytes lie in the reference's form, if known."""

    def _known(self, start: int, end: int) -> tuple[bytes | None, list[bytes] | None]:
        """The reference's name for the subtree at ``[start, end)`` (None: it
        does not lie in the reference), and what it rebuilt to (None: not known)."""
        key = self.place.key(start, end) if self.place is not None else None
        known = FROM_REFERENCE.get(key) if key is not None else None
        return key, known if isinstance(known, list) else None

    @contextlib.contextmanager
    def _spooled(self, suffix: str) -> Iterator[tuple[BinaryIO, Path]]:
        """The inner segments up to the next END, rebuilt into a scratch file
        (open at its end, flushed) and its path; removed when the block ends."""
        fd, name = tempfile.mkstemp(dir=self.scratch_dir, suffix=suffix)
        try:
            with os.fdopen(fd, "w+b") as spool:
                for chunk in self.segments():
                    spool.write(chunk)
                spool.flush()
                yield spool, Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    def _gnu(self, level: int) -> Iterator[bytes]:
        if not 1 <= level <= 9:
            raise FormatError(f"expanded form: bad GNU gzip level {level}")
        with self._spooled(".gnu") as (spool, payload):
            timeout = self.deadline.within(children.timeout_for(2 * spool.tell()))
            try:
                yield from gnuzip.gnu_deflate(level, payload, timeout)
            except DecodeLimit:
                self.deadline.check()  # zgz ran into the rebuild's limit: name that one
                raise

    def segments(self) -> Iterator[bytes]:
        """Rebuild segments up to the next END, in order."""
        while (tag := self.exact(1)[0]) != TAG_END:
            self.deadline.check()
            if tag in COMPRESSING:
                yield from self._subtree(tag)
            else:
                yield from self.segment(tag)

    def _split(self, recipe: SplitRecipe) -> Iterator[bytes]:
        """A SPLIT segment's stream: its inner segments spooled, then compressed
        in pieces, ``workers`` at a time."""
        with self._spooled(".split") as (spool, _):
            if recipe.checkpoints[-1].uncompressed + MIN_PIECE > spool.tell():
                raise FormatError("expanded form: a SPLIT checkpoint past its bytes")
            payload = Payload.of_file(spool.fileno(), spool.tell())
            try:
                yield from deflate_pieces(
                    recipe.params, payload, recipe.checkpoints, self.workers, self.deadline
                )
            except ValueError as exc:
                raise FormatError(f"expanded form: {exc}") from None

    def compressed(self, tag: int) -> Iterator[bytes]:
        """One DEFLATE or GNU segment whose tag was just read, compressed as it goes."""
        if self.depth >= MAX_NESTING:
            raise DecodeLimit(f"expanded form: segments nest deeper than {MAX_NESTING}")
        self.depth += 1
        try:
            if tag == TAG_DEFLATE:
                yield from deflate_chunks(self.params(), self.segments())
            elif tag == TAG_SPLIT:
                yield from self._split(self.split_recipe())
            else:
                yield from self._gnu(self.exact(1)[0])
        finally:
            self.depth -= 1

    def _subtree(self, tag: int) -> Iterator[bytes]:
        """A DEFLATE or GNU segment: from FROM_REFERENCE or REBUILT_SUBTREES
        when small enough, else streamed."""
        start = self.src.tell() - 1
        end = self._subtree_end(tag, PARALLEL_PAYLOAD)
        if end is None:
            self.src.seek(start + 1)
            yield from self.compressed(tag)
            return
        nests = self.nests
        key, known = self._known(start, end)
        if known is not None:
            yield from known  # and the source is at the subtree's end
            return
        self.src.seek(start)
        yield from _rebuild_subtree(
            self.exact(end - start),
            self.scratch_dir,
            self.depth,
            self.deadline,
            remember=not nests,
            place=self.place.inside(start) if self.place is not None else None,
            reference_key=key,
        )

    def segments_in_parallel(self, workers: int) -> Iterator[bytes]:
        """``segments``, with small subtrees rebuilt by ``workers`` threads.

        zlib releases the GIL while compressing, so a zip's members (and the
        gzip files inside them) are re-deflated side by side; output order
        and bytes are unchanged, and at most ``_IN_FLIGHT`` expanded bytes
        wait in memory.
        """
        given = _InOrder()
        with ThreadPoolExecutor(workers, thread_name_prefix="dgfs-deflate") as pool:
            while (tag := self.exact(1)[0]) != TAG_END:
                self.deadline.check()
                if tag not in COMPRESSING:
                    for chunk in self.segment(tag):
                        yield from given.raw(chunk)
                    continue
                start = self.src.tell() - 1
                end = self._subtree_end(tag, PARALLEL_PAYLOAD)
                if end is None:  # too big to hold: stream it, in order
                    self.src.seek(start + 1)
                    yield from given.ready(force=True)
                    yield from self.compressed(tag)
                    continue
                nests = self.nests
                key, known = self._known(start, end)
                if known is not None:
                    yield from given.add(known, sum(map(len, known)))
                    continue
                self.src.seek(start)
                subtree = self.exact(end - start)
                rebuilt = pool.submit(
                    _rebuild_subtree,
                    subtree,
                    self.scratch_dir,
                    0,
                    self.deadline,
                    remember=not nests,
                    place=self.place.inside(start) if self.place is not None else None,
                    reference_key=key,
                )
                yield from given.add(rebuilt, len(subtree) + _ENTRY)
            yield from given.ready(force=True)


class _InOrder:
    """What a parallel rebuild gives, in form order: subtrees being rebuilt
    and the RAW bytes between them, each given once it and all before it
    are ready; a RAW segment queues behind the subtrees before it, it does not
    wait for them (a zip's members each follow a RAW local header: waiting
    there rebuilt them one at a time). At most ``_IN_FLIGHT`` bytes are held:
    past that, ``add`` and ``raw`` wait for the oldest subtree."""

    def __init__(self) -> None:
        self._queue: deque[Future[list[bytes]] | list[bytes] | bytearray] = deque()
        self._sizes: deque[int] = deque()  # what each entry holds
        self._held = 0

    def add(
        self, rebuilt: Future[list[bytes]] | list[bytes] | bytearray, size: int
    ) -> Iterator[bytes]:
        """``rebuilt`` (being rebuilt, or its bytes) queued (``size`` bytes
        held), then what is ready."""
        self._queue.append(rebuilt)
        self._sizes.append(size)
        self._held += size
        yield from self.ready()

    def raw(self, chunk: bytes) -> Iterator[bytes]:
        """A RAW chunk: given at once if nothing waits before it, else joined
        to the RAW bytes queued last (a hostile form's million one-byte RAW
        segments hold no more memory or time than their bytes)."""
        if not self._queue:
            yield chunk
        elif isinstance(self._queue[-1], bytearray):
            self._queue[-1] += chunk
            self._sizes[-1] += len(chunk)
            self._held += len(chunk)
            yield from self.ready()
        else:
            yield from self.add(bytearray(chunk), len(chunk))

    def ready(self, force: bool = False) -> Iterator[bytes]:
        """What is ready, in order (with ``force``, everything, waiting for it)."""
        while self._queue and (force or self._held > _IN_FLIGHT or self._ended()):
            self._held -= self._sizes.popleft()
            entry = self._queue.popleft()
            if isinstance(entry, Future):
                yield from entry.result()
            elif isinstance(entry, list):
                yield from entry
            else:
                yield bytes(entry)

    def _ended(self) -> bool:
        first = self._queue[0]
        return not isinstance(first, Future) or first.done()


#: SHA-256 of a DEFLATE or GNU subtree that holds no other -> the bytes it
#: rebuilds to. A file's zip members (and the gzip files in them) are
#: mostly the same as the previous release's; rebuilding is a pure function
#: of the subtree's bytes, so its result is reused. Subtrees holding others
#: are not kept: their own bytes seldom recur (a wheel's ``.json.gz``
#: members carry build times in their gzip headers), the streams inside
#: them do, and the budget then holds two to three botocore wheels' worth
#: of those instead of one.
REBUILT_SUBTREES = Memo(32 << 20)
#: Where a subtree lies in a reference's form (``InReference.key``: the
#: reference's SHA-256, the offset and length there) -> the bytes it
#: rebuilds to, whether it holds others or not. A later release's form
#: holds most of its reference's subtrees as they are (its spans): found by
#: where they lie, they are not hashed again (a botocore wheel's rebuild
#: hashed 95 MB, 0.12 of its 0.45 CPU s), and a zip member found whole is
#: not even read. The budget holds two botocore wheels' worth.
FROM_REFERENCE = Memo(64 << 20)
#: What an entry of those memos holds besides its bytes (its key, list,
#: tuple and map slot: ~300 bytes measured): a reference of many tiny
#: subtrees fills them by their count, not by their bytes alone.
_MEMO_ENTRY = 320


def _rebuild_subtree(
    subtree: bytes,
    scratch_dir: Path | None,
    depth: int,
    deadline: Deadline,
    *,
    remember: bool = True,
    place: InReference | None = None,
    reference_key: bytes | None = None,
) -> list[bytes]:
    """The original bytes of one DEFLATE or GNU segment given whole (tag
    included), found inside ``depth`` others, by ``deadline``, lying at
    ``place`` (if known); from and into REBUILT_SUBTREES if ``remember``,
    and into FROM_REFERENCE under ``reference_key`` if given."""
    if not remember:
        rebuilt = _rebuild_whole(subtree, scratch_dir, depth, deadline, place)
    else:
        key = hashlib.sha256(subtree).digest()
        with REBUILT_SUBTREES.computing(key) as cached:
            if isinstance(cached, list):
                rebuilt = cached
            else:
                rebuilt = _rebuild_whole(subtree, scratch_dir, depth, deadline, place)
                REBUILT_SUBTREES.put(key, rebuilt, sum(map(len, rebuilt)) + _MEMO_ENTRY)
    if reference_key is not None:
        # Its pieces as they are: a DEFLATE segment of level 0 around it
        # compresses differently if they are joined.
        FROM_REFERENCE.put(reference_key, rebuilt, sum(map(len, rebuilt)) + _MEMO_ENTRY)
    return rebuilt


def _rebuild_whole(
    subtree: bytes,
    scratch_dir: Path | None,
    depth: int,
    deadline: Deadline,
    place: InReference | None = None,
) -> list[bytes]:
    reader = _Rebuilder(io.BytesIO(subtree), scratch_dir, depth, deadline=deadline, place=place)
    rebuilt = list(reader.compressed(reader.exact(1)[0]))
    if reader.src.read(1):
        raise FormatError("expanded form: bytes after a segment's end")
    return rebuilt


def rebuild_chunks(
    src: BinaryIO,
    scratch_dir: Path | None = None,
    workers: int = 1,
    deadline: Deadline = NEVER,
    in_reference: InReference | None = None,
) -> Iterator[bytes]:
    """The original bytes of the expanded stream ``src``, in pieces.

    Raises ``FormatError`` if the stream is not a complete expanded form, and
    ``DecodeLimit`` once ``deadline`` has passed (checked at every segment
    and chunk, output or not). ``scratch_dir`` holds GNU segments' payloads
    while zgz compresses them; ``workers`` > 1 re-deflates small top-level
    streams in that many threads; ``in_reference``: where the form's bytes
    lie in its reference (FROM_REFERENCE).
    """
    if src.read(len(MAGIC)) != MAGIC:
        raise FormatError("not a dgfs expanded form (bad magic)")
    reader = _Rebuilder(src, scratch_dir, workers=workers, deadline=deadline, place=in_reference)
    if workers > 1:
        yield from reader.segments_in_parallel(workers)
    else:
        yield from reader.segments()
    if src.read(1):
        raise FormatError("expanded form: bytes after the end")


def rebuild_file(
    expanded: Path | BinaryIO,
    out: Path,
    scratch_dir: Path | None = None,
    workers: int = 1,
    *,
    max_size: int | None = None,
    seconds: float | Deadline | None = None,
    in_reference: InReference | None = None,
) -> tuple[str, int]:
    """Write the original bytes of ``expanded`` (a file, or one open at its
    start) to ``out``; returns (sha256, size).

    Raises ``DecodeLimit`` once the bytes pass ``max_size`` (the file's
    recorded size; ``out`` then holds no more than that) or the rebuild
    ``seconds`` (None: no limit; a ``Deadline``: one already running, that
    other steps share). ``in_reference``: as for ``rebuild_chunks``.
    """
    digest = hashlib.sha256()
    size = 0
    deadline = seconds if isinstance(seconds, Deadline) else Deadline(seconds)
    with contextlib.ExitStack() as files:
        src = files.enter_context(open(expanded, "rb")) if isinstance(expanded, Path) else expanded
        sink = files.enter_context(open(out, "wb"))
        for chunk in rebuild_chunks(src, scratch_dir, workers, deadline, in_reference):
            size += len(chunk)
            if max_size is not None and size > max_size:
                raise DecodeLimit(
                    f"expanded form rebuilds to more than {max_size} bytes (its dg-file-size)"
                )
            deadline.check()
            digest.update(chunk)
            sink.write(chunk)
    return digest.hexdigest(), size


def rebuild_digest(
    expanded: Path, scratch_dir: Path | None = None, workers: int = 1
) -> tuple[str, int]:
    """SHA-256 and size of what ``expanded`` rebuilds to, without writing it."""
    digest = hashlib.sha256()
    size = 0
    with open(expanded, "rb") as src:
        for chunk in rebuild_chunks(src, scratch_dir, workers):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
