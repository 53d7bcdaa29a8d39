"""In-place conversion between delta modes.

``plan_conversion``/``convert_in_place`` turn the deltas under one location
into one mode, DeltaGlider v6 (``reference.bin``) or deep
(``reference.deep``), without a second bucket (``dgfs migrate`` with the
same source and destination). What a caller may rely on:

- Each delta of the other mode is rebuilt (verified against its SHA-256)
  and stored again by ``Core.put(mode=...)`` under the same key, with its
  user metadata and content type. Deltas already in the target mode,
  direct and foreign objects are left alone.
- Every step leaves every file readable: the new delta replaces the old
  one in a single PUT of the same ``.delta`` key, and the target mode's
  reference is created before it. A file that goes direct instead (the
  target mode's policy says so) is written before its old delta is
  deleted; should a crash leave both, the newer direct copy is what
  readers see, and the next run deletes the stale delta.
- The old mode's references are removed last, through ``gc.collect``
  (backup, re-check, settle, put back if a delta appeared), and only
  those no delta of their directory needs any more.
- Rerunning finishes an interrupted conversion and skips what is done.
- With a ``shard``, the plan and every step (conversion, stale deltas,
  removal of old references, the sizes before and after) cover only the
  directories that shard owns; the ``N`` shards together convert the
  location as one worker would.
- Into DeltaGlider mode, the deltas the stock DeltaGlider CLI made from
  gzip input (xdelta3 without ``-D`` diffed the decompressed streams, so
  DeltaGlider reads them back only if its gzip happens to recompress the
  same bytes) are rewritten too: rebuilt by dgfs (verified) and stored
  again by ``Core.put(mode=DG)``, which stores gzip content direct, as
  DeltaGlider reads it. Telling them apart costs a HEAD per delta of a
  DeltaGlider directory and, for those dgfs did not write, one ranged GET
  of their first ``delta.HEADER_PROBE`` bytes. Into deep mode they are DeltaGlider
  deltas like the others and are converted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from dgfs import delta, forms, gc, proxymeta
from dgfs import format as fmt
from dgfs.core import Core
from dgfs.errors import DgfsError, NotFound
from dgfs.format import DeltaMode, Kind
from dgfs.migrate import (
    DEFAULT_CONCURRENCY,
    Copied,
    MigrationReport,
    SourceFile,
    run_files,
    selected,
    source_file,
)
from dgfs.runtime import S3Location
from dgfs.shard import Shard, owned
from dgfs.store.base import ObjectHead, ObjectInfo, ObjectStore, head_many
from dgfs.writer import PutResult

log = logging.getLogger(__name__)

#: How ``dg-tool`` starts on everything dgfs writes (``dgfs/<version>``).
DGFS_TOOL_PREFIX = fmt.TOOL.split("/", 1)[0] + "/"


def is_in_place(source: S3Location, dest: S3Location) -> bool:
    """Whether source and destination name the same location (an in-place conversion)."""
    return source.bucket == dest.bucket and source.prefix.strip("/") == dest.prefix.strip("/")


def other_mode(mode: DeltaMode) -> DeltaMode:
    return DeltaMode.DG if mode is DeltaMode.DEEP else DeltaMode.DEEP


@dataclass
class ConversionPlan:
    """What an in-place conversion would do; nothing has been written when you hold one.

    Files, stale deltas and references are named by their full keys.
    """

    location: S3Location
    target: DeltaMode
    to_convert: list[SourceFile] = field(default_factory=list)  # deltas of the other mode
    # Target dg: DeltaGlider deltas of gzip input it cannot read back (``is_stock_gzip_delta``).
    to_rewrite: list[SourceFile] = field(default_factory=list)
    already: int = 0  # deltas in the target mode (or beside no other-mode reference)
    stale: list[str] = field(default_factory=list)  # planned .delta behind a newer direct copy
    old_references: list[ObjectInfo] = field(default_factory=list)  # the other mode's
    filtered_out: int = 0
    stored_bytes: int = 0  # every object under the location now (.deltaglider/ aside)
    shard: Shard | None = None  # the directories planned (stored_bytes too); None: all
    other_shards: int = 0  # deltas whose directory another shard owns

    @property
    def source_mode(self) -> DeltaMode:
        return other_mode(self.target)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.to_convert)

    @property
    def rewrite_bytes(self) -> int:
        return sum(f.size for f in self.to_rewrite)

    @property
    def nothing_to_do(self) -> bool:
        return not (self.to_convert or self.to_rewrite or self.stale or self.old_references)


def written_by_dgfs(metadata: Mapping[str, str]) -> bool:
    """Whether an object's ``dg-tool`` names dgfs (DeltaGlider writes ``deltaglider/<v>``)."""
    return (fmt.meta_value(metadata, "tool") or "").startswith(DGFS_TOOL_PREFIX)


async def is_stock_gzip_delta(store: ObjectStore, head: ObjectHead) -> bool:
    """Whether the delta ``head`` is one the stock DeltaGlider CLI made from gzip input.

    Such a delta (xdelta3 without ``-D`` diffed the decompressed streams)
    is read back by DeltaGlider only if its gzip happens to recompress the
    original bytes; dgfs recovers them. Deep deltas and deltas dgfs wrote
    cost no request; others one ranged GET of ``delta.HEADER_PROBE`` bytes.
    """
    if fmt.is_deep(head.metadata) or written_by_dgfs(head.metadata):
        return False
    return delta.is_stock_gzip_delta(await store.get_range(head.key, 0, delta.HEADER_PROBE))


async def _stock_gzip_deltas(
    store: ObjectStore, heads: list[ObjectHead], concurrency: int
) -> set[str]:
    """The keys among ``heads`` that ``is_stock_gzip_delta`` (gone ones are not)."""
    found: set[str] = set()
    limiter = trio.CapacityLimiter(max(1, concurrency))

    async def one(head: ObjectHead) -> None:
        async with limiter:
            with contextlib.suppress(NotFound):
                if await is_stock_gzip_delta(store, head):
                    found.add(head.key)

    async with trio.open_nursery() as nursery:
        for head in heads:
            nursery.start_soon(one, head)
    return found


async def plan_conversion(
    store: ObjectStore,
    location: S3Location,
    target: DeltaMode,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    concurrency: int = 32,
    shard: Shard | None = None,
) -> ConversionPlan:
    """List ``location`` and decide which deltas to convert to ``target`` (no writes).

    ``shard``: only the directories it owns, the old references and
    ``stored_bytes`` included (the other shards' deltas are counted in
    ``other_shards``).

    Only deltas in a directory that holds the other mode's reference can be
    of that mode; those are HEADed to read their mode, size and metadata.
    Into ``dg``, the deltas of directories holding ``reference.bin`` are
    HEADed too, and those dgfs did not write are checked with
    ``is_stock_gzip_delta`` (``to_rewrite``).
    """
    root = fmt.listing_root(location.prefix)
    plan = ConversionPlan(location, target, shard=shard)
    objects = await _owned_objects(store, root, plan)
    await _drop_users_reference_deep(store, plan, objects, concurrency)
    candidates = _candidates(plan, objects, root, include, exclude)
    heads = await head_many(store, [o.key for o in candidates], concurrency=concurrency)
    in_target = {
        key: head
        for key, head in heads.items()
        if fmt.is_deep(head.metadata) == (target is DeltaMode.DEEP)
    }
    stock_gzip: set[str] = set()
    if target is DeltaMode.DG:
        stock_gzip = await _stock_gzip_deltas(store, list(in_target.values()), concurrency)
    by_key = {o.key: o for o in objects}
    for obj in sorted(candidates, key=lambda o: o.key):
        head = heads.get(obj.key)
        if head is None:
            continue  # deleted since the listing
        if not forms.is_delta(head):
            continue  # a file of its own named x.delta (no DeltaGlider metadata)
        visible = fmt.visible_key(obj.key)
        assert visible is not None
        if obj.key in in_target and obj.key not in stock_gzip:
            plan.already += 1
            continue
        direct = by_key.get(visible)
        if direct is not None and await _shown_over(store, direct, obj.key, head):
            plan.stale.append(obj.key)  # a put that went direct died before deleting it
            continue
        # Named by their full keys everywhere (rel_key too), like the references.
        file = source_file(visible, visible, visible, obj, head)
        (plan.to_rewrite if obj.key in stock_gzip else plan.to_convert).append(file)
    return plan


async def _owned_objects(store: ObjectStore, root: str, plan: ConversionPlan) -> list[ObjectInfo]:
    """The objects under ``root`` in ``plan.shard``'s directories; sets ``stored_bytes``,
    ``old_references`` and ``other_shards`` (the other shards' deltas)."""
    listing = await store.list(root, delimiter=None)
    objects = []
    for obj in listing.objects:
        if not root and fmt.is_internal_key(obj.key):
            continue
        if owned(plan.shard, obj.key):
            objects.append(obj)
        elif fmt.is_delta_key(obj.key):
            plan.other_shards += 1
    plan.stored_bytes = sum(o.size for o in objects)
    old_ref_name = fmt.reference_key("", plan.source_mode)  # the bare name
    plan.old_references = [o for o in objects if fmt.split_key(o.key)[1] == old_ref_name]
    return objects


async def _drop_users_reference_deep(
    store: ObjectStore, plan: ConversionPlan, objects: list[ObjectInfo], concurrency: int
) -> None:
    """A ``reference.deep`` that is no reference (a deltaglider_proxy user's
    file of that name: no deep metadata) is a file of its own. Into dg it is
    no old reference to remove; into deep its directory cannot be deep (it
    stays DeltaGlider's, ``FileWriter._deltaspace``), so nothing there is
    planned. One HEAD per ``reference.deep``."""
    named = [o for o in objects if fmt.split_key(o.key)[1] == fmt.DEEP_REFERENCE_NAME]
    heads = await head_many(store, [o.key for o in named], concurrency=concurrency)
    users = {
        key for key, head in heads.items() if not fmt.is_deltaglider_reference(key, head.metadata)
    }
    if plan.target is DeltaMode.DG:
        plan.old_references = [
            o for o in plan.old_references if o.key in heads and o.key not in users
        ]
    else:
        blocked = {fmt.split_key(key)[0] for key in users}
        plan.old_references = [
            o for o in plan.old_references if fmt.split_key(o.key)[0] not in blocked
        ]


def _candidates(
    plan: ConversionPlan,
    objects: list[ObjectInfo],
    root: str,
    include: Sequence[str],
    exclude: Sequence[str],
) -> list[ObjectInfo]:
    """The deltas that may need converting: selected, in a directory ``_spaces_to_check``
    names (the others are counted in ``plan.filtered_out`` and ``plan.already``)."""
    checked_spaces = _spaces_to_check(plan, objects)
    candidates: list[ObjectInfo] = []
    for obj in objects:
        visible = fmt.visible_key(obj.key)
        if visible is None or visible == obj.key:
            continue  # a reference, or not a delta
        if not selected(visible[len(root) :], include, exclude):
            plan.filtered_out += 1
        elif fmt.split_key(obj.key)[0] in checked_spaces:
            candidates.append(obj)
        else:
            plan.already += 1
    return candidates


def _spaces_to_check(plan: ConversionPlan, objects: list[ObjectInfo]) -> set[str]:
    """The directories whose deltas may need converting (or, into dg, rewriting)."""
    spaces = {fmt.split_key(o.key)[0] for o in plan.old_references}
    if plan.target is DeltaMode.DG:
        # DeltaGlider's own gzip deltas can only be where its reference is.
        spaces |= {
            fmt.split_key(o.key)[0]
            for o in objects
            if fmt.split_key(o.key)[1] == fmt.REFERENCE_NAME
        }
    return spaces


@dataclass
class ConversionReport(MigrationReport):
    """What an in-place conversion did.

    ``copied``: every file stored again, converted or rewritten;
    ``rewritten``: the keys of those that were DeltaGlider's gzip deltas.
    """

    target: DeltaMode = DeltaMode.DG
    stored_before: int = 0  # every object under the location (.deltaglider/ aside)
    stored_after: int = 0
    rewritten: list[str] = field(default_factory=list)
    stale_removed: list[str] = field(default_factory=list)
    references_removed: list[gc.Garbage] = field(default_factory=list)
    references_kept: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    references_failed: list[tuple[str, str]] = field(default_factory=list)  # (key, error)
    # reference.bin of a rewritten directory that no delta needs now (``dgfs gc`` removes it).
    unused_references: list[str] = field(default_factory=list)

    @property
    def converted(self) -> list[Copied]:
        """The files converted from the other mode (``copied`` less the rewritten)."""
        rewritten = set(self.rewritten)
        return [c for c in self.copied if c.dest_key not in rewritten]

    @property
    def any_failed(self) -> bool:
        return bool(self.failed or self.references_failed)

    @property
    def freed_bytes(self) -> int:
        return sum(g.size for g in self.references_removed)

    def to_json(self) -> dict[str, object]:
        data = super().to_json()
        del data["copied"]
        return {
            "in_place": True,
            "deltas": self.target.value,
            "converted": len(self.converted),
            "rewritten": self.rewritten,
            **data,
            "stale_removed": self.stale_removed,
            "references_removed": [g.key for g in self.references_removed],
            "references_kept": [{"key": k, "why": why} for k, why in self.references_kept],
            "references_failed": [{"key": k, "error": e} for k, e in self.references_failed],
            "freed_bytes": self.freed_bytes,
            "location_bytes_before": self.stored_before,
            "location_bytes_after": self.stored_after,
            "unused_references": self.unused_references,
        }


async def convert_file(
    core: Core, file: SourceFile, target: DeltaMode, *, rewrite: bool = False
) -> PutResult | None:
    """Rebuild one delta (verified) and store it again under its key in ``target`` mode.

    ``rewrite``: the plan found it to be one of DeltaGlider's gzip deltas
    (``is_stock_gzip_delta``), stored again even though it is in the target
    mode. None when there is nothing left to do (done since the plan).
    """
    scratch = core.scratch_path()
    try:
        stored = await core.get(file.key, scratch)  # rebuilt and verified
        in_target = stored.deep == (target is DeltaMode.DEEP)
        if stored.kind is not Kind.DELTA or (in_target and not rewrite):
            return None
        if file.head is not None and file.head.key == stored.stored_key:
            head = file.head
        else:
            head = await core.store.head(stored.stored_key)
        if in_target and not await is_stock_gzip_delta(core.store, head):
            return None  # replaced since the plan by a delta DeltaGlider reads
        return await core.put(
            scratch,
            file.key,
            extra_metadata=fmt.user_metadata(head.metadata),
            digest=await core.digest(scratch),
            content_type=proxymeta.content_type_of(head.metadata, head.content_type),
            mode=target,
        )
    finally:
        scratch.unlink(missing_ok=True)


async def convert_in_place(
    core: Core,
    plan: ConversionPlan,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    settle: float = gc.DEFAULT_SETTLE_SECONDS,
    on_done: Callable[[SourceFile, Copied | None, str | None], None] | None = None,
) -> ConversionReport:
    """Convert and rewrite the plan's files, drop stale deltas, remove unneeded old references.

    ``settle``: seconds ``gc.collect`` waits before re-checking the removed
    references. ``on_done(file, copied, error)`` follows each file
    (``copied`` and ``error`` both None: already done).
    """
    started = trio.current_time()
    report = ConversionReport(
        skipped=plan.already,
        shard=plan.shard,
        target=plan.target,
        stored_before=plan.stored_bytes,
    )
    rewrite_keys = {f.key for f in plan.to_rewrite}

    async def convert(file: SourceFile) -> Copied | None:
        rewrite = file.key in rewrite_keys
        result = await convert_file(core, file, plan.target, rewrite=rewrite)
        if result is None:
            return None
        if rewrite:
            report.rewritten.append(file.key)
        return Copied.of(file, result)

    files = plan.to_convert + plan.to_rewrite
    await run_files(files, convert, report, "convert", concurrency, on_done)
    report.rewritten.sort()
    for key in plan.stale:
        try:
            if await _still_stale(core.store, key):
                await core.store.delete(key)
                report.stale_removed.append(key)
        except DgfsError as exc:
            log.error("convert: cannot remove the stale delta %s: %s", key, exc)
            report.failed.append((key, f"stale delta not removed: {exc}"))
    await _remove_old_references(core.store, plan, report, settle)
    root = fmt.listing_root(plan.location.prefix)
    after = await core.store.list(root, delimiter=None)
    objects = _shard_objects(after.objects, root, plan.shard)
    report.stored_after = sum(o.size for o in objects)
    touched = [*report.rewritten, *report.stale_removed]
    if plan.target is DeltaMode.DG and touched:
        refs = {fmt.reference_key(fmt.split_key(key)[0]) for key in touched}
        orphans = await gc.orphaned_references(core.store, objects)
        report.unused_references = sorted(g.key for g in orphans if g.key in refs)
    report.elapsed = trio.current_time() - started
    return report


def _shard_objects(objects: list[ObjectInfo], root: str, shard: Shard | None) -> list[ObjectInfo]:
    """The LIST ``objects`` a conversion counts: ``.deltaglider/`` aside, the shard's only."""
    return [o for o in objects if (root or not fmt.is_internal_key(o.key)) and owned(shard, o.key)]


async def _still_stale(store: ObjectStore, delta_key: str) -> bool:
    """Whether a direct copy newer than the delta ``delta_key`` is (still) there."""
    visible = fmt.visible_key(delta_key)
    assert visible is not None
    try:
        delta, direct = await store.head(delta_key), await store.head(visible)
    except NotFound:
        return False
    return forms.is_delta(delta) and _ranks_over(visible, direct, delta_key, delta)


async def _shown_over(
    store: ObjectStore, direct: ObjectInfo, delta_key: str, delta: ObjectHead
) -> bool:
    """Whether readers show the direct object (listed) over the delta: the
    newer second, else (a HEAD) the rest of ``fmt.form_rank``."""
    if direct.last_modified != delta.last_modified:
        return direct.last_modified > delta.last_modified
    try:
        head = await store.head(direct.key)
    except NotFound:
        return False
    return _ranks_over(direct.key, head, delta_key, delta)


def _ranks_over(direct_key: str, direct: ObjectHead, delta_key: str, delta: ObjectHead) -> bool:
    """Whether the direct form of a file is the one readers show (``fmt.form_rank``)."""
    return fmt.form_rank(direct_key, direct.last_modified, direct.metadata) > fmt.form_rank(
        delta_key, delta.last_modified, delta.metadata
    )


async def _remove_old_references(
    store: ObjectStore, plan: ConversionPlan, report: ConversionReport, settle: float
) -> None:
    """Remove the plan's old references that no delta needs now (``gc``'s rules and safety)."""
    if not plan.old_references:
        return
    planned = {ref.key for ref in plan.old_references}
    root = fmt.listing_root(plan.location.prefix)
    listing = await store.list(root, delimiter=None)
    # Whole directories: what a reference's own directory holds is all that decides.
    objects = _shard_objects(listing.objects, root, plan.shard)
    unneeded = {g.key: g for g in await gc.orphaned_references(store, objects) if g.key in planned}
    present = {o.key for o in objects}
    for ref in plan.old_references:
        if ref.key not in unneeded and ref.key in present:
            why = f"{plan.source_mode.value} deltas still need it (rerun to finish)"
            report.references_kept.append((ref.key, why))
    if not unneeded:
        return
    result = await gc.collect(store, list(unneeded.values()), settle=settle)
    report.references_removed = result.removed
    report.references_kept += [(g.key, why) for g, why in result.kept]
    report.references_kept += [(key, "a delta appeared; put back") for key in result.restored]
    report.references_failed += [(g.key, error) for g, error in result.failed]
