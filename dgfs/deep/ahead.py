"""A zip's members searched ahead of the walk, last first, on a spare core.

The expansion walks a zip's members in order, on one thread, and writes
the form as it goes. Finding which settings reproduce a member's deflate
stream (and the streams nested in it) compresses the member again, while
a member whose verdict ``VERIFIED_SPANS`` already holds is only inflated:
a botocore wheel expanded first in its directory takes ~3.7 s, ~1.4 s once
every verdict is known. The first file of a directory is what the files
stored beside it wait for (it makes the reference), and its expansion is
the one with nothing known.

A ``BackSearch`` expands the members from the last one backwards, each
into a segment of a scratch file of its own: in a thread (``SearchAhead``)
on a core the caller lends for a directory's first file (``spare_core``),
or, with no core to lend, in the walk's own thread while the walk waits
for a verdict another expansion is finding (the next release, stored
beside: ``Memo.computing``'s ``meanwhile``). The walk, reaching a member
expanded ahead, copies its segment into the form (``splice``) and counts
what it cost in its own budget, as if it had expanded it; it waits for
a member the search is on (its verdict's memo entry). The two meet in
the middle; the search stops there, once the walk leaves the zip, or at
any limit (its own budget; on the walk's thread, half the walk's time),
and gives its core back. Python threads share one interpreter lock, and
about half of an expansion is Python: a botocore wheel expanded first
takes 3.1 s this way instead of 3.5.

Every segment comes from settings a search compared byte for byte with
the original stream, and ``prove_form`` checks the whole form as before.
The search tells ``VERIFIED_SPANS`` only zlib settings it proved, and
offers only segments without a stream kept or given to GNU gzip: its
hints (the settings that worked last) fill from the other end, so such a
miss may be its hint's doing, and the walk, with its own, searches that
member itself. The walk never expands less for it; where several
settings reproduce one stream, the form may name the ones the search
ahead tried first. Together the two may hold up to twice one
expansion's scratch allowance.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from dgfs.deep.archives import after_descriptor, read_local_header, zip_prior
from dgfs.deep.deflate import DeflateParams
from dgfs.deep.limits import Budget, ExpansionLimits
from dgfs.deep.search import (
    MAX_MISSES,
    MEMO_MIN_SPAN,
    ExpandStats,
    StreamExpander,
    Writer,
)
from dgfs.deep.segments import RAW_CHUNK, TAG_DEFLATE
from dgfs.errors import ExpansionLimit, FormatError

log = logging.getLogger(__name__)


class Loan(Protocol):
    """A core lent to a search ahead (``SpareCore``)."""

    def wanted(self) -> bool:
        """Whether other work waits for a core now (callable from any thread)."""
        ...

    def give_back(self) -> None:
        """Return the core (callable from any thread, once)."""
        ...


#: A core lent to a search ahead, if one is free now; None if none is.
SpareCore = Callable[[], Loan | None]

#: A zip smaller than this is expanded in milliseconds: no search ahead.
MIN_SIZE = 1 << 20
#: Fewer deflated members than this: not worth a thread.
MIN_MEMBERS = 4


@dataclass(frozen=True, slots=True)
class Member:
    """A deflated zip member: its local header's place in the walk (0 for
    the first), where its data starts, its compressed size, the settings
    its flags suggest."""

    index: int
    start: int
    size: int
    prior: DeflateParams


def deflated_members(src: BinaryIO, start: int, end: int, budget: Budget) -> list[Member]:
    """The deflated members of the zip at ``src[start:end]`` long enough for
    ``VERIFIED_SPANS``, in the walk's order, up to the first entry whose
    size its local header does not give; every entry counted in ``budget``
    (``ExpansionLimit`` past its members or its time)."""
    members = []
    pos = start
    index = 0
    while pos + 30 <= end:
        budget.member()
        entry = read_local_header(src, pos, end)
        if entry is None:
            break
        data_start, method, flags, size = entry
        if size is None:
            break
        if method == 8 and size >= MEMO_MIN_SPAN and data_start + size <= end:
            members.append(Member(index, data_start, size, zip_prior(flags)))
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


@dataclass(frozen=True, slots=True)
class _Ready:
    """A member's segment, written ahead: where in the search's scratch file,
    the settings of its stream, and what its expansion spent and counted
    (for the walk's budget and stats)."""

    member: Member
    offset: int
    length: int
    params: DeflateParams
    entries: int  # zip entries and gzip members inside it
    inflated: int  # bytes inflated, every stream in it
    streams: int  # streams expanded, its own and those nested in it


class BackSearch:
    """The members of the zip at ``span`` (start, end) of ``path`` expanded
    last first, one per ``step``, until the walk is at the next one (its
    index in ``walked``), each into a segment the walk splices into the form
    when it gets there (``splice``). Used by one thread at a time: a
    ``SearchAhead``'s, or the walk's own while it waits for a verdict another
    expansion is finding (``meanwhile``). Opens its files at its first step;
    ``close`` (by the walk, once it has left the zip) ends it."""

    def __init__(
        self,
        path: Path,
        span: tuple[int, int],
        expander: _Expander,
        scratch_dir: Path,
        budget: Budget,
    ) -> None:
        self._path = path
        self._span = span
        self._expander = expander
        self._scratch_dir = scratch_dir
        self._budget = budget
        self.walked = -1
        """The index of the member the walk is at (set by the walk only)."""
        self._members: list[Member] | None = None  # still to search, first first
        self._files: list[BinaryIO] = []
        self._search: StreamExpander | None = None
        self._writer: Writer | None = None
        self._ready: dict[int, _Ready] = {}  # by member index; filled, then read
        self.stats = ExpandStats()
        """What the search proved and counted (every member it expanded, offered or not)."""
        self._misses = 0
        self._done = False

    def step(self) -> bool:
        """Expand the last member not expanded yet, if the walk is not at it
        yet; False when nothing is left to do (nor ever will be)."""
        if self._done:
            return False
        try:
            if self._members is None:
                self._start()
            assert self._members is not None
            if not self._members or self._members[-1].index <= self.walked:
                self._done = True  # met the walk
            elif self._misses >= MAX_MISSES:
                self._done = True  # not zlib's zip: the walk keeps the rest too
            else:
                self._one(self._members.pop())
        except (ExpansionLimit, FormatError, OSError) as exc:
            log.debug("%s: search ahead stopped: %s", self._path, exc)
            self._done = True
        except Exception:  # a bug here must not end the store: the walk searches alone
            log.warning("%s: search ahead failed", self._path, exc_info=True)
            self._done = True
        return not self._done

    def _start(self) -> None:
        self._members = []
        src = open(self._path, "rb")  # noqa: SIM115 (closed in close)
        self._files.append(src)
        members = deflated_members(src, *self._span, self._budget)
        if len(members) < MIN_MEMBERS:
            return  # not worth it: step() finds nothing to do
        sink = tempfile.TemporaryFile(dir=self._scratch_dir)  # noqa: SIM115 (closed in close)
        self._files.append(sink)
        self._writer = Writer(sink, self._budget)
        self._search = self._expander(self._writer, self._scratch_dir, self.stats, self._budget)
        self._search.ahead = True
        self._members = members

    def _one(self, member: Member) -> None:
        assert self._search is not None and self._writer is not None
        self._budget.member()
        end = member.start + member.size
        src, sink = self._files
        at = self._writer.tell()
        counts = (self.stats.streams_kept, self.stats.streams_gnu)
        spent = (self._budget.members, self._budget.inflated, self.stats.streams_inflated)
        self._search.unfinished = False
        found, expanded = self._search.deflate(
            src, member.start, end, 0, "zip", member.prior, member.size
        )
        if expanded:
            self._misses = 0
        elif found.compressed_length:
            self._misses += 1  # as the walk counts them
        # Only a segment the walk could have written: the whole member, in
        # zlib's settings, no stream in it kept or given to GNU gzip on this
        # search's hints (the walk's may know better), none left to the walk.
        whole = expanded and found.compressed_length == member.size
        whole = whole and counts == (self.stats.streams_kept, self.stats.streams_gnu)
        head = os.pread(sink.fileno(), 5, at) if whole else b""
        if not whole or self._search.unfinished or head[:1] != bytes((TAG_DEFLATE,)):
            self._writer.rewind(at)
            return
        length = self._writer.tell() - at
        sink.flush()  # readable by the walk's thread before it is offered
        self._ready[member.index] = _Ready(
            member,
            at,
            length,
            DeflateParams.unpack(head[1:]),
            self._budget.members - spent[0],
            self._budget.inflated - spent[1],
            self.stats.streams_inflated - spent[2],
        )

    def splice(self, index: int, start: int, size: int, walk: StreamExpander) -> bool:
        """Write the segment made ahead for member ``index`` (its data at
        ``start``, ``size`` bytes) into ``walk``'s form; False if there is none."""
        ready = self._ready.pop(index, None)
        if ready is None or (ready.member.start, ready.member.size) != (start, size):
            return False
        fd = self._files[1].fileno()
        offset, left = ready.offset, ready.length
        while left:
            chunk = os.pread(fd, min(left, RAW_CHUNK), offset)
            if not chunk:
                raise FormatError("a segment made ahead ends early")
            walk.w.tag(chunk)
            offset += len(chunk)
            left -= len(chunk)
        walk.budget.charge(ready.entries, ready.inflated)
        walk.learned("zip", 0, ready.params, size)
        walk.stats.streams_inflated += ready.streams
        walk.stats.inflated_bytes += ready.inflated
        return True

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
        self._done = True


class SearchAhead:
    """A ``BackSearch`` of the zip at ``span`` of ``path`` run in a thread,
    started at once on the core ``loan`` lends, until it is done or other
    work wants the core (then the walk goes on alone, and takes up the
    search while it waits, as without a core). The thread gives the core
    back when it ends; so does the constructor, if it cannot start the
    thread (``started`` is False then)."""

    def __init__(
        self,
        path: Path,
        span: tuple[int, int],
        expander: _Expander,
        scratch_dir: Path,
        budget: tuple[ExpansionLimits, int],
        loan: Loan,
    ) -> None:
        self._stopped = threading.Event()
        limits, size = budget
        spending = _StoppableBudget(limits, size, self._stopped)
        self.search = BackSearch(path, span, expander, scratch_dir, spending)
        self.finished = threading.Event()
        """Set once the thread ended (met the walk, searched every member,
        yielded its core, or stopped)."""
        self._thread = threading.Thread(
            target=self._run, args=(loan,), name="dgfs-search-ahead", daemon=True
        )
        self.started = False
        try:
            self._thread.start()
            self.started = True
        except RuntimeError as exc:  # "can't start new thread": no search ahead
            log.debug("%s: no search ahead: %s", path, exc)
            self._end(loan)

    def _run(self, loan: Loan) -> None:
        try:
            while not loan.wanted() and self.search.step():
                pass
        finally:
            self._end(loan)

    def _end(self, loan: Loan) -> None:
        loan.give_back()
        self.finished.set()

    def step(self) -> bool:
        """What the walk does while it waits for a verdict: the search's next
        step, once the thread has ended (the search has one user at a time)."""
        return self.finished.is_set() and self.search.step()

    def stop(self) -> None:
        """Stop the thread (at its next check), wait for it, and close the
        search (the walk has spliced what it takes)."""
        self._stopped.set()
        if self.started:
            self._thread.join()
        self.search.close()
