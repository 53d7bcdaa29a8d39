"""Find and remove what no file needs any more.

Garbage is:

- an orphaned reference: ``reference.bin`` in a directory with no
  ``.delta`` object left;
- an expired temp object under ``.deltaglider/tmp/``: its ``dg-expires-at``
  (DeltaGlider's rehydrated downloads) has passed, or, without one, it is
  older than ``tmp_max_age`` (leftovers of crashed writers and probes);
- an incomplete multipart upload older than ``multipart_max_age``.

``find_garbage`` only looks. ``collect`` removes, safely against a writer
that is about to use a reference it saw a moment ago: each reference is
first copied to ``.deltaglider/tmp/gc/`` (kept ``backup_ttl``), its
directory is listed again right before the delete, and after ``settle``
seconds once more; if a delta has appeared meanwhile the reference is put
back. A later ``find_garbage`` also proposes putting a backup back when
its directory has deltas again but no reference. Temp objects are only
looked for when the whole bucket is collected (they live at its root).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import trio

from dgfs import format as fmt
from dgfs.errors import DgfsError, NotFound
from dgfs.store.base import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

GC_BACKUP_PREFIX = fmt.TMP_PREFIX + "gc/"
META_EXPIRES_AT = "dg-expires-at"
META_GC_ORIGINAL_KEY = "dg-gc-original-key"
DEFAULT_TMP_MAX_AGE = timedelta(hours=24)
DEFAULT_MULTIPART_MAX_AGE = timedelta(hours=24)
DEFAULT_BACKUP_TTL = timedelta(hours=24)
DEFAULT_SETTLE_SECONDS = 10.0


class Kind(enum.Enum):
    ORPHANED_REFERENCE = "orphaned-reference"
    EXPIRED_TMP = "expired-tmp"
    STALE_MULTIPART = "stale-multipart"
    RESTORE_REFERENCE = "restore-reference"  # put a gc backup back


@dataclass(frozen=True)
class Garbage:
    """One thing ``collect`` would act on."""

    kind: Kind
    key: str
    size: int = 0
    reason: str = ""
    upload_id: str | None = None
    backup_key: str | None = None  # RESTORE_REFERENCE: where the bytes are


@dataclass
class GcResult:
    removed: list[Garbage] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # reference keys put back
    kept: list[tuple[Garbage, str]] = field(default_factory=list)  # no longer garbage
    failed: list[tuple[Garbage, str]] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(g.size for g in self.removed)


def _parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _has_delta(keys: list[str], space: str) -> bool:
    for key in keys:
        prefix, name = fmt.split_key(key)
        if prefix == space and name.endswith(fmt.DELTA_SUFFIX) and name != fmt.DELTA_SUFFIX:
            return True
    return False


def _orphans(objects: list[ObjectInfo]) -> list[Garbage]:
    spaces_with_delta: set[str] = set()
    refs: list[ObjectInfo] = []
    for obj in objects:
        if fmt.is_internal_key(obj.key):
            continue
        prefix, name = fmt.split_key(obj.key)
        if name == fmt.REFERENCE_NAME:
            refs.append(obj)
        elif name.endswith(fmt.DELTA_SUFFIX) and name != fmt.DELTA_SUFFIX:
            spaces_with_delta.add(prefix)
    return [
        Garbage(Kind.ORPHANED_REFERENCE, ref.key, ref.size, "no delta left in its directory")
        for ref in refs
        if fmt.split_key(ref.key)[0] not in spaces_with_delta
    ]


async def find_garbage(
    store: ObjectStore,
    prefix: str = "",
    *,
    now: datetime | None = None,
    tmp_max_age: timedelta = DEFAULT_TMP_MAX_AGE,
    multipart_max_age: timedelta = DEFAULT_MULTIPART_MAX_AGE,
) -> list[Garbage]:
    """Everything ``collect`` would act on under ``prefix`` ("" = whole bucket). No writes."""
    now = now or datetime.now(UTC)
    root = prefix.strip("/") + "/" if prefix.strip("/") else ""
    listing = await store.list(root, delimiter=None)
    found = _orphans(listing.objects)
    if not root:
        found += await _tmp_garbage(store, listing.objects, now, tmp_max_age)
    for upload in await store.list_multipart_uploads(root):
        age = now - upload.initiated
        if age >= multipart_max_age:
            found.append(
                Garbage(
                    Kind.STALE_MULTIPART,
                    upload.key,
                    0,
                    f"incomplete multipart upload started {upload.initiated:%Y-%m-%d %H:%M} UTC",
                    upload_id=upload.upload_id,
                )
            )
    return found


async def _tmp_garbage(
    store: ObjectStore, objects: list[ObjectInfo], now: datetime, max_age: timedelta
) -> list[Garbage]:
    tmp = [o for o in objects if o.key.startswith(fmt.TMP_PREFIX)]
    all_keys = [o.key for o in objects]
    present = set(all_keys)
    found: list[Garbage] = []
    limiter = trio.CapacityLimiter(16)

    async def one(obj: ObjectInfo) -> None:
        async with limiter:
            try:
                head = await store.head(obj.key)
            except NotFound:
                return
        original = head.metadata.get(META_GC_ORIGINAL_KEY)
        needed = original and _has_delta(all_keys, fmt.split_key(original)[0])
        if original and needed and original not in present:
            found.append(
                Garbage(
                    Kind.RESTORE_REFERENCE,
                    original,
                    obj.size,
                    "its directory has deltas again but no reference",
                    backup_key=obj.key,
                )
            )
            return
        expires = _parse_time(head.metadata.get(META_EXPIRES_AT, ""))
        if expires is not None:
            if expires <= now:
                found.append(
                    Garbage(Kind.EXPIRED_TMP, obj.key, obj.size, f"expired {expires.isoformat()}")
                )
        elif now - obj.last_modified >= max_age:
            found.append(
                Garbage(
                    Kind.EXPIRED_TMP,
                    obj.key,
                    obj.size,
                    f"no expiry, written {obj.last_modified:%Y-%m-%d %H:%M} UTC",
                )
            )

    async with trio.open_nursery() as nursery:
        for obj in tmp:
            nursery.start_soon(one, obj)
    return sorted(found, key=lambda g: g.key)


async def _space_keys(store: ObjectStore, space: str) -> list[str]:
    listing = await store.list(space + "/" if space else "", delimiter="/")
    return [o.key for o in listing.objects]


async def collect(
    store: ObjectStore,
    garbage: list[Garbage],
    *,
    settle: float = DEFAULT_SETTLE_SECONDS,
    backup_ttl: timedelta = DEFAULT_BACKUP_TTL,
    now: datetime | None = None,
) -> GcResult:
    """Act on ``garbage`` (from ``find_garbage``); see the module docstring for the safety net."""
    now = now or datetime.now(UTC)
    result = GcResult()
    deleted_refs: dict[str, tuple[Garbage, str, Mapping[str, str]]] = {}

    for item in garbage:
        try:
            if item.kind is Kind.ORPHANED_REFERENCE:
                space = fmt.split_key(item.key)[0]
                if _has_delta(await _space_keys(store, space), space):
                    result.kept.append((item, "a delta appeared; no longer orphaned"))
                    continue
                head = await store.head(item.key)
                backup = f"{GC_BACKUP_PREFIX}{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}/{item.key}"
                await store.copy(
                    item.key,
                    backup,
                    {
                        **head.metadata,
                        META_EXPIRES_AT: (now + backup_ttl).isoformat(),
                        META_GC_ORIGINAL_KEY: item.key,
                    },
                )
                await store.delete(item.key)
                deleted_refs[item.key] = (item, backup, head.metadata)
                log.info("removed orphaned reference %s (backup %s)", item.key, backup)
            elif item.kind is Kind.EXPIRED_TMP:
                await store.delete(item.key)
            elif item.kind is Kind.STALE_MULTIPART:
                assert item.upload_id is not None
                await store.abort_multipart_upload(item.key, item.upload_id)
            elif item.kind is Kind.RESTORE_REFERENCE:
                assert item.backup_key is not None
                await _restore(store, item.backup_key, item.key)
                result.restored.append(item.key)
                continue
        except NotFound:
            result.kept.append((item, "already gone"))
            continue
        except DgfsError as exc:
            log.error("gc %s: %s", item.key, exc)
            result.failed.append((item, str(exc)))
            continue
        result.removed.append(item)

    if deleted_refs:
        # A writer may have looked the reference up just before it went: give
        # its delta time to land, then look again.
        await trio.sleep(settle)
        for ref_key, (item, backup, _meta) in deleted_refs.items():
            space = fmt.split_key(ref_key)[0]
            keys = await _space_keys(store, space)
            if _has_delta(keys, space) and ref_key not in keys:
                log.warning("a delta appeared in %s while gc ran: restoring %s", space, ref_key)
                try:
                    await _restore(store, backup, ref_key)
                except DgfsError as exc:
                    result.failed.append((item, f"could not restore from {backup}: {exc}"))
                    continue
                result.removed.remove(item)
                result.restored.append(ref_key)
    return result


async def _restore(store: ObjectStore, backup_key: str, ref_key: str) -> None:
    """Copy a gc backup back to its reference key, with its original metadata."""
    head = await store.head(backup_key)
    meta = {
        k: v for k, v in head.metadata.items() if k not in (META_EXPIRES_AT, META_GC_ORIGINAL_KEY)
    }
    await store.copy(backup_key, ref_key, meta)
    with contextlib.suppress(DgfsError):
        await store.delete(backup_key)
    log.info("restored %s from %s", ref_key, backup_key)
