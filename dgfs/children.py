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
  (:func:`file_size_cap`: ``RLIMIT_FSIZE``; a write past it fails with
  ``EFBIG`` at once, :func:`wrote_past_cap` tells);
- a time limit proportional to its work (:func:`timeout_for`): far beyond
  what a real run needs, it only ends a child that hangs or crawls on
  hostile input.
"""

from __future__ import annotations

import errno
import os
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


def file_size_cap(max_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` that caps every file the child (and its children) write
    at ``max_bytes``: a write past it fails with ``EFBIG`` (``SIGXFSZ`` is
    ignored, so no core dump); nothing beyond the cap reaches the disk.

    It runs between fork and exec, so it does no more than two system calls
    (no locks, no allocation a thread of the parent could hold).
    """
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY:
        max_bytes = min(max_bytes, hard)
    limit = (max_bytes, max_bytes)

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)

    return cap


def wrote_past_cap(returncode: int, stderr: bytes) -> bool:
    """Whether a child run under :func:`file_size_cap` ended because it hit the cap."""
    return returncode == -signal.SIGXFSZ or os.strerror(errno.EFBIG).encode() in stderr
