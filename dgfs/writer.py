"""Storing: local files put under user-visible keys, as deltas where they pay.

``FileWriter.put`` stores a file direct or as a delta against its
deltaspace's reference, creating that reference (conditionally, when the
store honours ``If-None-Match``) for the first file of a directory. It
writes the new form before removing an older one (``Forms``). It owns the
mode new deltaspaces are made in (``deltas``) and whether references are
created conditionally (``conditional_create``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import trio

from dgfs import deep, proxymeta
from dgfs import format as fmt
from dgfs.errors import (
    ExpansionLimit,
    FormatError,
    MissingReference,
    NotFound,
    PreconditionFailed,
    WriteConflict,
    first_failure,
)
from dgfs.flight import KeyedLocks
from dgfs.format import DeltaMode, Kind, StoredFile
from dgfs.forms import Forms
from dgfs.hashing import FileDigest
from dgfs.policy import Policy
from dgfs.references import ReferencePool
from dgfs.store.base import ObjectHead, head_many
from dgfs.workbench import Workbench

log = logging.getLogger(__name__)


def _existing_reference(ref_key: str, head: ObjectHead) -> tuple[str | None, bool]:
    """``(ref_sha256, False)`` for a reference already there; ``(None, False)``
    when it records no SHA-256 (then files beside it are stored direct)."""
    ref_sha256 = fmt.meta_sha256(head.metadata)
    if ref_sha256 is None:
        log.warning("%s has no dg-file-sha256; storing files beside it direct", ref_key)
    return ref_sha256, False


@dataclass(frozen=True)
class _Put:
    """One file being stored: ``src`` under ``key``, with the metadata it carries."""

    src: Path
    key: str
    digest: FileDigest
    extra: dict[str, str]  # POSIX attributes, a client's metadata, content-type
    content_type: str

    @property
    def name(self) -> str:
        return fmt.split_key(self.key)[1]


class _DeepEncoding(NamedTuple):
    """What ``_encode_deep`` made: against which reference (None: none usable),
    whether the file made it, and the span table of the diff (None: of whole forms)."""

    ref_sha256: str | None
    created: bool
    zero_diff: bool
    table: bytes | None


#: xdelta3's level for what is left of a form once the reference's spans are
#: cut out: the spans took the long matches, and level 9 finds little more
#: (5 later botocore wheels: 414,191 bytes at 6 in 0.42 CPU s, 413,086 at 9
#: in 0.89 s; Django sdists 915,561 and 845,913 bytes in 0.98 and 1.78 s).
_CUT_LEVEL = 6


@dataclass(frozen=True)
class _NewDelta:
    """A delta made in ``body``, ready to store for ``put.key``."""

    put: _Put
    ref_key: str
    ref_sha256: str  # a deep delta's: the expanded reference's
    body: Path
    zero_diff: bool
    expanded: int | None = None  # a deep delta's expanded size

    def metadata(self, now: datetime) -> dict[str, str]:
        digest = self.put.digest
        make = fmt.delta_metadata if self.expanded is None else fmt.deep_delta_metadata
        meta = make(
            original_name=self.put.name,
            file_sha256=digest.sha256,
            file_size=digest.size,
            ref_key=self.ref_key,
            ref_sha256=self.ref_sha256,
            delta_size=self.body.stat().st_size,
            now=now,
            zero_diff=self.zero_diff,
            md5=digest.md5,
        )
        if self.expanded is not None:
            meta[fmt.META_EXPANDED_SIZE] = str(self.expanded)
        return {**self.put.extra, **meta}

    def stored(self) -> StoredFile:
        return StoredFile(
            Kind.DELTA,
            fmt.delta_key(self.put.key),
            self.put.key,
            self.put.digest.size,
            self.body.stat().st_size,
            self.put.digest.sha256,
            self.ref_key,
            self.ref_sha256,
            deep=self.expanded is not None,
            zero_diff=self.zero_diff,
        )


@dataclass(frozen=True)
class PutResult:
    """What ``put`` stored for one file: the ``StoredFile`` a ``locate`` would
    now return, and whether the put created its deltaspace's reference."""

    stored: StoredFile
    created_reference: bool = False


class FileWriter:
    """Local files stored under user-visible keys (``put``)."""

    def __init__(
        self,
        bench: Workbench,
        forms: Forms,
        references: ReferencePool,
        policy: Policy,
        *,
        deltas: DeltaMode = DeltaMode.DG,
        conditional_create: bool = True,
    ) -> None:
        self._store = bench.store
        self._bench = bench
        self._forms = forms
        self._references = references
        self._policy = policy
        # The mode of new deltaspaces; an existing one keeps its own.
        self.deltas = deltas
        # Whether the store honours If-None-Match (the mount probes it).
        self.conditional_create = conditional_create
        # Deep references being created by this writer, by their keys: one
        # put at a time creates (or checks for) each.
        self._creating = KeyedLocks()

    async def _store_delta(self, delta: _NewDelta) -> StoredFile:
        """Upload ``delta``, made against the reference ``ref_sha256``.

        Another mount may have removed the reference meanwhile (an rmdir or a
        directory rename), or, on a store without conditional PUTs, replaced
        it: then the delta could never be rebuilt. So once it is stored the
        reference is checked; if it changed, the delta goes again and
        ``WriteConflict`` asks the caller to store the file again, against
        what is there now (the upload pipeline does). Then the direct form
        of ``key`` goes, unless it is newer (``Forms.drop_other_form``).
        """
        key, ref_key, ref_sha256 = delta.put.key, delta.ref_key, delta.ref_sha256
        stored_key = fmt.delta_key(key)
        metadata = delta.metadata(self._now())
        etag = await self._store.upload(
            stored_key, delta.body, metadata, content_type=delta.put.content_type
        )
        try:
            ref_now = fmt.meta_sha256((await self._store.head(ref_key)).metadata)
        except NotFound:
            ref_now = None
        if ref_now != ref_sha256:
            with contextlib.suppress(NotFound):
                if (await self._store.head(stored_key)).etag == etag:  # still ours
                    await self._store.delete(stored_key)
            raise WriteConflict(
                f"{key}: its reference {ref_key} was removed or replaced by another"
                " writer while the delta was stored; storing it again"
            )
        await self._forms.drop_other_form(key, stored_key, key)
        return delta.stored()

    async def put(
        self,
        src: Path,
        key: str,
        *,
        extra_metadata: Mapping[str, str] | None = None,
        digest: FileDigest | None = None,
        content_type: str = proxymeta.DEFAULT_CONTENT_TYPE,
        mode: DeltaMode | None = None,
        direct: bool = False,
    ) -> PutResult:
        """Store the local file ``src`` under the user-visible ``key``.

        ``extra_metadata`` (POSIX attributes, a migrated object's user
        metadata) is stored beside the format's own keys. ``digest`` saves
        re-hashing when the caller has it. ``content_type`` is set on the
        object that holds the file (delta or direct), not on the reference,
        and written as deltaglider_proxy's ``content-type`` key too
        (``proxymeta.content_type_metadata``), which it serves instead.
        ``mode`` forces the deltaspace mode (a conversion); by default the
        directory's existing reference decides (see ``_deltaspace``).
        ``direct`` stores the file whole whatever the policy says: the upload
        pipeline's way out when making its delta keeps failing locally.
        """
        if fmt.is_hidden_name(fmt.split_key(key)[1]) or fmt.is_internal_key(key):
            raise FormatError(f"{key}: name is reserved by the DeltaGlider format")
        digest = digest or await self._bench.digest(src)
        extra = {**(extra_metadata or {}), **proxymeta.content_type_metadata(content_type)}
        job = _Put(src, key, digest, extra, content_type)
        prefix, name = fmt.split_key(key)
        if direct or not self._policy.is_delta_candidate(name, digest.head, digest.size, deep=True):
            return await self._put_direct(job)
        if await self._forms.delta_form_taken(key):
            # A foreign ``key.delta`` (shown as a file of that name) stays untouched.
            log.info("%s: %s is another file; storing direct", key, fmt.delta_key(key))
            return await self._put_direct(job)
        for attempt in (1, 2):
            space, ref_head = await self._deltaspace(prefix, mode)
            is_deep = space is DeltaMode.DEEP
            if not self._policy.is_delta_candidate(name, digest.head, digest.size, deep=is_deep):
                return await self._put_direct(job)
            try:
                if is_deep:
                    return await self._put_deep(job, ref_head)
                return await self._put_delta(job, ref_head)
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
        overrides both, except where a file of its own holds the name
        ``reference.deep`` (deltaglider_proxy reserves only ``reference.bin``):
        such a directory cannot be deep, and stays DeltaGlider's.
        """
        found = await head_many(
            self._store, [fmt.reference_key(prefix, mode) for mode in DeltaMode]
        )
        heads = {
            mode: head
            for mode in DeltaMode
            if (head := found.get(fmt.reference_key(prefix, mode))) is not None
            # (another tool's reference.bin stays in: files beside it go
            # direct, and no reference is ever PUT over it)
            and (mode is DeltaMode.DG or fmt.is_deltaglider_reference(head.key, head.metadata))
        }
        deep_key = fmt.reference_key(prefix, DeltaMode.DEEP)
        if deep_key in found and DeltaMode.DEEP not in heads:
            return DeltaMode.DG, heads.get(DeltaMode.DG)
        if force is not None:
            return force, heads.get(force)
        for mode in (DeltaMode.DEEP, DeltaMode.DG):
            if mode in heads:
                return mode, heads[mode]
        return self.deltas, None

    async def _put_direct(self, job: _Put) -> PutResult:
        key, digest = job.key, job.digest
        meta = fmt.direct_metadata(
            original_name=job.name,
            file_sha256=digest.sha256,
            file_size=digest.size,
            now=self._now(),
            md5=digest.md5,
        )
        await self._store.upload(key, job.src, {**job.extra, **meta}, content_type=job.content_type)
        await self._forms.drop_other_form(key, key, fmt.delta_key(key))
        log.info("stored %s direct (%d bytes)", key, digest.size)
        stored = StoredFile(Kind.DIRECT, key, key, digest.size, digest.size, digest.sha256)
        return PutResult(stored)

    async def _put_delta(self, job: _Put, ref_head: ObjectHead | None) -> PutResult:
        src, key, digest = job.src, job.key, job.digest
        prefix, name = fmt.split_key(key)
        ref_key = fmt.reference_key(prefix)
        ref_sha256, created = await self._ensure_reference(src, ref_key, name, digest, ref_head)
        if ref_sha256 is None:
            return await self._put_direct(job)
        async with self._bench.scratch(".delta") as delta_path:
            if created:
                await self._bench.engine.encode(src, src, delta_path)
            else:
                async with self._references.plain_copy(ref_key, ref_sha256) as plain_ref:
                    await self._bench.engine.encode(plain_ref, src, delta_path)
            delta_size = delta_path.stat().st_size
            if not created and not self._pays(key, "delta", delta_size, digest.size):
                return await self._put_direct(job)
            delta = _NewDelta(job, ref_key, ref_sha256, delta_path, zero_diff=created)
            stored = await self._store_delta(delta)
        log.info(
            "stored %s as delta: %d -> %d bytes%s",
            key,
            digest.size,
            delta_size,
            " (new reference)" if created else "",
        )
        return PutResult(stored, created)

    def _pays(self, key: str, what: str, delta_size: int, file_size: int) -> bool:
        """Whether the policy takes a delta of ``delta_size`` for a file of
        ``file_size``; when not, it is logged that ``key`` goes direct."""
        if self._policy.accepts_ratio(delta_size, file_size):
            return True
        log.info(
            "%s: %s is %.2f of the file (max %.2f), storing direct",
            key,
            what,
            delta_size / max(file_size, 1),
            self._policy.max_ratio,
        )
        return False

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
                await self._store.upload(
                    ref_key, body or src, meta, if_none_match=self.conditional_create
                )
            except PreconditionFailed:
                head = await self._store.head(ref_key)  # another writer won the race
            else:
                if not self.conditional_create:
                    # No conditional PUT: the last writer wins; re-read to see whose it is.
                    head = await self._store.head(ref_key)
                    winner = fmt.meta_sha256(head.metadata)
                    if winner != digest.sha256:
                        log.warning("reference race on %s: using the other writer's", ref_key)
                        return winner, False
                await self._bench.cpu(self._bench.cache.add_file, digest.sha256, src)
                log.info("created reference %s from %s", ref_key, name)
                return digest.sha256, True
        return _existing_reference(ref_key, head)

    # --- deep deltaspaces --------------------------------------------------------

    async def _put_deep(self, job: _Put, ref_head: ObjectHead | None) -> PutResult:
        """Store the file as a delta of its expanded form against the expanded reference."""
        src, key, digest = job.src, job.key, job.digest
        prefix = fmt.split_key(key)[0]
        ref_key = fmt.reference_key(prefix, DeltaMode.DEEP)
        async with (
            self._bench.scratch(".dgx") as expanded,
            self._bench.scratch(".vcdiff") as vcdiff,
            self._bench.scratch(".delta") as body,
        ):
            encoded = await self._encode_deep(src, key, ref_head, expanded, vcdiff)
            ref_sha256, created, zero_diff = encoded.ref_sha256, encoded.created, encoded.zero_diff
            if ref_sha256 is None:
                return await self._put_direct(job)
            delta_size = await self._bench.cpu_int(deep.wrap_delta, vcdiff, body, encoded.table)
            if not zero_diff and not self._pays(key, "deep delta", delta_size, digest.size):
                return await self._put_direct(job)
            expanded_size = expanded.stat().st_size
            delta = _NewDelta(job, ref_key, ref_sha256, body, zero_diff, expanded_size)
            stored = await self._store_delta(delta)
        log.info(
            "stored %s as deep delta: %d -> %d bytes (expanded %d)%s",
            key,
            digest.size,
            delta_size,
            expanded_size,
            " (new reference)" if created else "",
        )
        return PutResult(stored, created)

    async def _encode_deep(
        self, src: Path, key: str, ref_head: ObjectHead | None, expanded: Path, vcdiff: Path
    ) -> _DeepEncoding:
        """The expanded form of ``src`` in ``expanded``, and its diff against the
        deltaspace's deep reference in ``vcdiff`` (``ref_sha256`` None: no
        usable reference, store direct).

        The proof that the expanded form rebuilds to ``src`` runs beside
        the reference work and xdelta3 (they use the other core), and is
        awaited before anything is uploaded as ``key``. It compresses
        nothing again: the expansion compared every stream's recompression
        with the original, and ``deep.prove_form`` checks the rest of the
        form against ``src`` (readers still check the SHA-256 of every rebuild).
        """
        prefix, name = fmt.split_key(key)
        ref_key = fmt.reference_key(prefix, DeltaMode.DEEP)
        proven, leaves = await self._expand(src, expanded, key, first=ref_head is None)
        proof: list[bool] = []

        async def prove() -> None:
            proved = await self._bench.cpu(deep.prove_form, expanded, src, proven, leaves)
            proof.append(proved is True)

        table = None
        # The reference's or xdelta3's error as itself, not in a group: the
        # upload worker retries it, or files it under failed/, by its type.
        with first_failure():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prove)
                ref_sha256, created = await self._deep_reference(expanded, ref_key, name, ref_head)
                if ref_sha256 is not None and created:
                    await self._bench.engine.encode(expanded, expanded, vcdiff)
                elif ref_sha256 is not None:
                    table = await self._diff_deep(ref_key, ref_sha256, expanded, vcdiff)
        if ref_sha256 is None:
            return _DeepEncoding(None, False, False, None)
        if proof[0]:
            return _DeepEncoding(ref_sha256, created, created, table)
        # Never expected: the expansion checked every stream it inflated.
        log.error("%s: expanded form does not rebuild exactly; not expanding it", key)
        await self._bench.cpu(deep.plain_form, src, expanded)
        table = await self._diff_deep(ref_key, ref_sha256, expanded, vcdiff)
        return _DeepEncoding(ref_sha256, created, False, table)

    async def _diff_deep(
        self, ref_key: str, ref_sha256: str, expanded: Path, vcdiff: Path
    ) -> bytes | None:
        """The diff of ``expanded`` against the reference into ``vcdiff``: of the
        whole forms (returns None), or, where the reference holds spans of it
        as they are, of what is left on both sides (returns the span table)."""
        async with self._references.plain_copy(ref_key, ref_sha256) as plain_ref:
            spans = await self._bench.cpu(deep.find_spans, plain_ref, ref_sha256, expanded)
            assert isinstance(spans, list)
            if not spans:
                await self._bench.engine.encode(plain_ref, expanded, vcdiff)
                return None
            async with (
                self._bench.scratch(".src") as source,
                self._bench.scratch(".cut") as cut,
            ):
                await self._bench.cpu(deep.write_source, plain_ref, spans, source)
                await self._bench.cpu(deep.write_cut, expanded, spans, cut)
                level = min(_CUT_LEVEL, self._bench.engine.level)  # xdelta_level may ask less
                await self._bench.engine.encode(source, cut, vcdiff, level=level)
        return deep.pack_spans(spans)

    async def _deep_reference(
        self, expanded: Path, ref_key: str, name: str, ref_head: ObjectHead | None
    ) -> tuple[str | None, bool]:
        """``_ensure_reference`` for a deep deltaspace: made from ``expanded``, stored zstd.

        The first files of a new directory are stored side by side (upload
        workers): one of them makes the reference while the others wait for
        it and then diff against it, instead of each compressing a reference
        of its own that the conditional PUT refuses.
        """
        if ref_head is not None:
            return _existing_reference(ref_key, ref_head)
        async with self._creating.held(ref_key):
            # Made meanwhile, by a put of this writer or another mount? Or
            # somebody's file of that name (no deep metadata): files beside
            # it are stored direct, as beside another tool's reference.bin.
            with contextlib.suppress(NotFound):
                head = await self._store.head(ref_key)
                if not fmt.is_deltaglider_reference(ref_key, head.metadata):
                    log.warning("%s is no deep reference; storing files beside it direct", ref_key)
                    return None, False
                return _existing_reference(ref_key, head)
            async with self._bench.scratch(".zst") as packed:
                body = await self._bench.cpu(deep.compress_reference, expanded, packed)
                assert isinstance(body, deep.PackedReference)
                expanded_digest = FileDigest(body.expanded_sha256, body.expanded_size, b"")
                meta = fmt.deep_reference_metadata(
                    name, body.expanded_sha256, body.expanded_size, self._now()
                )
                return await self._ensure_reference(
                    expanded, ref_key, name, expanded_digest, None, meta=meta, body=packed
                )

    async def _expand(
        self, src: Path, out: Path, key: str, *, first: bool
    ) -> tuple[set[tuple[bytes, deep.Recipe]], dict[tuple[bytes, deep.Recipe], tuple[bytes, int]]]:
        """Write the expanded form of ``src`` to ``out``; returns what its search
        proved (``ExpandStats.proven`` and ``leaves``, for ``deep.prove_form``).

        The ``first`` file of a directory (no reference yet) is what the
        files stored beside it wait for, and nothing of it is known: its
        zip members are searched from the back too, on a core free now if
        there is one (a later release's members are mostly known: there
        the second thread costs more CPU than it saves time).

        With a zlib that does not deflate like reference zlib, its
        recompressions could not be trusted on other machines: the file
        then gets the form that expands nothing.
        """
        if not deep.zlib_is_reference():
            log.warning("this zlib does not deflate like reference zlib; %s is not expanded", key)
            await self._bench.cpu(deep.plain_form, src, out)
            return set(), {}
        expand_one = functools.partial(
            deep.expand_file,
            scratch_dir=self._bench.scratch_dir,
            limits=self._bench.limits,
            spare_core=self._bench.spare_core if first else None,
        )
        try:
            stats = await self._bench.cpu(expand_one, src, out)
        except ExpansionLimit as exc:  # a bomb, or beyond what this mount expands
            log.warning("%s: %s; stored without expanding it", key, exc)
            await self._bench.cpu(deep.plain_form, src, out)
            return set(), {}
        assert isinstance(stats, deep.ExpandStats)
        log.debug(
            "%s: %d streams inflated (%d by GNU gzip), %d kept; %d -> %d bytes",
            key,
            stats.streams_inflated,
            stats.streams_gnu,
            stats.streams_kept,
            stats.original_size,
            stats.expanded_size,
        )
        return stats.proven, stats.leaves

    @staticmethod
    def _now() -> datetime:
        return datetime.now(UTC)
