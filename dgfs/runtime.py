"""Wiring of the storage core from user settings (used by the mount and the CLI).

``Settings`` holds what the storage core is configured with (the S3
connection, cache, policy, delta mode and limits: the options
``dgfs.cli.options`` maps to ``settings.*``, ``policy.*`` and
``expansion.*``; the filesystem's are ``FsOptions``, the mount's
``MountConfig``); ``open_core`` builds the store, cache, delta engine and
policy from it and closes them again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from dgfs import deep, environment
from dgfs.cache import ContentCache
from dgfs.core import Core
from dgfs.crypto import load_cache_key
from dgfs.deep import ExpansionLimits
from dgfs.delta import DeltaEngine
from dgfs.errors import ConfigError
from dgfs.format import DeltaMode
from dgfs.policy import Policy
from dgfs.proxycrypt import load_proxy_key
from dgfs.store.s3 import READ_TIMEOUT, S3Store
from dgfs.telemetry import Telemetry

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 2 << 30


def default_cache_dir() -> Path:
    base = environment.cache_home() or (
        "/var/cache" if os.geteuid() == 0 else str(Path.home() / ".cache")
    )
    return Path(base) / "dgfs"


def private_cache_root(cache_dir: Path) -> Path:
    """The directory that holds the cache, journal, scratch space, attribute
    cache and log for the ``cache_dir`` option; created if need be.

    ``cache_dir`` itself when dgfs creates it now, or when it is private
    already (this user's, closed to group and others: what dgfs made
    before). A directory other users have a say in (``/tmp``,
    ``/var/cache``) is never used directly, nor is its mode changed: dgfs
    keeps its files in a subdirectory ``dgfs-UID`` it creates there
    (logged once). ``ConfigError`` when that cannot be done, or when
    ``dgfs-UID`` exists and is not this user's private directory (another
    user made it, or it is a symlink).
    """

    def refused(exc: OSError) -> ConfigError:
        return ConfigError(f"cannot use cache directory {cache_dir}: {exc.strerror}")

    try:
        cache_dir.mkdir(mode=0o700, parents=True)
        os.chmod(cache_dir, 0o700)  # dgfs made it: mkdir's mode went through the umask
        return cache_dir
    except FileExistsError:
        pass
    except OSError as exc:
        raise refused(exc) from None
    try:
        st = os.stat(cache_dir)  # the user's own path: a symlink they made is followed
    except OSError as exc:
        raise refused(exc) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"cache directory {cache_dir} is not a directory")
    if st.st_uid == os.geteuid() and not st.st_mode & 0o077:
        return cache_dir
    try:
        return _private_subdirectory(cache_dir, st)
    except OSError as exc:
        raise refused(exc) from None


def _private_subdirectory(cache_dir: Path, st: os.stat_result) -> Path:
    """``cache_dir/dgfs-UID`` of a shared ``cache_dir`` (stat ``st``): made, checked, logged."""
    private = cache_dir / f"dgfs-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        private.mkdir(mode=0o700)
        os.chmod(private, 0o700)
    own = os.lstat(private)  # not followed: someone else may have planted it
    if not (stat.S_ISDIR(own.st_mode) and own.st_uid == os.geteuid() and not own.st_mode & 0o077):
        raise ConfigError(
            f"cache directory {cache_dir} is shared (mode {stat.S_IMODE(st.st_mode):04o},"
            f" owner uid {st.st_uid}) and {private} is not this user's private directory:"
            " give cache_dir a directory of your own"
        )
    if (cache_dir / "journal").is_dir():
        log.warning(
            "cache directory %s is not private (mode %04o, owner uid %d): dgfs keeps its"
            " files in %s; a journal an earlier version left in %s is not read: chmod 700 %s"
            " to use it again",
            cache_dir,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            private,
            cache_dir / "journal",
            cache_dir,
        )
    else:
        log.info(
            "cache directory %s is shared (mode %04o): dgfs keeps its files in %s",
            cache_dir,
            stat.S_IMODE(st.st_mode),
            private,
        )
    return private


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"1048576"`` -> bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * (1 << (10 * " kmgt".index(unit or " "))))


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` or ``bucket/prefix`` split; ``prefix`` has no slashes at the ends."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> S3Location:
        body = text.removeprefix("s3://")
        bucket, _, prefix = body.partition("/")
        if not bucket or not re.fullmatch(r"[A-Za-z0-9._-]{1,255}", bucket):
            raise ConfigError(f"bad bucket in {text!r}: expected s3://BUCKET[/PREFIX] or BUCKET")
        return cls(bucket, prefix.strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class Settings:
    """What a user can set, from options and ``DG_*`` environment variables."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_size: int = DEFAULT_CACHE_SIZE
    cache_key_file: Path | None = None
    proxy_key_file: Path | None = None
    """deltaglider_proxy's encryption key, to read the objects it encrypted (dgfs/proxycrypt.py)."""
    policy: Policy = field(default_factory=Policy)
    xdelta3: str = "xdelta3"
    xdelta_memory: int = 1 << 30
    xdelta_level: int = 9
    """xdelta3's encoding level (1-9); docs/configuration.md measures 6 against 9."""
    s3_concurrency: int = 16
    s3_timeout: float = READ_TIMEOUT
    """Seconds to wait for each read from the S3 endpoint before the request is retried."""
    deltas: DeltaMode = DeltaMode.DG
    """Mode of new deltaspaces: DeltaGlider v6 (``dg``) or dgfs's ``deep`` extension."""
    expansion: ExpansionLimits = field(default_factory=ExpansionLimits)
    """How far a file may be expanded for a deep delta, and an object rebuilt from one."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: object) -> Settings:
        settings = cls(
            endpoint_url=environment.endpoint_url(environ),
            policy=Policy.from_env(environ),
        )
        return replace(settings, **overrides)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def open_store(
    location: S3Location, settings: Settings, telemetry: Telemetry | None = None
) -> AsyncIterator[S3Store]:
    store = S3Store(
        location.bucket,
        endpoint_url=settings.endpoint_url,
        region=settings.region,
        profile=settings.profile,
        max_concurrency=settings.s3_concurrency,
        telemetry=telemetry,
        read_timeout=settings.s3_timeout,
    )
    try:
        yield store
    finally:
        # Retries mean a flaky endpoint: operators (and the fault tests) read this line.
        log.info("s3://%s: %s", location.bucket, store.telemetry.snapshot().s3_summary())
        await store.aclose()


@contextlib.asynccontextmanager
async def open_core(
    location: S3Location,
    settings: Settings,
    *,
    check_bucket: bool = True,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[Core]:
    """A ready ``Core`` on ``location.bucket``; everything is released on exit.

    The store, the cache and the core count into ``telemetry`` (a new one if None).

    Checks xdelta3 and the bucket first so a user's mistake fails fast
    with one clear message.
    """
    telemetry = telemetry or Telemetry()
    engine = DeltaEngine(
        settings.xdelta3, memory_limit=settings.xdelta_memory, level=settings.xdelta_level
    )
    engine.check()
    proxy_key = load_proxy_key(settings.proxy_key_file) if settings.proxy_key_file else None
    root = private_cache_root(settings.cache_dir)
    cache, ephemeral = _open_cache(root, settings, telemetry)
    # What earlier processes on this cache_dir proved, loaded by the first
    # expansion (dgfs.deep.remember).
    deep.keep_verified_spans_in(root)
    # Scratch (staging, deltas, decrypted references) sits beside the cache,
    # on disk rather than a possibly small tmpfs.
    scratch, scratch_lock = new_scratch(root)
    try:
        async with open_store(location, settings, telemetry) as store:
            if check_bucket:
                await store.check_bucket()
            core = Core(
                store,
                cache,
                engine,
                settings.policy,
                scratch_dir=scratch,
                deltas=settings.deltas,
                telemetry=telemetry,
                limits=settings.expansion,
                proxy_key=proxy_key,
            )
            try:
                yield core
            finally:
                await core.aclose()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(deep.save_kept_verified_spans)
        cache.close()
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(scratch_lock)
        if ephemeral:
            shutil.rmtree(cache.directory, ignore_errors=True)


def _open_cache(root: Path, settings: Settings, telemetry: Telemetry) -> tuple[ContentCache, bool]:
    """``(cache, ephemeral)``: the content cache under ``root``, ``content/`` with a
    persistent key, else (ephemeral) a directory of this process's own."""
    key = load_cache_key(None, settings.cache_key_file)
    _remove_dead_ephemeral_caches(root)
    if key:
        cache_dir = root / "content"
        try:
            return ContentCache(cache_dir, settings.cache_size, key, telemetry=telemetry), False
        except ConfigError:
            # The persistent cache is held by a mount; this process (a CLI
            # command beside it, say) gets a private one instead of failing.
            log.info("cache %s is in use; using a private cache for this process", cache_dir)
    # An ephemeral key cannot read another process's entries: such a cache
    # lives in a directory of this process's own, named by its PID and a
    # random part (a process of the same PID in another PID namespace, as
    # in a container sharing the cache_dir volume, gets another).
    ephemeral_dir = Path(tempfile.mkdtemp(prefix=f"content-ephemeral-{os.getpid()}-", dir=root))
    return ContentCache(ephemeral_dir, settings.cache_size, None, telemetry=telemetry), True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: The file a process holds ``flock``ed in its ephemeral cache (``ContentCache``)
#: and its scratch directory while it uses them.
_LOCK_NAME = "lock"


def new_scratch(root: Path) -> tuple[Path, int]:
    """A scratch directory of this process's own under ``root/scratch`` and
    the descriptor of its lock, held until the caller closes it: another
    process (in another PID namespace too, where this PID means nothing)
    sees the directory is in use (``_remove_dead_ephemeral_caches``)."""
    (root / "scratch").mkdir(mode=0o700, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root / "scratch"))
    lock = os.open(scratch / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    return scratch, lock


def _in_use(path: Path) -> bool | None:
    """Whether a process holds ``path``'s lock file (None: it has none, as
    directories of older dgfs versions)."""
    try:
        fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return True  # cannot tell: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (releases the lock if taken)
    return False


def _remove_dead_ephemeral_caches(root: Path) -> None:
    """Ephemeral caches and scratch dirs of processes that died without
    cleaning up: their lock is free (a PID says nothing across PID
    namespaces, e.g. containers sharing a cache_dir volume); a directory
    without a lock file is judged by its PID."""
    for pattern, parse in (
        ("content-ephemeral-*", lambda name: name.split("-")[2]),
        ("scratch/*-*", lambda name: name.split("-", 1)[0]),
    ):
        for path in root.glob(pattern):
            held = _in_use(path)
            pid_text = parse(path.name)
            if held is None:
                held = not pid_text.isdigit() or _pid_alive(int(pid_text))
            if not held:
                log.info("removing %s left by a dead process", path)
                shutil.rmtree(path, ignore_errors=True)
