"""Copy a bucket or prefix into DeltaGlider-compressed storage, resumably.

What a caller may rely on:

- Streaming: each source object goes through one scratch file on disk
  (never whole in memory) and is stored by ``Core.put`` under its final
  name; no temporary names appear in the destination.
- Sources already in the DeltaGlider format are rehydrated (rebuilt and
  checked against their SHA-256) by the source's ``Core``, never copied as
  deltas; ``reference.bin`` and ``.deltaglider/`` are not files and are not
  copied. A source object's user metadata and content type travel with it
  (the format's own ``dg-*`` keys are written afresh).
- Resume: the destination is listed once; a file already there under the
  same visible name with the same original size (and the same SHA-256 when
  both sides record one) is skipped. A file there with another size is
  replaced.
- Prefixes as DeltaGlider does it: with ``preserve_prefix``, the last
  component of the source prefix is kept (``s3://src/a/b/`` into
  ``s3://dst/x/`` lands in ``x/b/``); without it files land right under
  the destination prefix.
- Filters are ``fnmatch`` globs on the key relative to the source prefix
  (``*`` also matches ``/``): a file is taken if it matches no exclude and,
  when includes are given, at least one include.
- Directory markers (empty ``dir/`` objects, a mount's mkdir) are copied
  as they are, with their metadata.
- One file's failure never stops the others; ``MigrationReport.failed``
  names each.
- The destination's new deltaspaces take the destination core's
  ``deltas`` mode (``Settings.deltas``); existing ones keep theirs.
- With a ``shard`` (``dgfs.shard``), a plan holds only the files whose
  destination directory that shard owns, so each destination reference is
  created by one worker; the ``N`` shards' plans together hold every file
  once. Resume works per shard: a shard's rerun skips what it copied.

In-place conversion (``plan_conversion``/``convert_in_place``) turns the
deltas under one location into one mode, DeltaGlider v6 (``reference.bin``)
or deep (``reference.deep``), without a second bucket:

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
import fnmatch
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from dgfs import delta, gc
from dgfs import format as fmt
from dgfs.core import Core, PutResult
from dgfs.errors import ConfigError, DgfsError, IntegrityError, NotFound
from dgfs.format import DeltaMode, Kind, StoredFile
from dgfs.runtime import S3Location, Settings, open_core, open_store
from dgfs.shard import Shard, label, owned
from dgfs.store.base import ObjectHead, ObjectInfo, ObjectStore, head_many

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
#: Bytes read from the start of a delta to find xdelta3's application header.
#: How ``dg-tool`` starts on everything dgfs writes (``dgfs/<version>``).
DGFS_TOOL_PREFIX = fmt.TOOL.split("/", 1)[0] + "/"


# --- names -------------------------------------------------------------------------


def effective_dest_prefix(source_prefix: str, dest_prefix: str, preserve_prefix: bool) -> str:
    """Where files land in the destination (no slashes at the ends; "" = bucket root)."""
    source_prefix, dest_prefix = source_prefix.strip("/"), dest_prefix.strip("/")
    if preserve_prefix and source_prefix:
        last = source_prefix.rsplit("/", 1)[-1]
        return f"{dest_prefix}/{last}" if dest_prefix else last
    return dest_prefix


def selected(rel_key: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """Whether ``rel_key`` passes the ``--include``/``--exclude`` globs."""
    if any(fnmatch.fnmatchcase(rel_key, pattern) for pattern in exclude):
        return False
    return not include or any(fnmatch.fnmatchcase(rel_key, pattern) for pattern in include)


# --- planning --------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """One user-visible file of the source and where it goes."""

    key: str  # visible key in the source bucket
    rel_key: str  # relative to the source prefix
    dest_key: str  # visible key in the destination bucket
    size: int  # original size (a delta's dg-file-size)
    sha256: str | None = None  # when the source records it
    delta: bool = False  # stored as a DeltaGlider delta in the source
    head: ObjectHead | None = None  # the source delta's HEAD (metadata, content type)


@dataclass
class MigrationPlan:
    """What a run would do; nothing has been written when you hold one."""

    source: S3Location
    dest: S3Location
    dest_prefix: str
    to_copy: list[SourceFile] = field(default_factory=list)
    present: list[SourceFile] = field(default_factory=list)  # already in the destination
    replacing: list[SourceFile] = field(default_factory=list)  # in to_copy, differ at dest
    filtered_out: int = 0
    shard: Shard | None = None  # the destination directories planned; None: all
    other_shards: int = 0  # selected files whose directory another shard owns

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.to_copy)

    @property
    def present_bytes(self) -> int:
        return sum(f.size for f in self.present)


def check_locations(source: S3Location, dest: S3Location, dest_prefix: str) -> None:
    """Refuse a destination inside the source (a rerun would copy copies) or vice versa."""
    if source.bucket != dest.bucket:
        return
    src_root, dst_root = fmt.listing_root(source.prefix), fmt.listing_root(dest_prefix)
    if dst_root.startswith(src_root) or src_root.startswith(dst_root):
        raise ConfigError(
            f"source {source} and destination s3://{dest.bucket}/{dst_root} overlap; "
            "choose a destination outside the source"
        )


@dataclass(frozen=True)
class _Entry:
    obj: ObjectInfo
    delta: bool


def _visible_entries(objects: list[ObjectInfo], root: str) -> dict[str, _Entry]:
    """Visible key -> the object holding it (the newer one when both forms exist)."""
    entries: dict[str, _Entry] = {}
    for obj in objects:
        if (not root and fmt.is_internal_key(obj.key)) or fmt.is_reference_key(obj.key):
            continue
        visible = fmt.visible_key(obj.key)
        if visible is None:
            continue
        entry = _Entry(obj, visible != obj.key)
        old = entries.get(visible)
        if old is None or obj.last_modified > old.obj.last_modified:
            entries[visible] = entry
    return entries


def _original_size(head: ObjectHead) -> tuple[int, str | None, bool]:
    """``(original size, recorded sha256, is a real delta)`` from a HEAD."""
    try:
        stored = fmt.classify(head.key, head.size, head.metadata)
    except DgfsError:
        return head.size, None, False
    return stored.original_size, stored.file_sha256, stored.kind is Kind.DELTA


def _source_file(
    visible: str, rel_key: str, dest_key: str, obj: ObjectInfo, head: ObjectHead | None
) -> SourceFile:
    """The file ``obj`` holds, visible as ``visible``; its sizes from ``head`` when HEADed
    (a delta's original size is in its metadata only)."""
    delta = visible != obj.key
    if head is not None:
        size, sha256, is_delta = _original_size(head)
    else:
        size, sha256, is_delta = obj.size, None, False
    kept = head if is_delta or delta else None
    return SourceFile(visible, rel_key, dest_key, size, sha256, delta, kept)


async def plan_migration(
    source_store: ObjectStore,
    dest_store: ObjectStore,
    source: S3Location,
    dest: S3Location,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    preserve_prefix: bool = True,
    concurrency: int = 32,
    shard: Shard | None = None,
) -> MigrationPlan:
    """List both sides once and decide what to copy (no writes).

    ``shard``: only the files whose destination directory it owns (the
    others are counted in ``other_shards``, after the filters).
    """
    dest_prefix = effective_dest_prefix(source.prefix, dest.prefix, preserve_prefix)
    check_locations(source, dest, dest_prefix)
    src_root, dst_root = fmt.listing_root(source.prefix), fmt.listing_root(dest_prefix)
    plan = MigrationPlan(source, dest, dest_prefix, shard=shard)

    source_listing = await source_store.list(src_root, delimiter=None)
    wanted: dict[str, _Entry] = {}
    for visible, entry in _visible_entries(source_listing.objects, src_root).items():
        rel_key = visible[len(src_root) :]
        if not selected(rel_key, include, exclude):
            plan.filtered_out += 1
        elif owned(shard, dst_root + rel_key):
            wanted[visible] = entry
        else:
            plan.other_shards += 1  # before any HEAD: a shard pays only for its own files
    delta_heads = await head_many(
        source_store,
        [e.obj.key for e in wanted.values() if e.delta],
        concurrency=concurrency,
    )
    files: list[SourceFile] = []
    for visible, entry in sorted(wanted.items()):
        rel_key = visible[len(src_root) :]
        if not rel_key:
            continue  # the source directory's own marker
        head = delta_heads.get(entry.obj.key)
        if entry.delta and head is None:
            continue  # deleted since the listing
        files.append(_source_file(visible, rel_key, dst_root + rel_key, entry.obj, head))
    dest_listing = await dest_store.list(dst_root, delimiter=None)
    dest_entries = _visible_entries(dest_listing.objects, dst_root)
    await _compare_with_destination(plan, files, dest_store, dest_entries, concurrency)
    return plan


async def _compare_with_destination(
    plan: MigrationPlan,
    files: list[SourceFile],
    dest_store: ObjectStore,
    dest_entries: Mapping[str, _Entry],
    concurrency: int,
) -> None:
    """Sort ``files`` into ``plan.to_copy`` (``replacing`` when they differ) and ``present``."""
    # Destination deltas need a HEAD for their original size (and sha256).
    at_dest = {f.dest_key: dest_entries[f.dest_key] for f in files if f.dest_key in dest_entries}
    dest_heads = await head_many(
        dest_store, [e.obj.key for e in at_dest.values() if e.delta], concurrency=concurrency
    )
    for f in files:
        existing = at_dest.get(f.dest_key)
        if existing is None:
            plan.to_copy.append(f)
            continue
        dest_sha: str | None = None
        dest_size = existing.obj.size
        if existing.delta:
            head = dest_heads.get(existing.obj.key)
            if head is None:
                plan.to_copy.append(f)
                continue
            dest_size, dest_sha, _ = _original_size(head)
        same = dest_size == f.size and (f.sha256 is None or dest_sha in (None, f.sha256))
        if same:
            plan.present.append(f)
        else:
            plan.to_copy.append(f)
            plan.replacing.append(f)


# --- running ---------------------------------------------------------------------


@dataclass(frozen=True)
class Copied:
    """One file stored in the destination."""

    rel_key: str
    dest_key: str
    kind: Kind
    original_size: int
    stored_size: int  # the delta or direct object, plus a reference it created

    @classmethod
    def of(cls, file: SourceFile, result: PutResult) -> Copied:
        put = result.stored
        stored = put.stored_size + (put.original_size if result.created_reference else 0)
        return cls(file.rel_key, file.dest_key, put.kind, put.original_size, stored)


@dataclass
class MigrationReport:
    """What a run did."""

    copied: list[Copied] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (rel_key, reason)
    skipped: int = 0
    elapsed: float = 0.0
    shard: Shard | None = None  # the directories the run covered; None: all

    @property
    def any_failed(self) -> bool:
        """Whether something failed (the command exits 1)."""
        return bool(self.failed)

    @property
    def original_bytes(self) -> int:
        return sum(c.original_size for c in self.copied)

    @property
    def stored_bytes(self) -> int:
        return sum(c.stored_size for c in self.copied)

    @property
    def saved_bytes(self) -> int:
        return self.original_bytes - self.stored_bytes

    @property
    def files_per_second(self) -> float:
        return len(self.copied) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def bytes_per_second(self) -> float:
        return self.original_bytes / self.elapsed if self.elapsed > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "shard": label(self.shard),
            "copied": len(self.copied),
            "failed": [{"key": key, "error": reason} for key, reason in self.failed],
            "skipped": self.skipped,
            "original_bytes": self.original_bytes,
            "stored_bytes": self.stored_bytes,
            "saved_bytes": self.saved_bytes,
            "elapsed_seconds": round(self.elapsed, 3),
            "files_per_second": round(self.files_per_second, 3),
            "bytes_per_second": round(self.bytes_per_second, 1),
        }


async def copy_file(source_core: Core, dest_core: Core, file: SourceFile) -> PutResult:
    """Copy one file: download (or rehydrate) to scratch, then ``put`` at its final name."""
    if fmt.is_directory_marker(file.key):
        # A directory (a mount's mkdir): copied as it is, attributes and all.
        marker = await source_core.store.head(file.key)
        meta = fmt.user_metadata(marker.metadata)
        await dest_core.store.put_bytes(
            file.dest_key,
            b"",
            meta,
            content_type=fmt.content_type_of(marker.metadata, marker.content_type),
        )
        copied = StoredFile(Kind.FOREIGN, file.dest_key, file.dest_key, 0, 0, EMPTY_SHA256)
        return PutResult(copied)
    scratch = dest_core.scratch_path()
    try:
        if file.delta:
            stored = await source_core.get(file.key, scratch)  # rebuilt and verified
            if file.head is not None and file.head.key == stored.stored_key:
                head = file.head
            else:  # the newer form is not the one planned with
                head = await source_core.store.head(stored.stored_key)
            expected = stored.file_sha256
        else:
            head = await source_core.download(file.key, scratch)
            expected = fmt.meta_value(head.metadata, "file_sha256")
        digest = await dest_core.digest(scratch)
        if expected is not None and digest.sha256 != expected:
            raise IntegrityError(
                f"source s3://{source_core.store.bucket}/{file.key} does not match its recorded"
                f" SHA-256 (expected {expected}, got {digest.sha256}); not copied"
            )
        return await dest_core.put(
            scratch,
            file.dest_key,
            extra_metadata=fmt.user_metadata(head.metadata),
            digest=digest,
            content_type=fmt.content_type_of(head.metadata, head.content_type),
        )
    finally:
        scratch.unlink(missing_ok=True)


async def run_migration(
    source_core: Core,
    dest_core: Core,
    plan: MigrationPlan,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_done: Callable[[SourceFile, Copied | None, str | None], None] | None = None,
) -> MigrationReport:
    """Copy ``plan.to_copy``; ``on_done(file, copied, error)`` follows each file.

    The first file of each destination directory runs before the others of
    that directory, so the reference is uploaded once rather than raced for.
    """
    report = MigrationReport(skipped=len(plan.present), shard=plan.shard)

    async def copy(file: SourceFile) -> Copied:
        return Copied.of(file, await copy_file(source_core, dest_core, file))

    await _run_files(plan.to_copy, copy, report, "migrate", concurrency, on_done)
    return report


async def _run_files(
    files: list[SourceFile],
    action: Callable[[SourceFile], Awaitable[Copied | None]],
    report: MigrationReport,
    verb: str,
    concurrency: int,
    on_done: Callable[[SourceFile, Copied | None, str | None], None] | None,
) -> None:
    """Run ``action`` on ``files``, the first of each destination directory first.

    ``action`` returning None counts the file as skipped.
    """
    limiter = trio.CapacityLimiter(max(1, concurrency))
    started = trio.current_time()
    seeds: dict[str, trio.Event] = {}

    async def one(file: SourceFile, wait_for: trio.Event | None, done: trio.Event | None) -> None:
        try:
            if wait_for is not None:
                await wait_for.wait()
            async with limiter:
                copied: Copied | None = None
                error: str | None = None
                try:
                    copied = await action(file)
                except (DgfsError, OSError) as exc:
                    error = str(exc) or type(exc).__name__
                    log.error("%s %s failed: %s", verb, file.rel_key, error)
        finally:
            if done is not None:
                done.set()
        if copied is not None:
            report.copied.append(copied)
        elif error is None:
            report.skipped += 1
        else:
            report.failed.append((file.rel_key, error))
        if on_done is not None:
            on_done(file, copied, error)

    async with trio.open_nursery() as nursery:
        for file in files:
            space = fmt.split_key(file.dest_key)[0]
            if space in seeds:
                nursery.start_soon(one, file, seeds[space], None)
            else:
                seeds[space] = trio.Event()
                nursery.start_soon(one, file, None, seeds[space])
    report.failed.sort()
    report.elapsed = trio.current_time() - started


@contextlib.asynccontextmanager
async def open_migration(
    source: S3Location, dest: S3Location, settings: Settings
) -> AsyncIterator[tuple[Core, Core]]:
    """``(source_core, dest_core)``: both buckets checked; one cache and engine shared.

    The cache is content-addressed, so the source's references and the
    destination's live side by side in it.
    """
    async with open_core(dest, settings) as dest_core, open_store(source, settings) as store:
        await store.check_bucket()
        source_core = Core(
            store,
            dest_core.cache,
            dest_core.engine,
            dest_core.policy,
            scratch_dir=dest_core.scratch_dir / "source",
            cpu_limiter=dest_core.cpu_limiter,
            limits=dest_core.limits,
            proxy_key=dest_core.proxy_key,
        )
        try:
            yield source_core, dest_core
        finally:
            await source_core.aclose()


# --- in-place conversion between delta modes ---------------------------------------


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
        visible = fmt.visible_key(obj.key)
        assert visible is not None
        if obj.key in in_target and obj.key not in stock_gzip:
            plan.already += 1
            continue
        direct = by_key.get(visible)
        if direct is not None and direct.last_modified > head.last_modified:
            plan.stale.append(obj.key)  # a put that went direct died before deleting it
            continue
        # Named by their full keys everywhere (rel_key too), like the references.
        file = _source_file(visible, visible, visible, obj, head)
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
            content_type=fmt.content_type_of(head.metadata, head.content_type),
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
    await _run_files(files, convert, report, "convert", concurrency, on_done)
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
    return direct.last_modified > delta.last_modified


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
