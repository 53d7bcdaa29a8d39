"""Domain errors, and the one table that maps them to errno.

Every layer raises these; nothing outside ``dgfs.store.s3`` parses botocore
exceptions, and nothing outside ``dgfs.fs`` builds a ``FUSEError``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator

import trio

log = logging.getLogger(__name__)


class DgfsError(Exception):
    """Base of every error dgfs raises on purpose."""

    errno: int = errno.EIO


class UserError(DgfsError):
    """A mistake the user can fix (bad option, missing bucket, ...).

    The CLI prints these as one line, without a traceback.
    """

    errno = errno.EINVAL


class ConfigError(UserError):
    """Invalid configuration or command-line option."""


# --- storage -----------------------------------------------------------------


class StoreError(DgfsError):
    """An S3 request failed in a way not covered by a subclass."""


class NotFound(StoreError):
    """The object (or bucket) does not exist."""

    errno = errno.ENOENT


class NoSuchBucket(NotFound, UserError):
    """The bucket does not exist."""

    errno = errno.ENOENT


class AccessDenied(StoreError, UserError):
    """Credentials are missing or refused."""

    errno = errno.EACCES


class CredentialsUnavailable(AccessDenied):
    """No credentials could be had (none configured, or their provider did not
    answer, e.g. the instance metadata service timed out): no request reached
    S3, so nothing was refused. An upload waits in the journal for them."""


class PreconditionFailed(StoreError):
    """A conditional request (If-None-Match / If-Match) did not hold."""

    errno = errno.EEXIST


class TransientError(StoreError):
    """The store kept failing after retries (throttling, 5xx, network)."""

    errno = errno.EIO


class WriteConflict(TransientError):
    """Another writer changed what a write depended on while it was stored
    (removed its object, replaced its reference): nothing failed, the write
    is redone at once."""


class EndpointUnreachable(TransientError, UserError):
    """The endpoint could not be reached at all."""

    errno = errno.EHOSTUNREACH


# --- content -----------------------------------------------------------------


class KeyTooLong(UserError):
    """A name would make a key longer than S3 holds (1,024 bytes)."""

    errno = errno.ENAMETOOLONG


class IntegrityError(DgfsError):
    """Reconstructed or downloaded bytes do not match their recorded SHA-256.

    Raised instead of ever handing back wrong bytes.
    """

    errno = errno.EIO


class FormatError(DgfsError):
    """An object's DeltaGlider metadata is missing or malformed."""

    errno = errno.EIO


class MissingReference(IntegrityError):
    """A delta's reference object is gone, or holds other bytes than the
    SHA-256 it was recorded with (replaced)."""


class DeltaEngineError(DgfsError):
    """xdelta3 failed to encode or decode."""

    errno = errno.EIO


class XdeltaFailedHere(DeltaEngineError):
    """xdelta3 failed on this machine, whatever its input: the disk full or
    failing, or the process killed (the OOM killer). Nothing says the
    object is broken; ``errno`` tells the reader which."""

    def __init__(self, message: str, errno_: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno_


class XdeltaMissing(DeltaEngineError, UserError):
    """The xdelta3 binary is not installed or not runnable."""


class LimitExceeded(DgfsError):
    """Untrusted bytes would cost more than a configured limit allows (bytes
    written, members, nesting or time). The message names the limit and the
    option that raises it; the work stopped before the limit was passed."""

    errno = errno.EIO


class ExpansionLimit(LimitExceeded):
    """Expanding a file for a deep delta passed a limit (``dgfs.deep``).

    Never an error for the writer: the file is stored without expansion."""


class DecodeLimit(LimitExceeded, IntegrityError):
    """Rebuilding an object from the bucket passed a limit: more bytes than
    its metadata allows, nesting deeper than any writer makes, or a child
    process that runs too long. The object is refused (EIO), like any other
    that cannot be rebuilt exactly."""


class CacheCorrupt(DgfsError):
    """A cache entry failed authentication or is truncated (it is dropped)."""

    errno = errno.EIO


# --- filesystem ----------------------------------------------------------------


class FsError(DgfsError):
    """A filesystem-level refusal with an explicit errno."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


def errno_of(exc: BaseException) -> int:
    """The errno a FUSE reply should carry for ``exc``."""
    if isinstance(exc, DgfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


@contextlib.contextmanager
def first_failure() -> Iterator[None]:
    """Around a nursery whose tasks work for one result: its first failure
    raised as itself, not inside an exception group, so that callers and
    their handlers (retries, errnos, the journal's failed/) see the error
    they know. Further failures are logged at debug level; a group of
    nothing but cancellations stays a group (trio's cancel scopes take it)."""
    try:
        yield
    except BaseExceptionGroup as group:
        errors = [exc for exc in exception_leaves(group) if not isinstance(exc, trio.Cancelled)]
        if not errors:
            raise
        for other in errors[1:]:
            log.debug("further failure beside %r: %r", errors[0], other)
        raise errors[0] from None


def exception_leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in ``group`` and in the groups nested in it, flattened."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(exception_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves
