"""Wiring of a mount: trio, pyfuse3, signals, readiness and an orderly unmount.

``mount`` runs in the foreground until the filesystem is unmounted (by
``umount``/``fusermount3 -u``, SIGTERM or SIGINT). After the kernel lets go
it keeps running until every committed upload is in S3, so a plain
``umount`` never drops data; whatever cannot be uploaded stays in the
journal and is uploaded by the next mount of the same bucket.
``daemonize`` forks first and returns in the parent only once the mount is
live (or failed, with the child's message).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from dgfs import readahead
from dgfs.background import contained
from dgfs.control import (
    SOCKET_NAME,
    MountFacts,
    open_control_listener,
    serve_control,
    status_document,
)
from dgfs.core import Core
from dgfs.errors import (
    AccessDenied,
    ConfigError,
    DgfsError,
    StoreError,
    UserError,
)
from dgfs.fs import attrcache
from dgfs.fs.filesystem import FileSystem
from dgfs.fs.fuse_ops import FuseOperations
from dgfs.fs.journal import Journal, journal_dir_for
from dgfs.fs.options import FsOptions
from dgfs.handoff import FD_NAME, check_fuse_fd, open_and_mount, unmount_lazily, user_ids
from dgfs.metrics import ListenAddress, make_registry, open_metrics_listener, serve_metrics
from dgfs.printable import PrintableFormatter
from dgfs.runtime import S3Location, Settings, open_core, private_cache_root
from dgfs.sdnotify import Notifier
from dgfs.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountConfig:
    location: S3Location
    mountpoint: Path
    settings: Settings
    fs_options: FsOptions = field(default_factory=FsOptions)
    allow_other: bool = False
    attr_timeout: float = 1.0
    metrics: ListenAddress | None = None  # serve Prometheus metrics there
    read_ahead_kb: int = readahead.DEFAULT_KIB  # 0: the kernel's default (dgfs/readahead.py)
    #: An open /dev/fuse already mounted on ``mountpoint`` by a privileged step
    #: (dgfs/handoff.py); None: libfuse mounts (itself as root, else fusermount3).
    fuse_fd: int | None = None


def check_mountpoint(mountpoint: Path) -> None:
    """A clear ``UserError`` for a mountpoint that cannot be used."""
    try:
        # statfs, not stat: the kernel answers a stat of a dead mount's root from
        # the attributes it cached (for attr_timeout), a statfs always asks the daemon.
        os.statvfs(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise ConfigError(
                f"mountpoint {mountpoint} is a dead FUSE mount (its daemon is gone):"
                f" run `fusermount3 -u {mountpoint}` first; files it had not uploaded"
                " are in the journal and this mount will upload them"
            ) from None
    if not mountpoint.exists():
        raise ConfigError(f"mountpoint {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise ConfigError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise ConfigError(f"mountpoint {mountpoint} is busy: something is already mounted there")
    if not os.path.exists("/dev/fuse"):
        raise ConfigError("/dev/fuse is missing: load the fuse module (modprobe fuse)")


def check_handed_over(mountpoint: Path, fuse_fd: int) -> None:
    """A clear ``ConfigError`` unless ``fuse_fd`` is /dev/fuse and a FUSE
    filesystem is mounted on ``mountpoint`` (read from mountinfo: touching the
    mount before this process serves it would wait for this process)."""
    check_fuse_fd(fuse_fd)
    try:
        mountinfo = readahead.MOUNTINFO.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {readahead.MOUNTINFO}: {exc.strerror}") from None
    if readahead.fuse_device(_mounted_path(mountpoint), mountinfo) is None:
        raise ConfigError(
            f"nothing is mounted on {mountpoint} for descriptor {fuse_fd}: the privileged"
            " step (dgfs mount ... --handoff USER) mounts it first"
        )


def _mounted_path(mountpoint: Path) -> Path:
    """``mountpoint`` as mountinfo shows it, without a lookup of the mount point
    itself (which, mounted already, only this process could answer)."""
    return Path(os.path.realpath(mountpoint.parent)) / mountpoint.name


async def _probe_store(core_store: object, read_only: bool) -> bool:
    """Whether conditional creates work; refuses a read-only credential for rw mounts."""
    from dgfs.store.base import ObjectStore

    assert isinstance(core_store, ObjectStore)
    if read_only:
        return True
    try:
        honoured = await core_store.probe_if_none_match()
    except AccessDenied:
        raise AccessDenied(
            f"cannot write to bucket {core_store.bucket}: credentials refused;"
            " mount with -o ro to read only"
        ) from None
    if not honoured:
        log.warning(
            "the store ignores If-None-Match: *; two mounts creating the first file of a"
            " directory at once race for its reference: the loser stores its file again,"
            " unless it was done before the winner's reference upload ended (see SEMANTICS.md)"
        )
    return honoured


#: Seconds between STATUS= updates while mounted.
STATUS_INTERVAL = 5.0
#: While a drain makes progress, each progress buys this many more seconds.
DRAIN_GRACE = 120.0


def _fuse_options(config: MountConfig) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.add(f"fsname=dgfs:{config.location.bucket}")
    opts.add("subtype=dgfs")
    # Modes come from the bucket, which anyone with write access to it controls:
    # a setuid-root binary or a device node there must not gain its powers here.
    opts |= {"nosuid", "nodev"}
    if config.allow_other:
        opts.add("allow_other")
    if config.fs_options.read_only:
        opts.add("ro")
    return opts


class _InterruptedReplyFilter(logging.Filter):
    """Show pyfuse3's "fuse_reply_* failed with No such file or directory" at DEBUG.

    libfuse returns ENOENT when the kernel no longer waits for the reply: the
    request was interrupted, or an asynchronous release was still being
    handled while the filesystem was unmounted. The operation itself ran;
    nothing is lost, so an ERROR line would only alarm.
    """

    _marker = f"fuse_reply_* failed with {os.strerror(errno.ENOENT)}"

    def filter(self, record: logging.LogRecord) -> bool:
        if self._marker in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


_PYFUSE3_FILTER = _InterruptedReplyFilter()


async def _set_read_ahead(mountpoint: Path, kib: int) -> None:
    """Set the kernel's read-ahead once the kernel has its answer to FUSE_INIT,
    which would otherwise lower it again: a ``stat`` of the root (served by
    this daemon, in a worker thread) is answered only after INIT."""

    def stat_then_set() -> None:
        with contextlib.suppress(OSError):
            os.stat(mountpoint)
        readahead.set_read_ahead(mountpoint, kib)

    with contained("setting read_ahead_kb", logger=log):
        await trio.to_thread.run_sync(stat_then_set, abandon_on_cancel=True)


async def _serve(config: MountConfig, on_ready: Callable[[], None]) -> None:
    settings = config.settings
    notifier = Notifier()
    logging.getLogger("pyfuse3").addFilter(_PYFUSE3_FILTER)  # once: filters are a set
    telemetry = Telemetry()
    async with open_core(config.location, settings, telemetry=telemetry) as core:
        fs, journal = await _open_filesystem(config, core, telemetry)
        facts = MountFacts(
            mountpoint=config.mountpoint,
            bucket=config.location.bucket,
            prefix=config.location.prefix,
            deltas=settings.deltas.value,
            read_only=config.fs_options.read_only,
            metrics=str(config.metrics) if config.metrics else None,
        )

        def document() -> dict[str, object]:
            return status_document(facts, fs, journal, telemetry)

        # Resolved before the mount exists: afterwards resolving it would ask this daemon.
        mounted_at = (
            _mounted_path(config.mountpoint)
            if config.fuse_fd is not None
            else Path(os.path.realpath(config.mountpoint))
        )
        control_path = journal.directory / SOCKET_NAME
        listeners = await _bind(config, fs, journal, control_path)
        fs.status_socket = str(control_path)
        if config.fuse_fd is not None:
            # libfuse owns the descriptor now; systemd's copy would keep the
            # connection alive (hanging, not "not connected") if this process died.
            notifier.remove_fd(FD_NAME)
        try:
            await _run_mounted(config, fs, listeners, document, notifier, on_ready, mounted_at)
        finally:
            for listener in listeners:
                listener.socket.close()  # no checkpoint: cleanup below must run
            control_path.unlink(missing_ok=True)
            await fs.close()
            journal.close()
            _log_leftovers(fs, journal)


async def _open_filesystem(
    config: MountConfig, core: Core, telemetry: Telemetry
) -> tuple[FileSystem, Journal]:
    """The filesystem over ``core``, with this mount's journal slot and attribute cache."""
    settings = config.settings
    core.conditional_create = await _probe_store(core.store, config.fs_options.read_only)
    journal_root = settings.cache_dir / "journal"
    journal = Journal.open_slot(
        journal_dir_for(
            journal_root, settings.endpoint_url, config.location.bucket, config.location.prefix
        ),
        telemetry=telemetry,
    )
    attr_cache = attrcache.for_slot(settings.cache_dir, journal.directory.name)
    fs = FileSystem(core, journal, attr_cache, config.fs_options, config.location.prefix)
    return fs, journal


async def _bind(
    config: MountConfig, fs: FileSystem, journal: Journal, control_path: Path
) -> list[trio.SocketListener]:
    """The control listener (then the metrics ones), then the mount itself.

    Both listeners exist before the mount does: a taken port or an unusable
    cache directory fails the mount, not its status later. On failure
    everything made here is undone and the journal closed.
    """
    # Handed over: libfuse serves the open descriptor and mounts nothing.
    fuse_target = (
        f"/dev/fd/{config.fuse_fd}" if config.fuse_fd is not None else str(config.mountpoint)
    )
    listeners: list[trio.SocketListener] = []
    try:
        listeners.append(await open_control_listener(control_path))
        if config.metrics is not None:
            listeners += await open_metrics_listener(config.metrics)
        ops = FuseOperations(fs, attr_timeout=config.attr_timeout)
        pyfuse3.init(ops, fuse_target, _fuse_options(config))
    except (RuntimeError, ConfigError) as exc:
        for listener in listeners:
            listener.socket.close()
        control_path.unlink(missing_ok=True)
        journal.close()
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot mount on {config.mountpoint}: {exc}") from None
    return listeners


async def _run_mounted(
    config: MountConfig,
    fs: FileSystem,
    listeners: list[trio.SocketListener],
    document: Callable[[], dict[str, object]],
    notifier: Notifier,
    on_ready: Callable[[], None],
    mounted_at: Path,
) -> None:
    """Serve until unmounted, then finish the uploads; the mount is gone on return."""
    unmounted = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, listeners[0], document)
            if config.metrics is not None:
                await nursery.start(serve_metrics, listeners[1:], make_registry(document))
            await nursery.start(fs.run_uploads)
            nursery.start_soon(_watch_signals, nursery.cancel_scope)
            await fs.recover_journal()
            log.info("mounted %s on %s", config.location, config.mountpoint)
            on_ready()
            notifier.ready(f"mounted {config.location} on {config.mountpoint}")
            reporting = trio.CancelScope()  # entered by the task, cancelled here
            nursery.start_soon(_report_status, fs, notifier, reporting)
            if config.read_ahead_kb > 0:
                nursery.start_soon(_set_read_ahead, mounted_at, config.read_ahead_kb)
            await pyfuse3.main()
            reporting.cancel()
            log.info("unmounted %s; finishing uploads", config.mountpoint)
            pyfuse3.close(unmount=True)
            unmounted = True
            notifier.stopping("unmounted; finishing uploads")
            draining = trio.CancelScope()
            nursery.start_soon(_report_drain, fs, notifier, draining)
            await fs.unmounted()
            await fs.wait_idle()
            draining.cancel()
            nursery.cancel_scope.cancel()
    finally:
        if not unmounted:
            pyfuse3.close(unmount=True)


def _log_leftovers(fs: FileSystem, journal: Journal) -> None:
    """What the uploads left behind, for the operator."""
    left = fs.uploads.leftovers()
    if left.kept:
        log.warning(
            "%d file(s) not uploaded; kept in %s for the next mount", left.kept, journal.directory
        )
    if left.dropped:
        log.warning("%d file(s) whose close() failed were not kept", left.dropped)
    if left.failed:
        # A permanent failure moved its entry to failed/: no mount retries those.
        log.error(
            "%d file(s) could not be uploaded (see above); their data is in %s",
            left.failed,
            journal.directory / "failed",
        )
    if not left:
        log.info("all uploads done")


def _backlog_text(fs: FileSystem) -> str:
    pending, failed = fs.uploads.backlog()
    return f"{pending} upload(s) pending, {failed} failed"


async def _report_status(fs: FileSystem, notifier: Notifier, scope: trio.CancelScope) -> None:
    """``STATUS=`` for ``systemctl status`` while mounted, when it changes."""
    with scope, contained("reporting the status to systemd", logger=log):
        last = ""
        while True:
            await trio.sleep(STATUS_INTERVAL)
            text = _backlog_text(fs)
            if text != last:
                notifier.status(text)
                last = text


async def _report_drain(fs: FileSystem, notifier: Notifier, scope: trio.CancelScope) -> None:
    """While the unmount drains uploads: more time from systemd as long as
    files keep reaching S3; none once the drain stalls (a dead endpoint), so a
    stop then ends at the unit's TimeoutStopSec with the data in the journal."""
    with scope, contained("reporting the drain to systemd", logger=log):
        best = fs.uploads.backlog()[0]
        notifier.extend_timeout(DRAIN_GRACE, _backlog_text(fs))
        while True:
            await trio.sleep(DRAIN_GRACE / 2)
            pending = fs.uploads.backlog()[0]
            if pending < best:
                best = pending
                notifier.extend_timeout(DRAIN_GRACE, "unmounted; " + _backlog_text(fs))


async def _watch_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                log.info("signal %d: unmounting after pending uploads", signum)
                pyfuse3.terminate()
            else:
                log.warning("second signal: exiting now; pending files stay in the journal")
                scope.cancel()


def _with_private_cache(config: MountConfig) -> MountConfig:
    """``config`` with the directory dgfs keeps its files in for ``cache_dir``
    (``runtime.private_cache_root``: never a directory others share)."""
    settings = config.settings
    root = private_cache_root(settings.cache_dir)
    return dataclasses.replace(config, settings=dataclasses.replace(settings, cache_dir=root))


def hand_over(config: MountConfig, user: str) -> None:
    """The privileged step of a sandboxed mount (``ExecStartPre=+``, as root):
    mount ``config.mountpoint`` for ``user`` and give the /dev/fuse descriptor
    to systemd's store, for the daemon that ``--fuse-fd systemd`` starts next
    (dgfs/handoff.py). Touches no bucket and no cache."""
    notifier = Notifier()
    if not notifier.enabled:
        raise ConfigError(
            "--handoff gives the mount to systemd, which passes it to the daemon:"
            " run it as ExecStartPre=+ of a unit (systemd/dgfs@.service)"
        )
    check_mountpoint(config.mountpoint)
    uid, gid = user_ids(user)
    target = Path(os.path.realpath(config.mountpoint))
    fd = open_and_mount(target, _fuse_options(config), uid, gid)
    try:
        notifier.store_fd(fd, FD_NAME)
    except BaseException:
        unmount_lazily(target)
        raise
    finally:
        os.close(fd)
    log.info("mounted %s on %s for %s; descriptor handed to systemd", config.location, target, user)


def _check(config: MountConfig) -> None:
    if config.fuse_fd is not None:
        check_handed_over(config.mountpoint, config.fuse_fd)
    else:
        check_mountpoint(config.mountpoint)


def run_foreground(config: MountConfig, on_ready: Callable[[], None] = lambda: None) -> None:
    """Mount and serve until unmounted. Raises ``UserError`` for a user's mistake."""
    _check(config)
    config = _with_private_cache(config)
    trio.run(_serve, config, on_ready)


def _setup_daemon_logging(config: MountConfig) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(
            PrintableFormatter("dgfs[%(process)d]: %(levelname)s %(name)s: %(message)s")
        )
    else:
        config.settings.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = logging.FileHandler(config.settings.cache_dir / "dgfs.log")
        handler.setFormatter(
            PrintableFormatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
        )
    root.addHandler(handler)


def daemonize(config: MountConfig) -> int:
    """Fork a daemon that mounts; return 0 once the mount is live, else print why and return 2."""
    _check(config)
    config = _with_private_cache(config)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        # The first child exits as soon as it has forked the daemon.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        if message.startswith("OK"):
            return 0
        if not message:
            message = "the mount process died before the mount was ready (see the system log)"
        print(f"dgfs mount: {message.strip()}", file=sys.stderr)
        return 2

    # Child: detach, keep the pipe to report readiness.
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _setup_daemon_logging(config)
    reported = False

    def ready() -> None:
        nonlocal reported
        os.write(write_fd, b"OK\n")
        os.close(write_fd)
        reported = True

    code = 0
    try:
        trio.run(_serve, config, ready)
    except (UserError, DgfsError, StoreError) as exc:
        log.error("%s", exc)
        if not reported:
            os.write(write_fd, str(exc).encode())
        code = 2
    except BaseException as exc:  # noqa: BLE001 - the daemon must report, whatever it was
        log.exception("mount failed")
        if not reported:
            os.write(write_fd, f"unexpected error: {exc!r}".encode())
        code = 1
    finally:
        if not reported:
            with contextlib.suppress(OSError):
                os.close(write_fd)
    os._exit(code)


__all__ = ["MountConfig", "daemonize", "run_foreground", "check_mountpoint", "hand_over"]
