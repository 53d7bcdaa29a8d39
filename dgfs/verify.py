"""Check that stored files give back exactly their recorded bytes.

What a caller may rely on:

- A delta passes only if its reference in the bucket hashes to the
  ``dg-ref-sha256`` the delta was made against, and the rebuilt bytes hash
  to the delta's ``dg-file-sha256``. The reference is downloaded and hashed
  once per run (never trusted from a local cache), so a replaced or
  corrupted ``reference.bin`` is reported even when its content is cached.
- A direct object passes if its bytes hash to ``dg-file-sha256`` (and its
  size matches ``dg-file-size``).
- A foreign object (no recorded SHA-256) cannot be checked: it is
  reported as skipped, never as passed or failed.
- ``verify_all`` also checks each reference against its own
  ``dg-file-sha256``; one object's failure never stops the others.
- A deep deltaspace's ``reference.deep`` records the SHA-256 of the
  expanded form it holds, not of its stored (zstd) bytes: it is
  decompressed and the result hashed (and sized against
  ``dgfs-expanded-size`` when recorded). Its deep deltas are checked by
  rebuilding, like any delta; ``VerifyResult.deep`` marks such objects.
- With a ``shard``, ``verify_all`` checks only the directories that shard
  owns (``dgfs.shard``), references included: the shards of one ``N``
  together check every object exactly once, each reference downloaded by
  one of them only.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from dgfs import deep
from dgfs import format as fmt
from dgfs.core import Core
from dgfs.errors import DgfsError, FormatError, NotFound
from dgfs.flight import SingleFlight
from dgfs.format import DeltaMode, Kind, StoredFile
from dgfs.fs import xattrs
from dgfs.shard import Shard, label, owned

log = logging.getLogger(__name__)

# What the mount tells about each of its paths.
XATTR_BUCKET = xattrs.PREFIX + "bucket"
XATTR_KEY = xattrs.PREFIX + "key"
XATTR_ENDPOINT = xattrs.PREFIX + "endpoint"  # optional


#: The note on a delta the stock CLI made from gzip input (see Core.rebuild).
RECOVERED = "unreadable by DeltaGlider, recovered by dgfs"


class Status(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class VerifyResult:
    """The verdict on one stored object."""

    stored_key: str
    visible_key: str
    kind: Kind | None
    status: Status
    original_size: int = 0
    expected_sha256: str | None = None
    actual_sha256: str | None = None
    message: str = ""
    deep: bool = False
    """A deep delta or ``reference.deep`` (dgfs's extension)."""

    @property
    def kind_label(self) -> str:
        """``delta``, ``direct``, ``reference``...; ``deep delta``, ``deep reference``."""
        label = self.kind.value if self.kind else "?"
        return f"deep {label}" if self.deep else label

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.visible_key,
            "stored_key": self.stored_key,
            "kind": self.kind.value if self.kind else None,
            "deep": self.deep,
            "status": self.status.value,
            "original_size": self.original_size,
            "expected_sha256": self.expected_sha256,
            "actual_sha256": self.actual_sha256,
            "message": self.message,
        }


@dataclass
class VerifyReport:
    """Every verdict of a ``verify_all`` run."""

    bucket: str
    prefix: str
    results: list[VerifyResult] = field(default_factory=list)
    elapsed: float = 0.0
    shard: Shard | None = None  # the directories checked; None: all of them

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status is status)

    @property
    def failures(self) -> list[VerifyResult]:
        return [r for r in self.results if r.status is Status.FAILED]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def verified_bytes(self) -> int:
        return sum(r.original_size for r in self.results if r.status is Status.OK)

    def to_json(self) -> dict[str, object]:
        return {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "shard": label(self.shard),
            "ok": self.count(Status.OK),
            "failed": self.count(Status.FAILED),
            "skipped": self.count(Status.SKIPPED),
            "verified_bytes": self.verified_bytes,
            "elapsed_seconds": round(self.elapsed, 3),
            "results": [r.to_json() for r in self.results],
        }


@dataclass(frozen=True)
class _ReferenceState:
    recorded_sha256: str | None  # its own dg-file-sha256
    actual_sha256: str | None  # None when it could not be read (of the expanded form if deep)
    size: int  # bytes hashed: the expanded form's for a deep reference
    error: str = ""
    deep: bool = False


class Verifier:
    """Verifies objects through one ``Core``; remembers each reference's check."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._refs: dict[str, _ReferenceState] = {}
        self._ref_flights = SingleFlight()

    async def _hash_object(self, stored_key: str) -> tuple[str, int]:
        """SHA-256 and size of an object's bytes as stored (downloaded to scratch)."""
        path = self.core.scratch_path()
        try:
            await self.core.download(stored_key, path)
            digest = await self.core.digest(path)
        finally:
            path.unlink(missing_ok=True)
        return digest.sha256, digest.size

    async def reference(self, ref_key: str) -> _ReferenceState:
        """Download and hash ``ref_key`` once per Verifier (concurrent callers share it)."""

        async def check() -> None:
            self._refs[ref_key] = await self._check_reference(ref_key)

        await self._ref_flights.ensure(ref_key, lambda: ref_key in self._refs, check)
        return self._refs[ref_key]

    async def _hash_deep_reference(self, ref_key: str) -> tuple[str, int]:
        """SHA-256 and size of the expanded form a ``reference.deep`` holds."""
        stored = self.core.scratch_path(".zst")
        plain = self.core.scratch_path(".dgx")
        try:
            head = await self.core.download(ref_key, stored)
            cap = deep.reference_cap(head.metadata, head.size, self.core.limits)
            await trio.to_thread.run_sync(
                deep.decompress_reference, stored, plain, cap, limiter=self.core.cpu_limiter
            )
            digest = await self.core.digest(plain)
        finally:
            stored.unlink(missing_ok=True)
            plain.unlink(missing_ok=True)
        return digest.sha256, digest.size

    async def _check_reference(self, ref_key: str) -> _ReferenceState:
        is_deep = fmt.reference_mode(ref_key) is DeltaMode.DEEP
        try:
            head = await self.core.store.head(ref_key)
            recorded = fmt.meta_sha256(head.metadata)
            if is_deep:
                actual, size = await self._hash_deep_reference(ref_key)
            else:
                actual, size = await self._hash_object(ref_key)
        except NotFound:
            return _ReferenceState(None, None, 0, f"{ref_key} is missing", is_deep)
        except FormatError as exc:  # a deep reference whose body is not zstd
            return _ReferenceState(None, None, 0, f"{ref_key}: {exc}", is_deep)
        except (DgfsError, OSError) as exc:
            return _ReferenceState(None, None, 0, f"{ref_key} could not be read: {exc}", is_deep)
        if is_deep:
            expanded_size = head.metadata.get(fmt.META_EXPANDED_SIZE, "")
            if expanded_size.isdigit() and int(expanded_size) != size:
                return _ReferenceState(
                    recorded,
                    actual,
                    size,
                    f"{ref_key} expands to {size} bytes, not the recorded {expanded_size}",
                    is_deep,
                )
        return _ReferenceState(recorded, actual, size, deep=is_deep)

    async def verify_reference(self, ref_key: str) -> VerifyResult:
        """A reference against its own recorded SHA-256 (a deep one's: once expanded)."""
        state = await self.reference(ref_key)
        result = VerifyResult(
            ref_key, ref_key, Kind.REFERENCE, Status.OK, state.size, deep=state.deep
        )
        if state.error:
            return replace(result, status=Status.FAILED, message=state.error)
        result = replace(
            result, expected_sha256=state.recorded_sha256, actual_sha256=state.actual_sha256
        )
        if state.recorded_sha256 is None:
            return replace(
                result, status=Status.SKIPPED, message="reference has no recorded SHA-256"
            )
        if state.recorded_sha256 != state.actual_sha256:
            return replace(
                result,
                status=Status.FAILED,
                message="reference bytes do not match their recorded SHA-256",
            )
        return result

    async def verify_stored(self, stored: StoredFile) -> VerifyResult:
        """Check one classified object; never raises for a content or store problem."""
        if stored.kind is Kind.REFERENCE:
            return await self.verify_reference(stored.stored_key)
        template = VerifyResult(
            stored.stored_key,
            stored.visible_key,
            stored.kind,
            Status.OK,
            stored.original_size,
            stored.file_sha256,
            deep=stored.deep,
        )
        if stored.kind is Kind.FOREIGN or stored.file_sha256 is None:
            return replace(
                template, status=Status.SKIPPED, message="foreign object: no recorded SHA-256"
            )
        try:
            if stored.kind is Kind.DELTA:
                return await self._verify_delta(stored, template)
            actual, size = await self._hash_object(stored.stored_key)
        except (DgfsError, OSError) as exc:
            return replace(template, status=Status.FAILED, message=str(exc))
        return _verdict(template, actual, size)

    async def _verify_delta(self, stored: StoredFile, template: VerifyResult) -> VerifyResult:
        assert stored.ref_key is not None
        ref = await self.reference(stored.ref_key)
        if ref.error:
            return replace(template, status=Status.FAILED, message=ref.error)
        if ref.actual_sha256 != stored.ref_sha256:
            return replace(
                template,
                status=Status.FAILED,
                message=(
                    f"{stored.ref_key} has SHA-256 {ref.actual_sha256}, but this delta was made "
                    f"against {stored.ref_sha256} (reference replaced or corrupted)"
                ),
            )
        out = self.core.scratch_path(".rebuilt")
        try:
            # The reference bytes were just checked against dg-ref-sha256, and
            # the core's cache is addressed by that same SHA-256.
            # Its delta decoded even when its note says zero-diff (reads then
            # rebuild the reference as it is): the body is what verify checks.
            whole = replace(stored, zero_diff=False)
            recovered = await self.core.rebuild(whole, out, verify=False)
            digest = await self.core.digest(out)
        finally:
            out.unlink(missing_ok=True)
        result = _verdict(template, digest.sha256, digest.size)
        if recovered and result.status is Status.OK:
            result = replace(result, message=RECOVERED)
        return result


def _verdict(template: VerifyResult, actual_sha256: str, size: int) -> VerifyResult:
    result = replace(template, actual_sha256=actual_sha256)
    if actual_sha256 != template.expected_sha256:
        return replace(result, status=Status.FAILED, message="SHA-256 mismatch")
    if size != template.original_size:
        return replace(
            result,
            status=Status.FAILED,
            message=f"size {size} differs from the recorded {template.original_size}",
        )
    return result


async def verify_key(core: Core, key: str) -> VerifyResult:
    """Verify the user-visible file ``key`` (``NotFound`` if there is none)."""
    try:
        stored = await core.locate(key)
    except FormatError as exc:
        return VerifyResult(key, key, None, Status.FAILED, message=str(exc))
    return await Verifier(core).verify_stored(stored)


async def verify_all(
    core: Core,
    prefix: str = "",
    *,
    concurrency: int = 8,
    shard: Shard | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_result: Callable[[VerifyResult], None] | None = None,
) -> VerifyReport:
    """Verify every object under ``prefix`` (a directory; "" = whole bucket).

    ``shard``: only the objects of the directories it owns.
    ``on_start(objects, stored_bytes)`` is called once after the listing
    (the shard's objects only); ``on_result`` after each verdict (for a
    progress bar).
    """
    root = fmt.listing_root(prefix)
    listing = await core.store.list(root, delimiter=None)
    objects = [
        o
        for o in listing.objects
        if not (fmt.is_internal_key(o.key) or fmt.is_directory_marker(o.key))
        and owned(shard, o.key)
    ]
    report = VerifyReport(core.store.bucket, root.rstrip("/"), shard=shard)
    if on_start is not None:
        on_start(len(objects), sum(o.size for o in objects))
    verifier = Verifier(core)
    limiter = trio.CapacityLimiter(max(1, concurrency))
    started = trio.current_time()

    async def one(key: str, size: int) -> None:
        async with limiter:
            result = await _verify_object(verifier, key, size)
        report.results.append(result)
        if result.status is Status.FAILED:
            log.error("%s: %s", result.visible_key, result.message)
        if on_result is not None:
            on_result(result)

    async with trio.open_nursery() as nursery:
        for obj in objects:
            nursery.start_soon(one, obj.key, obj.size)
    report.results.sort(key=lambda r: r.stored_key)
    report.elapsed = trio.current_time() - started
    return report


async def _verify_object(verifier: Verifier, key: str, size: int) -> VerifyResult:
    if fmt.is_reference_key(key):
        return await verifier.verify_reference(key)
    visible = fmt.visible_key(key) or key
    try:
        head = await verifier.core.store.head(key)
        stored = fmt.classify(key, size, head.metadata)
    except NotFound:
        return VerifyResult(key, visible, None, Status.SKIPPED, message="deleted during the run")
    except DgfsError as exc:
        return VerifyResult(key, visible, None, Status.FAILED, message=str(exc))
    return await verifier.verify_stored(stored)


@dataclass(frozen=True)
class MountPath:
    """Where a path inside a dgfs mount lives in S3 (from the mount's xattrs)."""

    bucket: str
    key: str  # the user-visible key; a directory's prefix; no slashes at the ends
    endpoint_url: str | None = None


def mount_location(path: Path) -> MountPath:
    """Read ``user.dgfs.bucket``/``user.dgfs.key`` (and ``user.dgfs.endpoint`` if set).

    Raises ``LookupError`` when the path carries no ``user.dgfs.bucket``
    attribute: it is not inside a dgfs mount.
    """
    values: dict[str, str] = {}
    for name in (XATTR_BUCKET, XATTR_KEY, XATTR_ENDPOINT):
        with contextlib.suppress(OSError):
            values[name] = os.getxattr(path, name).decode()
    if not values.get(XATTR_BUCKET):
        raise LookupError(f"{path} is not inside a dgfs mount (no {XATTR_BUCKET} attribute)")
    return MountPath(
        values[XATTR_BUCKET],
        values.get(XATTR_KEY, "").strip("/"),
        values.get(XATTR_ENDPOINT) or None,
    )
