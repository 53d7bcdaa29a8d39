"""A randomized model test: a real mount and a local directory in lockstep.

Hypothesis's ``RuleBasedStateMachine`` drives the same POSIX calls
(create, write at an offset, append, truncate, rename of files and
directories over existing targets, unlink, mkdir/rmdir, symlink, chmod,
utime, fsync, reads, listings, and remounts with the same or a fresh
cache) on a dgfs mount and on a directory of the local disk, and fails
on the first difference in results or errno. The local directory is the
model: it is what POSIX says. Only what docs/SEMANTICS.md promises is
compared; where dgfs documents a difference (directory mtimes after a remount, atime,
``st_nlink`` of directories) the model expects dgfs's documented
behaviour instead, and says so where it does.

One mount serves every example (mounting is the expensive part): each
example works in a fresh directory of it, and only the remount rule
remounts. The run is derandomized, so CI sees the same few thousand
steps every time. ``DGFS_MODEL_EXAMPLES=N`` (and optionally
``DGFS_MODEL_STEPS=M``) runs N examples of M steps by hand, still
seeded (``DGFS_MODEL_SEED`` picks another sequence).
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import random
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from tests.mountutil import DgfsMount, Mounts
from testsupport.releases import ReleaseSeries

pytestmark = [pytest.mark.mount, pytest.mark.timeout(3600)]

_LONG_EXAMPLES = int(os.environ.get("DGFS_MODEL_EXAMPLES", "0"))
EXAMPLES = _LONG_EXAMPLES or 100
STEPS = int(os.environ.get("DGFS_MODEL_STEPS", "0")) or 60
SEED = int(os.environ.get("DGFS_MODEL_SEED", "0"))
# Shrinking a failure on a real mount takes minutes; DGFS_MODEL_SHRINK=0 skips it.
SHRINK = os.environ.get("DGFS_MODEL_SHRINK", "1") != "0"
# A remount costs about a second (unmount drains uploads); one every this
# many steps (over all examples) keeps the CI run short.
REMOUNT_EVERY = 120

# A small name space so that operations collide: files, directories and
# symlinks compete for the same names, and paths cross each other.
NAMES = ("a", "b", "c.zip")
PATHS = tuple(
    "/".join(parts) for depth in (1, 2, 3) for parts in itertools.product(NAMES, repeat=depth)
)
# Symlink targets stay inside the example's directory whatever the
# symlink's depth (no ".."), so following one never leaves the model.
LINK_TARGETS = ("a", "b", "c.zip", "a/b", "nowhere")
FILES = ("file",)
MODES = (0o644, 0o600, 0o755, 0o700, 0o444, 0o000, 0o2755, 0o1777, 0o4755)
# utime sets times in 2001..2011; anything a write leaves is "now". A file
# whose model mtime is in this range was last set by utime, and the mount
# must show exactly that value.
UTIME_RANGE = (978_307_200 * 10**9, 1_300_000_000 * 10**9)
NATURAL_AFTER_NS = 1_600_000_000 * 10**9


def _release_zips() -> list[bytes]:
    """Consecutive zips of one project: same-directory copies share most bytes,
    so the mount stores them as deltas against one reference."""
    return [data for _, data in ReleaseSeries(size=160 << 10, seed=9).zips(6)]


RELEASES = _release_zips()


def make_content(kind: str, seed: int) -> bytes:
    """Bytes for a draw: a (slightly edited) release zip, small random bytes, or nothing."""
    rng = random.Random(seed)
    if kind == "release":
        data = bytearray(RELEASES[seed % len(RELEASES)])
        for _ in range(rng.randrange(3)):  # a few local edits, as a rebuilt release has
            at = rng.randrange(len(data))
            data[at : at + 64] = rng.randbytes(64)
        return bytes(data)
    if kind == "small":
        return rng.randbytes(rng.randrange(1, 3000))
    return b""


contents = st.builds(
    make_content, st.sampled_from(["release", "small", "small", "empty"]), st.integers(0, 2**31)
)
offsets = st.one_of(st.integers(0, 400), st.integers(0, 200_000))
sizes = st.one_of(st.integers(0, 400), st.integers(0, 200_000))
utimes = st.integers(*UTIME_RANGE)


@dataclass
class World:
    """What every example shares: the one mount and the local base directory."""

    mount: DgfsMount
    local_base: Path
    cache_base: Path
    examples: int = 0
    steps: int = 0
    steps_at_remount: int = 0
    remounts: int = 0
    fresh_caches: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)  # "rule ok" / "rule ENOENT" -> count


WORLD: World | None = None


def _world() -> World:
    assert WORLD is not None, "the model runs only inside test_mount_matches_local_model"
    return WORLD


Outcome = tuple[str, Any]


def _run(fn: Callable[[Path], Any], root: Path) -> Outcome:
    try:
        return ("ok", fn(root))
    except OSError as exc:
        return ("error", errno.errorcode.get(exc.errno or 0, str(exc.errno)))


def _makedirs(path: str, root: Path) -> None:
    os.makedirs(root / path, exist_ok=True)


def _write_file(path: str, content: bytes, root: Path) -> None:
    (root / path).write_bytes(content)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class MountModel(RuleBasedStateMachine):
    """One example: a fresh directory on the mount and one on the local disk."""

    def __init__(self) -> None:
        super().__init__()
        world = _world()
        world.examples += 1
        name = f"ex{world.examples:05d}"
        self.local = world.local_base / name
        self.local.mkdir()
        self.mounted = world.mount.root / name
        self.mounted.mkdir()
        self.history: list[str] = []  # this example's operations, for failure messages

    # --- running one operation on both sides -----------------------------------------

    def both(self, what: str, fn: Callable[[Path], Any]) -> Outcome:
        """Run ``fn`` on the model and on the mount; the outcomes must be equal."""
        world = _world()
        world.steps += 1
        expected = _run(fn, self.local)
        got = _run(fn, self.mounted)
        result = "ok" if expected[0] == "ok" else expected[1]
        self.history.append(f"{time.strftime('%H:%M:%S')} {what}: {result}")
        key = f"{what.split()[0]} {result}"
        world.outcomes[key] = world.outcomes.get(key, 0) + 1
        assert got == expected, (
            f"{what}: local gave {expected!r}, the mount gave {got!r}\n{self.recent()}"
        )
        return expected

    def recent(self) -> str:
        """The example's last operations (timestamps match the daemon's log)."""
        return f"in {self.mounted.name}, after:\n  " + "\n  ".join(self.history[-25:])

    def existing(self) -> dict[str, list[str]]:
        """The example's entries by kind ("file", "dir", "link"), as the model has them."""
        found: dict[str, list[str]] = {"file": [], "dir": [], "link": []}
        for dirpath, dirs, files in os.walk(self.local):
            rel = os.path.relpath(dirpath, self.local)
            for entry in sorted(dirs + files):
                path = entry if rel == "." else f"{rel}/{entry}"
                mode = (self.local / path).lstat().st_mode
                kind = "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "file"
                found[kind].append(path)
        return found

    def any_path(
        self, data: st.DataObject, prefer: tuple[str, ...] = ("file", "dir", "link")
    ) -> str:
        """Mostly an existing entry (of a kind in ``prefer`` when there is one) or a
        new name in an existing directory; sometimes any path of the name space
        (through files, missing parents)."""
        known = self.existing()
        preferred = sorted(p for kind in prefer for p in known[kind])
        anything = sorted(p for paths in known.values() for p in paths)
        kind = data.draw(st.sampled_from(("existing", "existing", "existing", "new", "any")))
        if kind == "existing" and (preferred or anything):
            return data.draw(st.sampled_from(preferred or anything))
        if kind in ("existing", "new"):
            parent = data.draw(st.sampled_from(["", *known["dir"]]))
            name = data.draw(st.sampled_from(NAMES))
            return f"{parent}/{name}" if parent else name
        return data.draw(st.sampled_from(PATHS))

    # --- rules ---------------------------------------------------------------------

    @initialize(
        dirs=st.lists(st.sampled_from(("a", "b", "a/b", "b/c.zip")), max_size=3, unique=True),
        files=st.lists(st.tuples(st.sampled_from(PATHS[:12]), contents), max_size=4),
    )
    def populate(self, dirs: list[str], files: list[tuple[str, bytes]]) -> None:
        """A few directories and files to start from, so that the first steps
        meet existing names rather than ENOENT."""
        for path in dirs:
            self.both(f"mkdir {path}", functools.partial(_makedirs, path))
        for path, content in files:
            self.both(f"create {path}", functools.partial(_write_file, path, content))

    @rule(data=st.data(), content=contents, exclusive=st.booleans())
    def create(self, data: st.DataObject, content: bytes, exclusive: bool) -> None:
        path = self.any_path(data, FILES)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_EXCL if exclusive else 0)

        def op(root: Path) -> None:
            fd = os.open(root / path, flags, 0o644)
            try:
                _write_all(fd, content)
            finally:
                os.close(fd)

        self.both(f"create {path} ({len(content)} bytes, excl={exclusive})", op)

    @rule(data=st.data(), seed=st.integers(0, 2**31))
    def create_release(self, data: st.DataObject, seed: int) -> None:
        """A release copied in (``cp``): next to other releases of the same
        project, it is stored as a delta against the directory's reference."""
        path = self.any_path(data, FILES)
        content = make_content("release", seed)
        self.both(f"create {path} (release)", lambda root: (root / path).write_bytes(content))

    @rule(data=st.data(), content=contents, offset=offsets)
    def write_at(self, data: st.DataObject, content: bytes, offset: int) -> None:
        path = self.any_path(data, FILES)

        def op(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY)
            try:
                os.pwrite(fd, content, offset)
            finally:
                os.close(fd)

        self.both(f"pwrite {path} {len(content)} bytes at {offset}", op)

    @rule(data=st.data(), content=contents)
    def append(self, data: st.DataObject, content: bytes) -> None:
        path = self.any_path(data, FILES)

        def op(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY | os.O_APPEND)
            try:
                _write_all(fd, content)
            finally:
                os.close(fd)

        self.both(f"append {len(content)} bytes to {path}", op)

    @rule(data=st.data(), size=sizes, through_fd=st.booleans())
    def truncate(self, data: st.DataObject, size: int, through_fd: bool) -> None:
        path = self.any_path(data, FILES)

        def op(root: Path) -> None:
            if not through_fd:
                os.truncate(root / path, size)
                return
            fd = os.open(root / path, os.O_RDWR)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)

        self.both(f"truncate {path} to {size} (fd={through_fd})", op)

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        old, new = self.any_path(data), self.any_path(data)
        self.both(f"rename {old} -> {new}", lambda root: os.rename(root / old, root / new))

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self.any_path(data, ("file", "link"))
        self.both(f"unlink {path}", lambda root: os.unlink(root / path))

    @rule(data=st.data(), mode=st.sampled_from((0o755, 0o700, 0o777)))
    def mkdir(self, data: st.DataObject, mode: int) -> None:
        path = self.any_path(data)
        self.both(f"mkdir {path} {mode:o}", lambda root: os.mkdir(root / path, mode))

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = self.any_path(data, ("dir",))
        self.both(f"rmdir {path}", lambda root: os.rmdir(root / path))

    @rule(data=st.data(), link_to=st.sampled_from(LINK_TARGETS))
    def symlink(self, data: st.DataObject, link_to: str) -> None:
        path = self.any_path(data)
        self.both(f"symlink {path} -> {link_to}", lambda root: os.symlink(link_to, root / path))

    @rule(data=st.data(), mode=st.sampled_from(MODES))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self.any_path(data)
        self.both(f"chmod {mode:o} {path}", lambda root: os.chmod(root / path, mode))

    @rule(data=st.data(), atime=utimes, mtime=utimes)
    def utime(self, data: st.DataObject, atime: int, mtime: int) -> None:
        path = self.any_path(data)
        self.both(
            f"utime {path} mtime={mtime}", lambda root: os.utime(root / path, ns=(atime, mtime))
        )

    @rule(data=st.data())
    def fsync(self, data: st.DataObject) -> None:
        path = self.any_path(data, FILES)

        def op(root: Path) -> None:
            fd = os.open(root / path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        self.both(f"fsync {path}", op)

    @rule(data=st.data(), offset=offsets, length=st.integers(0, 70_000), whole=st.booleans())
    def read(self, data: st.DataObject, offset: int, length: int, whole: bool) -> None:
        path = self.any_path(data, FILES)

        def op(root: Path) -> bytes:
            if whole:
                return (root / path).read_bytes()
            fd = os.open(root / path, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

        self.both(f"read {path} ({'whole' if whole else f'{length} at {offset}'})", op)

    @rule(data=st.data(), content=contents, offset=offsets, replace=st.booleans())
    def write_while_unlinked(
        self, data: st.DataObject, content: bytes, offset: int, replace: bool
    ) -> None:
        """A file unlinked (or replaced by a rename) while open stays readable and
        writable through its handle (docs/SEMANTICS.md, as POSIX has it)."""
        path = self.any_path(data, FILES)
        other = self.any_path(data, FILES)

        def op(root: Path) -> bytes:
            fd = os.open(root / path, os.O_RDWR)
            try:
                if replace:
                    os.rename(root / other, root / path)
                else:
                    os.unlink(root / path)
                os.pwrite(fd, content, offset)
                return os.pread(fd, 1 << 20, 0)
            finally:
                os.close(fd)

        how = f"rename {other} over it" if replace else "unlink"
        self.both(f"open {path}, {how}, pwrite {len(content)} at {offset}, read", op)

    @rule(data=st.data())
    def listdir(self, data: st.DataObject) -> None:
        path = self.any_path(data, ("dir",)) if data.draw(st.booleans()) else ""
        self.both(f"listdir {path!r}", lambda root: sorted(os.listdir(root / path)))

    @rule(data=st.data())
    def readlink(self, data: st.DataObject) -> None:
        path = self.any_path(data, ("link",))
        self.both(f"readlink {path}", lambda root: os.readlink(root / path))

    @rule(data=st.data())
    def stat(self, data: st.DataObject) -> None:
        path = self.any_path(data)
        self.both(f"stat {path}", lambda root: os.stat(root / path).st_mode)
        self.compare_entry(path)

    @rule()
    def compare_tree(self) -> None:
        self.compare_all(contents=False)

    @rule(fresh_cache=st.booleans())
    def remount(self, fresh_cache: bool) -> None:
        """Unmount (uploads drain) and mount again: everything must read back from S3."""
        world = _world()
        # The budget is global state: it decides whether to act, never what
        # is drawn (a precondition on it would make hypothesis's replay flaky).
        if world.steps - world.steps_at_remount < REMOUNT_EVERY:
            return
        world.steps_at_remount = world.steps
        world.remounts += 1
        if fresh_cache:
            world.fresh_caches += 1
            world.mount.unmount()
            world.mount.check_log()
            world.mount.cache_dir = world.cache_base / f"cache{world.fresh_caches}"
        world.mount.remount()
        self.compare_all(contents=True)

    # --- comparing ---------------------------------------------------------------------

    def compare_entry(self, path: str) -> None:
        """lstat of ``path`` on both sides: what dgfs promises must be equal."""
        try:
            self._compare_entry(path)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.recent()}") from None

    def _compare_entry(self, path: str) -> None:
        expected = _run(lambda root: os.lstat(root / path), self.local)
        got = _run(lambda root: os.lstat(root / path), self.mounted)
        assert expected[0] == got[0], f"lstat {path}: local {expected}, mount {got}"
        if expected[0] == "error":
            assert got == expected, f"lstat {path}: local {expected}, mount {got}"
            return
        local, mounted = expected[1], got[1]
        assert stat.filemode(mounted.st_mode) == stat.filemode(local.st_mode), (
            f"mode of {path}: local {stat.filemode(local.st_mode)}, "
            f"mount {stat.filemode(mounted.st_mode)}"
        )
        if stat.S_ISDIR(local.st_mode):
            # Directory sizes and link counts are not promised (S3 has no
            # directories; dgfs shows 2 links). An mtime utime set, with no
            # entry changed since, shows exactly; one moved on by entries
            # changing is kept in memory only (a remount shows the stored
            # one), so it is not compared.
            if UTIME_RANGE[0] <= local.st_mtime_ns <= UTIME_RANGE[1]:
                assert mounted.st_mtime_ns == local.st_mtime_ns, f"mtime of dir {path}"
            return
        assert mounted.st_size == local.st_size, f"size of {path}"
        assert mounted.st_nlink == local.st_nlink == 1, f"nlink of {path}"
        if UTIME_RANGE[0] <= local.st_mtime_ns <= UTIME_RANGE[1]:
            assert mounted.st_mtime_ns == local.st_mtime_ns, (
                f"mtime of {path}: set by utime to {local.st_mtime_ns}, mount shows "
                f"{mounted.st_mtime_ns}"
            )
        elif not stat.S_ISLNK(local.st_mode):
            # Changed by a write since: the mount's mtime is "now" too.
            assert mounted.st_mtime_ns > NATURAL_AFTER_NS, (
                f"mtime of {path}: written recently, mount shows {mounted.st_mtime_ns}"
            )

    def compare_all(self, *, contents: bool) -> None:
        """Every entry of the example, listed, stat'ed and (optionally) read on both sides."""
        for dirpath, dirs, files in os.walk(self.local):
            rel = os.path.relpath(dirpath, self.local)
            rel = "" if rel == "." else rel
            assert sorted(os.listdir(self.mounted / rel)) == sorted(dirs + files), (
                f"listing of {rel!r}"
            )
            for name in dirs + files:
                path = f"{rel}/{name}" if rel else name
                self.compare_entry(path)
                local = self.local / path
                if stat.S_ISLNK(local.lstat().st_mode):
                    assert os.readlink(self.mounted / path) == os.readlink(local), path
                elif contents and local.is_file():
                    assert (self.mounted / path).read_bytes() == local.read_bytes(), (
                        f"content of {path}\n{self.recent()}"
                    )

    def teardown(self) -> None:
        try:
            self.compare_all(contents=True)
        finally:
            _world().mount.check_log()


def _settings() -> settings:
    return settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=SEED == 0,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
        phases=tuple(Phase) if SHRINK else (Phase.explicit, Phase.reuse, Phase.generate),
    )


@pytest.fixture
def world(mounts: Mounts, tmp_path: Path) -> Iterator[World]:
    global WORLD
    mount = mounts.mount(upload_delay="0.05")
    WORLD = World(mount=mount, local_base=tmp_path / "local", cache_base=tmp_path / "caches")
    WORLD.local_base.mkdir()
    WORLD.cache_base.mkdir()
    try:
        yield WORLD
    finally:
        WORLD = None


def test_mount_matches_local_model(world: World) -> None:
    """Thousands of random operations give the same results on the mount as on disk."""
    os.umask(0o022)
    started = time.monotonic()
    machine: Any = MountModel
    if SEED:
        machine = seed(SEED)(type("SeededMountModel", (MountModel,), {}))
    run_state_machine_as_test(machine, settings=_settings())
    elapsed = time.monotonic() - started
    # Uploads stored against an existing reference (not the one that made it).
    deltas = sum(
        "as delta:" in line and "new reference" not in line
        for line in world.mount.log_text().splitlines()
    )
    print(
        f"\nmodel: {world.examples} examples, {world.steps} operations, "
        f"{world.remounts} remounts ({world.fresh_caches} with a fresh cache) in {elapsed:.0f}s; "
        f"{deltas} uploads stored as deltas; "
        f"outcomes compared: {dict(sorted(world.outcomes.items()))}"
    )
    assert world.steps >= 1000 or _LONG_EXAMPLES, "the model ran too few operations to mean much"
    assert deltas > 0, "no release was stored as a delta: the model missed dgfs's core"
