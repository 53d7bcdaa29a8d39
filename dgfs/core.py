"""put / get / delete / rename of files in the DeltaGlider format (no FUSE).

``Core`` turns local files into objects and back. Keys given to it are the
user-visible keys (``app/x.zip``); where the bytes really live
(``app/x.zip.delta``, ``app/x.zip`` or ``app/reference.bin``) is its business.

Guarantees a caller may rely on:

- ``get``/``materialize`` never hand back bytes whose SHA-256 differs from
  the recorded ``dg-file-sha256``: they raise ``IntegrityError`` instead.
- ``put`` writes the new form of a file before removing an older form, so a
  reader always finds one complete version.
- Exactly one reference per deltaspace: it is created with a conditional
  PUT (``If-None-Match: *``) when the store honours it.
- A deltaspace keeps the mode its reference was made in: ``reference.bin``
  (DeltaGlider v6 byte-level deltas) or ``reference.deep`` (deltas of
  expanded forms, :mod:`dgfs.deep`); ``deltas`` only chooses for new ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

import trio

from dgfs import format as fmt
from dgfs.cache import CacheEntryReader, ContentCache
from dgfs.deep import expand
from dgfs.delta import DeltaEngine
from dgfs.errors import (
    DgfsError,
    FormatError,
    NotFound,
    TransientError,
)
from dgfs.format import DeltaMode, Kind, StoredFile
from dgfs.forms import Forms
from dgfs.hashing import FileDigest
from dgfs.policy import Policy
from dgfs.proxycrypt import ProxyKey
from dgfs.rebuild import Rebuilder, RebuildStream
from dgfs.references import ReferencePool
from dgfs.store.base import ObjectHead, ObjectStore, head_many
from dgfs.telemetry import Telemetry
from dgfs.workbench import Workbench
from dgfs.writer import DEFAULT_CONTENT_TYPE, FileWriter, PutResult

log = logging.getLogger(__name__)

SYMLINK_MAX = 4096  # PATH_MAX: the longest symlink body read back


class Core:
    """The storage core shared by the mount and the CLI."""

    def __init__(
        self,
        store: ObjectStore,
        cache: ContentCache,
        engine: DeltaEngine,
        policy: Policy,
        *,
        scratch_dir: Path,
        conditional_create: bool = True,
        cpu_limiter: trio.CapacityLimiter | None = None,
        plain_reference_slots: int = 4,
        deltas: DeltaMode = DeltaMode.DG,
        telemetry: Telemetry | None = None,
        limits: expand.ExpansionLimits | None = None,
        proxy_key: ProxyKey | None = None,
    ) -> None:
        self.store = store
        # Bounds on expanding files and on rebuilding objects (docs/SECURITY.md).
        self.limits = limits or expand.ExpansionLimits()
        self.telemetry = telemetry or Telemetry()
        self.cache = cache
        self.engine = engine
        self.policy = policy
        self.bench = Workbench(
            store, scratch_dir=scratch_dir, cpu_limiter=cpu_limiter, proxy_key=proxy_key
        )
        self.references = ReferencePool(self.bench, cache, self.limits, slots=plain_reference_slots)
        self.forms = Forms(store)
        self.writer = FileWriter(
            self.bench,
            self.forms,
            self.references,
            cache,
            engine,
            policy,
            self.limits,
            deltas=deltas,
            conditional_create=conditional_create,
        )
        self.rebuilder = Rebuilder(
            self.bench, self.references, cache, engine, self.limits, self.telemetry
        )

    # --- small helpers -------------------------------------------------------

    @property
    def scratch_dir(self) -> Path:
        return self.bench.scratch_dir

    @property
    def cpu_limiter(self) -> trio.CapacityLimiter:
        return self.bench.cpu_limiter

    @property
    def proxy_key(self) -> ProxyKey | None:
        """deltaglider_proxy's key, for objects it encrypted (the workbench's)."""
        return self.bench.proxy_key

    @proxy_key.setter
    def proxy_key(self, key: ProxyKey | None) -> None:
        self.bench.proxy_key = key

    @property
    def conditional_create(self) -> bool:
        """Whether references are created with If-None-Match (the writer's)."""
        return self.writer.conditional_create

    @conditional_create.setter
    def conditional_create(self, conditional: bool) -> None:
        self.writer.conditional_create = conditional

    @property
    def deltas(self) -> DeltaMode:
        """The mode of new deltaspaces (the writer's)."""
        return self.writer.deltas

    def scratch_path(self, suffix: str = "") -> Path:
        """A new, empty, private temp file in the scratch dir."""
        return self.bench.scratch_path(suffix)

    async def digest(self, path: Path) -> FileDigest:
        """SHA-256, size and sniffable head of a local file (in a worker thread)."""
        return await self.bench.digest(path)

    async def download(self, key: str, dest: Path) -> ObjectHead:
        """``Workbench.download``: the object ``key`` as the file it holds, in ``dest``."""
        return await self.bench.download(key, dest)

    async def ensure_cached(self, key: str, sha256: str) -> None:
        """Make sure the object ``key`` (plain bytes with ``sha256``) is in the cache."""
        await self.references.ensure_cached(key, sha256)

    # --- locating and storing --------------------------------------------------

    async def locate(self, key: str) -> StoredFile:
        """Find how the user-visible ``key`` is stored; ``NotFound`` if it is not.

        When both a delta and a direct object exist (a writer died between
        writing the new form and deleting the old), the newer one wins.
        """
        return await self.forms.locate(key)

    async def put(
        self,
        src: Path,
        key: str,
        *,
        extra_metadata: Mapping[str, str] | None = None,
        digest: FileDigest | None = None,
        content_type: str = DEFAULT_CONTENT_TYPE,
        mode: DeltaMode | None = None,
        direct: bool = False,
    ) -> PutResult:
        """Store the local file ``src`` under the user-visible ``key`` (``FileWriter.put``)."""
        return await self.writer.put(
            src,
            key,
            extra_metadata=extra_metadata,
            digest=digest,
            content_type=content_type,
            mode=mode,
            direct=direct,
        )

    # --- get -------------------------------------------------------------------

    async def rebuild(
        self,
        stored: StoredFile,
        out: Path,
        *,
        verify: bool = True,
        stream: RebuildStream | None = None,
    ) -> bool:
        """``Rebuilder.rebuild``: the original bytes of a delta in ``out``."""
        return await self.rebuilder.rebuild(stored, out, verify=verify, stream=stream)

    async def get(self, key: str, dest: Path) -> StoredFile:
        """Write the original bytes of ``key`` to ``dest``, verified.

        ``dest`` appears only once complete and verified (written beside it,
        then renamed).
        """
        stored = await self.locate(key)
        await self.rebuilder.write(stored, dest)
        return stored

    async def materialize(self, stored: StoredFile, *, counted: bool = True) -> str:
        """``Rebuilder.materialize``: the bytes of ``stored`` in the cache; their sha256."""
        return await self.rebuilder.materialize(stored, counted=counted)

    # --- delete / rename / metadata -------------------------------------------------

    async def delete(self, key: str) -> None:
        """Remove the file ``key`` in every form; the reference stays (as DeltaGlider does)."""
        forms = await self.forms.holders(key)
        if not forms:
            raise NotFound(f"no such file: {key}")
        await self.store.delete_many(list(forms))
        log.info("deleted %s (%s)", key, ", ".join(sorted(forms)))

    async def rename(self, src_key: str, dst_key: str) -> StoredFile:
        """Move one file. A delta keeps its reference when it stays in its
        deltaspace; moved to another directory it is rebuilt and stored there."""
        if fmt.is_hidden_name(fmt.split_key(dst_key)[1]) or fmt.is_internal_key(dst_key):
            raise FormatError(f"{dst_key}: name is reserved by the DeltaGlider format")
        stored, head = await self.forms.locate_with_head(src_key)
        if src_key == dst_key:
            return stored
        same_space = fmt.split_key(src_key)[0] == fmt.split_key(dst_key)[0]
        # A delta moves as a delta only where ``dst.delta`` is free for it;
        # otherwise it is rebuilt and stored (direct, beside a foreign ``dst.delta``).
        try:
            await self._write_renamed(stored, head, src_key, dst_key, same_space)
        except TransientError:
            # S3 may have done it and lost the reply (the store's own retries
            # spent): with the file under both names, finish the rename
            # rather than report a failure that leaves a second name.
            if not await self._holds_file(dst_key, stored.file_sha256):
                raise
            log.info("%s: stored as %s though the reply was lost; renaming on", src_key, dst_key)
        await self.store.delete(stored.stored_key)
        log.info("renamed %s -> %s", src_key, dst_key)
        return await self.locate(dst_key)

    async def _write_renamed(
        self, stored: StoredFile, head: ObjectHead, src_key: str, dst_key: str, same_space: bool
    ) -> None:
        """``rename``'s first half: the file under ``dst_key`` (a delta keeps
        its reference in its deltaspace, else it is rebuilt and stored)."""
        if stored.kind is Kind.DELTA and (
            not same_space or await self.forms.delta_form_taken(dst_key)
        ):
            async with self.bench.scratch() as plain:
                await self.rebuild(stored, plain)
                # Everything but the format's keys follows the file, as a copy does.
                await self.put(
                    plain,
                    dst_key,
                    extra_metadata=fmt.user_metadata(head.metadata),
                    content_type=fmt.content_type_of(head.metadata, head.content_type),
                )
            return
        if stored.kind is Kind.DELTA:
            dst_stored = fmt.delta_key(dst_key)
            other_form = dst_key
        else:
            dst_stored, other_form = dst_key, fmt.delta_key(dst_key)
        meta = None
        if stored.kind in (Kind.DELTA, Kind.DIRECT):
            meta = fmt.with_original_name(head.metadata, fmt.split_key(dst_key)[1])
        await self.store.copy(stored.stored_key, dst_stored, meta)
        if other_form == dst_key:
            await self.store.delete(other_form)
        else:
            await self.forms.delete_delta_form(dst_key)

    async def _holds_file(self, key: str, sha256: str | None) -> bool:
        """Whether ``key`` shows the file with ``sha256`` (False when unknown)."""
        if sha256 is None:
            return False
        try:
            return (await self.locate(key)).file_sha256 == sha256
        except (NotFound, TransientError):
            return False

    async def update_metadata(self, key: str, changes: Mapping[str, str]) -> StoredFile:
        """Merge ``changes`` (POSIX attributes) into the stored object's metadata in place."""
        stored, head = await self.forms.locate_with_head(key)
        await self.store.copy(stored.stored_key, stored.stored_key, {**head.metadata, **changes})
        return stored

    async def rename_prefix(self, src_prefix: str, dst_prefix: str) -> int:
        """Move every object under ``src_prefix/`` to ``dst_prefix/`` (a directory rename).

        References move with their deltas and the deltas' ``dg-ref-key`` is
        rewritten, so the moved tree stays readable by DeltaGlider. Sources
        are deleted only after every copy succeeded. Returns objects moved.
        """
        src_root, dst_root = src_prefix.rstrip("/") + "/", dst_prefix.rstrip("/") + "/"
        listing = await self.store.list(src_root, delimiter=None)
        keys = [obj.key for obj in listing.objects]

        copied: list[str] = []
        failures: list[DgfsError] = []

        async def copy_one(key: str, new_key: str) -> None:
            if key.endswith("/"):
                # A directory marker is written anew: SeaweedFS answers
                # NoSuchKey to a CopyObject whose source key ends in "/".
                head = await self.store.head(key)
                body = await self.store.get_range(key, 0, head.size) if head.size else b""
                await self.store.put_bytes(new_key, body, head.metadata)
                return
            meta = None
            if key.endswith(fmt.DELTA_SUFFIX):
                head = await self.store.head(key)
                ref_key = fmt.meta_value(head.metadata, "ref_key")
                if ref_key and ref_key.startswith(src_root):
                    new_ref_key = dst_root + ref_key[len(src_root) :]
                    meta = fmt.with_ref_key(head.metadata, new_ref_key)
            await self.store.copy(key, new_key, meta)

        async def move_one(key: str, limiter: trio.CapacityLimiter) -> None:
            new_key = dst_root + key[len(src_root) :]
            async with limiter:
                try:
                    await copy_one(key, new_key)
                except NotFound:
                    return  # removed meanwhile (another mount): nothing to move
                except DgfsError as exc:
                    failures.append(exc)
                    return
            copied.append(new_key)

        limiter = trio.CapacityLimiter(16)
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(move_one, key, limiter)
        if failures:
            # Nothing is deleted at the source; the copies made go, so the
            # rename fails whole rather than leaving two trees.
            with contextlib.suppress(DgfsError):
                await self.store.delete_many(copied)
            raise failures[0]
        await self.store.delete_many(keys)
        log.info("moved %d objects %s -> %s", len(keys), src_root, dst_root)
        return len(keys)

    # --- for the filesystem: cached content, directory leftovers, symlinks ----------

    def rebuild_stream(self, sha256: str) -> RebuildStream | None:
        """The rebuild of content ``sha256`` running now, if any (see ``RebuildStream``)."""
        return self.rebuilder.stream(sha256)

    async def open_cached(self, stored: StoredFile) -> CacheEntryReader:
        """A reader of the original bytes of ``stored`` from the cache, which gets
        them first (rebuilt or fetched, verified); the caller closes it."""
        return await self.rebuilder.open_cached(stored)

    async def export_cached(self, stored: StoredFile, dest: Path) -> None:
        """Write the original bytes of ``stored`` to ``dest`` through the cache (verified)."""
        await self.rebuilder.export_cached(stored, dest)

    async def dir_leftovers(self, prefix: str) -> tuple[list[str], list[str]]:
        """What a directory that lists empty (``prefix`` ends in "/") still holds:
        ``(removable, kept)``.

        Removable: its empty marker, and references (with DeltaGlider
        metadata) no delta uses any more. Kept: everything else, which the
        mount does not show and must not delete: a marker with bytes, a
        ``reference.bin`` another tool wrote, objects under names the mount
        skips (``a//b``, ``./x``, names over 255 bytes).
        """
        page = await self.store.list(prefix, "/")
        removable: list[str] = []
        kept = list(page.prefixes)
        refs = [o.key for o in page.objects if fmt.is_reference_key(o.key)]
        ref_heads = await head_many(self.store, refs)
        for obj in page.objects:
            head = ref_heads.get(obj.key)
            if (obj.key == prefix and obj.size == 0) or (
                head is not None and fmt.is_deltaglider_reference(head.metadata)
            ):
                removable.append(obj.key)
            elif obj.key not in refs or obj.key in ref_heads:  # not gone since the LIST
                kept.append(obj.key)
        return removable, kept

    # Symlinks and special files (FIFOs, devices, sockets) are single plain
    # objects as s3fs stores them: the type in the ``mode`` metadata, the body
    # a symlink's target or empty. Never deltas, never staged.

    async def put_plain(self, key: str, body: bytes, metadata: Mapping[str, str]) -> None:
        await self.store.put_bytes(key, body, metadata)

    async def read_symlink(self, key: str) -> bytes:
        return await self.store.get_range(key, 0, SYMLINK_MAX)

    async def move_plain(self, src_key: str, dst_key: str) -> None:
        """Rename a symlink or special file (one plain object), over whatever
        file ``dst_key`` names: a delta it replaces goes too, or listings
        would show that (the delta wins a tie of Last-Modified seconds)."""
        await self.store.copy(src_key, dst_key)
        await self.forms.delete_delta_form(dst_key)
        await self.store.delete(src_key)

    async def delete_plain(self, key: str) -> None:
        await self.store.delete(key)

    async def aclose(self) -> None:
        """Remove decrypted reference copies."""
        self.references.close()
