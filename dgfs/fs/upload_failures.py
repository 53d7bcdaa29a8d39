"""What a failed upload means: given up, redone at once, or retried after a pause.

One place for the rules the upload pipeline (dgfs/fs/uploads.py) acts on:

- Only S3 refusing the write itself is final (``refused_for_good``): the
  entry goes to the journal's failed/ and fsync/close report the error.
- A race lost to another writer (``WriteConflict``: it removed our form,
  replaced our reference) is no failure: redone at once, unseen by fsync,
  up to ``RACES_REDONE_AT_ONCE`` times in a row; two mounts that keep
  undoing each other then pause like after any failure, so one gets through.
- Anything else is retried with the data in the journal, after a pause
  doubling from ``retry_delay`` up to ``RETRY_MAX_DELAY``; fsync reports
  the error meanwhile. After ``LOCAL_FAILURES_BEFORE_DIRECT`` failures on
  this machine (disk, cache, xdelta3; not S3's) the file is stored whole.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

from dgfs.errors import (
    CredentialsUnavailable,
    DgfsError,
    FormatError,
    FsError,
    NoSuchBucket,
    NotFound,
    PreconditionFailed,
    StoreError,
    TransientError,
    WriteConflict,
)

#: Local failures (disk, cache, xdelta3; not S3's) of one file's upload after
#: which it is stored whole instead of as a delta.
LOCAL_FAILURES_BEFORE_DIRECT = 2
#: The longest pause between two attempts of one file (seconds).
RETRY_MAX_DELAY = 60.0
#: Races lost to another writer in a row that are redone at once.
RACES_REDONE_AT_ONCE = 3


class Next(enum.Enum):
    """What the pipeline does after a failed attempt."""

    GIVE_UP = "give up"  # the entry goes to failed/
    REDO = "redo"  # queued again at once, fsync waits on
    RETRY = "retry"  # after a pause; fsync reports the error meanwhile


@dataclass(frozen=True)
class Verdict:
    """A failed attempt, judged."""

    next: Next
    error: DgfsError  # as fsync (or close) reports it
    local: bool  # it failed on this machine, not in S3
    unexpected: bool  # not an error dgfs knows: a bug to log with its stack


def store_whole(local_failures: int) -> bool:
    """Whether the next attempt stores the file whole, its delta having
    failed on this machine too often."""
    return local_failures >= LOCAL_FAILURES_BEFORE_DIRECT


def judge(exc: BaseException, *, direct: bool, races_lost: int) -> Verdict:
    """What to do after an attempt (``direct``: it stored the file whole)
    failed with ``exc``, ``races_lost`` races to other writers in a row before it."""
    error = as_dgfs_error(exc)
    unexpected = not isinstance(exc, (DgfsError, OSError))
    local = not isinstance(exc, StoreError)  # S3 answered (or did not): not this machine
    if refused_for_good(exc, direct=direct):
        return Verdict(Next.GIVE_UP, error, local, unexpected)
    if isinstance(exc, WriteConflict) and races_lost < RACES_REDONE_AT_ONCE:
        return Verdict(Next.REDO, error, local, unexpected)
    return Verdict(Next.RETRY, error, local, unexpected)


def retry_delay(base: float, failures: int) -> float:
    """The pause before the next attempt after ``failures`` failures in a row."""
    return min(base * 2 ** (failures - 1), max(base, RETRY_MAX_DELAY))


def refused_for_good(exc: BaseException, *, direct: bool) -> bool:
    """Whether an upload that failed with ``exc`` can never succeed, so its
    entry goes to the journal's failed/ instead of being retried.

    Only S3 refusing the write itself is: access denied (not credentials
    that could not be had: no request reached S3), the bucket gone, or
    a request it rejects whatever the timing (a 4xx other than a missing
    object or a lost condition). Everything else is retried with the data in
    the journal: S3 unreachable or throttling, a full or failing local disk,
    a corrupt or evicted cache entry, xdelta3 failing or killed, a reference
    another writer replaced or removed; once the file is stored whole
    (``direct``), a format error (a name the format reserves) is final too.
    """
    if isinstance(exc, NoSuchBucket):
        return True  # gone: a person must act (the data waits in failed/)
    if isinstance(exc, CredentialsUnavailable):
        return False  # S3 refused nothing: retried until credentials come (or back)
    if isinstance(exc, StoreError):
        return not isinstance(exc, (TransientError, NotFound, PreconditionFailed))
    return direct and isinstance(exc, FormatError)


def as_dgfs_error(exc: BaseException) -> DgfsError:
    """``exc`` as fsync() reports it (its errno; EIO when it has none)."""
    if isinstance(exc, DgfsError):
        return exc
    err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    return FsError(err, str(exc) or type(exc).__name__)
