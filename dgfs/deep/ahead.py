"""A zip's members searched ahead of the walk, last first, on a spare core.

The expansion walks a zip's members in order, on one thread, and writes
the form as it goes. Finding which settings reproduce a member's deflate
stream (and the streams nested in it) compresses the member again, while
a member whose verdict ``VERIFIED_SPANS`` already holds is only inflated:
a botocore wheel expanded first in its directory takes ~3.7 s, ~1.4 s once
every verdict is known. The first file of a directory is what the files
stored beside it wait for (it makes the reference), and its expansion is
the one with nothing known.

``SearchAhead`` runs those searches from the last member backwards in a
thread of its own, on a core the caller lends it (``spare_core``), into a
scratch file it throws away. Each verdict lands in ``VERIFIED_SPANS``,
where the walk finds it, or waits for it while the thread is on that very
member. The two meet in the middle; the thread stops there, once the walk
leaves the zip, or at any limit, and gives its core back.

It changes what is searched when, never what is written or how it is
proven: the walk writes every segment itself, from verdicts that a search
compared byte for byte with the original stream, as it does with the
verdicts of the releases stored before (``dgfs.deep.search``).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from dgfs.deep.archives import ZIP_FLAG_PRIOR, after_descriptor, read_local_header
from dgfs.deep.limits import Budget, ExpansionLimits
from dgfs.deep.search import (
    MAX_MISSES,
    MEMO_MIN_SPAN,
    ExpandStats,
    StreamExpander,
    Writer,
)
from dgfs.errors import ExpansionLimit, FormatError

log = logging.getLogger(__name__)

#: A core lent to a search ahead, if one is free now: the function that
#: gives it back (callable from any thread), or None.
SpareCore = Callable[[], Callable[[], None] | None]

#: A zip smaller than this is expanded in milliseconds: no search ahead.
MIN_SIZE = 1 << 20
#: Fewer deflated members than this: not worth a thread.
MIN_MEMBERS = 4


@dataclass(frozen=True)
class Member:
    """A deflated zip member: its local header's place in the walk (0 for
    the first), where its data starts, its compressed size, its flags."""

    index: int
    start: int
    size: int
    flags: int


def deflated_members(src: BinaryIO, start: int, end: int) -> list[Member]:
    """The deflated members of the zip at ``src[start:end]`` long enough for
    ``VERIFIED_SPANS``, in the walk's order, up to the first entry whose
    size its local header does not give."""
    members = []
    pos = start
    index = 0
    while pos + 30 <= end:
        entry = read_local_header(src, pos, end)
        if entry is None:
            break
        data_start, method, flags, size = entry
        if size is None:
            break
        if method == 8 and size >= MEMO_MIN_SPAN and data_start + size <= end:
            members.append(Member(index, data_start, size, flags))
        after = after_descriptor(src, data_start + size, end, flags)
        if after is None:
            break
        pos = after
        index += 1
    return members


class _Expander(Protocol):
    """What the search ahead needs of the walk's expander class."""

    def __call__(
        self, writer: Writer, scratch_dir: Path, stats: ExpandStats, budget: Budget
    ) -> StreamExpander: ...


class _StoppableBudget(Budget):
    """A budget that also runs out once ``stopped`` is set."""

    def __init__(self, limits: ExpansionLimits, original_size: int, stopped: threading.Event):
        super().__init__(limits, original_size)
        self.stopped = stopped

    def check_time(self) -> None:
        if self.stopped.is_set():
            raise ExpansionLimit("the walk left the zip")
        super().check_time()


class SearchAhead:
    """The members of the zip at ``span`` (start, end) of ``path`` searched
    last first, in a thread started at once on the core ``give_back`` returns
    (the thread calls it once, when it ends; so does the constructor, if it
    cannot start the thread)."""

    def __init__(
        self,
        path: Path,
        span: tuple[int, int],
        expander: _Expander,
        scratch_dir: Path,
        budget: tuple[ExpansionLimits, int],
        give_back: Callable[[], None],
    ) -> None:
        self._span = span
        self.walked = -1
        """The index of the member the walk is at (set by the walk only)."""
        self._stopped = threading.Event()
        self.finished = threading.Event()
        """Set once the thread ended (met the walk, searched every member, or stopped)."""
        self._thread = threading.Thread(
            target=self._run,
            args=(path, expander, scratch_dir, budget, give_back),
            name="dgfs-search-ahead",
            daemon=True,
        )
        try:
            self._thread.start()
        except BaseException:
            give_back()
            self.finished.set()
            raise

    def _run(
        self,
        path: Path,
        expander: _Expander,
        scratch_dir: Path,
        budget: tuple[ExpansionLimits, int],
        give_back: Callable[[], None],
    ) -> None:
        limits, size = budget
        spending = _StoppableBudget(limits, size, self._stopped)
        misses = 0
        try:
            with open(path, "rb") as src, tempfile.TemporaryFile(dir=scratch_dir) as sink:
                members = deflated_members(src, *self._span)
                if len(members) < MIN_MEMBERS:
                    return
                writer = Writer(sink, spending)
                search = expander(writer, scratch_dir, ExpandStats(), spending)
                search.verdicts_only = True
                for member in reversed(members):
                    if member.index <= self.walked or misses >= MAX_MISSES:
                        return  # met the walk; or not zlib's zip
                    spending.member()
                    prior = ZIP_FLAG_PRIOR[(member.flags >> 1) & 3]
                    end = member.start + member.size
                    found, expanded = search.deflate(
                        src, member.start, end, 0, "zip", prior, member.size
                    )
                    if expanded:
                        misses = 0
                    elif found.compressed_length:
                        misses += 1  # as the walk counts them
                    writer.rewind(0)
        except (ExpansionLimit, FormatError, OSError) as exc:
            log.debug("%s: search ahead stopped: %s", path, exc)
        except Exception:  # a bug here must not end the store: the walk searches alone
            log.warning("%s: search ahead failed", path, exc_info=True)
        finally:
            give_back()
            self.finished.set()

    def stop(self) -> None:
        """Stop the thread (at its next check) and wait for it."""
        self._stopped.set()
        self._thread.join()
