"""What a mount needs from this machine, the network and the bucket, checked one by one.

``dgfs doctor`` (``dgfs.cli.doctor``) prints the ``Check``s these
functions return, one line each: what was found and, when something is
wrong, the fix. Every check runs on its own and reports instead of
raising, so one broken thing never hides the others; checks that need an
earlier one (the bucket needs the endpoint and credentials) say they were
skipped and why.

What may be relied on:

- Nothing here changes the machine, except the cache directory a mount
  would create (``runtime.private_cache_root``, the same rules as a mount)
  and, in the bucket, one probe object under ``.deltaglider/tmp/`` that is
  deleted again (``ObjectStore.probe_if_none_match``; not with ``ro``).
- Credentials are named by their source in AWS's chain, never shown.
- Network checks have timeouts (``NETWORK_TIMEOUT`` seconds each).
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import http.client
import os
import pwd
import shutil
import socket
import ssl
import stat
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dgfs import children, deep
from dgfs.delta import DeltaEngine
from dgfs.errors import AccessDenied, DgfsError, NoSuchBucket, UserError
from dgfs.format import (
    DELTA_SUFFIX,
    INTERNAL_PREFIX,
    REFERENCE_NAMES,
    is_deep,
    is_internal_key,
    listing_root,
    meta_value,
    proxy_encryption,
    split_key,
)
from dgfs.fs.journal import committed_entries, failed_entries
from dgfs.progress import human_bytes
from dgfs.runtime import private_cache_root
from dgfs.store.base import ObjectHead, ObjectStore, head_many

#: Seconds each network step (connect, TLS handshake, HTTP answer) may take.
NETWORK_TIMEOUT = 10.0
#: A clock further off the endpoint's than this fails: S3 refuses requests
#: signed 15 minutes off, and presigned URLs and Last-Modified go wrong well before.
MAX_CLOCK_SKEW = 300.0
#: Keys listed, and objects HEADed, to tell what the bucket already holds.
SCAN_KEYS = 1000
SCAN_HEADS = 40
#: Filesystem types whose content is gone at the next boot.
VOLATILE_FS = {"tmpfs", "ramfs"}
#: ``dg-tool`` prefixes of the writers (dgfs also writes the proxy's keys, so the
#: tool tells them apart; an object without one is judged by its keys).
DGFS_TOOL = "dgfs/"
PROXY_TOOL = "deltaglider_proxy/"


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"  # works, but something an operator should know or fix
    FAIL = "FAIL"  # a mount would fail, or lose data
    SKIP = "skip"  # not checked (not asked for, or an earlier check failed)


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, what was found, how to fix it."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{self.status.value:<4} {self.name:<13} {self.detail}"
        return f"{text} -- fix: {self.fix}" if self.fix else text

    def as_json(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "status": self.status.value.lower(),
            "detail": self.detail,
            "fix": self.fix,
        }


def failed(checks: Iterable[Check]) -> bool:
    return any(check.status is Status.FAIL for check in checks)


# --- this machine -----------------------------------------------------------------


def check_fuse_device(path: Path = Path("/dev/fuse")) -> Check:
    name = "fuse-device"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Check(
            name,
            Status.FAIL,
            f"{path} is missing",
            "modprobe fuse (in a container: run it with --device /dev/fuse)",
        )
    except OSError as exc:
        return Check(name, Status.FAIL, f"{path}: {exc.strerror}", "modprobe fuse")
    if not stat.S_ISCHR(st.st_mode):
        return Check(name, Status.FAIL, f"{path} is not a character device", "modprobe fuse")
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as exc:
        return Check(
            name,
            Status.FAIL,
            f"{path} cannot be opened: {exc.strerror}",
            "chmod 666 /dev/fuse (Debian's default), or mount as root;"
            " in a container: --device /dev/fuse --cap-add SYS_ADMIN",
        )
    return Check(name, Status.OK, f"{path} opens read-write")


def check_fusermount(name: str = "fusermount3", euid: int | None = None) -> Check:
    """fusermount3 unmounts (systemd's ExecStartPre, a dead mount) and mounts for non-root users."""
    euid = os.geteuid() if euid is None else euid
    path = shutil.which(name)
    if path is None:
        return Check("fusermount3", Status.FAIL, f"{name} not found", "apt-get install fuse3")
    st = os.stat(path)
    if euid != 0 and not (st.st_mode & stat.S_ISUID and st.st_uid == 0):
        return Check(
            "fusermount3",
            Status.FAIL,
            f"{path} is not setuid root: only root can mount",
            f"chmod u+s {path} (as Debian's fuse3 ships it), or mount as root",
        )
    return Check("fusermount3", Status.OK, path)


def check_allow_other(
    asked: bool, euid: int | None = None, fuse_conf: Path = Path("/etc/fuse.conf")
) -> Check:
    name = "allow_other"
    if not asked:
        return Check(name, Status.SKIP, "not asked (-o allow_other)")
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return Check(name, Status.OK, "root may use allow_other without user_allow_other")
    try:
        lines = fuse_conf.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    except OSError as exc:
        return Check(name, Status.FAIL, f"cannot read {fuse_conf}: {exc.strerror}")
    if any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines):
        return Check(name, Status.OK, f"user_allow_other is set in {fuse_conf}")
    return Check(
        name,
        Status.FAIL,
        f"allow_other asked by uid {euid}, but {fuse_conf} has no user_allow_other",
        f"echo user_allow_other >> {fuse_conf} (as root), or mount as root",
    )


def check_xdelta3(binary: str = "xdelta3") -> Check:
    try:
        version = DeltaEngine(binary).check()
    except DgfsError as exc:
        return Check("xdelta3", Status.FAIL, str(exc).split("; ")[0], "apt-get install xdelta3")
    return Check("xdelta3", Status.OK, f"{children.resolve(binary)} ({version})")


def check_zgz() -> Check:
    path = deep.zgz_path()
    if path is None:
        return Check(
            "zgz",
            Status.WARN,
            "not found: deep directories store gzip members made by GNU gzip unexpanded,"
            " and cannot rebuild such files another dgfs stored (EIO)",
            deep.ZGZ_INSTALL_HINT,
        )
    return Check("zgz", Status.OK, path)


def mount_of(path: Path, mounts_file: Path = Path("/proc/self/mounts")) -> tuple[str, str]:
    """``(mount point, filesystem type)`` of the mount ``path`` is on (``path`` need not exist)."""
    target = os.path.realpath(path)
    best = ("/", "unknown")
    with contextlib.suppress(OSError), open(mounts_file) as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            # mount points escape space, tab, newline and backslash as octal
            point = fields[1].encode().decode("unicode_escape")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[0]):
                best = (point, fields[2])
    return best


def journal_counts(root: Path) -> tuple[int, int]:
    """Of the journals under the cache directory ``root``: files written
    through a mount and not in S3 yet, and files whose upload failed for
    good (kept in failed/)."""
    journal = root / "journal"
    slots = [d for d in journal.iterdir() if d.is_dir()] if journal.is_dir() else []
    return (
        sum(committed_entries(d) for d in slots),
        sum(failed_entries(d) for d in slots),
    )


def check_cache_dir(
    cache_dir: Path, cache_size: int, mounts_file: Path = Path("/proc/self/mounts")
) -> Check:
    """Owner, mode, free space and filesystem of the directory a mount would keep its files in."""
    name = "cache-dir"
    existed = cache_dir.exists()
    try:
        root = private_cache_root(cache_dir)
    except UserError as exc:
        return Check(
            name, Status.FAIL, str(exc), "-o cache_dir=DIR with a directory of this user's own"
        )
    st = os.stat(root)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    if not os.access(root, os.W_OK | os.X_OK):
        return Check(
            name,
            Status.FAIL,
            f"{root} is not writable by uid {os.geteuid()} (owner {owner})",
            f"chown {os.geteuid()} {root}, or -o cache_dir=DIR",
        )
    vfs = os.statvfs(root)
    free = vfs.f_bavail * vfs.f_frsize
    point, fstype = mount_of(root, mounts_file)
    pending, failed = journal_counts(root)
    detail = (
        f"{root}{'' if existed else ' (created)'}: owner {owner}, mode"
        f" {stat.S_IMODE(st.st_mode):04o}, {human_bytes(free)} free, {fstype} on {point}"
        + (f", {pending} file(s) waiting for upload in its journal" if pending else "")
        + (f", {failed} file(s) whose upload failed for good in its failed/" if failed else "")
    )
    if fstype in VOLATILE_FS:
        return Check(
            name,
            Status.WARN,
            f"{detail}: {fstype} loses the journal (files not yet uploaded) at the next boot",
            "-o cache_dir=DIR on a disk (e.g. /var/cache/dgfs)",
        )
    if free < cache_size:
        return Check(
            name,
            Status.WARN,
            f"{detail}: less than cache_size ({human_bytes(cache_size)})",
            "free space there, or lower -o cache_size=",
        )
    return Check(name, Status.OK, detail)


# --- credentials and endpoint ----------------------------------------------------


def check_credentials(source: Callable[[], str | None]) -> Check:
    """``source()``: the name of the provider that answered (``store.s3.credential_source``)."""
    name = "credentials"
    try:
        method = source()
    except DgfsError as exc:
        return Check(name, Status.FAIL, str(exc), "fix the profile name or ~/.aws/config")
    if method is None:
        return Check(
            name,
            Status.FAIL,
            "none found in the AWS chain (environment, profile, instance role)",
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (for a service: in"
            " /etc/dgfs/INSTANCE.env, mode 0600), -o profile=NAME, or an instance role",
        )
    return Check(name, Status.OK, f"from {method} (values not shown)")


def _http_date_skew(headers: http.client.HTTPMessage, now: float) -> float | None:
    text = headers.get("Date")
    if not text:
        return None
    try:
        return now - email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


def check_endpoint(
    url: str,
    *,
    ca_bundle: str | None = None,
    now: Callable[[], float] = time.time,
    timeout: float = NETWORK_TIMEOUT,
) -> list[Check]:
    """The endpoint: reachable, TLS trusted (``ca_bundle``, as boto3 verifies it), clock skew.

    Returns the ``endpoint`` check, then the ``clock`` check.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    skipped = Check("clock", Status.SKIP, "needs the endpoint")
    started = time.monotonic()
    connected = _connect(url, host, port, tls, ca_bundle, timeout)
    if isinstance(connected, Check):
        return [connected, skipped]
    protocol, context = connected
    answer = _http_answer(url, host, port, context, timeout, now)
    if isinstance(answer, Check):
        return [answer, skipped]
    status, skew = answer
    elapsed = (time.monotonic() - started) * 1000
    via = f", {protocol}, certificate trusted" if tls else " (plain HTTP: no TLS)"
    endpoint = Check("endpoint", Status.OK, f"{url} answers (HTTP {status}, {elapsed:.0f} ms){via}")
    return [endpoint, _clock_check(skew)]


_FIX_URL = "check -o endpoint= (scheme, host, port), that the S3 server runs, and firewalls"


def _connect(
    url: str, host: str, port: int, tls: bool, ca_bundle: str | None, timeout: float
) -> tuple[str, ssl.SSLContext | None] | Check:
    """A TCP connection (and with ``tls`` a handshake trusting ``ca_bundle``):
    ``(TLS version, the context that trusted it)`` (``("", None)`` without TLS),
    or the failed ``endpoint`` check."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if not tls:
                return "", None
            context = ssl.create_default_context(cafile=ca_bundle)
            with context.wrap_socket(sock, server_hostname=host) as wrapped:
                return wrapped.version() or "", context
    except socket.gaierror as exc:
        return Check("endpoint", Status.FAIL, f"{url}: cannot resolve {host}: {exc}", _FIX_URL)
    except ssl.SSLCertVerificationError as exc:
        return Check(
            "endpoint",
            Status.FAIL,
            f"{url}: TLS certificate not trusted: {exc.verify_message}",
            "install the server's CA (update-ca-certificates) and point AWS_CA_BUNDLE at it",
        )
    except (ssl.SSLError, OSError) as exc:
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        return Check("endpoint", Status.FAIL, f"{url}: cannot connect: {reason}", _FIX_URL)


def _http_answer(
    url: str,
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    timeout: float,
    now: Callable[[], float],
) -> tuple[int, float | None] | Check:
    """``(HTTP status, clock skew)`` of a ``HEAD /``, or the failed ``endpoint`` check."""
    connection: http.client.HTTPConnection
    if context is not None:
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("HEAD", "/", headers={"User-Agent": "dgfs-doctor"})
        response = connection.getresponse()
        response.read()
        return response.status, _http_date_skew(response.headers, now())
    except (OSError, http.client.HTTPException) as exc:
        message = f"{url}: connected, but no HTTP answer: {exc}"
        return Check("endpoint", Status.FAIL, message, _FIX_URL)
    finally:
        connection.close()


def _clock_check(skew: float | None) -> Check:
    """Our clock against the endpoint's (``skew`` seconds ahead; None: no Date header)."""
    if skew is None:
        return Check("clock", Status.WARN, "the endpoint sent no Date header to compare")
    direction = "ahead of" if skew > 0 else "behind"
    detail = f"{abs(skew):.0f} s {direction} the endpoint's clock"
    if abs(skew) > MAX_CLOCK_SKEW:
        return Check(
            "clock",
            Status.FAIL,
            f"{detail} (more than {MAX_CLOCK_SKEW:.0f} s)",
            "sync the clock: timedatectl set-ntp true (systemd-timesyncd or chrony)",
        )
    return Check("clock", Status.OK, detail)


# --- the bucket ------------------------------------------------------------------


async def check_bucket(
    store: ObjectStore, prefix: str, read_only: bool, proxy_key: bool = False
) -> list[Check]:
    """List, probe-write (unless ``read_only``) and look at what ``store``'s bucket
    holds (``proxy_key``: the mount has deltaglider_proxy's key, ``proxy_key_file``)."""
    where = f"s3://{store.bucket}/{prefix}".rstrip("/")
    try:
        page = await store.list(listing_root(prefix))
    except NoSuchBucket as exc:
        return [
            Check(
                "bucket",
                Status.FAIL,
                str(exc),
                f"create it (aws s3 mb s3://{store.bucket} --endpoint-url URL), or fix the name",
            )
        ]
    except AccessDenied as exc:
        return [
            Check(
                "bucket",
                Status.FAIL,
                str(exc),
                f"grant s3:ListBucket on {store.bucket} to these credentials",
            )
        ]
    except DgfsError as exc:
        return [Check("bucket", Status.FAIL, str(exc))]
    checks = [
        Check(
            "bucket",
            Status.OK,
            f"{where} lists ({len(page.objects)} objects, {len(page.prefixes)} directories"
            " at its top)",
        )
    ]
    checks.append(await _check_write(store, read_only))
    checks.append(await _check_contents(store, prefix, proxy_key))
    return checks


async def _check_write(store: ObjectStore, read_only: bool) -> Check:
    name = "bucket-write"
    if read_only:
        return Check(name, Status.SKIP, "ro: no probe write")
    try:
        honoured = await store.probe_if_none_match()
    except AccessDenied as exc:
        return Check(
            name,
            Status.FAIL,
            f"probe write refused: {exc}",
            f"grant s3:PutObject and s3:DeleteObject on {store.bucket}/*, or mount with -o ro",
        )
    except DgfsError as exc:
        return Check(name, Status.FAIL, f"probe write failed: {exc}")
    if not honoured:
        return Check(
            name,
            Status.WARN,
            f"probe object under {INTERNAL_PREFIX}tmp/ written and deleted, but the store ignores"
            " If-None-Match: *: two mounts creating a directory's first file at once race"
            " for its reference (docs/SEMANTICS.md)",
        )
    return Check(
        name,
        Status.OK,
        f"probe object under {INTERNAL_PREFIX}tmp/ written, a second create refused"
        " (If-None-Match: * honoured), deleted",
    )


def _writer(head: ObjectHead) -> str:
    """Which tool wrote a DeltaGlider-format object: ``deep`` (dgfs's deep
    deltaspaces), ``dgfs``, ``proxy`` (deltaglider_proxy) or ``dg`` (the DeltaGlider CLI)."""
    metadata = head.metadata
    if is_deep(metadata):
        return "deep"
    tool = (meta_value(metadata, "tool") or "").lower()
    if tool.startswith(DGFS_TOOL):
        return "dgfs"
    proxy_only = meta_value(metadata, "ref_path") and not meta_value(metadata, "ref_key")
    if tool.startswith(PROXY_TOOL) or proxy_only or proxy_encryption(metadata):
        return "proxy"
    return "dg"


async def _check_contents(store: ObjectStore, prefix: str, proxy_key: bool) -> Check:
    name = "bucket-data"
    keys: list[str] = []
    try:
        async for page in store.list_pages(listing_root(prefix), delimiter=None):
            keys.extend(info.key for info in page.objects)
            if len(keys) >= SCAN_KEYS:
                break
    except DgfsError as exc:
        return Check(name, Status.FAIL, f"cannot list the bucket's keys: {exc}")
    keys = [key for key in keys[:SCAN_KEYS] if not is_internal_key(key)]
    references = [key for key in keys if split_key(key)[1] in REFERENCE_NAMES]
    deltas = [key for key in keys if key.endswith(DELTA_SUFFIX)]
    if not references and not deltas:
        if not keys:
            return Check(name, Status.OK, "empty: no DeltaGlider objects")
        scope = f"first {SCAN_KEYS} keys" if len(keys) >= SCAN_KEYS else f"{len(keys)} keys"
        return Check(name, Status.OK, f"no DeltaGlider objects in the {scope}")
    sample = (references + deltas)[:SCAN_HEADS]
    try:
        heads = await head_many(store, sample, concurrency=8)
    except DgfsError as exc:
        return Check(name, Status.FAIL, f"cannot read objects' metadata: {exc}")
    writers = Counter(_writer(head) for head in heads.values())
    encrypted = sum(1 for head in heads.values() if proxy_encryption(head.metadata))
    labels = {
        "dg": "DeltaGlider v6 (the DeltaGlider CLI)",
        "dgfs": "DeltaGlider v6 (dgfs)",
        "deep": "dgfs deep (the DeltaGlider CLI refuses them)",
        "proxy": "deltaglider_proxy",
    }
    found = ", ".join(f"{labels[kind]}: {writers[kind]}" for kind in labels if writers[kind])
    detail = (
        f"in {len(keys)} keys: {len(references)} references, {len(deltas)} deltas;"
        f" of {len(heads)} read: {found}"
    )
    if encrypted and not proxy_key:
        return Check(
            name,
            Status.WARN,
            f"{detail}; {encrypted} encrypted by deltaglider_proxy: they read as EIO"
            " without its key",
            "-o proxy_key_file=FILE (the proxy's key, 64 hex digits)",
        )
    return Check(name, Status.OK, detail)
