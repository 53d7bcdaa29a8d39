"""Where a user-visible file is stored, and the rules for its two forms.

A file ``key`` is held by the direct object ``key`` or the delta
``key.delta``, and for a moment by both (a writer between storing the new
form and removing the old). ``Forms`` answers which object holds it
(``locate``: the higher ``fmt.form_rank`` wins, as in ``Namespace``) and
removes an older form only when that is safe. It holds no state.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime

from dgfs import format as fmt
from dgfs.errors import NotFound, WriteConflict
from dgfs.format import StoredFile
from dgfs.store.base import ObjectHead, ObjectStore, head_many

log = logging.getLogger(__name__)


def _form_rank(head: ObjectHead) -> tuple[datetime, datetime, bool]:
    """Of two forms of one file, the one with the higher rank is shown
    (``fmt.form_rank``: ``Namespace`` and ``locate`` agree)."""
    return fmt.form_rank(head.key, head.last_modified, head.metadata)


def is_delta(head: ObjectHead) -> bool:
    """Whether the object ``head`` is a file's delta, as a mount shows it: an
    object named ``x.delta`` without usable DeltaGlider metadata is a file
    of its own, shown (and to be copied, kept, counted) as ``x.delta``."""
    return fmt.classify_shown(head.key, head.size, head.metadata).kind is fmt.Kind.DELTA


def shown_key(head: ObjectHead) -> str:
    """The user-visible key the object ``head`` holds (``x`` for ``x``'s delta;
    ``x.delta`` for a file of its own named so)."""
    return fmt.classify_shown(head.key, head.size, head.metadata).visible_key


def _holds(head: ObjectHead, key: str) -> bool:
    """Whether the object ``head`` holds the user-visible file ``key`` (as the mount shows it)."""
    return shown_key(head) == key


class Forms:
    """Locating a file's stored form; removing the other form of a file just stored."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    async def locate(self, key: str) -> StoredFile:
        """Find how the user-visible ``key`` is stored; ``NotFound`` if it is not.

        When both a delta and a direct object exist (a writer died between
        writing the new form and deleting the old), the newer one wins.
        """
        return (await self.locate_with_head(key))[0]

    async def locate_with_head(self, key: str) -> tuple[StoredFile, ObjectHead]:
        """``locate``, plus the HEAD it was read from (for callers that copy metadata)."""
        forms = await self.holders(key)
        if not forms:
            raise NotFound(f"no such file: {key}")
        newest = max(forms.values(), key=_form_rank)
        return fmt.classify_shown(newest.key, newest.size, newest.metadata), newest

    async def holders(self, key: str) -> dict[str, ObjectHead]:
        """The objects that hold the user-visible ``key`` (stored key -> HEAD).

        ``key.delta`` is one only when it is a usable delta: a ``.delta`` that
        is not (no DeltaGlider metadata, or too little) is a file of its own
        name, which nothing done to ``key`` may overwrite or remove.
        """
        heads = await head_many(self._store, [fmt.delta_key(key), key])
        return {stored_key: head for stored_key, head in heads.items() if _holds(head, key)}

    async def delta_form(self, key: str) -> ObjectHead | None:
        """The HEAD of ``key.delta`` (None if there is none)."""
        try:
            return await self._store.head(fmt.delta_key(key))
        except NotFound:
            return None

    async def delta_form_taken(self, key: str) -> bool:
        """Whether ``key.delta`` holds an object that is not ``key``'s delta."""
        head = await self.delta_form(key)
        return head is not None and not _holds(head, key)

    async def delete_delta_form(self, key: str) -> None:
        """Remove ``key.delta`` if it is ``key``'s delta (an older form), nothing else."""
        head = await self.delta_form(key)
        if head is not None and _holds(head, key):
            await self._store.delete(head.key)

    async def drop_other_form(self, key: str, own_key: str, other_key: str) -> None:
        """``key`` was just stored as ``own_key``: remove its other form
        ``other_key`` (the direct file or the delta), unless that one is
        newer — another mount stored it after us, and it is what the mount
        shows (``_form_rank``).

        Two mounts storing one name in its two forms at once each remove
        the other's: the HEAD before and the DELETE after leave a moment in
        which both can go. So our own form is looked at once more; gone, it
        is stored again (``WriteConflict``): one of the two always stays.
        """
        heads = await head_many(self._store, [own_key, other_key])
        own, other = heads.get(own_key), heads.get(other_key)
        if own is not None and other is not None and _holds(other, key):
            # Strictly newer only: many stores give Last-Modified in whole
            # seconds, and the form this writer replaces was usually written
            # within the same second (truncate after a copy, say).
            if other.last_modified > own.last_modified:
                log.info("%s: a newer %s stored by another writer stays", key, other_key)
                return
            with contextlib.suppress(NotFound):
                await self._store.delete(other_key)
            try:
                await self._store.head(own_key)
            except NotFound:
                own = None
        if own is None:
            raise WriteConflict(
                f"{key}: another writer removed {own_key} while it was stored; storing it again"
            )
