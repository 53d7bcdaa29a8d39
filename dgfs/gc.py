"""Find and remove what no file needs any more.

Garbage is:

- an orphaned reference: ``reference.bin`` or ``reference.deep`` in a
  directory with no ``.delta`` object left that needs it. A directory
  with one reference needs it while it holds any ``.delta`` (a LIST tells);
  one holding both (a deep deltaspace a DeltaGlider client wrote into, or
  a conversion under way) has each delta's metadata read (a HEAD each):
  deep deltas (``dgfs-format: deep-1``) need ``reference.deep``, the
  others ``reference.bin``;
- an expired temp object under ``.deltaglider/tmp/``: its ``dg-expires-at``
  (DeltaGlider's rehydrated downloads) has passed, or, without one, it is
  older than ``tmp_max_age`` (leftovers of crashed writers and probes);
- an incomplete multipart upload older than ``multipart_max_age``;
- an orphaned directory index (``dgfs.fs.dirindex``): one of a directory
  that holds no object any more (removed or renamed by a mount of another
  machine, or by another tool). An index is a hint: one removed just as a
  mount rewrote it costs the next fresh mounts HEADs, never an attribute.

``find_garbage`` only looks. ``collect`` removes, safely against a writer
that is about to use a reference it saw a moment ago: each reference is
first copied to ``.deltaglider/tmp/gc/`` (kept ``backup_ttl``), its
directory is listed again right before the delete, and after ``settle``
seconds once more; if a delta has appeared meanwhile the reference is put
back. A later ``find_garbage`` also proposes putting a backup back when
its directory has deltas again but no reference. Temp objects and
directory indexes are only looked for when the whole bucket is collected
(they live at its root).
Each "is a delta left that needs it" question below follows the same rule.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import trio

from dgfs import format as fmt
from dgfs.errors import DgfsError, NotFound, PreconditionFailed
from dgfs.format import DeltaMode
from dgfs.fs import dirindex
from dgfs.store.base import ObjectInfo, ObjectStore, head_many

log = logging.getLogger(__name__)

GC_BACKUP_PREFIX = fmt.TMP_PREFIX + "gc/"
META_EXPIRES_AT = "dg-expires-at"
META_GC_ORIGINAL_KEY = "dg-gc-original-key"
DEFAULT_TMP_MAX_AGE = timedelta(hours=24)
DEFAULT_MULTIPART_MAX_AGE = timedelta(hours=24)
DEFAULT_BACKUP_TTL = timedelta(hours=24)
DEFAULT_SETTLE_SECONDS = 10.0


class GarbageKind(enum.Enum):
    ORPHANED_REFERENCE = "orphaned-reference"
    EXPIRED_TMP = "expired-tmp"
    STALE_MULTIPART = "stale-multipart"
    ORPHANED_INDEX = "orphaned-index"
    RESTORE_REFERENCE = "restore-reference"  # put a gc backup back


@dataclass(frozen=True)
class Garbage:
    """One thing ``collect`` would act on."""

    kind: GarbageKind
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


async def delta_modes(
    store: ObjectStore, delta_keys: Iterable[str], concurrency: int = 16
) -> dict[str, DeltaMode | None]:
    """The mode of each delta from its metadata (HEADs); None when it could not be read."""
    modes: dict[str, DeltaMode | None] = {}

    def unreadable(key: str, exc: DgfsError) -> None:
        log.warning("cannot read %s (%s): assuming it needs its references", key, exc)
        modes[key] = None

    heads = await head_many(
        store, dict.fromkeys(delta_keys), concurrency=concurrency, on_error=unreadable
    )
    for key, head in heads.items():
        modes[key] = DeltaMode.DEEP if fmt.is_deep(head.metadata) else DeltaMode.DG
    return modes


def unneeded_references(
    references: Collection[DeltaMode], delta_modes: Collection[DeltaMode | None]
) -> set[DeltaMode]:
    """Which of one directory's references (by mode) none of its deltas needs.

    The one rule ``dgfs gc`` and ``dgfs stats`` both follow. ``delta_modes``
    holds the mode of each delta in the directory (None: its metadata was
    not read). A directory's only reference is needed by any delta; with
    both references, a delta needs the one of its own mode, and a delta of
    unknown mode needs both.
    """
    if not delta_modes:
        return set(references)
    if len(references) == 1:
        return set()
    return {ref for ref in references if not any(m in (ref, None) for m in delta_modes)}


async def needed(store: ObjectStore, ref_key: str, keys: Iterable[str]) -> bool:
    """Whether a ``.delta`` among ``keys`` (a LIST) needs the reference ``ref_key``.

    ``ref_key`` need not exist (a removed reference: should it come back?).
    ``unneeded_references`` decides; each delta's metadata is read (a HEAD)
    only when the other mode's reference is there too.
    """
    space = fmt.split_key(ref_key)[0]
    mode = fmt.reference_mode(ref_key)
    deltas: list[str] = []
    references = {mode}
    for key in keys:
        prefix, name = fmt.split_key(key)
        if prefix != space:
            continue
        if fmt.is_delta_key(key):
            deltas.append(key)
        elif name in fmt.REFERENCE_NAMES:
            references.add(fmt.reference_mode(key))
    if len(references) > 1 and deltas:
        modes = set((await delta_modes(store, deltas)).values())
    else:
        modes = {None} if deltas else set()
    return mode not in unneeded_references(references, modes)


async def orphaned_references(store: ObjectStore, objects: list[ObjectInfo]) -> list[Garbage]:
    """The references in a LIST (``objects``) that no delta needs."""
    by_space: dict[str, list[str]] = {}
    refs: list[ObjectInfo] = []
    for obj in objects:
        if fmt.is_internal_key(obj.key):
            continue
        by_space.setdefault(fmt.split_key(obj.key)[0], []).append(obj.key)
        if fmt.is_reference_key(obj.key):
            refs.append(obj)
    found: list[Garbage] = []
    for ref in refs:
        keys = by_space[fmt.split_key(ref.key)[0]]
        if await needed(store, ref.key, keys):
            continue
        if not await _is_deltaglider_reference(store, ref.key):
            continue
        if any(fmt.is_delta_key(key) for key in keys):
            other = "deep" if fmt.reference_mode(ref.key) is DeltaMode.DG else "DeltaGlider"
            reason = f"its directory has only {other} deltas left"
        else:
            reason = "no delta left in its directory"
        found.append(Garbage(GarbageKind.ORPHANED_REFERENCE, ref.key, ref.size, reason))
    return found


async def _is_deltaglider_reference(store: ObjectStore, key: str) -> bool:
    try:
        head = await store.head(key)
    except NotFound:
        return False
    if not fmt.is_deltaglider_reference(head.metadata):
        log.warning("%s has no DeltaGlider metadata: not a reference, left alone", key)
        return False
    return True


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
    root = fmt.listing_root(prefix)
    listing = await store.list(root, delimiter=None)
    found = await orphaned_references(store, listing.objects)
    if not root:
        found += await _tmp_garbage(store, listing.objects, now, tmp_max_age)
        found += orphaned_indexes(listing.objects)
    for upload in await store.list_multipart_uploads(root):
        age = now - upload.initiated
        if age >= multipart_max_age:
            found.append(
                Garbage(
                    GarbageKind.STALE_MULTIPART,
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
        if original and original not in present and await needed(store, original, all_keys):
            found.append(
                Garbage(
                    GarbageKind.RESTORE_REFERENCE,
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
                    Garbage(
                        GarbageKind.EXPIRED_TMP, obj.key, obj.size, f"expired {expires.isoformat()}"
                    )
                )
        elif now - obj.last_modified >= max_age:
            found.append(
                Garbage(
                    GarbageKind.EXPIRED_TMP,
                    obj.key,
                    obj.size,
                    f"no expiry, written {obj.last_modified:%Y-%m-%d %H:%M} UTC",
                )
            )

    async with trio.open_nursery() as nursery:
        for obj in tmp:
            nursery.start_soon(one, obj)
    return sorted(found, key=lambda g: g.key)


def orphaned_indexes(objects: list[ObjectInfo]) -> list[Garbage]:
    """The directory indexes among ``objects`` (a whole bucket's listing) whose
    directory holds no object, not even another directory."""
    directories: set[str] = set()
    for obj in objects:
        if not obj.key.startswith(fmt.INTERNAL_PREFIX):
            directories.update(obj.key[: at + 1] for at, char in enumerate(obj.key) if char == "/")
    found = []
    for obj in objects:
        directory = dirindex.directory_of(obj.key)
        if directory and directory not in directories:
            found.append(
                Garbage(GarbageKind.ORPHANED_INDEX, obj.key, obj.size, f"{directory} holds nothing")
            )
    return found


async def _space_keys(store: ObjectStore, space: str) -> list[str]:
    listing = await store.list(space + "/" if space else "", delimiter="/")
    return [o.key for o in listing.objects]


@dataclass(frozen=True)
class _Removed:
    """A reference ``collect`` removed: its backup, for the re-check after ``settle``."""

    item: Garbage
    backup_key: str


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
    removed_refs: list[_Removed] = []
    for item in garbage:
        try:
            if item.kind is GarbageKind.ORPHANED_REFERENCE:
                backup = await _remove_reference(store, item, now + backup_ttl, now)
                if backup is None:
                    result.kept.append((item, "a delta appeared, or it was replaced; kept"))
                    continue
                removed_refs.append(_Removed(item, backup))
            elif item.kind in (GarbageKind.EXPIRED_TMP, GarbageKind.ORPHANED_INDEX):
                await store.delete(item.key)
            elif item.kind is GarbageKind.STALE_MULTIPART:
                assert item.upload_id is not None
                await store.abort_multipart_upload(item.key, item.upload_id)
            elif item.kind is GarbageKind.RESTORE_REFERENCE:
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
    if removed_refs:
        # A writer may have looked the reference up just before it went: give
        # its delta time to land, then look again.
        await trio.sleep(settle)
        await _put_back_needed(store, removed_refs, result)
    return result


async def _remove_reference(
    store: ObjectStore, item: Garbage, expires: datetime, now: datetime
) -> str | None:
    """Back an orphaned reference up under ``GC_BACKUP_PREFIX`` and delete it; the
    backup's key, or None when a delta needs it again or a writer replaced
    it meanwhile (nothing done: only the version backed up is deleted, so a
    new reference and the deltas made against it stay readable)."""
    space = fmt.split_key(item.key)[0]
    if await needed(store, item.key, await _space_keys(store, space)):
        return None
    head = await store.head(item.key)
    backup = f"{GC_BACKUP_PREFIX}{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}/{item.key}"
    meta = {**head.metadata, META_EXPIRES_AT: expires.isoformat(), META_GC_ORIGINAL_KEY: item.key}
    try:
        await store.copy(item.key, backup, meta, version=head)
        await store.delete(item.key, version=head)
    except PreconditionFailed:
        log.info("gc: %s was replaced while it was collected; kept", item.key)
        with contextlib.suppress(DgfsError):
            await store.delete(backup)
        return None
    log.info("removed orphaned reference %s (backup %s)", item.key, backup)
    return backup


async def _put_back_needed(store: ObjectStore, removed: list[_Removed], result: GcResult) -> None:
    """Restore each removed reference a delta has needed since (listing its directory again)."""
    for entry in removed:
        ref_key = entry.item.key
        space = fmt.split_key(ref_key)[0]
        keys = await _space_keys(store, space)
        if ref_key in keys or not await needed(store, ref_key, keys):
            continue
        log.warning("a delta appeared in %s while gc ran: restoring %s", space, ref_key)
        try:
            await _restore(store, entry.backup_key, ref_key)
        except DgfsError as exc:
            result.failed.append((entry.item, f"could not restore from {entry.backup_key}: {exc}"))
            continue
        result.removed.remove(entry.item)
        result.restored.append(ref_key)


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
