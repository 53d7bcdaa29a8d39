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

``Core`` is a facade over parts of one job each, which it makes and wires;
each piece of mutable state has the one owner named here:

- ``bench`` (:mod:`dgfs.workbench`): scratch files, the CPU limiter,
  downloads; owns ``proxy_key``; holds the tools every part uses (the
  content cache, the xdelta3 engine, the expansion limits).
- ``forms`` (:mod:`dgfs.forms`): where a file is stored, the two-form rules.
- ``references`` (:mod:`dgfs.references`): cache fetches; owns the plain
  reference copies and who uses them.
- ``writer`` (:mod:`dgfs.writer`): ``put``; owns ``deltas`` and
  ``conditional_create``.
- ``rebuilder`` (:mod:`dgfs.rebuild`): original bytes into a path or the
  cache; owns the rebuilds running now and failed gzip recoveries.
- ``renamer`` (:mod:`dgfs.renames`): delete, rename, metadata, directory renames.

``Core.proxy_key`` and ``Core.conditional_create`` read and set the owner's value.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import trio

from dgfs import deep, gc
from dgfs import format as fmt
from dgfs.cache import CacheEntryReader, ContentCache
from dgfs.delta import DeltaEngine
from dgfs.errors import DgfsError, NotFound
from dgfs.format import DeltaMode, StoredFile
from dgfs.forms import Forms
from dgfs.hashing import FileDigest
from dgfs.policy import Policy
from dgfs.proxycrypt import ProxyKey
from dgfs.rebuild import Rebuilder, RebuildStream
from dgfs.references import ReferencePool
from dgfs.renames import Copied, Pending, Renamer
from dgfs.store.base import ObjectHead, ObjectStore, head_many
from dgfs.telemetry import Telemetry
from dgfs.workbench import Workbench
from dgfs.writer import FileWriter

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
        limits: deep.ExpansionLimits | None = None,
        proxy_key: ProxyKey | None = None,
    ) -> None:
        self.store = store
        # Bounds on expanding files and on rebuilding objects (docs/SECURITY.md).
        self.limits = limits or deep.ExpansionLimits()
        self.telemetry = telemetry or Telemetry()
        self.cache = cache
        self.engine = engine
        self.policy = policy
        self.bench = Workbench(
            store,
            scratch_dir=scratch_dir,
            cache=cache,
            engine=engine,
            limits=self.limits,
            cpu_limiter=cpu_limiter,
            proxy_key=proxy_key,
        )
        self.references = ReferencePool(self.bench, slots=plain_reference_slots)
        self.forms = Forms(store)
        self.writer = FileWriter(
            self.bench,
            self.forms,
            self.references,
            policy,
            deltas=deltas,
            conditional_create=conditional_create,
        )
        self.rebuilder = Rebuilder(self.bench, self.references, self.telemetry)
        self.renamer = Renamer(self.bench, self.forms, self.writer, self.rebuilder)
        # Storing the local file ``src`` under the user-visible ``key``.
        self.put = self.writer.put

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

    def scratch_path(self, suffix: str = "") -> Path:
        """A new, empty, private temp file in the scratch dir."""
        return self.bench.scratch_path(suffix)

    async def digest(self, path: Path) -> FileDigest:
        """SHA-256, size and sniffable head of a local file (in a worker thread)."""
        return await self.bench.digest(path)

    async def download(self, key: str, dest: Path) -> ObjectHead:
        """``Workbench.download``: the object ``key`` as the file it holds, in ``dest``."""
        return await self.bench.download(key, dest)

    # --- locating and storing --------------------------------------------------

    async def locate(self, key: str) -> StoredFile:
        """Find how the user-visible ``key`` is stored; ``NotFound`` if it is not.

        When both a delta and a direct object exist (a writer died between
        writing the new form and deleting the old), the newer one wins.
        """
        return await self.forms.locate(key)

    # --- get -------------------------------------------------------------------

    async def rebuild(self, stored: StoredFile, out: Path, *, verify: bool = True) -> bool:
        """``Rebuilder.rebuild``: the original bytes of a delta in ``out``."""
        return await self.rebuilder.rebuild(stored, out, verify=verify)

    async def get(self, key: str, dest: Path) -> StoredFile:
        """The original bytes of ``key`` in ``dest``, verified (``Rebuilder.write``)."""
        stored = await self.locate(key)
        await self.rebuilder.write(stored, dest)
        return stored

    async def materialize(self, stored: StoredFile, *, counted: bool = True) -> str:
        """``Rebuilder.materialize``: the bytes of ``stored`` in the cache; their sha256."""
        return await self.rebuilder.materialize(stored, counted=counted)

    # --- delete / rename / metadata (``Renamer``) -------------------------------

    async def delete(self, key: str) -> None:
        """Remove the file ``key`` in every form; the reference stays (as DeltaGlider does)."""
        await self.renamer.delete(key)

    async def rename(
        self, src_key: str, dst_key: str, *, copied: Copied | None = None
    ) -> StoredFile:
        """Move one file (``Renamer.rename``); returns it as now stored."""
        return await self.renamer.rename(src_key, dst_key, copied=copied)

    async def update_metadata(self, key: str, changes: Mapping[str, str]) -> StoredFile:
        """Merge ``changes`` (POSIX attributes) into the stored object's metadata in place."""
        return await self.renamer.update_metadata(key, changes)

    async def rename_prefix(
        self, src_prefix: str, dst_prefix: str, *, pending: Pending = lambda: frozenset()
    ) -> int:
        """A directory rename (``Renamer.rename_prefix``); returns the objects moved."""
        return await self.renamer.rename_prefix(src_prefix, dst_prefix, pending=pending)

    # --- for the filesystem: cached content, directory leftovers, symlinks ----------

    def rebuild_stream(self, sha256: str) -> RebuildStream | None:
        """The rebuild of content ``sha256`` running now, if any (see ``RebuildStream``)."""
        return self.rebuilder.stream(sha256)

    async def open_cached(self, stored: StoredFile) -> CacheEntryReader:
        """A reader of the original bytes of ``stored`` from the cache, which gets
        them first (rebuilt or fetched, verified); the caller closes it."""
        return await self.rebuilder.open_cached(stored)

    def open_plain(self, sha256: str) -> int | None:
        """A descriptor of verified plain bytes of content ``sha256`` kept beside
        the cache, or None (``Rebuilder.open_plain``); the caller closes it."""
        return self.rebuilder.open_plain(sha256)

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
                head is not None and fmt.is_deltaglider_reference(obj.key, head.metadata)
            ):
                removable.append(obj.key)
            elif obj.key not in refs or obj.key in ref_heads:  # not gone since the LIST
                kept.append(obj.key)
        return removable, kept

    async def remove_leftovers(self, removable: list[str]) -> bool:
        """Delete what ``dir_leftovers`` found removable; False when a delta
        another mount stored meanwhile needs the directory's reference (put
        back then: the directory is not empty after all, and its marker
        stays). Each reference is backed up first, as ``dgfs gc`` does."""
        now = datetime.now(UTC)
        emptied = True
        for key in [k for k in removable if fmt.is_reference_key(k)]:
            try:
                backup = await gc.remove_with_backup(
                    self.store, key, now + gc.DEFAULT_BACKUP_TTL, now
                )
            except NotFound:
                continue  # removed meanwhile (another rmdir, dgfs gc)
            if backup is None:  # replaced meanwhile: a writer made it anew
                emptied = False
                continue
            outcome = await gc.put_back_if_needed(self.store, key, backup)
            if outcome is not gc.PutBack.STRANDED:
                with contextlib.suppress(DgfsError):
                    await self.store.delete(backup)
            emptied = emptied and outcome is gc.PutBack.NOT_NEEDED
        if emptied:
            await self.store.delete_many([k for k in removable if not fmt.is_reference_key(k)])
        return emptied

    # Symlinks and special files (FIFOs, devices, sockets) are single plain
    # objects as s3fs stores them: the type in the ``mode`` metadata, the body
    # a symlink's target or empty. Never deltas, never staged.

    async def put_plain(self, key: str, body: bytes, metadata: Mapping[str, str]) -> None:
        await self.store.put_bytes(key, body, metadata)

    async def read_symlink(self, key: str) -> bytes:
        return await self.store.get_range(key, 0, SYMLINK_MAX)

    async def move_plain(self, src_key: str, dst_key: str, *, copied: Copied | None = None) -> None:
        """Rename a symlink or special file (``Renamer.move_plain``)."""
        await self.renamer.move_plain(src_key, dst_key, copied=copied)

    async def delete_plain(self, key: str) -> None:
        await self.store.delete(key)

    async def aclose(self) -> None:
        """Remove decrypted reference copies and the plain copies of rebuilds."""
        self.references.close()
        self.rebuilder.recent.close()
