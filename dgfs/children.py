"""How dgfs starts child processes (xdelta3, zgz, and the gzip xdelta3 may start).

One place for what every child gets, whoever starts it:

- an absolute path, resolved once (:func:`resolve`), not a ``PATH`` lookup
  on every run;
- a minimal environment (:func:`child_env`): ``PATH`` (xdelta3 finds gzip
  through it when it decodes a stock delta of gzip input) and the C locale
  (its messages are parsed), and glibc's malloc asked for transparent
  huge pages (:data:`MALLOC_TUNABLES`), nothing else: no AWS credentials,
  no ``DG_CACHE_ENCRYPTION_KEY``, no ``XDELTA`` or ``GZIP`` variable that
  would change what the tool does;
- when it writes a file whose size is known beforehand, a cap on that size
  (:func:`size_capped`: ``RLIMIT_FSIZE``; a write past it fails, or ends
  the child, at once, :func:`wrote_past_cap` tells);
- a time limit proportional to its work (:func:`timeout_for`): far beyond
  what a real run needs, it only ends a child that hangs or crawls on
  hostile input.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import resource
import shutil
import signal
from collections.abc import Callable

from dgfs import environment

#: A child's time limit: this much, plus one second per ``MIN_RATE`` bytes of work.
BASE_SECONDS = 120.0
#: Bytes per second below which a child counts as hung. Measured here on a
#: 64 MiB text file (Debian's xdelta3 3.0.11 and zgz): xdelta3 -9 encodes
#: ~110 MB/s (a 2 GiB series: ~45 MB/s, docs/benchmarks-large.md) and decodes
#: ~750 MB/s; zgz -9 compresses ~12 MB/s. This is 12-750 times slower.
MIN_RATE = 1 << 20

_FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin"

#: xdelta3 mallocs its source window and hash table whole (tens to hundreds
#: of MiB) and touches every page of them: with 4 KiB pages, the faults and
#: TLB misses are a third of an encode and most of a decode. This tunable
#: (glibc 2.35+; older ones ignore it) makes malloc madvise its large
#: mappings for huge pages, which the kernel grants where its
#: transparent_hugepage setting is ``madvise`` (Debian's default) or
#: ``always``. Measured (benchmarks/children_env.py, 2026-12-06): encode
#: -9 of a 12 MB wheel or a 60 MB tar takes ~20% less CPU (of a .tar.gz,
#: where matching dominates, 9%), decode 20-28% less; maximum RSS 1-5% more.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"


def resolve(name: str) -> str | None:
    """The absolute path of the program ``name`` (a path, or looked up on ``PATH``), or None."""
    found = shutil.which(name)
    return os.path.abspath(found) if found else None


def child_env() -> dict[str, str]:
    """The whole environment a child process gets."""
    return {
        "PATH": environment.search_path() or _FALLBACK_PATH,
        "LC_ALL": "C",
        "GLIBC_TUNABLES": MALLOC_TUNABLES,
    }


def timeout_for(work_bytes: int) -> float:
    """Seconds a child may take for ``work_bytes`` bytes read and written."""
    return BASE_SECONDS + max(0, work_bytes) / MIN_RATE


@functools.cache
def _prlimit() -> str | None:
    """util-linux's ``prlimit``, resolved once (None: not installed)."""
    return resolve("prlimit")


def size_capped(command: list[str], max_bytes: int) -> tuple[list[str], Callable[[], None] | None]:
    """``command`` and the ``preexec_fn`` to start it with, so that no file it
    (or a child of it) writes passes ``max_bytes``: nothing beyond the cap
    reaches the disk (:func:`wrote_past_cap` tells that it was reached).

    Through util-linux's ``prlimit`` where it is installed: the child then
    dies of ``SIGXFSZ`` at the cap (``--core=0``: a hostile input leaves no
    core dump), and Python starts it with vfork. A ``preexec_fn`` makes
    Python fork the whole daemon, threads and page tables, for every run:
    2.5 ms more per run from a process of 80 MiB (benchmarks/children_env.py).
    Without ``prlimit``, a ``preexec_fn`` sets the limit (core dumps off
    too) and ignores ``SIGXFSZ``, so a write past it fails with ``EFBIG``.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY:
        max_bytes = min(max_bytes, hard)
    prlimit = _prlimit()
    if prlimit is not None:
        return [prlimit, f"--fsize={max_bytes}", "--core=0", "--", *command], None
    limit = (max_bytes, max_bytes)

    def cap() -> None:
        # Between fork and exec: a few system calls, no locks, no allocation
        # a thread of the parent could hold.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return command, cap


def prlimit_failed(returncode: int, stderr: bytes) -> bool:
    """Whether a child run through :func:`size_capped`'s ``prlimit`` never
    started: its program is gone or cannot be run, or the limit could not be
    set (a seccomp filter such as systemd's ``SystemCallFilter=~@resources``)."""
    return returncode > 0 and stderr.startswith(b"prlimit: ")


def wrote_past_cap(returncode: int, stderr: bytes) -> bool:
    """Whether a child run under :func:`size_capped` ended because it hit the
    cap: killed by ``SIGXFSZ``, a write that failed with ``EFBIG``, or (a
    stock decode) the gzip it pipes its output through killed by it, which
    xdelta3 reports as ``signal 25``."""
    return (
        returncode == -signal.SIGXFSZ
        or os.strerror(errno.EFBIG).encode() in stderr
        or re.search(rb"\bsignal %d\b" % signal.SIGXFSZ, stderr) is not None
    )
