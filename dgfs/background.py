"""Background jobs contain their failures: one job fails, the mount stays up.

A background job runs in the mount's nursery (a prefetch, the rebuild a
streamed read waits for, the periodic write of the attribute cache and
directory indexes, one metrics scrape or status request): an exception
escaping it would cancel that nursery and end the mount for everyone. A
full disk (ENOSPC), no descriptors left (EMFILE), a ``RecursionError``
from hostile input or a ``MemoryError`` are failures of that one job.

``contained`` is the one place that says so: it turns any ``Exception``
raised in its block into one log line naming the job, and lets
cancellation and ``KeyboardInterrupt`` (``BaseException``) through.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from dgfs.errors import exception_leaves

log = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """One line for ``exc`` (the leaves of a group, joined)."""
    leaves = exception_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return "; ".join(
        f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__ for leaf in leaves
    )


@contextlib.contextmanager
def contained(
    job: str, *, quiet: tuple[type[Exception], ...] = (), logger: logging.Logger = log
) -> Iterator[None]:
    """Run the block as the background job ``job``: what it raises is logged, not raised.

    An exception of a ``quiet`` type (an error the job's user reports
    anyway, such as a reader's own open of a file a prefetch failed on) is
    logged at DEBUG; any other ``Exception`` as one ERROR line
    ``JOB failed (the mount goes on): TYPE: MESSAGE``, its traceback at
    DEBUG. ``BaseException`` (``trio.Cancelled``, ``KeyboardInterrupt``)
    passes, also from inside an exception group.
    """
    try:
        yield
    except* Exception as group:
        leaves = exception_leaves(group)
        if quiet and all(isinstance(leaf, quiet) for leaf in leaves):
            logger.debug("%s failed: %s", job, describe(group))
        else:
            logger.error("%s failed (the mount goes on): %s", job, describe(group))
            logger.debug("%s: the failure's traceback", job, exc_info=group)
