"""A randomized model test of ``FileSystem`` in-process: no kernel, a mock clock, by the thousand.

Hypothesis's ``RuleBasedStateMachine`` drives ``dgfs.fs.filesystem.FileSystem``
(wired as ``tests/fsharness.py``'s ``mounted()`` wires it, over a
``FaultyStore`` around a ``MemoryStore``) and a directory of the local disk
in lockstep, and fails on the first difference in results or errno. The
local directory is the model: it is what POSIX says (errnos, renames over
existing targets, handles that outlive their name). Calls reach the
filesystem as the kernel would send them: a path is walked with ``lookup``
one name at a time, ``close`` is ``flush`` then ``release``, ``truncate``
is ``setattr(size)``, O_APPEND writes at the size the file shows, a write of
nothing is not sent, and rename's own checks (a directory into itself:
EINVAL, over one of its ancestors: ENOTEMPTY) come before RENAME.

The rules: create (exclusive or not, kept open or closed; sometimes as a
create that raced a lookup), open with O_TRUNC or not, write at offsets,
append, ftruncate and truncate by path, read, close, fsync, several
handles kept open across steps (and their files unlinked or renamed
over), rename of files and directories over existing targets, unlink,
mkdir, rmdir, chmod, utime, listings and stats, and FORGET of every inode
no open file holds (the lookups the kernel holds are counted);
and what only an in-process run can do: ``let_time_pass`` (the mock clock
jumps: queued uploads, retries and listing TTLs come due, and the store,
whose Last-Modified and Date follow the same clock, answers later: rows
settle and directory indexes are written and read across remounts),
``hold_next_upload`` / ``release_held`` / ``land_uploads`` (an upload kept
in flight, before or after its PUT reached the store, across any number of
steps), ``fail_next_uploads`` (transient failures, retried by the mount),
``arm_concurrent`` (the next operation runs while a held upload lands or
queued uploads come due, the event placed at a chosen scheduling point of
the operation), ``remount`` (clean unmount: drain, a new ``FileSystem`` on
the same store and journal) and ``crash_and_recover`` (every task
cancelled, nothing drained or closed, descriptors closed as the kernel
closes a dead process's; a new ``FileSystem`` recovers the journal).
Contents are small; ``*.zip`` names get near-identical zip-like bytes, and
the policy's minimum delta size is lowered to 1 KiB, so a directory holding
several of them stores references and xdelta3 deltas.

What is compared, and when:

- Every operation: the result (bytes read, counts written, listings,
  kinds, sizes, modes) or the errno. An mtime set by utime is compared
  exactly until the next write (the model's mtime is then "now"); atime,
  ctime, nlink and directory sizes are not (docs/SEMANTICS.md).
- After a clean remount, and at the end of every example (which ends with
  one): the whole tree, every file's bytes, kinds and modes exactly, and
  the journal empty. Directory mtimes are compared only where utime set
  them and no entry changed since (a remount shows the stored one,
  docs/SEMANTICS.md).
- After a crash, precisely: directories are exactly the model's (mkdir,
  rmdir and renames are in S3 when they return); no name the model does
  not have appears (nothing unlinked or renamed away comes back). A file
  *acknowledged* at least once — a ``flush`` (close) or ``fsync`` of one
  of its handles returned 0 while it had its name — is present, and its
  content is its content at some moment since its last acknowledgement:
  the acknowledged version, or that version with some prefix of the later
  writes and truncations applied (each whole). A file never acknowledged
  may be absent, or hold such a version of itself. Renaming a file over
  another acknowledges it (dgfs commits it first, as ext4's auto_da_alloc
  flushes it: the name shows one of the two, never neither). A file's mode is the
  last one chmod gave it, or, while it has writes not acknowledged, any it
  had since its last acknowledgement (the mode then travels with those
  writes; an O_TRUNC open is one, whatever it changed: it sets the mtime,
  of an empty file too, as Linux does). The model then takes what the
  mount shows, and the run goes on.
- An fsync may fail with EIO only while injected upload failures are
  pending or waiting for their retry on this mount (docs/SEMANTICS.md:
  "while a retry waits, fsync reports the last error").
- Any dgfs WARNING or ERROR other than a transient upload failure's
  "retrying in" fails the step.

Each divergence found is shrunk to a plain test in
tests/test_fs_model_regressions.py. One whose fix is still to come is
marked ``xfail(strict=True)`` there and named in ``KNOWN_BUGS`` here: the
model steers clear of it (each check says how) until the fix removes both.

Determinism. One ``trio.run`` per example runs in a thread of its own on a
``MockClock`` that stands still; each rule hands it one step and waits
until every task is blocked again. Worker-thread calls
(``trio.to_thread.run_sync``, ``trio.Path``) and ``trio.run_process``
(xdelta3) are run inline on the trio thread, with a scheduling point
before and after each, so a step ends exactly when nothing can run without
the test (a held upload, a timer), and trio's scheduler is seeded by
Hypothesis, reseeded at every step (from a drawn value in a concurrent
one): every run of an example schedules identically, and a failure keeps
its interleavings as it shrinks. (What that gives up is only true
parallelism of a disk call with the trio thread; every await is still a
point where other tasks run.)

CI runs a fixed, derandomized set of examples (about 20,000 steps, half a
minute). ``DGFS_FS_MODEL_STEPS=N`` runs at least N steps by hand, over
``DGFS_FS_MODEL_SEEDS`` seeds (default 20, from ``DGFS_FS_MODEL_SEED``),
each a randomized run that goes on to the next seed after a divergence
(``DGFS_FS_MODEL_SHRINK=0`` skips shrinking it; ``DGFS_FS_MODEL_REPRODUCE``
replays a printed failure); ``DGFS_FS_MODEL_EXAMPLE_STEPS`` sets the rules
one example runs (100).

Deep mode. ``FsDeepModel`` runs the same rules over ``Core(deltas=DEEP)``
(docs/FORMAT.md, "deep"): its names are of each kind deep mode expands
(``x.zip``, ``y.whl``, ``p.tar.gz``, ``q.gz``), and what is written to them
is mostly a real archive of a small family (``Release``: zip members of
text deflated at zlib's default with a stored ``.gz`` member, a tar.gz, a
gzip; versions differ by edits in a member, an added member, the gzip
mtime and level), so that expansions succeed and a directory's later files
are deep deltas, with spans of its ``reference.deep``; writes and
truncations at offsets still corrupt them, which deep mode must store and
read back as they are. The verdicts on compressed spans a process keeps
(``VERIFIED_SPANS``) are cleared when a process would start without them
(each example, a crash, a fresh cache). CI runs a smaller derandomized set
of it (``test_deep_filesystem_matches_local_model``, about half a minute),
and asserts that deep deltas of expanded archives, with spans, are in the
final buckets; ``DGFS_FS_MODEL_DELTAS=deep`` makes
``test_filesystem_matches_local_model`` (its CI set, the long mode, a
replay) run the deep model instead.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gzip
import io
import itertools
import logging
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import hypothesis
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, reproduce_failure, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dgfs import format as fmt
from dgfs.cache import ContentCache
from dgfs.core import Core
from dgfs.deep import ExpansionLimits
from dgfs.deep.search import VERIFIED_SPANS
from dgfs.delta import DeltaEngine
from dgfs.errors import DgfsError, FsError, errno_of
from dgfs.fs.attrcache import AttrCache
from dgfs.fs.entries import NodeKind
from dgfs.fs.filesystem import FileSystem, FsOptions
from dgfs.fs.journal import Journal
from dgfs.fs.nodes import Node
from dgfs.fs.upload_failures import RETRY_MAX_DELAY
from dgfs.policy import Policy
from dgfs.store.faulty import Fault, FaultyStore
from dgfs.store.memory import MemoryStore
from tests.fsharness import close_fds_under

pytestmark = [
    # A guard against a hang in CI's short run; the long mode's seeds report
    # as they go and may take hours on a loaded machine (0: no limit).
    pytest.mark.timeout(0 if os.environ.get("DGFS_FS_MODEL_STEPS") else 3600),
    # Injected transient failures are logged, and retried.
    pytest.mark.expected_log(r"retrying in"),
    # The deep model's archives past its DEEP_LIMITS.
    pytest.mark.expected_log(r"; stored without expanding it$"),
]

_LONG_STEPS = int(os.environ.get("DGFS_FS_MODEL_STEPS", "0"))
SEEDS = int(os.environ.get("DGFS_FS_MODEL_SEEDS", "0")) or 20
FIRST_SEED = int(os.environ.get("DGFS_FS_MODEL_SEED", "0")) or 1
EXAMPLE_STEPS = int(os.environ.get("DGFS_FS_MODEL_EXAMPLE_STEPS", "0")) or 100
CI_EXAMPLES = 300
# Deep mode's CI set (test_deep_filesystem_matches_local_model): within a minute.
DEEP_CI_EXAMPLES = 200
# Shrinking a failure can take minutes; DGFS_FS_MODEL_SHRINK=0 skips it.
SHRINK = os.environ.get("DGFS_FS_MODEL_SHRINK", "1") != "0"
# DGFS_FS_MODEL_REPRODUCE=<blob> (what a failure prints inside b'...') replays
# that one example, with DGFS_FS_MODEL_SEED if it came from the long mode.
REPRODUCE = os.environ.get("DGFS_FS_MODEL_REPRODUCE", "")
# Operations between two whole-tree checks (compare_tree, remount, crash) at least.
HEAVY_EVERY = 6
# A step that has not finished after this long (real time) hangs: a deadlock.
STEP_TIMEOUT = 60.0

ROOT = 1
UID, GID = os.getuid(), os.getgid()
UMASK = 0o022
OPTIONS = FsOptions(upload_delay=0.5, retry_delay=2.0)
# Deltas from 1 KiB on (64 KiB by default), so small files exercise them.
POLICY = Policy(min_delta_size=1024)
LOGGED_ON_PURPOSE = re.compile(r"retrying in|; stored without expanding it$")

# A small name space so that operations collide: files and directories
# compete for the same names and paths cross each other.
NAMES = ("a", "b", "x.zip", "y.zip", "d")
PATHS = tuple(
    "/".join(parts) for depth in (1, 2) for parts in itertools.product(NAMES, repeat=depth)
)
# Deep mode's: names for each archive kind deep mode expands (a wheel is a zip).
DEEP_NAMES = ("a", "x.zip", "y.whl", "p.tar.gz", "q.gz", "d")
DEEP_PATHS = tuple(
    "/".join(parts) for depth in (1, 2) for parts in itertools.product(DEEP_NAMES, repeat=depth)
)
# DGFS_FS_MODEL_DELTAS=deep: test_filesystem_matches_local_model (its CI set,
# the long mode, a replay) runs the deep model, FsDeepModel.
DELTAS = fmt.DeltaMode(os.environ.get("DGFS_FS_MODEL_DELTAS", "") or "dg")
FILE_MODES = (0o644, 0o600, 0o664, 0o640)
DIR_MODES = (0o755, 0o700, 0o775)

# dgfs bugs this model found that are not fixed yet, by the name of their
# xfail test in tests/test_fs_model_regressions.py (or, found by the deep
# model, tests/test_fs_model_deep_regressions.py): the model steers clear of
# each (look for its name below) until the fix removes the entry and the mark.
KNOWN_BUGS: frozenset[str] = frozenset()
# utime sets mtimes in 2001..2011; anything a write leaves is "now". A model
# mtime in this range was set by utime and nothing changed the entry since.
UTIME_RANGE = (978_307_200 * 10**9, 1_300_000_000 * 10**9)


# --- contents ---------------------------------------------------------------------------


def _zip_base(family: int) -> bytes:
    """Zip-like bytes (zip magic, so sniffed as an archive whatever the name)."""
    rng = random.Random(family)
    return b"PK\x03\x04" + rng.randbytes(3000 + 500 * family)


ZIP_BASES = [_zip_base(family) for family in range(2)]


def _zip_version(family: int, edits: list[tuple[int, bytes]], grow: int) -> bytes:
    """A version of a release: the family's bytes with a few local edits."""
    data = bytearray(ZIP_BASES[family])
    for at, patch in edits:
        start = 4 + at % (len(data) - 4)
        data[start : start + len(patch)] = patch
    return bytes(data) + bytes(range(256))[:grow]


zip_contents = st.builds(
    _zip_version,
    st.integers(0, 1),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=12)), max_size=3),
    st.integers(0, 100),
)
small_contents = st.one_of(st.just(b""), st.binary(min_size=1, max_size=300))


# Deep mode (DGFS_FS_MODEL_DELTAS=deep, test_deep_filesystem_matches_local_model):
# real archives of a small family, so that expansions succeed and a
# directory's later files become deep deltas (of expanded forms) against its
# reference.deep; random writes and truncations at offsets still corrupt them.
DEEP_WORDS = (
    b"def class return import self value result config error buffer stream delta "
    b"store cache plugin release build module export handler request"
).split()
DEEP_MEMBERS = 4
DEEP_STAMP = (2024, 1, 1, 0, 0, 0)
GNU_GZIP = shutil.which("gzip") or "gzip"
# Limits some of the archives pass (a zip with its added member holds 7 zip
# entries and gzip members): those are stored without expanding them (a
# WARNING on purpose), the others expanded, in one directory.
DEEP_LIMITS = ExpansionLimits(max_bytes=21_000, members=6)


def _deep_text(family: int, member: int, size: int) -> bytes:
    """Compressible text, the same for a member in every version; the last
    member differs between the two families, the others are shared."""
    rng = random.Random(family * 1000 * (member == DEEP_MEMBERS - 1) + member)
    return b" ".join(rng.choice(DEEP_WORDS) for _ in range(size // 6 + 1))[:size]


@dataclass(frozen=True)
class Release:
    """A version of a release of family ``family``: a few members of text, with
    ``edits`` (at, bytes) in them, ``added`` an extra member, its gzip streams
    stamped ``mtime`` and compressed at ``level`` (by GNU gzip, ``gzip -n``,
    if ``gnu``: zlib does not always reproduce its streams, dgfs replays them
    with zgz). Rendered by the name it is written to: a zip for
    ``*.zip``/``*.whl`` (members deflated at zlib's default, plus a stored
    ``.gz`` member), a tar.gz for ``*.tar.gz``, one gzip stream for
    ``*.gz``, and ``kind`` for any other name."""

    family: int
    edits: tuple[tuple[int, bytes], ...]
    added: bool
    mtime: int
    level: int
    kind: str  # "zip", "tgz" or "gz"
    gnu: bool

    def gzip(self, data: bytes) -> bytes:
        if not self.gnu:
            return gzip.compress(data, compresslevel=self.level, mtime=self.mtime)
        command = [GNU_GZIP, "-n", f"-{self.level}"]
        return subprocess.run(command, input=data, capture_output=True, check=True).stdout

    def members(self) -> dict[str, bytes]:
        members = {
            f"pkg/mod{i}.py": _deep_text(self.family, i, 1500 + 900 * i)
            for i in range(DEEP_MEMBERS)
        }
        for at, patch in self.edits:
            name = f"pkg/mod{at % DEEP_MEMBERS}.py"
            text = bytearray(members[name])
            start = at % len(text)
            text[start : start + len(patch)] = patch
            members[name] = bytes(text)
        if self.added:
            members["pkg/extra.py"] = _deep_text(self.family, 99, 1200)
        return members

    def render(self, path: str) -> bytes:
        name = path.rsplit("/", 1)[-1]
        if name.endswith((".zip", ".whl")):
            kind = "zip"
        elif name.endswith(".tar.gz"):
            kind = "tgz"
        elif name.endswith(".gz"):
            kind = "gz"
        else:
            kind = self.kind
        members = self.members()
        if kind == "gz":
            return self.gzip(members["pkg/mod0.py"] + members["pkg/mod2.py"])
        if kind == "tgz":
            return self.gzip(_tar(members))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for member, text in members.items():
                archive.writestr(zipfile.ZipInfo(member, DEEP_STAMP), text, zipfile.ZIP_DEFLATED)
            nested = self.gzip(members["pkg/mod1.py"])
            archive.writestr(zipfile.ZipInfo("pkg/mod1.py.gz", DEEP_STAMP), nested)
        return buffer.getvalue()


@dataclass(frozen=True)
class Plain:
    """Bytes written as they are, whatever the name."""

    content: bytes

    def render(self, path: str) -> bytes:
        return self.content


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for member, text in members.items():
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(text), 1_700_000_000, 0o644
            archive.addfile(info, io.BytesIO(text))
    return buffer.getvalue()


releases = st.builds(
    Release,
    st.integers(0, 1),
    st.lists(
        st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=12)), max_size=3
    ).map(tuple),
    st.booleans(),
    st.sampled_from((1_600_000_000, 1_600_000_000, 1_700_000_000)),
    st.sampled_from((6, 9, 9)),
    st.sampled_from(("zip", "tgz", "gz")),
    st.sampled_from((False, False, True)) if shutil.which("gzip") else st.just(False),
)
deep_contents = st.one_of(
    small_contents.map(Plain), releases, releases, releases, zip_contents.map(Plain)
)
chunks = st.binary(min_size=0, max_size=120)
offsets = st.one_of(st.integers(0, 64), st.integers(0, 4000))
sizes = st.one_of(st.integers(0, 64), st.integers(0, 4000))
utimes = st.integers(*UTIME_RANGE)


# --- worker threads and processes, inline ---------------------------------------------

_T = TypeVar("_T")


async def _inline_run_sync(fn: Callable[..., _T], *args: Any, **_options: Any) -> _T:
    """``trio.to_thread.run_sync`` on the trio thread: a scheduling point, the
    call, and a scheduling point (other tasks run "while the thread works")."""
    await trio.lowlevel.checkpoint()
    try:
        return fn(*args)
    finally:
        await trio.lowlevel.cancel_shielded_checkpoint()


async def _inline_run_process(
    command: Any,
    *,
    stdin: Any = b"",
    capture_stdout: bool = False,
    capture_stderr: bool = False,
    check: bool = True,
    deliver_cancel: Any = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> subprocess.CompletedProcess[bytes]:
    """``trio.run_process`` that waits for the process on the trio thread."""
    await trio.lowlevel.checkpoint()
    try:
        if isinstance(stdin, bytes | bytearray | memoryview):
            options["input"] = bytes(stdin)
        else:
            options["stdin"] = stdin
        if capture_stdout:
            options["stdout"] = subprocess.PIPE
        if capture_stderr:
            options["stderr"] = subprocess.PIPE
        return subprocess.run(command, check=check, **options)
    finally:
        await trio.lowlevel.cancel_shielded_checkpoint()


@pytest.fixture
def inline_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline_run_sync)
    monkeypatch.setattr(trio._path, "run_sync", _inline_run_sync)  # bound at its import
    monkeypatch.setattr(trio, "run_process", _inline_run_process)


# --- the trio side: one loop per example, one mount at a time --------------------------


#: The store's time when the loop's mock clock reads 0.
STORE_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class Loop:
    """A ``trio.run`` on a standing ``MockClock`` in a thread; ``call`` runs one step in it."""

    def __init__(self) -> None:
        self.clock = trio.testing.MockClock()
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self.died: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="fs-model-trio", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.died is not None:
            raise self.died

    def _main(self) -> None:
        try:
            trio.run(self._serve, clock=self.clock)
        except BaseException as exc:  # reported by the next call
            self.died = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await trio.sleep_forever()

    @property
    def nursery(self) -> trio.Nursery:
        """Where steps and mounts run (inside the loop only)."""
        assert self._nursery is not None
        return self._nursery

    def call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``fn`` as a task of the loop and return (or raise) what it did."""
        done = threading.Event()
        box: list[tuple[bool, Any]] = []

        async def run() -> None:
            try:
                box.append((True, await fn()))
            except BaseException as exc:
                box.append((False, exc))
                if not isinstance(exc, Exception):
                    raise
            finally:
                done.set()

        assert self._nursery is not None and self._token is not None
        if self.died is not None:
            raise self.died
        trio.from_thread.run_sync(self._nursery.start_soon, run, trio_token=self._token)
        if not done.wait(STEP_TIMEOUT):
            raise AssertionError(f"a step did not finish in {STEP_TIMEOUT:.0f}s: a deadlock?")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        if self.died is None and self._nursery is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join(STEP_TIMEOUT)


# The random trio's scheduler shuffles ready tasks with (seeded by Hypothesis
# under its trio plugin); None if a trio version has no such thing.
_SCHEDULER: random.Random | None = getattr(trio._core._run, "_r", None)


def _waiting_for_io() -> int:
    io = trio.lowlevel.current_statistics().io_statistics
    return int(getattr(io, "tasks_waiting_read", 0)) + int(getattr(io, "tasks_waiting_write", 0))


async def settle() -> None:
    """Until no task can run: every one waits for the clock, a held call, or the test."""
    await trio.testing.wait_all_tasks_blocked()
    # Trio's own task for calls from other threads waits on its wakeup socket.
    assert _waiting_for_io() <= 1, "real I/O in flight: a worker call that is not inline"


class Mount:
    """One mount's lifetime as ``tests/fsharness.py``'s ``mounted()`` runs it,
    its end (unmount or crash) chosen when it comes. Lives in a task of the loop."""

    def __init__(
        self,
        store: FaultyStore,
        base: Path,
        cache_dir: Path,
        deltas: fmt.DeltaMode,
        limits: ExpansionLimits | None = None,
    ) -> None:
        self.store = store
        self.deltas = deltas
        self.limits = limits
        self.base = base
        self.cache_dir = cache_dir  # kept by a remount or a crash, as a real one is
        self.fs: FileSystem | None = None
        self.recovered = 0
        self.failure: BaseException | None = None  # a background job's: the mount is dead
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._crash = False

    @property
    def journal_dir(self) -> Path:
        return self.base / "journal"

    async def start(self, nursery: trio.Nursery) -> FileSystem:
        await nursery.start(self._run)
        assert self.fs is not None
        return self.fs

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        run_dir = Path(tempfile.mkdtemp(dir=self.base, prefix="mount-"))
        cache = ContentCache(self.cache_dir, 64 << 20)
        core = Core(
            self.store,
            cache,
            DeltaEngine(),
            POLICY,
            scratch_dir=run_dir / "scratch",
            deltas=self.deltas,
            limits=self.limits,
        )
        journal = Journal(self.journal_dir)
        fs = FileSystem(core, journal, AttrCache(None), OPTIONS)
        started = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run_uploads)
                self.recovered = await fs.recover_journal()
                self.fs = fs
                started = True
                task_status.started()
                await self._stop.wait()
                if not self._crash:
                    await fs.unmounted()
                    await fs.wait_idle()
                nursery.cancel_scope.cancel()
        except Exception as exc:
            if not started:
                raise
            self.failure = exc
        finally:
            if self._crash or self.failure is not None:
                journal.close()
                close_fds_under(journal.directory)
            else:
                await fs.close()
                journal.close()
            await core.aclose()
            cache.close()
            self._stopped.set()

    async def stop(self, *, crash: bool) -> None:
        self._crash = crash
        self._stop.set()
        await self._stopped.wait()
        if self.failure is not None:
            raise self.failure


# --- the kernel's side of the calls ------------------------------------------------------


class Kernel:
    """Path-based calls turned into what the kernel sends ``FileSystem``, and the
    lookups it holds (each reply that hands it a node counts one)."""

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs
        self.lookups: collections.Counter[int] = collections.Counter()

    def counted(self, node: Node) -> Node:
        self.lookups[node.ino] += 1
        return node

    async def lookup(self, parent_ino: int, name: str) -> Node:
        return self.counted(await self.fs.lookup(parent_ino, name))

    def forget_all(self, keep: set[int]) -> None:
        """FORGET every lookup held, but of ``keep`` (inodes of open files)."""
        items = [(ino, count) for ino, count in self.lookups.items() if ino not in keep]
        self.fs.forget(items)
        for ino, _ in items:
            del self.lookups[ino]

    async def parent(self, path: str) -> tuple[Node, str]:
        """The directory holding ``path``'s last name, walked name by name."""
        *dirs, name = path.split("/")
        node = self.fs.get_node(ROOT)
        for part in dirs:
            node = await self.lookup(node.ino, part)
            if node.kind is not NodeKind.DIR:
                raise FsError(errno.ENOTDIR)
        return node, name

    async def node(self, path: str) -> Node:
        parent, name = await self.parent(path)
        return await self.lookup(parent.ino, name)

    async def maybe_node(self, parent: Node, name: str) -> Node | None:
        try:
            return await self.lookup(parent.ino, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    async def create(self, path: str, *, exclusive: bool, racing: bool) -> tuple[int, int]:
        """open(O_RDWR|O_CREAT|O_TRUNC[|O_EXCL]): CREATE for a new name, else OPEN
        (or, ``racing``, CREATE anyway, as when the name appeared after the
        kernel's lookup). Returns ``(fh, ino)``."""
        parent, name = await self.parent(path)
        node = await self.maybe_node(parent, name)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_EXCL if exclusive else 0)
        if node is None or (racing and not exclusive and node.kind is NodeKind.FILE):
            handle, node = await self.fs.create(parent.ino, name, 0o644 & ~UMASK, UID, GID, flags)
            return handle.fh, self.counted(node).ino
        if exclusive:
            raise FsError(errno.EEXIST)
        if node.kind is NodeKind.DIR:
            raise FsError(errno.EISDIR)
        handle = await self.fs.open(node.ino, os.O_RDWR | os.O_TRUNC)
        return handle.fh, node.ino

    async def open(self, path: str, flags: int) -> tuple[int, int]:
        node = await self.node(path)
        if node.kind is NodeKind.DIR:
            raise FsError(errno.EISDIR)
        handle = await self.fs.open(node.ino, flags)
        return handle.fh, node.ino

    async def close(self, fh: int) -> None:
        try:
            await self.fs.flush(fh)
        finally:
            await self.fs.release(fh)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """write(2): the kernel sends no WRITE for zero bytes."""
        return await self.fs.write(fh, offset, data) if data else 0

    async def read_all(self, fh: int) -> bytes:
        return await self.fs.read(fh, 0, 1 << 20)

    async def read_file(self, node: Node) -> bytes:
        handle = await self.fs.open(node.ino, os.O_RDONLY)
        try:
            return await self.read_all(handle.fh)
        finally:
            await self.fs.release(handle.fh)

    async def truncate(self, ino: int, size: int) -> None:
        """truncate(2), ftruncate(2): SETATTR with the size alone (the file
        system marks the times, and only if the size changes)."""
        await self.fs.setattr(ino, size=size)

    async def listdir(self, path: str) -> list[str]:
        node = await self.node(path) if path else self.fs.get_node(ROOT)
        names: list[str] = []

        def reply(name: str, child: Node, offset: int) -> bool:
            names.append(name)
            self.counted(child)
            return True

        await self.fs.readdir(self.fs.get_dir(node.ino).ino, 0, reply)
        return sorted(names)

    async def stat(self, path: str) -> Entry:
        node = await self.fs.getattr((await self.node(path)).ino)
        return Entry.of_node(node)

    async def tree(self) -> dict[str, Entry]:
        """Every entry under the root, with each file's bytes."""
        found: dict[str, Entry] = {}

        async def walk(dir_node: Node, prefix: str) -> None:
            children: list[tuple[str, Node]] = []
            await self.fs.readdir(
                dir_node.ino,
                0,
                lambda name, child, offset: children.append((name, self.counted(child))) or True,
            )
            for name, child in children:
                path = f"{prefix}{name}"
                entry = Entry.of_node(await self.fs.getattr(child.ino))
                if child.kind is NodeKind.FILE:
                    entry.content = await self.read_file(child)
                found[path] = entry
                if child.kind is NodeKind.DIR:
                    await walk(child, f"{path}/")

        await walk(self.fs.get_node(ROOT), "")
        return found


@dataclass
class Entry:
    """What ``stat`` (and for a file, a read) shows of one entry."""

    kind: str  # "file" or "dir"
    mode: int
    size: int | None  # files only
    mtime_ns: int | None  # only where utime set it
    content: bytes | None = None

    @classmethod
    def of_node(cls, node: Node) -> Entry:
        is_dir = node.kind is NodeKind.DIR
        return cls(
            "dir" if is_dir else "file" if node.kind is NodeKind.FILE else node.kind.value,
            node.mode,
            None if is_dir else node.size,
            node.mtime_ns if UTIME_RANGE[0] <= node.mtime_ns <= UTIME_RANGE[1] else None,
        )

    @classmethod
    def of_stat(cls, st: os.stat_result) -> Entry:
        is_dir = stat.S_ISDIR(st.st_mode)
        utimed = UTIME_RANGE[0] <= st.st_mtime_ns <= UTIME_RANGE[1]
        return cls(
            "dir" if is_dir else "file",
            stat.S_IMODE(st.st_mode),
            None if is_dir else st.st_size,
            st.st_mtime_ns if utimed else None,
        )

    def matches(self, got: Entry) -> bool:
        """``got`` (the mount's) shows what this (the model's) promises."""
        return (
            got.kind == self.kind
            and got.mode == self.mode
            and got.size == self.size
            # A directory's mtime is compared only where utime set it; a
            # file's must also be "now" where the model's is (not a stale one
            # a utime once set).
            and (got.mtime_ns == self.mtime_ns or self.mtime_ns is None and self.kind == "dir")
            and (self.content is None or got.content == self.content)
        )


# --- the model's bookkeeping ---------------------------------------------------------------


@dataclass
class History:
    """One file (a local inode) as a crash may bring it back."""

    acked: bool = False  # a flush or fsync returned since it was created
    # Its content at every moment since the last acknowledgement (or creation).
    since: list[bytes] = field(default_factory=lambda: [b""])
    # Its modes since then; only the last while nothing unacknowledged is written.
    modes: list[int] = field(default_factory=lambda: [0o644 & ~UMASK])
    # Opened with O_TRUNC since: a write whatever it changed (it sets the
    # mtime, of an empty file too, as Linux does), with which a chmod travels.
    truncated: bool = False

    @property
    def dirty(self) -> bool:
        return not self.acked or len(self.since) > 1 or self.truncated

    def changed(self, content: bytes) -> None:
        if self.since[-1] != content:
            self.since.append(content)

    def chmod(self, mode: int) -> None:
        self.modes = [*self.modes, mode] if self.dirty else [mode]

    def acknowledged(self, content: bytes, mode: int) -> None:
        self.acked = True
        self.since = [content]
        self.modes = [mode]
        self.truncated = False


@dataclass
class OpenFile:
    """A handle open on both sides."""

    fd: int  # the model's (always readable)
    fh: int  # the mount's
    ino: int  # the mount's node
    local_ino: int
    readable: bool
    writable: bool


Outcome = tuple[str, Any]


def _done(outcome: Outcome) -> Outcome:
    """``outcome`` without its value: whether it succeeded (or its errno)."""
    return ("ok", None) if outcome[0] == "ok" else outcome


def _local(fn: Callable[[], _T]) -> Outcome:
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("error", errno.errorcode.get(exc.errno or 0, str(exc.errno)))


@dataclass
class Stats:
    """Counts over a whole test run (every example)."""

    examples: int = 0
    steps: int = 0
    remounts: int = 0
    crashes: int = 0
    deltas: int = 0
    deep_deltas: int = 0  # deep ones (see FsModel.count_deltas)
    deep_span_deltas: int = 0
    deep_expanded_deltas: int = 0
    held: int = 0
    failures_injected: int = 0
    concurrent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


STATS = Stats()


class _Unexpected(logging.Handler):
    """dgfs WARNING/ERROR records the model did not cause on purpose."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if LOGGED_ON_PURPOSE.search(record.getMessage()):
            return
        self.records.append(record)


UNEXPECTED = _Unexpected()


def _scratch_root() -> str | None:
    """tmpfs when there is one: the journal fsyncs on every close."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


# --- the state machine ---------------------------------------------------------------------


class FsModel(RuleBasedStateMachine):
    """One example: a fresh bucket, journal and model directory, and a mount."""

    deltas = fmt.DeltaMode.DG
    names = NAMES
    paths = PATHS
    limits: ExpansionLimits | None = None

    def __init__(self) -> None:
        super().__init__()
        STATS.examples += 1
        self.base = Path(tempfile.mkdtemp(prefix="dgfs-fs-model-", dir=_scratch_root()))
        self.local = self.base / "local"
        self.local.mkdir()
        # The store's clock (Last-Modified, Date) is the loop's mock clock:
        # time passes for it as for the mount, so rows settle, directory
        # indexes are written and read, and versions change second by second
        # as on a real store (on the wall clock a whole example runs within
        # a second or two).
        self.memory = MemoryStore("model-bucket", clock=self._store_now)
        self.faulty = FaultyStore(self.memory)
        self.files: dict[int, History] = {}  # by the model's st_ino
        self.handles: list[OpenFile] = []
        self.held: list[Fault] = []  # uploads held in flight (or to be, once one starts)
        self.failing: list[Fault] = []  # transient failures injected on this mount
        self.concurrent: tuple[str, int, int] | None = None  # for the next operation
        self.loop = Loop()
        self.caches = 0  # fresh cache directories used (a remount may take one)
        self.since_heavy = 0  # operations since the last whole-tree check
        self.mount: Mount | None = None
        self.kernel: Kernel | None = None
        self._start_mount()

    def mount_deltas(self) -> fmt.DeltaMode:
        """The mode the next mount makes new directories in."""
        return self.deltas

    def _store_now(self) -> datetime:
        return STORE_EPOCH + timedelta(seconds=self.loop.clock.current_time())

    # --- running steps -----------------------------------------------------------------

    def _start_mount(self, *, fresh_cache: bool = False) -> None:
        if fresh_cache:
            self.caches += 1
        cache_dir = self.base / f"cache{self.caches}"
        mount = Mount(self.faulty, self.base, cache_dir, self.mount_deltas(), self.limits)

        async def start() -> FileSystem:
            fs = await mount.start(self.loop.nursery)
            await settle()
            return fs

        self.kernel = Kernel(self.loop.call(start))
        self.mount = mount

    def perform(self, op: Callable[[], Awaitable[_T]], *, concurrent: bool = True) -> _T:
        """Run ``op`` on the mount (with the armed concurrent event) until every
        task is blocked; an op left blocked has held uploads released, then
        time pass, until it ends (else: a deadlock)."""
        event, self.concurrent = (self.concurrent if concurrent else None), None
        mount = self.mount
        assert mount is not None
        clock = self.loop.clock

        async def step() -> _T:
            # Each step orders the tasks trio runs together as this alone says,
            # whatever ran before: a failure keeps its interleaving as it shrinks.
            if _SCHEDULER is not None:
                _SCHEDULER.seed(event[2] if event is not None else 0)
            done = trio.Event()
            box: list[tuple[bool, Any]] = []

            async def run() -> None:
                try:
                    box.append((True, await op()))
                except Exception as exc:
                    box.append((False, exc))
                finally:
                    done.set()

            self.loop.nursery.start_soon(run)
            if event is not None:
                kind, lag, _ = event
                for _ in range(lag):
                    await trio.lowlevel.checkpoint()
                if kind == "release" and self.held:
                    self.held.pop(0).release()
                else:
                    clock.jump(OPTIONS.upload_delay)
            await settle()
            jumps = 0
            while not done.is_set():
                if self.held:
                    self.held.pop(0).release()
                elif jumps < 5:
                    clock.jump(RETRY_MAX_DELAY)
                    jumps += 1
                else:
                    raise AssertionError("the operation never ends: a deadlock")
                await settle()
            if mount.failure is not None:
                raise mount.failure
            ok, value = box[0]
            if not ok:
                raise value
            return value  # type: ignore[no-any-return]

        try:
            return self.loop.call(step)
        finally:
            self._check_log()

    def _check_log(self) -> None:
        if UNEXPECTED.records:
            lines = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in UNEXPECTED.records]
            UNEXPECTED.records.clear()
            raise AssertionError("dgfs logged what it should not:\n" + "\n".join(lines))

    def remote(self, op: Callable[[Kernel], Awaitable[_T]]) -> Outcome:
        kernel = self.kernel
        assert kernel is not None

        async def run() -> Outcome:
            try:
                return ("ok", await op(kernel))
            except (DgfsError, OSError) as exc:  # what fuse_ops answers with an errno
                code = errno_of(exc)
                return ("error", errno.errorcode.get(code, str(code)))

        return self.perform(run)

    def both(
        self,
        what: str,
        local: Callable[[], _T],
        remote: Callable[[Kernel], Awaitable[Any]],
        *,
        also_ok: Callable[[Outcome, Outcome], bool] | None = None,
    ) -> Outcome:
        """Run an operation on the model and on the mount: the outcomes must be equal."""
        expected = _local(local)
        return self.compare(what, expected, self.remote(remote), also_ok=also_ok)

    def compare(
        self,
        what: str,
        expected: Outcome,
        got: Outcome,
        *,
        also_ok: Callable[[Outcome, Outcome], bool] | None = None,
    ) -> Outcome:
        """One step's outcomes, the model's and the mount's: they must be equal."""
        STATS.steps += 1
        self.since_heavy += 1
        self.count(f"{what.split()[0]} {'ok' if expected[0] == 'ok' else expected[1]}")
        if got != expected and not (also_ok is not None and also_ok(expected, got)):
            raise AssertionError(f"{what}: the model gave {expected!r}, the mount {got!r}")
        return got

    # --- the model's view --------------------------------------------------------------

    def existing(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {"file": [], "dir": []}
        for dirpath, dirs, files in os.walk(self.local):
            rel = os.path.relpath(dirpath, self.local)
            for name in dirs:
                found["dir"].append(name if rel == "." else f"{rel}/{name}")
            for name in files:
                found["file"].append(name if rel == "." else f"{rel}/{name}")
        return {kind: sorted(paths) for kind, paths in found.items()}

    def any_path(self, data: st.DataObject, prefer: tuple[str, ...] = ("file", "dir")) -> str:
        """Mostly an existing entry (of a kind in ``prefer`` when there is one) or
        a new name in an existing directory; sometimes any path at all."""
        known = self.existing()
        preferred = [p for kind in prefer for p in known[kind]]
        anything = known["file"] + known["dir"]
        how = data.draw(st.sampled_from(("existing", "existing", "existing", "new", "any")))
        if how == "existing" and (preferred or anything):
            return data.draw(st.sampled_from(preferred or anything))
        if how in ("existing", "new"):
            parent = data.draw(st.sampled_from(["", *known["dir"]]))
            name = data.draw(st.sampled_from(self.names))
            return f"{parent}/{name}" if parent else name
        return data.draw(st.sampled_from(self.paths))

    def history(self, local_ino: int) -> History:
        return self.files.setdefault(local_ino, History())

    def content_at(self, path: str) -> bytes:
        return (self.local / path).read_bytes()

    def changed_path(self, path: str) -> None:
        """A content change of the file at ``path`` (if it is one)."""
        target = self.local / path
        if target.is_file():
            self.history(target.stat().st_ino).changed(target.read_bytes())

    def changed_handle(self, handle: OpenFile) -> bytes:
        content = _read_fd(handle.fd)
        self.history(handle.local_ino).changed(content)
        return content

    def acknowledged(self, handle: OpenFile) -> None:
        """A flush or fsync of ``handle`` returned 0: its file's content is promised."""
        st = os.fstat(handle.fd)
        if st.st_nlink:  # unlinked: nothing to promise
            self.history(handle.local_ino).acknowledged(
                _read_fd(handle.fd), stat.S_IMODE(st.st_mode)
            )

    def pick(self, index: int, *, readable: bool = False, writable: bool = False) -> OpenFile:
        fitting = [
            h for h in self.handles if (h.readable or not readable) and (h.writable or not writable)
        ]
        return fitting[index % len(fitting)]

    def has_handle(self, *, readable: bool = False, writable: bool = False) -> bool:
        return any(
            (h.readable or not readable) and (h.writable or not writable) for h in self.handles
        )

    # --- rules: files ------------------------------------------------------------------

    @initialize(
        first=zip_contents,
        second=zip_contents,
        small=small_contents,
    )
    def populate(self, first: bytes, second: bytes, small: bytes) -> None:
        """A directory with two similar releases (a reference and a delta once
        uploaded) and a small file, so the first steps meet existing names."""
        self.mkdir_path("d", 0o755)
        self.create_path("d/x.zip", first, keep_open=False)
        self.create_path("d/y.zip", second, keep_open=False)
        self.create_path("a", small, keep_open=False)

    def create_path(
        self,
        path: str,
        content: bytes,
        *,
        keep_open: bool,
        exclusive: bool = False,
        racing: bool = False,
    ) -> OpenFile | None:
        """create(path) on both sides; the handle when ``keep_open`` (else None)."""
        target = self.local / path
        existed = target.is_file()
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_EXCL if exclusive else 0)

        def local() -> int:
            return os.open(target, flags, 0o644)

        async def remote(k: Kernel) -> tuple[int, int]:
            fh, ino = await k.create(path, exclusive=exclusive, racing=racing)
            assert await k.write(fh, 0, content) == len(content)
            if not keep_open:
                await k.close(fh)
            return fh, ino

        outcome = _local(local)
        fd = outcome[1] if outcome[0] == "ok" else None
        if fd is not None:
            local_ino = os.fstat(fd).st_ino
            if not existed:
                self.files[local_ino] = History()
            history = self.history(local_ino)
            history.changed(b"")
            _write_all(fd, content, 0)
            history.changed(content)
        got = self.remote(remote)
        what = f"create {path} ({len(content)} bytes, excl={exclusive}, racing={racing})"
        try:
            self.compare(what, _done(outcome), _done(got))
        except AssertionError:
            if fd is not None:
                os.close(fd)
            raise
        if fd is None:
            return None
        fh, ino = got[1]
        handle = OpenFile(fd, fh, ino, os.fstat(fd).st_ino, readable=True, writable=True)
        if keep_open:
            self.handles.append(handle)
            return handle
        self.acknowledged(handle)
        os.close(fd)
        return None

    @rule(
        data=st.data(),
        content=st.one_of(small_contents, zip_contents),
        exclusive=st.booleans(),
        keep_open=st.booleans(),
        racing=st.booleans(),
    )
    def create(
        self, data: st.DataObject, content: bytes, exclusive: bool, keep_open: bool, racing: bool
    ) -> None:
        if keep_open and len(self.handles) >= 6:
            keep_open = False
        path = self.any_path(data, ("file",))
        self.create_path(path, content, keep_open=keep_open, exclusive=exclusive, racing=racing)

    @precondition(lambda self: len(self.handles) < 6)
    @rule(
        data=st.data(),
        access=st.sampled_from(("r", "w", "rw")),
        trunc=st.booleans(),
    )
    def open(self, data: st.DataObject, access: str, trunc: bool) -> None:
        path = self.any_path(data, ("file",))
        target = self.local / path
        if access == "r" and target.is_dir():
            return  # the kernel opens a directory with opendir, not open
        flags = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}[access]
        if trunc and access != "r":
            flags |= os.O_TRUNC
        local_flags = flags if access == "r" else (flags & ~os.O_ACCMODE) | os.O_RDWR

        outcome = _local(lambda: os.open(target, local_flags))
        got = self.remote(lambda k: k.open(path, flags))
        what = f"open {path} {access}{' trunc' if flags & os.O_TRUNC else ''}"
        try:
            self.compare(what, _done(outcome), _done(got))
        finally:
            if outcome[0] == "ok" and got[0] != "ok":
                os.close(outcome[1])
        if outcome[0] != "ok":
            return
        fd = outcome[1]
        fh, ino = got[1]
        handle = OpenFile(fd, fh, ino, os.fstat(fd).st_ino, True, access != "r")
        self.handles.append(handle)
        self.changed_handle(handle)
        if flags & os.O_TRUNC:
            self.history(handle.local_ino).truncated = True

    @precondition(lambda self: self.has_handle(writable=True))
    @rule(index=st.integers(0, 5), chunk=chunks, offset=offsets)
    def write(self, index: int, chunk: bytes, offset: int) -> None:
        handle = self.pick(index, writable=True)
        self.both(
            f"pwrite fh {handle.fh}: {len(chunk)} bytes at {offset}",
            lambda: os.pwrite(handle.fd, chunk, offset),
            lambda k: k.write(handle.fh, offset, chunk),
        )
        self.changed_handle(handle)

    @precondition(lambda self: self.has_handle(writable=True))
    @rule(index=st.integers(0, 5), chunk=chunks)
    def append(self, index: int, chunk: bytes) -> None:
        """O_APPEND: the kernel writes at the size the file shows."""
        handle = self.pick(index, writable=True)
        size = os.fstat(handle.fd).st_size

        async def remote(k: Kernel) -> tuple[int, int]:
            shown = (await k.fs.getattr(handle.ino)).size
            return shown, await k.write(handle.fh, shown, chunk)

        self.both(
            f"append fh {handle.fh}: {len(chunk)} bytes",
            lambda: (size, os.pwrite(handle.fd, chunk, size)),
            remote,
        )
        self.changed_handle(handle)

    @precondition(lambda self: self.has_handle(writable=True))
    @rule(index=st.integers(0, 5), size=sizes)
    def ftruncate(self, index: int, size: int) -> None:
        handle = self.pick(index, writable=True)
        self.both(
            f"ftruncate fh {handle.fh} to {size}",
            lambda: _truncated(handle.fd, size),
            lambda k: k.truncate(handle.ino, size),
        )
        self.changed_handle(handle)

    @rule(data=st.data(), size=st.one_of(sizes, st.none()))
    def truncate(self, data: st.DataObject, size: int | None) -> None:
        path = self.any_path(data, ("file",))
        if size is None:  # to the size it has: no content changes, the times do
            try:
                size = os.lstat(self.local / path).st_size
            except OSError:
                size = 0

        async def remote(k: Kernel) -> None:
            await k.truncate((await k.node(path)).ino, size)

        target = self.local / path
        self.both(f"truncate {path} to {size}", lambda: _truncated(target, size), remote)
        self.changed_path(path)

    @precondition(lambda self: self.has_handle(readable=True))
    @rule(index=st.integers(0, 5), offset=offsets, length=st.integers(0, 5000))
    def read(self, index: int, offset: int, length: int) -> None:
        handle = self.pick(index, readable=True)
        self.both(
            f"pread fh {handle.fh}: {length} at {offset}",
            lambda: os.pread(handle.fd, length, offset),
            lambda k: k.fs.read(handle.fh, offset, length),
        )

    @rule(data=st.data())
    def read_file(self, data: st.DataObject) -> None:
        path = self.any_path(data, ("file",))

        async def remote(k: Kernel) -> bytes:
            node = await k.node(path)
            if node.kind is NodeKind.DIR:
                raise FsError(errno.EISDIR)
            return await k.read_file(node)

        self.both(f"read {path}", lambda: (self.local / path).read_bytes(), remote)

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 5))
    def close(self, index: int) -> None:
        self.close_handle(self.pick(index))

    def close_handle(self, handle: OpenFile) -> None:
        self.handles.remove(handle)
        try:
            self.both(f"close fh {handle.fh}", lambda: None, lambda k: k.close(handle.fh))
            self.acknowledged(handle)
        finally:
            os.close(handle.fd)

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 5))
    def fsync(self, index: int) -> None:
        handle = self.pick(index)
        got = self.both(
            f"fsync fh {handle.fh}",
            lambda: os.fsync(handle.fd),
            lambda k: k.fs.fsync(handle.fh),
            also_ok=lambda expected, got: got == ("error", "EIO") and self.may_fail_uploads(),
        )
        if got[0] == "ok":
            self.acknowledged(handle)

    def may_fail_uploads(self) -> bool:
        """Whether an injected failure has hit an upload on this mount (its retry may wait)."""
        return self.failures_hit() > 0

    def failures_hit(self) -> int:
        return sum(fault.hits for fault in self.failing)

    def count(self, outcome: str) -> None:
        STATS.outcomes[outcome] = STATS.outcomes.get(outcome, 0) + 1

    # --- rules: names ------------------------------------------------------------------

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        self.rename_path(self.any_path(data), self.any_path(data))

    def rename_path(self, old: str, new: str) -> None:

        async def remote(k: Kernel) -> None:
            old_parent, old_name = await k.parent(old)
            new_parent, new_name = await k.parent(new)
            await k.lookup(old_parent.ino, old_name)  # ENOENT first
            # The kernel's own checks (do_renameat2's "trap"), before RENAME is sent.
            if new.startswith(f"{old}/"):
                raise FsError(errno.EINVAL)
            if old.startswith(f"{new}/"):
                raise FsError(errno.ENOTEMPTY)
            await k.fs.rename(old_parent.ino, old_name, new_parent.ino, new_name, 0)

        source, target = self.local / old, self.local / new
        moved = self.history(source.stat().st_ino) if source.is_file() else None
        replaces = moved is not None and target.is_file() and not target.samefile(source)
        what = f"rename {old} -> {new}"
        hits = self.failures_hit()
        got = self.remote(remote)
        if got == ("error", "EIO") and self.failures_hit() > hits:
            # An injected failure hit the rename itself (a delta moved to another
            # directory is stored there anew): it failed, and so changed nothing.
            STATS.steps += 1
            self.count("rename EIO (injected)")
            self.compare_paths(what, [old, new])
            return
        self.compare(what, _local(lambda: os.rename(source, target)), got)
        if got[0] != "ok":
            return
        if moved is not None and replaces and not moved.acked:
            # The rename made what the file holds now durable (see the docstring).
            moved.acknowledged(target.read_bytes(), stat.S_IMODE(target.stat().st_mode))

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        self.unlink_path(self.any_path(data, ("file",)))

    def unlink_path(self, path: str) -> None:
        async def remote(k: Kernel) -> None:
            parent, name = await k.parent(path)
            await k.fs.unlink(parent.ino, name)

        self.both(f"unlink {path}", lambda: os.unlink(self.local / path), remote)

    @precondition(lambda self: self.handles)
    @rule(
        index=st.integers(0, 5),
        data=st.data(),
        how=st.sampled_from(("unlink", "replace", "move")),
    )
    def rename_open_file(self, index: int, data: st.DataObject, how: str) -> None:
        """A file a handle keeps open is unlinked, replaced (another file renamed
        over it) or moved (renamed, as a temporary file into place before its
        close): the handle still reads and writes its own file (POSIX)."""
        handle = self.pick(index)
        paths = self.existing()["file"]
        path = next((p for p in paths if (self.local / p).stat().st_ino == handle.local_ino), None)
        others = [p for p in paths if p != path]
        if path is None:
            return
        if how == "unlink":
            self.unlink_path(path)
        elif how == "move":
            self.rename_path(path, self.any_path(data, ("file",)))
        elif others:
            self.rename_path(data.draw(st.sampled_from(others)), path)

    @rule(
        data=st.data(),
        content=st.one_of(small_contents, zip_contents),
        close_first=st.booleans(),
    )
    def save_atomically(self, data: st.DataObject, content: bytes, close_first: bool) -> None:
        """An editor's save: write a new temporary file, then rename it over the
        file it replaces, closed first or (``close_first`` false) still open."""
        self.save_as(data, lambda path: content, close_first, target_first=False)

    def save_as(
        self,
        data: st.DataObject,
        render: Callable[[str], bytes],
        close_first: bool,
        *,
        target_first: bool,
    ) -> None:
        """``save_atomically`` of what ``render`` gives for the name saved to
        (drawn first if ``target_first``, else the temporary one)."""
        target = self.any_path(data, ("file",)) if target_first else None
        known = self.existing()
        parent = data.draw(st.sampled_from(["", *known["dir"]]))
        free = [n for n in self.names if not (self.local / parent / n).exists()]
        if not free or len(self.handles) >= 6:
            return
        name = data.draw(st.sampled_from(free))
        temporary = f"{parent}/{name}" if parent else name
        self.count("save_atomically")
        content = render(target or temporary)
        handle = self.create_path(temporary, content, keep_open=True)
        assert handle is not None, f"{temporary} could not be created"
        if close_first:
            self.close_handle(handle)
        self.rename_path(temporary, target or self.any_path(data, ("file",)))
        if not close_first:
            self.close_handle(handle)

    @rule()
    def forget(self) -> None:
        """The kernel drops every inode no open file holds (FORGET of all their
        lookups), as under memory pressure; names are looked up again."""
        STATS.steps += 1
        self.count("forget")
        keep = {handle.ino for handle in self.handles}

        kernel = self.kernel
        assert kernel is not None

        async def forget() -> None:
            kernel.forget_all(keep)

        self.perform(forget, concurrent=False)

    def mkdir_path(self, path: str, mode: int) -> None:
        async def remote(k: Kernel) -> None:
            parent, name = await k.parent(path)
            k.counted(await k.fs.mkdir(parent.ino, name, mode & ~UMASK, UID, GID))

        self.both(f"mkdir {path} {mode:o}", lambda: os.mkdir(self.local / path, mode), remote)

    @rule(data=st.data(), mode=st.sampled_from(DIR_MODES))
    def mkdir(self, data: st.DataObject, mode: int) -> None:
        self.mkdir_path(self.any_path(data), mode)

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = self.any_path(data, ("dir",))

        async def remote(k: Kernel) -> None:
            parent, name = await k.parent(path)
            await k.fs.rmdir(parent.ino, name)

        self.both(f"rmdir {path}", lambda: os.rmdir(self.local / path), remote)

    @rule(data=st.data(), file_mode=st.sampled_from(FILE_MODES))
    def chmod(self, data: st.DataObject, file_mode: int) -> None:
        path = self.any_path(data)
        mode = DIR_MODES[file_mode % 3] if (self.local / path).is_dir() else file_mode

        async def remote(k: Kernel) -> None:
            await k.fs.setattr((await k.node(path)).ino, mode=mode)

        got = self.both(f"chmod {mode:o} {path}", lambda: os.chmod(self.local / path, mode), remote)
        if got[0] == "ok" and (self.local / path).is_file():
            self.history((self.local / path).stat().st_ino).chmod(mode)

    @rule(data=st.data(), atime=utimes, mtime=utimes)
    def utime(self, data: st.DataObject, atime: int, mtime: int) -> None:
        path = self.any_path(data)

        async def remote(k: Kernel) -> None:
            await k.fs.setattr((await k.node(path)).ino, mtime_ns=mtime, atime_ns=atime)

        self.both(
            f"utime {path} mtime={mtime}",
            lambda: os.utime(self.local / path, ns=(atime, mtime)),
            remote,
        )

    @rule(data=st.data(), root=st.booleans())
    def listdir(self, data: st.DataObject, root: bool) -> None:
        path = "" if root else self.any_path(data, ("dir",))
        self.both(
            f"listdir {path!r}",
            lambda: sorted(os.listdir(self.local / path)),
            lambda k: k.listdir(path),
        )

    @rule(data=st.data())
    def stat(self, data: st.DataObject) -> None:
        path = self.any_path(data)
        expected = _local(lambda: Entry.of_stat((self.local / path).stat()))
        got = self.remote(lambda k: k.stat(path))
        self.compare(
            f"stat {path}",
            expected,
            got,
            also_ok=lambda e, g: e[0] == g[0] == "ok" and e[1].matches(g[1]),
        )

    def heavy_due(self) -> bool:
        """A whole-tree check (compare, remount, crash) costs ten operations:
        a few operations come between two."""
        return self.since_heavy >= HEAVY_EVERY

    @precondition(heavy_due)
    @rule()
    def compare_tree(self) -> None:
        STATS.steps += 1
        self.compare_all()

    # --- rules: time, uploads and faults -------------------------------------------------

    @rule(seconds=st.sampled_from((OPTIONS.upload_delay, OPTIONS.retry_delay + 0.5, 11.0, 61.0)))
    def let_time_pass(self, seconds: float) -> None:
        """Queued uploads, retries and listing TTLs come due (and run, unless held)."""
        STATS.steps += 1
        clock = self.loop.clock

        async def jump() -> None:
            clock.jump(seconds)

        self.perform(jump, concurrent=False)

    @precondition(lambda self: len(self.held) < 3)
    @rule(after=st.booleans())
    def hold_next_upload(self, after: bool) -> None:
        """The next upload to start is held in flight, before its PUT reaches the
        store or (``after``) once the object is stored, until released."""
        STATS.held += 1
        self.held.append(self.faulty.hang("upload", after=after))

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 2))
    def release_held(self, index: int) -> None:
        STATS.steps += 1
        fault = self.held.pop(index % len(self.held))

        async def release() -> None:
            fault.release()

        self.perform(release, concurrent=False)

    @precondition(lambda self: self.held)
    @rule()
    def land_uploads(self) -> None:
        """Every held upload goes on and lands."""
        STATS.steps += 1
        held, self.held = self.held, []

        async def release() -> None:
            for fault in held:
                fault.release()

        self.perform(release, concurrent=False)

    @precondition(lambda self: len(self.failing) < 4)
    @rule(times=st.integers(1, 3), after=st.booleans())
    def fail_next_uploads(self, times: int, after: bool) -> None:
        """The next ``times`` uploads fail transiently (``after``: once the object
        is stored, the reply lost); the mount retries them."""
        STATS.failures_injected += 1
        self.failing.append(self.faulty.fail("upload", times=times, after=after))

    @rule(
        kind=st.sampled_from(("release", "due")),
        lag=st.integers(0, 12),
        schedule=st.integers(0, 2**16),
    )
    def arm_concurrent(self, kind: str, lag: int, schedule: int) -> None:
        """The next operation runs while a held upload is released (or queued
        uploads come due), ``lag`` scheduling points after it starts, trio
        ordering the tasks ready together by ``schedule``."""
        STATS.concurrent += 1
        self.concurrent = (kind, lag, schedule)

    # --- rules: remount and crash -------------------------------------------------------

    def _stop_mount(self, *, crash: bool) -> None:
        mount = self.mount
        assert mount is not None
        self.held, self.failing, self.concurrent = [], [], None

        async def stop() -> None:
            if crash:  # held uploads die with the process
                await mount.stop(crash=True)
                self.faulty.clear()
            else:  # held uploads go on, injected failures are gone
                self.faulty.clear()
                await mount.stop(crash=False)

        self.perform(stop, concurrent=False)
        for handle in self.handles:
            os.close(handle.fd)
        self.handles = []
        self.mount = self.kernel = None

    @precondition(heavy_due)
    @rule(fresh_cache=st.sampled_from((False, False, True)))
    def remount(self, fresh_cache: bool) -> None:
        """Unmount (open handles released, uploads drained) and mount again, with
        the same cache directory or (``fresh_cache``) an empty one: everything
        reads back exactly, from S3."""
        STATS.steps += 1
        STATS.remounts += 1
        self._stop_mount(crash=False)
        leftovers = [
            p.name for p in (self.base / "journal").iterdir() if p.suffix in (".data", ".json")
        ]
        assert leftovers == [], f"the journal keeps {leftovers} after a clean unmount"
        self._start_mount(fresh_cache=fresh_cache)
        self.compare_all()
        for path in self.existing()["file"]:
            st = (self.local / path).stat()
            self.history(st.st_ino).acknowledged(self.content_at(path), stat.S_IMODE(st.st_mode))

    @precondition(heavy_due)
    @rule()
    def crash_and_recover(self) -> None:
        """The process dies (nothing drained or closed); the next mount recovers
        the journal. See the module docstring for what must come back."""
        STATS.steps += 1
        STATS.crashes += 1
        self._stop_mount(crash=True)
        self._start_mount()
        kernel = self.kernel
        assert kernel is not None
        got = self.perform(kernel.tree, concurrent=False)
        self.since_heavy = 0
        expected = self.local_tree()
        problems: list[str] = []
        for path in sorted(set(got) - set(expected)):
            problems.append(f"{path}: the mount shows it, the model has no such entry")
        for path, entry in sorted(expected.items()):
            shown = got.get(path)
            target = self.local / path
            if entry.kind == "dir":
                if shown is None or shown.kind != "dir" or shown.mode != entry.mode:
                    problems.append(f"{path}: directory {entry}, the mount shows {shown}")
                continue
            history = self.history(target.stat().st_ino)
            if shown is None:
                if history.acked:
                    problems.append(f"{path}: acknowledged, gone after the crash")
                else:
                    target.unlink()
                continue
            modes = history.modes
            if shown.kind != "file" or shown.content not in history.since:
                versions = [len(v) for v in history.since]
                problems.append(
                    f"{path}: after the crash the mount shows {_describe(shown)}, not one of its "
                    f"versions since the last acknowledgement (sizes {versions}, "
                    f"acknowledged={history.acked})"
                )
                continue
            if shown.mode not in modes:
                listed = " or ".join(f"{m:o}" for m in modes)
                problems.append(f"{path}: mode {shown.mode:o} after the crash, not {listed}")
                continue
            assert shown.content is not None
            if shown.content != entry.content:
                target.write_bytes(shown.content)
            os.chmod(target, shown.mode)
            # The model takes the mtime shown: one a utime set, or "now".
            if shown.mtime_ns is None:
                os.utime(target)
            else:
                os.utime(target, ns=(shown.mtime_ns, shown.mtime_ns))
            history.acknowledged(shown.content, shown.mode)
        assert not problems, "after crash and recovery:\n  " + "\n  ".join(problems)

    # --- comparing -----------------------------------------------------------------------

    def local_tree(self) -> dict[str, Entry]:
        tree: dict[str, Entry] = {}
        for dirpath, dirs, files in os.walk(self.local):
            rel = os.path.relpath(dirpath, self.local)
            for name in dirs + files:
                path = name if rel == "." else f"{rel}/{name}"
                entry = Entry.of_stat((self.local / path).stat())
                if entry.kind == "file":
                    entry.content = (self.local / path).read_bytes()
                tree[path] = entry
        return tree

    def compare_paths(self, what: str, paths: list[str]) -> None:
        """What the mount shows at ``paths`` is what the model has there."""

        async def shown(k: Kernel, path: str) -> Entry:
            node = await k.fs.getattr((await k.node(path)).ino)
            entry = Entry.of_node(node)
            if node.kind is NodeKind.FILE:
                entry.content = await k.read_file(node)
            return entry

        for path in paths:
            target = self.local / path
            expected = _local(lambda target=target: Entry.of_stat(target.stat()))
            if expected[0] == "ok" and expected[1].kind == "file":
                expected[1].content = target.read_bytes()
            got = self.remote(lambda k, path=path: shown(k, path))
            same = expected[1].matches(got[1]) if expected[0] == got[0] == "ok" else got == expected
            assert same, f"after {what}: {path} is {expected!r} in the model, the mount {got!r}"

    def compare_all(self) -> None:
        """The whole tree, every file's bytes: the mount shows what the model has."""
        self.since_heavy = 0
        kernel = self.kernel
        assert kernel is not None
        got = self.perform(kernel.tree, concurrent=False)
        expected = self.local_tree()
        problems = [
            f"{p}: only in the mount ({_describe(got[p])})"
            for p in sorted(set(got) - set(expected))
        ]
        for path, entry in sorted(expected.items()):
            shown = got.get(path)
            if shown is None:
                problems.append(f"{path}: missing from the mount")
            elif not entry.matches(shown):
                problems.append(
                    f"{path}: the model has {_describe(entry)}, the mount {_describe(shown)}"
                )
        assert not problems, "the mount differs from the model:\n  " + "\n  ".join(problems)

    def count_deltas(self) -> None:
        """The deltas of the final bucket, and of them the deep ones (dgfs-format
        deep-1, not the zero-diff of the file a reference.deep was made from):
        those with spans (version 2), and those whose expansion inflated something."""
        for key, stored in self.memory.objects.items():
            if not key.endswith(fmt.DELTA_SUFFIX):
                continue
            STATS.deltas += 1
            meta = stored.metadata
            if not fmt.is_deep(meta) or meta.get("dg-note") == fmt.ZERO_DIFF_NOTE:
                continue
            STATS.deep_deltas += 1
            STATS.deep_span_deltas += stored.body.startswith(fmt.DEEP_DELTA_SPANS_MAGIC)
            expanded = int(meta.get(fmt.META_EXPANDED_SIZE, "0"))
            STATS.deep_expanded_deltas += expanded > int(meta.get("dg-file-size", "0"))

    def teardown(self) -> None:
        try:
            # Unless a step failed (its error is on its way): all must come back.
            if sys.exc_info()[1] is None and self.mount is not None:
                for handle in list(self.handles):
                    self.handles.remove(handle)
                    self.remote(lambda k, fh=handle.fh: k.close(fh))
                    self.acknowledged(handle)
                    os.close(handle.fd)
                self.remount(fresh_cache=True)
                self.count_deltas()
                self._stop_mount(crash=False)
        finally:
            for handle in self.handles:
                os.close(handle.fd)
            self.loop.stop()
            shutil.rmtree(self.base, ignore_errors=True)


class FsDeepModel(FsModel):
    """The model over deep mode (``Core(deltas=DEEP)``): names of each archive
    kind, real archives of a family written to them (``Release``), so that a
    directory's reference.deep is an expanded archive and later ones deep
    deltas against it; random writes and truncations corrupt them as before."""

    deltas = fmt.DeltaMode.DEEP
    names = DEEP_NAMES
    paths = DEEP_PATHS
    limits = DEEP_LIMITS

    def __init__(self) -> None:
        # The process's verdicts on compressed spans: each example starts as a
        # new process does, whatever ran before (a failure replays alike).
        VERIFIED_SPANS.clear()
        self.mounts = 0
        super().__init__()

    def mount_deltas(self) -> fmt.DeltaMode:
        """Every third mount is a DeltaGlider one (``-o deltas=dg``): it writes
        into deep directories and makes DeltaGlider ones, which the deep
        mounts after it write into (a directory keeps its mode: docs/FORMAT.md)."""
        self.mounts += 1
        return fmt.DeltaMode.DG if self.mounts % 3 == 0 else fmt.DeltaMode.DEEP

    @initialize(
        first=releases,
        second=releases,
        third=releases,
        small=small_contents,
    )
    def populate(  # type: ignore[override]
        self, first: Release, second: Release, third: Release, small: bytes
    ) -> None:
        """A directory with releases of each kind, a small file beside."""
        self.mkdir_path("d", 0o755)
        for path, release in (("d/x.zip", first), ("d/y.whl", second), ("d/p.tar.gz", third)):
            self.create_path(path, release.render(path), keep_open=False)
        self.create_path("a", small, keep_open=False)

    @rule(
        data=st.data(),
        content=deep_contents,
        exclusive=st.booleans(),
        keep_open=st.booleans(),
        racing=st.booleans(),
    )
    def create(  # type: ignore[override]
        self,
        data: st.DataObject,
        content: Release | Plain,
        exclusive: bool,
        keep_open: bool,
        racing: bool,
    ) -> None:
        if keep_open and len(self.handles) >= 6:
            keep_open = False
        path = self.any_path(data, ("file",))
        self.create_path(
            path, content.render(path), keep_open=keep_open, exclusive=exclusive, racing=racing
        )

    @rule(data=st.data(), content=deep_contents, close_first=st.booleans())
    def save_atomically(  # type: ignore[override]
        self, data: st.DataObject, content: Release | Plain, close_first: bool
    ) -> None:
        self.save_as(data, content.render, close_first, target_first=True)

    def _stop_mount(self, *, crash: bool) -> None:
        super()._stop_mount(crash=crash)
        if crash:  # the process died with what it had proven
            VERIFIED_SPANS.clear()

    def _start_mount(self, *, fresh_cache: bool = False) -> None:
        if fresh_cache:  # the verdicts are kept in the cache directory
            VERIFIED_SPANS.clear()
        super()._start_mount(fresh_cache=fresh_cache)


def _describe(entry: Entry) -> str:
    content = entry.content
    if content is None:
        return f"{entry.kind} mode {entry.mode:o}"
    head = content[:24]
    return (
        f"{entry.kind} mode {entry.mode:o}, {len(content)} bytes {head!r}"
        f"{'...' if len(content) > 24 else ''}, mtime {entry.mtime_ns}"
    )


def _truncated(file: int | Path, size: int) -> None:
    """truncate (or, given a descriptor, ftruncate) as ext4 does it: the times
    are marked even when the size stays (tmpfs, where the model may live,
    leaves them when an empty file is truncated to 0; POSIX allows either)."""
    os.truncate(file, size)
    os.utime(file)


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# --- running it -----------------------------------------------------------------------


def _settings(examples: int, *, derandomize: bool) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=EXAMPLE_STEPS,
        deadline=None,
        derandomize=derandomize,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
        phases=(Phase.explicit, Phase.reuse, Phase.generate) + ((Phase.shrink,) if SHRINK else ()),
    )


@pytest.fixture
def dgfs_log_watch() -> Iterator[None]:
    logger = logging.getLogger("dgfs")
    UNEXPECTED.records.clear()
    logger.addHandler(UNEXPECTED)
    try:
        yield
    finally:
        logger.removeHandler(UNEXPECTED)


def _described(exc: BaseException) -> str:
    """An error with what Hypothesis noted on it (the steps, the blob), and
    the same for each error of a group (distinct failures)."""
    text = "\n".join([f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", ())])
    if isinstance(exc, BaseExceptionGroup):
        text += "".join(f"\n--- {_described(sub)}" for sub in exc.exceptions)
    return text


def _report(started: float, label: str) -> str:
    return (
        f"{label}: {STATS.examples} examples, {STATS.steps} steps in "
        f"{time.monotonic() - started:.1f}s; {STATS.remounts} remounts, {STATS.crashes} crashes, "
        f"{STATS.held} uploads held, {STATS.failures_injected} failures injected, "
        f"{STATS.concurrent} concurrent events, {STATS.deltas} deltas in the final buckets "
        f"({STATS.deep_deltas} deep: {STATS.deep_expanded_deltas} of expanded archives, "
        f"{STATS.deep_span_deltas} with spans); "
        f"outcomes: {dict(sorted(STATS.outcomes.items()))}"
    )


def test_filesystem_matches_local_model(inline_workers: None, dgfs_log_watch: None) -> None:
    """Thousands of random steps give the same results on ``FileSystem`` as on disk,
    and every acknowledged write survives remounts and crashes."""
    model = FsDeepModel if DELTAS is fmt.DeltaMode.DEEP else FsModel
    _run_model(model, CI_EXAMPLES, min_steps=10_000)


def test_deep_filesystem_matches_local_model(inline_workers: None, dgfs_log_watch: None) -> None:
    """The same over deep mode: real archives stored as deep deltas of their
    expanded forms, rebuilt bit for bit, through remounts and crashes."""
    if _LONG_STEPS or REPRODUCE or DELTAS is fmt.DeltaMode.DEEP:
        pytest.skip("DGFS_FS_MODEL_DELTAS=deep runs it as test_filesystem_matches_local_model")
    _run_model(FsDeepModel, DEEP_CI_EXAMPLES, min_steps=2_000)


def _run_model(model: type[FsModel], ci_examples: int, *, min_steps: int) -> None:
    global STATS
    STATS = Stats()
    os.umask(UMASK)
    started = time.monotonic()
    deep = model.deltas is fmt.DeltaMode.DEEP
    label = "fs model (deep)" if deep else "fs model"
    if REPRODUCE:
        machine: Any = reproduce_failure(hypothesis.__version__, REPRODUCE.encode())(
            type(f"{model.__name__}Replay", (model,), {})
        )
        if os.environ.get("DGFS_FS_MODEL_SEED"):
            machine = seed(FIRST_SEED)(machine)
        run_state_machine_as_test(machine, settings=_settings(1, derandomize=False))
        return
    if not _LONG_STEPS:
        run_state_machine_as_test(model, settings=_settings(ci_examples, derandomize=True))
        print("\n" + _report(started, label))
        assert STATS.steps >= min_steps, "the model ran too few steps to mean much"
        assert STATS.deltas > 0, "nothing was stored as a delta: the model missed dgfs's core"
        if deep:
            # Deltas of expanded archives, some of them with spans of the reference.
            assert STATS.deep_expanded_deltas > 0, "no deep delta of an expanded archive"
            assert STATS.deep_span_deltas > 0, "no deep delta took spans of its reference"
        return
    # Long mode: seed after seed, each with its share of the steps, at least SEEDS
    # of them; a seed that fails is reported and the next one runs.
    per_seed = max(1, _LONG_STEPS // SEEDS)
    failed: list[int] = []
    for number in itertools.count(FIRST_SEED):
        before = STATS.steps
        machine = seed(number)(type(f"{model.__name__}Seed{number}", (model,), {}))
        # An example runs about three operations (steps) for every four rules.
        examples = max(1, per_seed * 4 // (EXAMPLE_STEPS * 3))
        outcome = "no divergence"
        try:
            run_state_machine_as_test(machine, settings=_settings(examples, derandomize=False))
        except Exception as exc:
            failed.append(number)
            outcome = f"DIVERGED (replay: DGFS_FS_MODEL_SEED={number}):\n{_described(exc)}"
        print(f"\nseed {number}: {STATS.steps - before} steps, {outcome}", flush=True)
        if number - FIRST_SEED + 1 >= SEEDS and STATS.steps >= _LONG_STEPS:
            break
    print("\n" + _report(started, f"{label}, long mode ({number - FIRST_SEED + 1} seeds)"))
    assert not failed, f"seeds {failed} diverged (see above)"
