"""``dgfs migrate --normalize``: metadata every reader understands, in place.

A bucket written by the DeltaGlider CLI, by deltaglider_proxy or by dgfs
becomes readable by all three when each object carries the union of their
metadata keys (``format.normalized_metadata``). Each object that lacks some
is copied onto itself with the keys added (CopyObject, metadata replaced,
no byte transferred), on the condition that it is still the version whose
metadata was read (``If-Match`` on its ETag): a file replaced meanwhile is
left alone and counted, and a rerun looks at it again. Objects that need
nothing are skipped, so a rerun resumes.

A copy gives the object a new Last-Modified, and of a file's two forms
(``x`` and ``x.delta``, left by a writer that died between storing one and
removing the other) the newer is the one shown (``format.form_rank``). So
the form not shown is never copied, or normalizing would bring an older
version of the file back; it is counted as shadowed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from dgfs import format as fmt
from dgfs.errors import NotFound, PreconditionFailed, StoreError
from dgfs.shard import Shard, owned
from dgfs.store.base import ObjectHead, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)


@dataclass
class NormalizeReport:
    """What a normalization did (or, in a dry run, would do)."""

    examined: int = 0
    rewritten: list[str] = field(default_factory=list)
    unchanged: int = 0
    """Objects that needed nothing, foreign, deep or unusable ones included."""
    changed_meanwhile: list[str] = field(default_factory=list)
    """Replaced or removed between their HEAD and their copy: rerun to look again."""
    shadowed: list[str] = field(default_factory=list)
    """Forms of a file that its other, newer form hides: left alone."""
    failed: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "examined": self.examined,
            "rewritten" if not self.dry_run else "would_rewrite": self.rewritten,
            "unchanged": self.unchanged,
            "changed_meanwhile": self.changed_meanwhile,
            "shadowed": self.shadowed,
            "failed": self.failed,
        }


def _candidates(objects: list[ObjectInfo], shard: Shard | None) -> list[ObjectInfo]:
    return [
        o
        for o in objects
        if not fmt.is_internal_key(o.key)
        and not fmt.is_directory_marker(o.key)
        and owned(shard, o.key)
    ]


async def normalize(
    store: ObjectStore,
    prefix: str,
    *,
    dry_run: bool = False,
    shard: Shard | None = None,
    concurrency: int = 8,
) -> NormalizeReport:
    """Give every object under ``prefix`` (recursively) the union metadata."""
    report = NormalizeReport(dry_run=dry_run)
    objects: list[ObjectInfo] = []
    async for page in store.list_pages(fmt.listing_root(prefix), delimiter=None):
        objects.extend(page.objects)
    todo = sorted(_candidates(objects, shard), key=lambda o: o.key)
    report.examined = len(todo)
    pending = iter(todo)  # shared by the workers (one trio thread)

    keys = {o.key for o in todo}

    async def one(obj: ObjectInfo) -> None:
        try:
            head = await store.head(obj.key)
            other = _other_form(obj.key)
            if other in keys and await _outranked(store, head, other):
                report.shadowed.append(obj.key)
                return
            new = fmt.normalized_metadata(obj.key, head.metadata, head.content_type)
            if new is None:
                report.unchanged += 1
                return
            if not dry_run:
                await store.copy(obj.key, obj.key, new, version=head)
            report.rewritten.append(obj.key)
        except (NotFound, PreconditionFailed):
            report.changed_meanwhile.append(obj.key)
        except StoreError as exc:
            log.warning("%s: not normalized: %s", obj.key, exc)
            report.failed[obj.key] = str(exc)

    async def worker() -> None:
        for obj in pending:
            await one(obj)

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, concurrency)):
            nursery.start_soon(worker)
    report.rewritten.sort()
    report.changed_meanwhile.sort()
    report.shadowed.sort()
    return report


def _other_form(stored_key: str) -> str:
    """``x.delta`` for ``x``, ``x`` for ``x.delta``: the key of the same file's other form."""
    if stored_key.endswith(fmt.DELTA_SUFFIX):
        return stored_key.removesuffix(fmt.DELTA_SUFFIX)
    return fmt.delta_key(stored_key)


async def _outranked(store: ObjectStore, head: ObjectHead, other_key: str) -> bool:
    """Whether the object at ``other_key`` is the form of the file shown instead of ``head``'s."""
    try:
        other = await store.head(other_key)
    except NotFound:
        return False
    mine = fmt.form_rank(head.key, head.last_modified, head.metadata)
    return fmt.form_rank(other.key, other.last_modified, other.metadata) > mine
