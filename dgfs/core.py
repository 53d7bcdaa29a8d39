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
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import trio

from dgfs import format as fmt
from dgfs.cache import CacheEntryReader, ContentCache
from dgfs.deep import expand, objects
from dgfs.deep.deflate import zlib_is_reference
from dgfs.delta import DeltaEngine
from dgfs.errors import (
    DgfsError,
    ExpansionLimit,
    FormatError,
    MissingReference,
    NotFound,
    PreconditionFailed,
    TransientError,
    WriteConflict,
)
from dgfs.format import DeltaMode, Kind, StoredFile
from dgfs.hashing import FileDigest
from dgfs.policy import Policy
from dgfs.proxycrypt import ProxyKey
from dgfs.rebuild import Rebuilder, RebuildStream
from dgfs.references import ReferencePool
from dgfs.store.base import ObjectHead, ObjectStore, head_many
from dgfs.telemetry import Telemetry
from dgfs.workbench import Workbench

log = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_CONTENT_TYPE = fmt.DEFAULT_CONTENT_TYPE
SYMLINK_MAX = 4096  # PATH_MAX: the longest symlink body read back


def _existing_reference(ref_key: str, head: ObjectHead) -> tuple[str | None, bool]:
    """``(ref_sha256, False)`` for a reference already there; ``(None, False)``
    when it records no SHA-256 (then files beside it are stored direct)."""
    ref_sha256 = fmt.meta_value(head.metadata, "file_sha256")
    if ref_sha256 is None:
        log.warning("%s has no dg-file-sha256; storing files beside it direct", ref_key)
    return ref_sha256, False


def _form_rank(head: ObjectHead) -> tuple[datetime, datetime, bool]:
    """Of two forms of one file, the one with the higher rank is shown
    (``fmt.form_rank``: ``Namespace`` and ``locate`` agree)."""
    return fmt.form_rank(head.key, head.last_modified, head.metadata)


def _holds(head: ObjectHead, key: str) -> bool:
    """Whether the object ``head`` holds the user-visible file ``key`` (as the mount shows it)."""
    return fmt.classify_shown(head.key, head.size, head.metadata).visible_key == key


@dataclass(frozen=True)
class PutResult:
    """What ``put`` stored for one file: the ``StoredFile`` a ``locate`` would
    now return, and whether the put created its deltaspace's reference."""

    stored: StoredFile
    created_reference: bool = False


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
        self.conditional_create = conditional_create
        self.deltas = deltas
        self.bench = Workbench(
            store, scratch_dir=scratch_dir, cpu_limiter=cpu_limiter, proxy_key=proxy_key
        )
        self.references = ReferencePool(self.bench, cache, self.limits, slots=plain_reference_slots)
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

    @staticmethod
    def _now() -> datetime:
        return datetime.now(UTC)

    # --- locating ------------------------------------------------------------

    async def locate(self, key: str) -> StoredFile:
        """Find how the user-visible ``key`` is stored; ``NotFound`` if it is not.

        When both a delta and a direct object exist (a writer died between
        writing the new form and deleting the old), the newer one wins.
        """
        return (await self._locate_with_head(key))[0]

    async def _locate_with_head(self, key: str) -> tuple[StoredFile, ObjectHead]:
        """``locate``, plus the HEAD it was read from (for callers that copy metadata)."""
        forms = await self._forms(key)
        if not forms:
            raise NotFound(f"no such file: {key}")
        newest = max(forms.values(), key=_form_rank)
        return fmt.classify_shown(newest.key, newest.size, newest.metadata), newest

    async def _forms(self, key: str) -> dict[str, ObjectHead]:
        """The objects that hold the user-visible ``key`` (stored key -> HEAD).

        ``key.delta`` is one only when it is a usable delta: a ``.delta`` that
        is not (no DeltaGlider metadata, or too little) is a file of its own
        name, which nothing done to ``key`` may overwrite or remove.
        """
        heads = await head_many(self.store, [fmt.delta_key(key), key])
        return {stored_key: head for stored_key, head in heads.items() if _holds(head, key)}

    async def _delta_form(self, key: str) -> ObjectHead | None:
        """The HEAD of ``key.delta`` (None if there is none)."""
        try:
            return await self.store.head(fmt.delta_key(key))
        except NotFound:
            return None

    async def _delta_form_taken(self, key: str) -> bool:
        """Whether ``key.delta`` holds an object that is not ``key``'s delta."""
        head = await self._delta_form(key)
        return head is not None and not _holds(head, key)

    async def _delete_delta_form(self, key: str) -> None:
        """Remove ``key.delta`` if it is ``key``'s delta (an older form), nothing else."""
        head = await self._delta_form(key)
        if head is not None and _holds(head, key):
            await self.store.delete(head.key)

    async def _store_delta(
        self,
        key: str,
        body: Path,
        metadata: Mapping[str, str],
        content_type: str,
        ref_key: str,
        ref_sha256: str,
    ) -> None:
        """Upload ``key``'s delta, made against the reference ``ref_sha256``.

        Another mount may have removed the reference meanwhile (an rmdir or a
        directory rename), or, on a store without conditional PUTs, replaced
        it: then the delta could never be rebuilt. So once it is stored the
        reference is checked; if it changed, the delta goes again and
        ``WriteConflict`` asks the caller to store the file again, against
        what is there now (the upload pipeline does). Then the direct form
        of ``key`` goes, unless it is newer (``_drop_other_form``).
        """
        stored_key = fmt.delta_key(key)
        etag = await self.store.upload(stored_key, body, metadata, content_type=content_type)
        try:
            ref_now = fmt.meta_value((await self.store.head(ref_key)).metadata, "file_sha256")
        except NotFound:
            ref_now = None
        if ref_now != ref_sha256:
            with contextlib.suppress(NotFound):
                if (await self.store.head(stored_key)).etag == etag:  # still ours
                    await self.store.delete(stored_key)
            raise WriteConflict(
                f"{key}: its reference {ref_key} was removed or replaced by another"
                " writer while the delta was stored; storing it again"
            )
        await self._drop_other_form(key, stored_key, key)

    async def _drop_other_form(self, key: str, own_key: str, other_key: str) -> None:
        """``key`` was just stored as ``own_key``: remove its other form
        ``other_key`` (the direct file or the delta), unless that one is
        newer — another mount stored it after us, and it is what the mount
        shows (``_form_rank``).

        Two mounts storing one name in its two forms at once each remove
        the other's: the HEAD before and the DELETE after leave a moment in
        which both can go. So our own form is looked at once more; gone, it
        is stored again (``WriteConflict``): one of the two always stays.
        """
        heads = await head_many(self.store, [own_key, other_key])
        own, other = heads.get(own_key), heads.get(other_key)
        if own is not None and other is not None and _holds(other, key):
            # Strictly newer only: many stores give Last-Modified in whole
            # seconds, and the form this writer replaces was usually written
            # within the same second (truncate after a copy, say).
            if other.last_modified > own.last_modified:
                log.info("%s: a newer %s stored by another writer stays", key, other_key)
                return
            with contextlib.suppress(NotFound):
                await self.store.delete(other_key)
            try:
                await self.store.head(own_key)
            except NotFound:
                own = None
        if own is None:
            raise WriteConflict(
                f"{key}: another writer removed {own_key} while it was stored; storing it again"
            )

    # --- put -----------------------------------------------------------------

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
        """Store the local file ``src`` under the user-visible ``key``.

        ``extra_metadata`` (POSIX attributes, a migrated object's user
        metadata) is stored beside the format's own keys. ``digest`` saves
        re-hashing when the caller has it. ``content_type`` is set on the
        object that holds the file (delta or direct), not on the reference,
        and written as deltaglider_proxy's ``content-type`` key too
        (``fmt.content_type_metadata``), which it serves instead.
        ``mode`` forces the deltaspace mode (a conversion); by default the
        directory's existing reference decides (see ``_deltaspace``).
        ``direct`` stores the file whole whatever the policy says: the upload
        pipeline's way out when making its delta keeps failing locally.
        """
        if fmt.is_hidden_name(fmt.split_key(key)[1]) or fmt.is_internal_key(key):
            raise FormatError(f"{key}: name is reserved by the DeltaGlider format")
        digest = digest or await self.bench.digest(src)
        extra = dict(extra_metadata or {})
        prefix, name = fmt.split_key(key)
        if direct or not self.policy.is_delta_candidate(name, digest.head, digest.size, deep=True):
            return await self._put_direct(src, key, digest, extra, content_type)
        if await self._delta_form_taken(key):
            # A foreign ``key.delta`` (shown as a file of that name) stays untouched.
            log.info("%s: %s is another file; storing direct", key, fmt.delta_key(key))
            return await self._put_direct(src, key, digest, extra, content_type)
        for attempt in (1, 2):
            space, ref_head = await self._deltaspace(prefix, mode)
            deep = space is DeltaMode.DEEP
            if not self.policy.is_delta_candidate(name, digest.head, digest.size, deep=deep):
                return await self._put_direct(src, key, digest, extra, content_type)
            try:
                if deep:
                    return await self._put_deep(src, key, digest, extra, content_type, ref_head)
                return await self._put_delta(src, key, digest, extra, content_type, ref_head)
            except MissingReference as exc:
                # Another mount removed or replaced the reference between our
                # HEAD and its download (a directory renamed over this one,
                # say): once more against what the directory holds now.
                if attempt == 2:
                    raise
                log.info("%s: %s; storing it against the reference there now", key, exc)
        raise AssertionError("unreachable")

    async def _deltaspace(
        self, prefix: str, force: DeltaMode | None = None
    ) -> tuple[DeltaMode, ObjectHead | None]:
        """The mode of the deltaspace ``prefix`` and its reference's HEAD (None if it has none).

        An existing reference decides (deep first: a DeltaGlider client
        writing into a deep directory adds a ``reference.bin`` beside it);
        without one the core's own ``deltas`` setting does. ``force``
        overrides both.
        """
        found = await head_many(self.store, [fmt.reference_key(prefix, mode) for mode in DeltaMode])
        heads = {
            mode: found[fmt.reference_key(prefix, mode)]
            for mode in DeltaMode
            if fmt.reference_key(prefix, mode) in found
        }
        if force is not None:
            return force, heads.get(force)
        for mode in (DeltaMode.DEEP, DeltaMode.DG):
            if mode in heads:
                return mode, heads[mode]
        return self.deltas, None

    async def _put_direct(
        self,
        src: Path,
        key: str,
        digest: FileDigest,
        extra: dict[str, str],
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> PutResult:
        name = fmt.split_key(key)[1]
        meta = fmt.direct_metadata(
            original_name=name,
            file_sha256=digest.sha256,
            file_size=digest.size,
            now=self._now(),
            md5=digest.md5,
        )
        await self.store.upload(key, src, {**extra, **meta}, content_type=content_type)
        await self._drop_other_form(key, key, fmt.delta_key(key))
        log.info("stored %s direct (%d bytes)", key, digest.size)
        stored = StoredFile(Kind.DIRECT, key, key, digest.size, digest.size, digest.sha256)
        return PutResult(stored)

    async def _put_delta(
        self,
        src: Path,
        key: str,
        digest: FileDigest,
        extra: dict[str, str],
        content_type: str,
        ref_head: ObjectHead | None,
    ) -> PutResult:
        prefix, name = fmt.split_key(key)
        ref_key = fmt.reference_key(prefix)
        ref_sha256, created = await self._ensure_reference(src, ref_key, name, digest, ref_head)
        if ref_sha256 is None:
            return await self._put_direct(src, key, digest, extra, content_type)
        async with self.bench.scratch(".delta") as delta_path:
            if created:
                await self.engine.encode(src, src, delta_path)
            else:
                async with self.references.plain_copy(ref_key, ref_sha256) as plain_ref:
                    await self.engine.encode(plain_ref, src, delta_path)
            delta_size = delta_path.stat().st_size
            if not created and not self.policy.accepts_ratio(delta_size, digest.size):
                log.info(
                    "%s: delta is %.2f of the file (max %.2f), storing direct",
                    key,
                    delta_size / max(digest.size, 1),
                    self.policy.max_ratio,
                )
                return await self._put_direct(src, key, digest, extra, content_type)
            meta = fmt.delta_metadata(
                original_name=name,
                file_sha256=digest.sha256,
                file_size=digest.size,
                ref_key=ref_key,
                ref_sha256=ref_sha256,
                delta_size=delta_size,
                now=self._now(),
                zero_diff=created,
                md5=digest.md5,
            )
            stored_key = fmt.delta_key(key)
            await self._store_delta(
                key, delta_path, {**extra, **meta}, content_type, ref_key, ref_sha256
            )
        log.info(
            "stored %s as delta: %d -> %d bytes%s",
            key,
            digest.size,
            delta_size,
            " (new reference)" if created else "",
        )
        stored = StoredFile(
            Kind.DELTA, stored_key, key, digest.size, delta_size, digest.sha256, ref_key, ref_sha256
        )
        return PutResult(stored, created)

    async def _ensure_reference(
        self,
        src: Path,
        ref_key: str,
        name: str,
        digest: FileDigest,
        head: ObjectHead | None,
        *,
        meta: dict[str, str] | None = None,
        body: Path | None = None,
    ) -> tuple[str | None, bool]:
        """The deltaspace's reference sha256, creating it from ``src`` if absent.

        ``head`` is the reference's HEAD if it was seen. Returns
        ``(ref_sha256, created_by_us)``; ``(None, False)`` when the existing
        reference is not a usable one. ``src``/``digest`` are what the
        reference holds (for a deep one, the expanded form); ``body`` is
        what to upload if that differs (the compressed expanded form), and
        ``meta`` the reference's metadata.
        """
        if head is None:
            meta = meta or fmt.reference_metadata(
                name, digest.sha256, self._now(), file_size=digest.size, md5=digest.md5
            )
            try:
                await self.store.upload(
                    ref_key, body or src, meta, if_none_match=self.conditional_create
                )
            except PreconditionFailed:
                head = await self.store.head(ref_key)  # another writer won the race
            else:
                if not self.conditional_create:
                    # No conditional PUT: the last writer wins; re-read to see whose it is.
                    head = await self.store.head(ref_key)
                    winner = fmt.meta_value(head.metadata, "file_sha256")
                    if winner != digest.sha256:
                        log.warning("reference race on %s: using the other writer's", ref_key)
                        return winner, False
                await self.bench.cpu(self.cache.add_file, digest.sha256, src)
                log.info("created reference %s from %s", ref_key, name)
                return digest.sha256, True
        return _existing_reference(ref_key, head)

    # --- deep deltaspaces --------------------------------------------------------

    async def _put_deep(
        self,
        src: Path,
        key: str,
        digest: FileDigest,
        extra: dict[str, str],
        content_type: str,
        ref_head: ObjectHead | None,
    ) -> PutResult:
        """Store ``src`` as a delta of its expanded form against the expanded reference.

        The proof that the expanded form rebuilds to ``src`` runs beside
        the reference work and xdelta3 (they use the other core), and is
        awaited before anything is uploaded as ``key``. It compresses
        nothing again: the expansion compared every stream's recompression
        with the original, and ``expand.prove_form`` checks the rest of the
        form against ``src`` (readers still check the SHA-256 of every rebuild).
        """
        prefix, name = fmt.split_key(key)
        ref_key = fmt.reference_key(prefix, DeltaMode.DEEP)
        async with (
            self.bench.scratch(".dgx") as expanded,
            self.bench.scratch(".vcdiff") as vcdiff,
            self.bench.scratch(".delta") as body,
        ):
            proven = await self._expand(src, expanded, key)
            proof: list[bool] = []

            async def prove() -> None:
                proof.append(await self.bench.cpu(expand.prove_form, expanded, src, proven) is True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(prove)
                ref_sha256, created = await self._deep_reference(expanded, ref_key, name, ref_head)
                if ref_sha256 is not None and created:
                    await self.engine.encode(expanded, expanded, vcdiff)
                elif ref_sha256 is not None:
                    async with self.references.plain_copy(ref_key, ref_sha256) as plain_ref:
                        await self.engine.encode(plain_ref, expanded, vcdiff)
            if ref_sha256 is None:
                return await self._put_direct(src, key, digest, extra, content_type)
            zero_diff = created
            if not proof[0]:
                # Never expected: the expansion checked every stream it inflated.
                log.error("%s: expanded form does not rebuild exactly; not expanding it", key)
                await self.bench.cpu(expand.plain_form, src, expanded)
                async with self.references.plain_copy(ref_key, ref_sha256) as plain_ref:
                    await self.engine.encode(plain_ref, expanded, vcdiff)
                zero_diff = False
            delta_size = await self.bench.cpu_int(objects.wrap_delta, vcdiff, body)
            if not zero_diff and not self.policy.accepts_ratio(delta_size, digest.size):
                log.info(
                    "%s: deep delta is %.2f of the file (max %.2f), storing direct",
                    key,
                    delta_size / max(digest.size, 1),
                    self.policy.max_ratio,
                )
                return await self._put_direct(src, key, digest, extra, content_type)
            expanded_size = expanded.stat().st_size
            meta = fmt.deep_delta_metadata(
                original_name=name,
                file_sha256=digest.sha256,
                file_size=digest.size,
                ref_key=ref_key,
                ref_sha256=ref_sha256,
                delta_size=delta_size,
                now=self._now(),
                zero_diff=zero_diff,
                md5=digest.md5,
            )
            meta[fmt.META_EXPANDED_SIZE] = str(expanded_size)
            stored_key = fmt.delta_key(key)
            await self._store_delta(key, body, {**extra, **meta}, content_type, ref_key, ref_sha256)
        log.info(
            "stored %s as deep delta: %d -> %d bytes (expanded %d)%s",
            key,
            digest.size,
            delta_size,
            expanded_size,
            " (new reference)" if created else "",
        )
        stored = StoredFile(
            Kind.DELTA,
            stored_key,
            key,
            digest.size,
            delta_size,
            digest.sha256,
            ref_key,
            ref_sha256,
            deep=True,
        )
        return PutResult(stored, created)

    async def _deep_reference(
        self, expanded: Path, ref_key: str, name: str, ref_head: ObjectHead | None
    ) -> tuple[str | None, bool]:
        """``_ensure_reference`` for a deep deltaspace: made from ``expanded``, stored zstd."""
        if ref_head is not None:
            return _existing_reference(ref_key, ref_head)
        expanded_digest = await self.bench.digest(expanded)
        async with self.bench.scratch(".zst") as packed:
            await self.bench.cpu(objects.compress_reference, expanded, packed)
            meta = fmt.deep_reference_metadata(
                name, expanded_digest.sha256, expanded_digest.size, self._now()
            )
            return await self._ensure_reference(
                expanded, ref_key, name, expanded_digest, None, meta=meta, body=packed
            )

    async def _expand(self, src: Path, out: Path, key: str) -> set[tuple[bytes, expand.Recipe]]:
        """Write the expanded form of ``src`` to ``out``; returns what its search
        proved (``ExpandStats.proven``, for ``expand.prove_form``).

        With a zlib that does not deflate like reference zlib, its
        recompressions could not be trusted on other machines: the file
        then gets the form that expands nothing.
        """
        if not zlib_is_reference():
            log.warning("this zlib does not deflate like reference zlib; %s is not expanded", key)
            await self.bench.cpu(expand.plain_form, src, out)
            return set()
        expand_one = functools.partial(
            expand.expand_file, scratch_dir=self.bench.scratch_dir, limits=self.limits
        )
        try:
            stats = await self.bench.cpu(expand_one, src, out)
        except ExpansionLimit as exc:  # a bomb, or beyond what this mount expands
            log.warning("%s: %s; stored without expanding it", key, exc)
            await self.bench.cpu(expand.plain_form, src, out)
            return set()
        assert isinstance(stats, expand.ExpandStats)
        log.debug(
            "%s: %d streams inflated (%d by GNU gzip), %d kept; %d -> %d bytes",
            key,
            stats.streams_inflated,
            stats.streams_gnu,
            stats.streams_kept,
            stats.original_size,
            stats.expanded_size,
        )
        return stats.proven

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
        forms = await self._forms(key)
        if not forms:
            raise NotFound(f"no such file: {key}")
        await self.store.delete_many(list(forms))
        log.info("deleted %s (%s)", key, ", ".join(sorted(forms)))

    async def rename(self, src_key: str, dst_key: str) -> StoredFile:
        """Move one file. A delta keeps its reference when it stays in its
        deltaspace; moved to another directory it is rebuilt and stored there."""
        if fmt.is_hidden_name(fmt.split_key(dst_key)[1]) or fmt.is_internal_key(dst_key):
            raise FormatError(f"{dst_key}: name is reserved by the DeltaGlider format")
        stored, head = await self._locate_with_head(src_key)
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
        if stored.kind is Kind.DELTA and (not same_space or await self._delta_form_taken(dst_key)):
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
            await self._delete_delta_form(dst_key)

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
        stored, head = await self._locate_with_head(key)
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
        await self._delete_delta_form(dst_key)
        await self.store.delete(src_key)

    async def delete_plain(self, key: str) -> None:
        await self.store.delete(key)

    async def aclose(self) -> None:
        """Remove decrypted reference copies."""
        self.references.close()
