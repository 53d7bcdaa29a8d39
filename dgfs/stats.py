"""How much a bucket (or prefix) stores, and how much the deltas save.

Counting rules (what a caller may rely on):

- Files are what a user sees: deltas, direct objects and foreign objects.
  References (``reference.bin``, and ``reference.deep`` of dgfs's deep
  deltaspaces) are not files, but their bytes are stored bytes.
  ``.deltaglider/`` (stats caches, temp files) and directory markers
  (empty ``dir/`` objects) are left out.
- A delta's original size is its ``dg-file-size``; a direct or foreign
  object's original and stored sizes are its object size.
- A file left in both forms (``x`` and its delta ``x.delta``, by a writer
  that died between storing one and removing the other) is counted once,
  in the form a mount shows (``fmt.form_rank``; both forms are HEADed when
  they share a Last-Modified second). The other form is no file: its bytes
  are stored bytes, counted in ``hidden_forms``/``hidden_bytes``, and a
  hidden delta still needs its reference (no orphan). An ``x.delta``
  without DeltaGlider metadata is a file of its own where it was HEADed
  (``detailed``); otherwise it is taken for ``x``'s delta.
- Modes trade requests for accuracy:
  ``quick``: one LIST. A delta's original size is *estimated* as its
  deltaspace's reference size (the reference is a full earlier version of
  the same series), or the delta's own size when there is no reference.
  Direct and foreign objects are not told apart (``foreign_count`` is None).
  ``sampled``: LIST plus one HEAD per deltaspace (its newest delta); the
  other deltas of that space are estimated as the mean of the sampled size
  and the reference size (versions of a series drift between the two).
  ``detailed``: LIST plus a HEAD of every delta and every plain object, all
  exact; direct and foreign are told apart.
  In every mode, a directory holding both ``reference.bin`` and
  ``reference.deep`` has each of its deltas HEADed (their metadata alone
  tells which reference they use).
- Deltas by mode (``delta_modes``): a delta is deep when its metadata says
  so (``dgfs-format: deep-1``) or, not HEADed, when its directory's only
  reference is ``reference.deep``. Each mode counts the directories holding
  its reference, the reference bytes, its deltas' count, stored and
  original bytes. A deep delta's quick estimate uses ``reference.deep``'s
  size, which is that of a compressed expanded form: rougher than for
  DeltaGlider deltas.
- An orphaned reference is one that no ``.delta`` of its directory needs
  (a deep delta needs ``reference.deep``, any other ``reference.bin``); its
  bytes are still counted as stored.

Whole-bucket results are cached (files encoded by ``dgfs.stats_cache``) in the bucket at
``.deltaglider/stats_{mode}.json`` in DeltaGlider's layout (so ``deltaglider
stats`` reads them), plus a ``dgfs`` section with the full breakdown and a
fingerprint of the listing (count, bytes, and a digest of every key, size
and ETag). A cache entry is used only if dgfs wrote it and the fingerprint
of a fresh LIST matches; DeltaGlider-written entries are recomputed because
DeltaGlider's quick numbers leave deltas' original sizes out. Prefix
results are not cached.

The records a run returns, and their JSON form, are ``dgfs.stats_results``'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from dgfs import format as fmt
from dgfs import forms
from dgfs.errors import DgfsError, FormatError, NotFound
from dgfs.format import DeltaMode
from dgfs.stats_cache import (
    DG_CACHE_VERSION,
    DGFS_CACHE_FORMAT,
    Fingerprint,
    Mode,
    cache_key,
    encode_caches,
)
from dgfs.stats_results import MODES, BucketStats, ModeStats, Orphan, SpaceStats
from dgfs.store.base import ObjectHead, ObjectInfo, ObjectStore, head_many

log = logging.getLogger(__name__)

__all__ = [  # what callers import from here; the records are dgfs.stats_results's
    "MODES",
    "BucketStats",
    "Fingerprint",
    "Mode",
    "ModeStats",
    "Orphan",
    "SpaceStats",
    "cache_key",
    "compute_stats",
    "encode_caches",
]


# --- computing -------------------------------------------------------------------


async def compute_stats(
    store: ObjectStore,
    prefix: str = "",
    mode: Mode = "quick",
    *,
    use_cache: bool = True,
    refresh: bool = False,
    concurrency: int = 32,
    on_head: Callable[[int], None] | None = None,
) -> BucketStats:
    """Statistics of ``store``'s bucket under ``prefix`` (a directory; "" = whole bucket).

    ``use_cache=False`` neither reads nor writes the cache; ``refresh`` skips
    reading it but writes the new result. ``on_head(n)`` is called as HEADs
    finish (for a progress bar), after being called once with the total.
    """
    if mode not in MODES:
        raise ValueError(f"unknown stats mode {mode!r}")
    root = fmt.listing_root(prefix)
    listing = await store.list(root, delimiter=None)
    everything = listing.objects
    content = [
        o for o in everything if not (fmt.is_internal_key(o.key) or fmt.is_directory_marker(o.key))
    ]
    fingerprint = Fingerprint.of(content)
    cacheable = root == ""

    if cacheable and use_cache and not refresh:
        cached = await _read_cache(store, mode, everything, fingerprint)
        if cached is not None:
            return cached

    stats = await _compute(store, root, mode, content, concurrency, on_head)
    if cacheable and use_cache:
        await _write_cache(store, mode, stats, everything, fingerprint)
    return stats


@dataclass
class _Listing:
    """A LIST sorted by directory: its references (by mode), deltas and plain objects."""

    spaces: dict[str, SpaceStats] = field(default_factory=dict)
    refs: dict[str, dict[DeltaMode, ObjectInfo]] = field(default_factory=dict)
    deltas: dict[str, list[ObjectInfo]] = field(default_factory=dict)
    plain: dict[str, list[ObjectInfo]] = field(default_factory=dict)

    @classmethod
    def of(cls, objects: Iterable[ObjectInfo]) -> _Listing:
        listing = cls()
        for obj in objects:
            space_name = fmt.split_key(obj.key)[0]
            listing.spaces.setdefault(space_name, SpaceStats(space_name))
            if fmt.is_reference_key(obj.key):
                listing.refs.setdefault(space_name, {})[fmt.reference_mode(obj.key)] = obj
            elif fmt.is_delta_key(obj.key):
                listing.deltas.setdefault(space_name, []).append(obj)
            else:
                listing.plain.setdefault(space_name, []).append(obj)
        return listing

    def two_forms(self) -> list[tuple[str, ObjectInfo, ObjectInfo]]:
        """``(directory, x, x.delta)`` of each file whose name holds both forms."""
        found = []
        for name, group in self.deltas.items():
            plain = {o.key: o for o in self.plain.get(name, [])}
            for delta in group:
                direct = plain.get(fmt.visible_key(delta.key) or "")
                if direct is not None:
                    found.append((name, direct, delta))
        return found

    def keys_to_head(self, mode: Mode) -> list[str]:
        """Which objects ``mode`` HEADs (see the module docstring)."""
        if mode == "detailed":
            return [o.key for group in (*self.deltas.values(), *self.plain.values()) for o in group]
        # A file's two forms of one Last-Modified second: which one is shown.
        to_head = [
            key
            for _, direct, delta in self.two_forms()
            if direct.last_modified == delta.last_modified
            for key in (direct.key, delta.key)
        ]
        for name, group in self.deltas.items():
            if len(self.refs.get(name, {})) > 1:  # both references: each delta's mode is needed
                to_head += [o.key for o in group]
            elif mode == "sampled":
                newest = max(group, key=lambda o: (o.last_modified, o.key))
                to_head.append(newest.key)
        return list(dict.fromkeys(to_head))

    def hide_older_forms(self, heads: Mapping[str, ObjectHead | bool]) -> None:
        """Take the form a mount does not show of each file left in two forms
        out of the files, into its directory's ``hidden_*`` (its bytes stay stored).

        A ``.delta`` HEADed and found no delta (``forms.is_delta``) is a file of
        its own; one not HEADed is taken for a delta. The shown form is the one
        ``fmt.form_rank`` ranks first: by the listing's Last-Modified, and
        within one second by the HEADs ``keys_to_head`` asked for.
        """
        for name, direct, delta in self.two_forms():
            direct_head, delta_head = heads.get(direct.key), heads.get(delta.key)
            if direct_head is False or delta_head is False:
                continue  # gone since the LIST: one form left
            if isinstance(delta_head, ObjectHead) and not forms.is_delta(delta_head):
                continue  # x.delta is a file of its own
            if isinstance(direct_head, ObjectHead) and isinstance(delta_head, ObjectHead):
                direct_shown = _rank(direct_head) > _rank(delta_head)
            else:
                direct_shown = direct.last_modified > delta.last_modified
            space = self.spaces[name]
            hidden = delta if direct_shown else direct
            space.hidden_forms += 1
            space.hidden_bytes += hidden.size
            space.stored_bytes += hidden.size
            if direct_shown:
                self.deltas[name].remove(delta)
                if _delta_mode(delta_head, self.refs.get(name, {})) is DeltaMode.DEEP:
                    space.hidden_deep_deltas += 1
                else:
                    space.hidden_dg_deltas += 1
            else:
                self.plain[name].remove(direct)


def _rank(head: ObjectHead) -> tuple[datetime, datetime, bool]:
    return fmt.form_rank(head.key, head.last_modified, head.metadata)


async def _compute(
    store: ObjectStore,
    root: str,
    mode: Mode,
    objects: list[ObjectInfo],
    concurrency: int,
    on_head: Callable[[int], None] | None,
) -> BucketStats:
    listing = _Listing.of(objects)
    heads = await _head_all(store, listing.keys_to_head(mode), concurrency, on_head)
    listing.hide_older_forms(heads)
    stats = BucketStats(store.bucket, root.rstrip("/"), mode)
    candidates: list[ObjectInfo] = []  # references that look orphaned
    for name, space in sorted(listing.spaces.items()):
        space_refs = listing.refs.get(name, {})
        _count_references(space, space_refs)
        _count_deltas(
            space, space_refs, listing.deltas.get(name, []), heads, mode, stats.unreadable
        )
        _count_plain(space, listing.plain.get(name, []), heads, mode, stats.unreadable)
        stats.spaces.append(space)
        candidates += [space_refs[fmt.reference_mode(n)] for n in space.orphaned_references()]
    stats.orphans = await _orphans(store, candidates, concurrency, on_head)
    _add_up(stats)
    return stats


def _count_references(space: SpaceStats, space_refs: Mapping[DeltaMode, ObjectInfo]) -> None:
    for ref_mode, ref in space_refs.items():
        space.has_reference = True
        space.reference_bytes += ref.size
        space.stored_bytes += ref.size
        if ref_mode is DeltaMode.DEEP:
            space.deep_reference = True
            space.deep_reference_bytes = ref.size
        else:
            space.dg_reference = True


def _count_deltas(
    space: SpaceStats,
    space_refs: Mapping[DeltaMode, ObjectInfo],
    deltas: list[ObjectInfo],
    heads: Mapping[str, ObjectHead | bool],
    mode: Mode,
    unreadable: list[str],
) -> None:
    """A directory's deltas: exact where HEADed, estimated otherwise."""
    sample_size: int | None = None
    unknown: list[tuple[ObjectInfo, DeltaMode]] = []  # original size to estimate
    for obj in deltas:
        head = heads.get(obj.key)
        if head is False:  # gone since the LIST
            continue
        stored = _classified(obj, head, unreadable)
        if stored is not None and stored.kind is not fmt.Kind.DELTA:
            _add_plain(space, stored.kind, stored.original_size, obj.size)
            continue
        delta_mode = _delta_mode(head, space_refs)
        deep = delta_mode is DeltaMode.DEEP
        space.delta_count += 1
        space.stored_bytes += obj.size
        space.delta_bytes += obj.size
        if deep:
            space.deep_delta_count += 1
            space.deep_delta_bytes += obj.size
        if stored is None:
            unknown.append((obj, delta_mode))
        else:
            _add_delta_original(space, stored.original_size, deep)
            sample_size = stored.original_size
    for obj, delta_mode in unknown:
        space.estimated = True
        own_ref = space_refs.get(delta_mode) or next(iter(space_refs.values()), None)
        estimate = _estimate(obj, own_ref, sample_size if mode == "sampled" else None)
        _add_delta_original(space, estimate, delta_mode is DeltaMode.DEEP)


def _count_plain(
    space: SpaceStats,
    plain: list[ObjectInfo],
    heads: Mapping[str, ObjectHead | bool],
    mode: Mode,
    unreadable: list[str],
) -> None:
    for obj in plain:
        head = heads.get(obj.key)
        if head is False:
            continue
        stored = _classified(obj, head, unreadable)
        if mode == "detailed" and stored is not None:
            _add_plain(space, stored.kind, stored.original_size, obj.size)
        else:
            _add_plain(space, None, obj.size, obj.size)
    if mode != "detailed":
        space.direct_count = space.foreign_count = None


async def _orphans(
    store: ObjectStore,
    candidates: list[ObjectInfo],
    concurrency: int,
    on_head: Callable[[int], None] | None,
) -> list[Orphan]:
    """The ``candidates`` (references no delta needs) that are still there and are
    DeltaGlider references: one a tool wrote without DeltaGlider metadata is nobody's
    reference, not an orphan for `dgfs gc`, which keeps it too. One HEAD each (few:
    directories whose deltas are all gone)."""
    ref_heads = await _head_all(store, [ref.key for ref in candidates], concurrency, on_head)
    orphans = []
    for ref in candidates:
        head = ref_heads.get(ref.key)
        if head is False:
            continue  # gone since the LIST
        if isinstance(head, ObjectHead) and not fmt.is_deltaglider_reference(
            ref.key, head.metadata
        ):
            continue
        orphans.append(Orphan(ref.key, ref.size))
    if orphans:
        # Reported to the user by the command; a note in the log is enough.
        log.info(
            "%d orphaned reference(s) hold %d bytes with no delta left",
            len(orphans),
            sum(o.size for o in orphans),
        )
    return orphans


def _add_up(stats: BucketStats) -> None:
    """The bucket's totals from its directories'."""
    stats.delta_modes = {m.value: ModeStats() for m in DeltaMode}
    for space in stats.spaces:
        stats.delta_count += space.delta_count
        stats.plain_count += space.plain_count
        stats.original_bytes += space.original_bytes
        stats.stored_bytes += space.stored_bytes
        stats.reference_bytes += space.reference_bytes
        stats.hidden_forms += space.hidden_forms
        stats.hidden_bytes += space.hidden_bytes
        stats.reference_count += int(space.dg_reference) + int(space.deep_reference)
        stats.mixed_spaces += int(space.dg_reference and space.deep_reference)
        stats.estimated = stats.estimated or space.estimated
        for delta_mode in DeltaMode:
            stats.delta_modes[delta_mode.value].add_space(space, delta_mode is DeltaMode.DEEP)
    stats.file_count = stats.delta_count + stats.plain_count
    if stats.mode == "detailed":
        stats.direct_count = sum(s.direct_count or 0 for s in stats.spaces)
        stats.foreign_count = sum(s.foreign_count or 0 for s in stats.spaces)
    else:
        stats.direct_count = stats.foreign_count = None
    stats.unreadable = sorted(stats.unreadable)
    stats.computed_at = datetime.now(UTC).isoformat()


def _delta_mode(
    head: ObjectHead | bool | None, space_refs: Mapping[DeltaMode, object]
) -> DeltaMode:
    """A delta's mode: from its metadata if HEADed, else its directory's only reference."""
    if isinstance(head, ObjectHead):
        return DeltaMode.DEEP if fmt.is_deep(head.metadata) else DeltaMode.DG
    if len(space_refs) == 1:
        return next(iter(space_refs))
    return DeltaMode.DG


def _add_delta_original(space: SpaceStats, original: int, deep: bool) -> None:
    space.original_bytes += original
    space.delta_original_bytes += original
    if deep:
        space.deep_original_bytes += original


def _classified(
    obj: ObjectInfo, head: ObjectHead | bool | None, unreadable: list[str]
) -> fmt.StoredFile | None:
    """The object's StoredFile if it was HEADed and its metadata is sound."""
    if not isinstance(head, ObjectHead):
        return None
    try:
        return fmt.classify(obj.key, obj.size, head.metadata)
    except FormatError as exc:
        log.warning("%s", exc)
        unreadable.append(obj.key)
        return None


def _add_plain(space: SpaceStats, kind: fmt.Kind | None, original: int, stored: int) -> None:
    space.plain_count += 1
    space.original_bytes += original
    space.stored_bytes += stored
    if kind is fmt.Kind.FOREIGN:
        space.foreign_count = (space.foreign_count or 0) + 1
    elif kind is fmt.Kind.DIRECT:
        space.direct_count = (space.direct_count or 0) + 1


def _estimate(delta: ObjectInfo, ref: ObjectInfo | None, sample_size: int | None) -> int:
    """Estimated original size of a delta whose metadata was not read."""
    if sample_size is not None:
        return (sample_size + ref.size) // 2 if ref is not None else sample_size
    return ref.size if ref is not None else delta.size


async def _head_all(
    store: ObjectStore,
    keys: list[str],
    concurrency: int,
    on_head: Callable[[int], None] | None,
) -> dict[str, ObjectHead | bool]:
    """HEAD ``keys`` concurrently: key -> head, or False if it vanished since the LIST."""
    if on_head is not None:
        on_head(len(keys))
    if not keys:
        return {}

    def headed(key: str, head: ObjectHead | None) -> None:
        if on_head is not None:
            on_head(1)

    heads = await head_many(store, keys, concurrency=concurrency, on_head=headed)
    return {key: heads.get(key, False) for key in keys}


# --- the cache ----------------------------------------------------------------


async def _read_cache(
    store: ObjectStore, mode: Mode, everything: list[ObjectInfo], fingerprint: Fingerprint
) -> BucketStats | None:
    key = cache_key(mode)
    entry = next((o for o in everything if o.key == key), None)
    if entry is None:
        return None
    try:
        raw = await store.get_range(key, 0, entry.size)
        document = json.loads(raw)
        ours = document.get("dgfs") or {}
        if document.get("version") != DG_CACHE_VERSION or document.get("mode") != mode:
            log.info("stats cache %s: other version or mode; recomputing", key)
            return None
        if ours.get("format") != DGFS_CACHE_FORMAT:
            log.info("stats cache %s was not written by dgfs; recomputing", key)
            return None
        if Fingerprint(**ours["validation"]) != fingerprint:
            log.info("stats cache %s is stale (bucket changed); recomputing", key)
            return None
        stats = BucketStats.from_json(ours["stats"])
    except NotFound:
        return None
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("stats cache %s is unreadable (%s); recomputing", key, exc)
        return None
    stats.from_cache = True
    log.info("stats cache hit: %s (computed %s)", key, stats.computed_at)
    return stats


async def _write_cache(
    store: ObjectStore,
    mode: Mode,
    stats: BucketStats,
    everything: list[ObjectInfo],
    fingerprint: Fingerprint,
) -> None:
    """Write this mode's cache, and rewrite the other modes' still-valid ones.

    A new or resized cache file changes what a LIST shows, which would make
    DeltaGlider reject the other modes' files; they are rewritten with the
    same numbers and a validation that counts every file written now.
    """
    entries: dict[Mode, BucketStats] = {mode: stats}
    for other in MODES:
        if other != mode:
            existing = await _read_cache(store, other, everything, fingerprint)
            if existing is not None:
                existing.from_cache = False
                entries[other] = existing
    bodies = encode_caches(entries, fingerprint, everything)
    for written, body in bodies.items():
        try:
            await store.put_bytes(
                cache_key(written),
                body,
                {"x-deltaglider-cache": "true"},
                content_type="application/json",
            )
        except DgfsError as exc:  # caching is optional: a read-only user still gets stats
            log.warning("could not write the stats cache %s: %s", cache_key(written), exc)
            return
