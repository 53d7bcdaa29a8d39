"""Helpers for tests that really mount dgfs: the daemon as a subprocess.

- ``Mounts``: a factory (context manager) that mounts buckets on fresh
  directories and, on exit, unmounts every mount it made, waits for each
  daemon to finish its uploads, and fails if a daemon logged something
  unexpected.
- ``DgfsMount``: one daemon. ``unmount()``, ``remount()`` (same bucket, same
  cache_dir), ``crash()`` (SIGKILL + lazy unmount), ``expect_log()`` for
  tests that provoke errors, ``check_log()`` to fail on unexpected ones.
- ``S3View``: what the bucket really holds (boto3, no dgfs code).
- ``dg_download()``/``dg_upload()``: the real DeltaGlider CLI, for interop.

Only processes started here are ever signalled, by PID. A mount that
cannot be unmounted cleanly is detached lazily (``fusermount3 -uz``) so
no test leaves a stale mount behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from testsupport.dgcli import run_deltaglider
from testsupport.servers import make_bucket, s3_client

MOUNT_TIMEOUT = 20.0
UNMOUNT_TIMEOUT = 60.0

# Lines of a daemon's log that fail a test unless it said it expects them.
_BAD_LINE = re.compile(r"Traceback|\b(ERROR|CRITICAL|WARNING)\b|Warning:")


def dgfs_bin() -> str:
    """The ``dgfs`` script of the running interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "dgfs"
    if beside.exists():
        return str(beside)
    found = shutil.which("dgfs")
    if found is None:
        raise RuntimeError("dgfs is not installed in this environment (pip install -e .)")
    return found


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_bucket(endpoint: str) -> str:
    """A fresh, empty bucket on the server at ``endpoint``."""
    name = f"dgfs-mount-{uuid.uuid4().hex[:16]}"
    make_bucket(endpoint, name)
    return name


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point right now (by /proc/self/mountinfo)."""
    target = os.fsencode(str(path))
    with open("/proc/self/mountinfo", "rb") as info:
        for line in info:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(raw: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)


def mount_fstype(path: Path) -> str | None:
    target = os.fsencode(str(path))
    with open("/proc/self/mountinfo", "rb") as info:
        for line in info:
            before, _, after = line.partition(b" - ")
            fields = before.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return after.split()[0].decode()
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie that nobody reaps (a daemonized child of init) counts as gone.
    with suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def daemon_pids(mountpoint: Path) -> list[int]:
    """PIDs of dgfs daemons serving ``mountpoint`` (found by their command line).

    Mount points are unique temporary directories, so only daemons this
    test run started can match.
    """
    wanted = os.fsencode(str(mountpoint))
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in argv and any(b"dgfs" in a for a in argv[:4]):
            pids.append(int(entry.name))
    return pids


def fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["fusermount3", *args], capture_output=True, text=True, timeout=30, check=False
    )


class DgfsMount:
    """One dgfs daemon serving ``bucket`` on ``mountpoint``."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        mountpoint: Path,
        cache_dir: Path,
        options: Mapping[str, str | None],
        *,
        daemon: bool = False,
        source: str | None = None,
        via_mount_t: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.source = source or bucket
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.options = dict(options)
        self.via_mount_t = via_mount_t  # `mount -t dgfs` through mount.dgfs (daemonizes)
        self.daemon = daemon or via_mount_t
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.last_returncode: int | None = None
        self.generation = 0
        self.cwd: Path | None = None  # where `dgfs mount` runs (relative option paths)
        self.log_path = cache_dir.parent / f"{mountpoint.name}-stderr.log"
        self.expected: list[re.Pattern[str]] = []
        self._checked_upto = 0

    # --- paths ----------------------------------------------------------------

    def __truediv__(self, other: str) -> Path:
        return self.mountpoint / other

    @property
    def root(self) -> Path:
        return self.mountpoint

    # --- life cycle -------------------------------------------------------------

    def option_text(self) -> str:
        items = {
            "endpoint": self.endpoint,
            "cache_dir": str(self.cache_dir),
            "log_level": "info",
            **self.options,
        }
        return ",".join(k if v is None else f"{k}={v}" for k, v in items.items())

    def command(self) -> list[str]:
        if self.via_mount_t:
            return [
                "mount",
                "-t",
                "dgfs",
                self.source,
                str(self.mountpoint),
                "-o",
                self.option_text(),
            ]
        cmd = [dgfs_bin(), "mount", self.source, str(self.mountpoint), "-o", self.option_text()]
        if not self.daemon:
            cmd.append("-f")
        return cmd

    def start(self, *, timeout: float = MOUNT_TIMEOUT) -> Self:
        """Start the daemon and wait until the mount is live."""
        assert not self.running, "already mounted"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.generation += 1
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"--- mount #{self.generation}: {self.command()}\n".encode())
            log_file.flush()
            if self.daemon:
                result = subprocess.run(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    env=daemon_env(),
                    cwd=self.cwd,
                    timeout=timeout,
                    check=False,
                )
                if result.returncode != 0:
                    raise AssertionError(
                        f"dgfs mount exited {result.returncode}:\n{self.log_text()}"
                    )
                pids = daemon_pids(self.mountpoint)
                assert len(pids) == 1, f"expected one daemon for {self.mountpoint}, got {pids}"
                self.pid = pids[0]
            else:
                self.proc = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    env=daemon_env(),
                    cwd=self.cwd,
                    start_new_session=True,
                )
                self.pid = self.proc.pid
        self._wait_mounted(timeout)
        return self

    def _wait_mounted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_mounted(self.mountpoint):
                return
            if not self.alive:
                raise AssertionError(
                    f"dgfs daemon exited before mounting {self.mountpoint}:\n{self.log_text()}"
                )
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"{self.mountpoint} not mounted after {timeout}s:\n{self.log_text()}")

    @property
    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _pid_alive(self.pid)

    @property
    def running(self) -> bool:
        return self.pid is not None and self.alive

    def wait_exit(self, timeout: float) -> bool:
        """Wait for the daemon to exit; True if it did."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.pid is not None and _pid_alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    @property
    def returncode(self) -> int | None:
        """The foreground daemon's exit status (after it exited), else None."""
        return self.proc.returncode if self.proc is not None else self.last_returncode

    def unmount(self, *, timeout: float = UNMOUNT_TIMEOUT, with_umount: bool = False) -> None:
        """``fusermount3 -u`` (or ``umount``) and wait until the daemon has
        finished its uploads and exited."""
        if self.pid is None:
            return
        try:
            deadline = time.monotonic() + 10
            while is_mounted(self.mountpoint):
                if with_umount:
                    result = subprocess.run(
                        ["umount", str(self.mountpoint)],
                        capture_output=True,
                        text=True,
                        timeout=30,
                        check=False,
                    )
                else:
                    result = fusermount("-u", str(self.mountpoint))
                if result.returncode == 0 or not is_mounted(self.mountpoint):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"fusermount3 -u failed: {result.stderr.strip()}")
                time.sleep(0.2)  # busy: a test's open file is closing
            if not self.wait_exit(timeout):
                raise AssertionError(
                    f"dgfs daemon {self.pid} still running {timeout}s after unmount:\n"
                    f"{self.log_text()}"
                )
        finally:
            self._force_cleanup()

    def kill(self) -> None:
        """Last resort: lazy unmount and SIGKILL our daemon."""
        if is_mounted(self.mountpoint):
            fusermount("-uz", str(self.mountpoint))
        if self.pid is not None and self.alive:
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait_exit(10)
        self._reap()

    def crash(self) -> None:
        """Simulate a crash: SIGKILL the daemon, then detach the dead mount."""
        assert self.pid is not None and self.alive
        os.kill(self.pid, signal.SIGKILL)
        self.wait_exit(10)
        fusermount("-uz", str(self.mountpoint))
        self._reap()

    def _force_cleanup(self) -> None:
        if is_mounted(self.mountpoint) or (self.pid is not None and self.alive):
            self.kill()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            self.last_returncode = self.proc.returncode
        self.proc = None
        self.pid = None

    def remount(self, **changes: str | None) -> Self:
        """Unmount (if mounted) and mount the same bucket again with the same cache_dir."""
        if self.running or is_mounted(self.mountpoint):
            self.unmount()
        self.options.update(changes)
        return self.start()

    # --- logs -------------------------------------------------------------------

    def daemon_log_path(self) -> Path:
        """Where a daemonized dgfs writes its log (no syslog in the test box)."""
        return self.cache_dir / "dgfs.log"

    def log_text(self) -> str:
        parts = []
        for path in (self.log_path, self.daemon_log_path()):
            with suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def expect_log(self, pattern: str) -> None:
        """Lines matching ``pattern`` (regex) are not treated as failures."""
        self.expected.append(re.compile(pattern))

    def unexpected_log_lines(self) -> list[str]:
        bad = []
        for line in self.log_text().splitlines():
            if _BAD_LINE.search(line) and not any(p.search(line) for p in self.expected):
                bad.append(line)
        return bad

    def check_log(self) -> None:
        """Fail if the daemon logged a traceback, an error or a warning nobody expected."""
        bad = self.unexpected_log_lines()
        new = bad[self._checked_upto :]
        self._checked_upto = len(bad)
        if new:
            raise AssertionError(
                f"dgfs daemon for {self.mountpoint} logged unexpected problems:\n"
                + "\n".join(new[:40])
                + f"\n--- full log ---\n{self.log_text()[-6000:]}"
            )

    # --- waiting for uploads ----------------------------------------------------------

    def settle(self, *paths: Path) -> None:
        """Return once the given files are in S3: fsync forces their upload and waits."""
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DG_LOG_LEVEL", None)
    env.pop("DG_CACHE_ENCRYPTION_KEY", None)
    return env


class Mounts:
    """Makes mounts under ``base``; on exit unmounts them all and checks their logs."""

    def __init__(self, endpoint: str, base: Path) -> None:
        self.endpoint = endpoint
        self.base = base
        self.mounts: list[DgfsMount] = []
        self._count = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(check=exc_type is None)

    def new_bucket(self) -> str:
        return new_bucket(self.endpoint)

    def mount(
        self,
        bucket: str | None = None,
        *,
        cache_dir: Path | None = None,
        daemon: bool = False,
        source: str | None = None,
        via_mount_t: bool = False,
        start: bool = True,
        **options: str | None,
    ) -> DgfsMount:
        """Mount ``bucket`` (a new one if None) with ``options`` on a new directory."""
        bucket = bucket or self.new_bucket()
        self._count += 1
        mountpoint = self.base / f"mnt{self._count}"
        cache_dir = cache_dir or self.base / f"cache{self._count}"
        defaults: dict[str, str | None] = {"upload_delay": "0.2", "listing_ttl": "1"}
        defaults.update(options)
        mount = DgfsMount(
            self.endpoint,
            bucket,
            mountpoint,
            cache_dir,
            defaults,
            daemon=daemon,
            source=source,
            via_mount_t=via_mount_t,
        )
        self.mounts.append(mount)
        if start:
            mount.start()
        return mount

    def close(self, *, check: bool = True) -> None:
        errors: list[str] = []
        for mount in reversed(self.mounts):
            try:
                mount.unmount()
            except AssertionError as exc:
                errors.append(str(exc))
            if check:
                try:
                    mount.check_log()
                except AssertionError as exc:
                    errors.append(str(exc))
        self.mounts.clear()
        if errors:
            pytest.fail("\n\n".join(errors), pytrace=False)


class S3View:
    """The bucket as S3 has it, through plain boto3."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.client: Any = s3_client(endpoint)

    def close(self) -> None:
        self.client.close()

    def keys(self, prefix: str = "") -> dict[str, int]:
        """key -> size of every object under ``prefix``."""
        found: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[obj["Key"]] = obj["Size"]
        return found

    def metadata(self, key: str) -> dict[str, str]:
        return dict(self.client.head_object(Bucket=self.bucket, Key=key)["Metadata"])

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except self.client.exceptions.ClientError:
            return False
        return True

    def get(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body

    def put(self, key: str, data: bytes, metadata: Mapping[str, str] | None = None) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, Metadata=dict(metadata or {})
        )

    def wait_for(self, keys: Iterable[str], timeout: float = 20.0) -> dict[str, int]:
        """Poll until every key exists; returns the listing."""
        wanted = set(keys)
        deadline = time.monotonic() + timeout
        while True:
            listing = self.keys()
            if wanted <= listing.keys() or time.monotonic() > deadline:
                return listing
            time.sleep(0.1)


def dg_download(endpoint: str, bucket: str, key: str, dest: Path) -> Path:
    """``deltaglider cp s3://bucket/key dest`` with the real CLI; asserts it worked."""
    run_deltaglider(endpoint, "cp", f"s3://{bucket}/{key}", str(dest))
    return dest


def dg_upload(endpoint: str, src: Path, bucket: str, key: str) -> None:
    """``deltaglider cp src s3://bucket/key`` (full key: 6.2.0 drops a bare prefix)."""
    run_deltaglider(endpoint, "cp", str(src), f"s3://{bucket}/{key}")


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) of every regular file under ``root``."""
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = (path.stat().st_size, sha256_file(path))
    return found


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> bool:
    """Poll ``predicate`` (an ``OSError`` counts as False) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def assert_no_stale_mounts(base: Path) -> None:
    """No mount of ours is left under ``base``."""
    prefix = os.fsencode(str(base))
    with open("/proc/self/mountinfo", "rb") as info:
        stale = [
            _unescape(line.split()[4]).decode()
            for line in info
            if _unescape(line.split()[4]).startswith(prefix)
        ]
    assert not stale, f"stale mounts left behind: {stale}"


__all__ = [
    "DgfsMount",
    "Mounts",
    "S3View",
    "assert_no_stale_mounts",
    "dg_download",
    "dg_upload",
    "is_mounted",
    "new_bucket",
    "sha256_bytes",
    "sha256_file",
    "tree_digest",
    "wait_until",
]
