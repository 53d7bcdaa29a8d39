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
- Files are what a mount shows (``_visible_entries``), on both sides: an
  object named ``x.delta`` is ``x``'s delta only when ``forms.is_delta``
  says so, else a file of its own, copied as it is under that name (the
  format stores no other way); ``x`` beside it is stored direct
  (``store_direct``). Of a file's two forms the one ``fmt.form_rank``
  ranks first is copied and compared with.
- Resume: the destination is listed once; a file already there under the
  same visible name with the same original size is skipped unless both
  sides record a ``dg-file-sha256`` and they differ. Direct and foreign
  objects are HEADed for it only when the sizes match (the destination's,
  then the source's if the destination records one). A file there with
  another size or SHA-256 is replaced.
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

In-place conversion between delta modes is :mod:`dgfs.convert`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from dgfs import format as fmt
from dgfs import forms, proxymeta
from dgfs.core import Core
from dgfs.errors import ConfigError, DgfsError, IntegrityError, NotFound
from dgfs.format import Kind, StoredFile
from dgfs.hashing import FileDigest
from dgfs.runtime import S3Location, Settings, open_core, open_store
from dgfs.shard import Shard, label, owned
from dgfs.store.base import ObjectHead, ObjectInfo, ObjectStore, head_many
from dgfs.writer import PutResult

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


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
    store_direct: bool = False  # its name + ".delta" is another file: never a delta


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
    delta: bool  # the object is a usable delta of the visible key (``forms.is_delta``)
    head: ObjectHead | None = None  # when HEADed


def _is_file(obj: ObjectInfo, root: str) -> bool:
    """Whether a listed object may hold a file (not a reference, not ``.deltaglider/``)."""
    return not ((not root and fmt.is_internal_key(obj.key)) or fmt.is_reference_key(obj.key))


async def _visible_entries(
    store: ObjectStore,
    objects: list[ObjectInfo],
    root: str,
    wanted: Callable[[str], bool],
    concurrency: int,
) -> dict[str, _Entry]:
    """Visible key -> the object a mount shows under it, as a mount decides.

    Every object named ``x.delta`` that may be ``wanted`` (as ``x`` or as
    ``x.delta``) is HEADed: it is ``x``'s delta only when ``forms.is_delta``
    says so, else a file of its own named ``x.delta``. Of a file's two forms
    the one ``fmt.form_rank`` ranks higher: the newer Last-Modified second
    from the listing; within one second (a HEAD of the direct form too) the
    newer ``dg-created-at``, then the delta. Objects not ``wanted`` under
    either name are not HEADed and are taken by their names (an ``x.delta``
    as ``x``'s delta): good enough to count them. An object gone since the
    listing is left out.
    """
    files = [obj for obj in objects if _is_file(obj, root)]
    heads = await head_many(
        store,
        [o.key for o in files if fmt.is_delta_key(o.key) and _may_want(o.key, wanted)],
        concurrency=concurrency,
    )
    entries: dict[str, _Entry] = {}
    ties: dict[str, tuple[_Entry, _Entry]] = {}  # visible -> (direct, delta) of one second
    for obj in files:
        visible = fmt.visible_key(obj.key)
        assert visible is not None
        entry = _Entry(obj, visible != obj.key)
        if entry.delta and _may_want(obj.key, wanted):
            head = heads.get(obj.key)
            if head is None:
                continue  # deleted since the listing
            visible = forms.shown_key(head)
            entry = _Entry(obj, visible != obj.key, head)
        old = entries.get(visible)
        if old is None or obj.last_modified > old.obj.last_modified:
            entries[visible] = entry
        elif obj.last_modified == old.obj.last_modified and wanted(visible):
            ties[visible] = (entry, old) if old.delta else (old, entry)
    direct_heads = await head_many(
        store, [direct.obj.key for direct, _ in ties.values()], concurrency=concurrency
    )
    for visible, (direct, delta) in ties.items():
        head = direct_heads.get(direct.obj.key)
        entries[visible] = delta
        if head is not None and _shown_over(head, delta):
            entries[visible] = replace(direct, head=head)
    return entries


def _may_want(stored_key: str, wanted: Callable[[str], bool]) -> bool:
    """Whether an object may be ``wanted`` under either name it can show as."""
    visible = fmt.visible_key(stored_key)
    return wanted(stored_key) or (visible is not None and wanted(visible))


def _shown_over(direct: ObjectHead, delta: _Entry) -> bool:
    """Whether a mount shows the direct form over the delta (``fmt.form_rank``)."""
    assert delta.head is not None
    delta_rank = fmt.form_rank(delta.obj.key, delta.head.last_modified, delta.head.metadata)
    return fmt.form_rank(direct.key, direct.last_modified, direct.metadata) > delta_rank


def _original_size(head: ObjectHead) -> tuple[int, str | None, bool]:
    """``(original size, recorded sha256, is a real delta)`` from a HEAD."""
    try:
        stored = fmt.classify(head.key, head.size, head.metadata)
    except DgfsError:
        return head.size, None, False
    return stored.original_size, stored.file_sha256, stored.kind is Kind.DELTA


def source_file(
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

    def rel(visible: str) -> str:
        return visible[len(src_root) :]

    def wanted(visible: str) -> bool:
        rel_key = rel(visible)  # "": the source directory's own marker
        return (
            bool(rel_key)
            and selected(rel_key, include, exclude)
            and owned(shard, dst_root + rel_key)
        )

    source_listing = await source_store.list(src_root, delimiter=None)
    entries = await _visible_entries(
        source_store, source_listing.objects, src_root, wanted, concurrency
    )
    files: list[SourceFile] = []
    for visible, entry in sorted(entries.items()):
        rel_key = rel(visible)
        if wanted(visible):
            dest_key = dst_root + rel_key
            files.append(source_file(visible, rel_key, dest_key, entry.obj, entry.head))
        elif not rel_key:
            continue
        elif not selected(rel_key, include, exclude):
            plan.filtered_out += 1
        else:
            plan.other_shards += 1  # never HEADed: a shard pays only for its own files
    files = _beside_delta_named(files)
    dest_keys = {f.dest_key for f in files}
    dest_listing = await dest_store.list(dst_root, delimiter=None)
    dest_entries = await _visible_entries(
        dest_store, dest_listing.objects, dst_root, dest_keys.__contains__, concurrency
    )
    await _compare_with_destination(
        plan, files, source_store, dest_store, dest_entries, concurrency
    )
    return plan


def _beside_delta_named(files: list[SourceFile]) -> list[SourceFile]:
    """``files``, those whose name + ``.delta`` is another file of theirs marked
    ``store_direct``: their delta would take that file's name."""
    delta_named = {f.dest_key for f in files if fmt.is_delta_key(f.dest_key)}
    return [
        replace(f, store_direct=True) if fmt.delta_key(f.dest_key) in delta_named else f
        for f in files
    ]


async def _compare_with_destination(
    plan: MigrationPlan,
    files: list[SourceFile],
    source_store: ObjectStore,
    dest_store: ObjectStore,
    dest_entries: Mapping[str, _Entry],
    concurrency: int,
) -> None:
    """Sort ``files`` into ``plan.to_copy`` (``replacing`` when they differ) and ``present``.

    A file is present when the destination shows it with the same original
    size and, when both sides record one, the same ``dg-file-sha256``. Deltas
    were HEADed already (their sizes are in their metadata); a direct or
    foreign object is HEADed at the destination only when its size matches,
    and then at the source only when the destination's records a SHA-256.
    """
    pairs = [(f, dest_entries[f.dest_key]) for f in files if f.dest_key in dest_entries]
    unread = {e.obj.key for f, e in pairs if e.head is None and e.obj.size == f.size}
    dest_heads = await head_many(dest_store, sorted(unread), concurrency=concurrency)
    recorded: dict[str, tuple[int, str | None]] = {}  # dest key -> (original size, sha256)
    for f, entry in pairs:
        head = entry.head or dest_heads.get(entry.obj.key)
        if head is not None:
            recorded[f.dest_key] = _original_size(head)[:2]
        elif entry.obj.key not in unread:
            recorded[f.dest_key] = (entry.obj.size, None)  # another size: replaced
    source_heads = await head_many(
        source_store,
        [f.key for f in files if f.sha256 is None and not f.delta and _records(recorded, f)],
        concurrency=concurrency,
    )
    # A destination file held by a delta whose name a file of its own takes
    # (a foreign ``x.delta`` copied now) is stored again, direct (``store_direct``).
    delta_named = {f.dest_key for f in files if fmt.is_delta_key(f.dest_key)}
    for f, existing in [(f, dest_entries.get(f.dest_key)) for f in files]:
        dest = recorded.get(f.dest_key)
        if existing is None or dest is None:  # not there, or gone since the listing
            plan.to_copy.append(f)
            continue
        if f.key in source_heads:
            f = replace(f, sha256=_original_size(source_heads[f.key])[1])
        dest_size, dest_sha = dest
        same = dest_size == f.size and (None in (f.sha256, dest_sha) or dest_sha == f.sha256)
        if same and not (existing.delta and existing.obj.key in delta_named):
            plan.present.append(f)
        else:
            plan.to_copy.append(f)
            plan.replacing.append(f)


def _records(recorded: Mapping[str, tuple[int, str | None]], file: SourceFile) -> bool:
    """Whether the destination records a SHA-256 for ``file``, at its size."""
    size, sha256 = recorded.get(file.dest_key, (None, None))
    return size == file.size and sha256 is not None


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
        return await _copy_marker(source_core, dest_core, file)
    scratch = dest_core.scratch_path()
    try:
        head, digest = await _fetch_checked(source_core, dest_core, file, scratch)
        user_meta = fmt.user_metadata(head.metadata)
        content_type = proxymeta.content_type_of(head.metadata, head.content_type)
        if fmt.is_delta_key(file.dest_key):
            return await _store_dot_delta_file(
                dest_core, file, scratch, digest, user_meta, content_type
            )
        return await dest_core.put(
            scratch,
            file.dest_key,
            extra_metadata=user_meta,
            digest=digest,
            content_type=content_type,
            direct=file.store_direct,
        )
    finally:
        scratch.unlink(missing_ok=True)


async def _copy_marker(source_core: Core, dest_core: Core, file: SourceFile) -> PutResult:
    """A directory (a mount's mkdir): copied as it is, attributes and all."""
    marker = await source_core.store.head(file.key)
    meta = fmt.user_metadata(marker.metadata)
    await dest_core.store.put_bytes(
        file.dest_key,
        b"",
        meta,
        content_type=proxymeta.content_type_of(marker.metadata, marker.content_type),
    )
    copied = StoredFile(Kind.FOREIGN, file.dest_key, file.dest_key, 0, 0, EMPTY_SHA256)
    return PutResult(copied)


async def _fetch_checked(
    source_core: Core, dest_core: Core, file: SourceFile, scratch: Path
) -> tuple[ObjectHead, FileDigest]:
    """The source file in ``scratch`` (a delta rebuilt and verified), the head
    of the object it came from, and its digest, checked against the SHA-256
    the source records."""
    if file.delta:
        stored = await source_core.get(file.key, scratch)  # rebuilt and verified
        if file.head is not None and file.head.key == stored.stored_key:
            head = file.head
        else:  # the newer form is not the one planned with
            head = await source_core.store.head(stored.stored_key)
        expected = stored.file_sha256
    else:
        head = await source_core.download(file.key, scratch)
        expected = fmt.meta_sha256(head.metadata)
    digest = await dest_core.digest(scratch)
    if expected is not None and digest.sha256 != expected:
        raise IntegrityError(
            f"source s3://{source_core.store.bucket}/{file.key} does not match its recorded"
            f" SHA-256 (expected {expected}, got {digest.sha256}); not copied"
        )
    return head, digest


async def _store_dot_delta_file(
    dest_core: Core,
    file: SourceFile,
    scratch: Path,
    digest: FileDigest,
    user_meta: Mapping[str, str],
    content_type: str,
) -> PutResult:
    """A file of its own named x.delta: the format has no other way to store
    it than as it is, without DeltaGlider metadata (with it, it would be x's
    delta or x itself). Never over x's own delta at the destination (x not
    in this run: filtered out, or only there)."""
    with contextlib.suppress(NotFound):
        if forms.is_delta(await dest_core.store.head(file.dest_key)):
            raise DgfsError(
                f"s3://{dest_core.store.bucket}/{file.dest_key} holds the delta of"
                f" {file.dest_key.removesuffix(fmt.DELTA_SUFFIX)}; copy that file"
                " (it is then stored whole) before this one"
            )
    await dest_core.store.upload(file.dest_key, scratch, user_meta, content_type=content_type)
    size = digest.size
    copied = StoredFile(Kind.FOREIGN, file.dest_key, file.dest_key, size, size, digest.sha256)
    return PutResult(copied)


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

    # Files named x.delta last: the x they may replace at the destination (a
    # delta of that name) is stored direct first, and removes that delta
    # before, never after, the file takes its name.
    delta_named = [f for f in plan.to_copy if fmt.is_delta_key(f.dest_key)]
    others = [f for f in plan.to_copy if not fmt.is_delta_key(f.dest_key)]
    for files in (others, delta_named):
        await run_files(files, copy, report, "migrate", concurrency, on_done)
    return report


async def run_files(
    files: list[SourceFile],
    action: Callable[[SourceFile], Awaitable[Copied | None]],
    report: MigrationReport,
    verb: str,
    concurrency: int,
    on_done: Callable[[SourceFile, Copied | None, str | None], None] | None,
) -> None:
    """Run ``action`` on ``files``, the first of each destination directory first.

    ``action`` returning None counts the file as skipped; the time taken is
    added to ``report.elapsed``.
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
    report.elapsed += trio.current_time() - started


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
