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
back (``put_back_if_needed``, which rmdir and directory renames use too),
never over a reference another writer made since. A later
``find_garbage`` also proposes putting a backup back when its directory
has deltas again but no reference, and never expires one whose deltas
are stranded (another reference took its key). Temp objects and
directory indexes are only looked for when the whole bucket is collected
(they live at its root).
Each "is a delta left that needs it" question below follows the same rule.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import tempfile
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
#: What a backup's metadata holds beyond the reference's own.
_GC_METADATA = (META_EXPIRES_AT, META_GC_ORIGINAL_KEY)
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
    if not fmt.is_deltaglider_reference(key, head.metadata):
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
        if original and await _stranded(store, all_keys, original, fmt.meta_sha256(head.metadata)):
            log.error(
                "deltas in %s need the reference gc removed, and another reference took its"
                " key: they cannot be read; its bytes stay at %s",
                fmt.split_key(original)[0],
                obj.key,
            )
            return  # kept, whatever its expiry: the only copy of what they need
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


async def space_keys(store: ObjectStore, space: str) -> list[str]:
    """The keys of the objects directly in the directory ``space`` (a LIST)."""
    listing = await store.list(space + "/" if space else "", delimiter="/")
    return [o.key for o in listing.objects]


class PutBack(enum.Enum):
    """What ``put_back_if_needed`` found."""

    NOT_NEEDED = "not needed"
    PUT_BACK = "put back"
    #: Deltas need the removed reference, but another writer made a new one
    #: at its key since: they cannot be read until rebuilt from the copy,
    #: which must be kept (never put over the new one: its deltas need it).
    STRANDED = "stranded"


async def put_back_if_needed(store: ObjectStore, ref_key: str, copy_key: str) -> PutBack:
    """After the reference ``ref_key`` was deleted (by ``dgfs gc``, rmdir or
    a directory rename): put it back from ``copy_key`` (its bytes, under
    another key) if a delta in its directory needs it now.

    A writer looks at its reference again after storing a delta and takes
    the delta back if the reference is gone (``FileWriter``): a delta this
    listing does not show is taken back, one it shows was stored while the
    reference stood and needs it. It is created only where no object
    stands (``If-None-Match``), never over a reference made since.
    """
    space = fmt.split_key(ref_key)[0]
    keys = await space_keys(store, space)
    if not await needed(store, ref_key, keys):
        return PutBack.NOT_NEEDED
    head = await store.head(copy_key)
    meta = {k: v for k, v in head.metadata.items() if k not in _GC_METADATA}
    if ref_key not in keys and await _create_from(store, copy_key, ref_key, meta):
        log.info("%s put back from %s: deltas in its directory need it", ref_key, copy_key)
        return PutBack.PUT_BACK
    if await _stranded(store, keys, ref_key, fmt.meta_sha256(head.metadata)):
        log.error(
            "deltas in %s were stored against a reference removed meanwhile, and another"
            " reference took its key: they cannot be read; its bytes are kept at %s",
            space,
            copy_key,
        )
        return PutBack.STRANDED
    return PutBack.NOT_NEEDED


async def _create_from(
    store: ObjectStore, source_key: str, key: str, metadata: Mapping[str, str]
) -> bool:
    """Create ``key`` with ``source_key``'s bytes, ``metadata`` and content
    type where no object stands; False if one does. S3 has no conditional
    copy: the bytes are downloaded and PUT with ``If-None-Match``. A store
    that ignores it is asked (a HEAD) right before the PUT, which leaves a
    moment for another writer's new reference to be overwritten."""
    with tempfile.TemporaryDirectory(prefix="dgfs-put-back-") as tmp:
        body = Path(tmp) / "reference"
        head = await store.download(source_key, body)
        with contextlib.suppress(NotFound):
            await store.head(key)
            return False
        try:
            await store.upload(
                key, body, metadata, content_type=head.content_type, if_none_match=True
            )
        except PreconditionFailed:
            return False
    return True


async def _stranded(
    store: ObjectStore, keys: Iterable[str], ref_key: str, ref_sha256: str | None
) -> bool:
    """Whether a delta among ``keys`` (a LIST) in ``ref_key``'s directory
    was made against ``ref_key`` holding ``ref_sha256`` while that is not
    what stands there."""
    space = fmt.split_key(ref_key)[0]
    deltas = [k for k in keys if fmt.is_delta_key(k) and fmt.split_key(k)[0] == space]
    if ref_sha256 is None or not deltas:
        return False
    try:
        if fmt.meta_sha256((await store.head(ref_key)).metadata) == ref_sha256:
            return False  # the same reference stands: nothing is stranded
    except NotFound:
        pass
    heads = await head_many(store, deltas)
    return any(
        fmt.reference_of(key, h.metadata) == ref_key
        and fmt.meta_sha256(h.metadata, "ref_sha256") == ref_sha256
        for key, h in heads.items()
    )


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
                outcome = await _restore(store, item.backup_key, item.key)
                if outcome is PutBack.PUT_BACK:
                    result.restored.append(item.key)
                elif outcome is PutBack.STRANDED:
                    result.failed.append((item, _stranded_reason(item.backup_key)))
                else:
                    result.kept.append((item, "no delta needs it any more, or a reference stands"))
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
    if await needed(store, item.key, await space_keys(store, space)):
        return None
    backup = await remove_with_backup(store, item.key, expires, now)
    if backup is None:
        log.info("gc: %s was replaced while it was collected; kept", item.key)
        return None
    log.info("removed orphaned reference %s (backup %s)", item.key, backup)
    return backup


async def remove_with_backup(
    store: ObjectStore, ref_key: str, expires: datetime, now: datetime
) -> str | None:
    """Copy the reference ``ref_key`` under ``GC_BACKUP_PREFIX`` (kept until
    ``expires``, and by later runs while a delta needs it) and delete that
    version; the backup's key, or None when another writer replaced it
    meanwhile (nothing deleted). ``put_back_if_needed`` comes next."""
    head = await store.head(ref_key)
    backup = f"{GC_BACKUP_PREFIX}{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}/{ref_key}"
    meta = {**head.metadata, META_EXPIRES_AT: expires.isoformat(), META_GC_ORIGINAL_KEY: ref_key}
    try:
        await store.copy(ref_key, backup, meta, version=head)
        await store.delete(ref_key, version=head)
    except PreconditionFailed:
        with contextlib.suppress(DgfsError):
            await store.delete(backup)
        return None
    return backup


async def _put_back_needed(store: ObjectStore, removed: list[_Removed], result: GcResult) -> None:
    """Restore each removed reference a delta has needed since (listing its directory again)."""
    for entry in removed:
        ref_key = entry.item.key
        try:
            outcome = await put_back_if_needed(store, ref_key, entry.backup_key)
        except DgfsError as exc:
            result.failed.append((entry.item, f"could not restore from {entry.backup_key}: {exc}"))
            continue
        if outcome is PutBack.NOT_NEEDED:
            continue
        result.removed.remove(entry.item)
        if outcome is PutBack.STRANDED:
            result.failed.append((entry.item, _stranded_reason(entry.backup_key)))
            continue
        log.warning("a delta appeared in %s while gc ran: restored", ref_key)
        with contextlib.suppress(DgfsError):
            await store.delete(entry.backup_key)
        result.restored.append(ref_key)


def _stranded_reason(backup_key: str) -> str:
    return (
        "deltas stored against it while it was removed cannot be read (another reference"
        f" took its key); its bytes are kept at {backup_key}"
    )


async def _restore(store: ObjectStore, backup_key: str, ref_key: str) -> PutBack:
    """Put a gc backup back at its reference key, with its original
    metadata, unless what stands there since needs no putting back."""
    outcome = await put_back_if_needed(store, ref_key, backup_key)
    if outcome is PutBack.PUT_BACK:
        with contextlib.suppress(DgfsError):
            await store.delete(backup_key)
    return outcome
