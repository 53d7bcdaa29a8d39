"""Running a sub-command's async body under trio, with errors fit for the user.

trio wraps exceptions raised inside nurseries in exception groups; the
dispatcher in ``dgfs.cli.main`` expects plain ``DgfsError``s (one-line
messages, exit codes). ``run_trio`` unwraps a group to the error that explains it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from dgfs.errors import DgfsError, UserError, exception_leaves

T = TypeVar("T")


def run_trio(fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """``trio.run(fn, *args)``; a group is replaced by its Ctrl-C, user error or dgfs error."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        leaves = exception_leaves(group)
        for wanted in (KeyboardInterrupt, UserError, DgfsError):
            for leaf in leaves:
                if isinstance(leaf, wanted):
                    raise leaf from group
        raise
