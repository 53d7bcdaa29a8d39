"""``MemoryStore``: an in-memory ObjectStore with S3's semantics, for fast tests.

What it shares with ``S3Store`` (and tests may rely on): ETags are the MD5
hex of the body (no quotes), ``last_modified`` is the time of the write in
UTC by the store's ``clock`` (which also dates HEAD and LIST answers, as
a server's ``Date`` does), ``If-None-Match: *`` is honoured, listings are in key order with
common prefixes rolled up exactly as ``ListObjectsV2`` does (a common
prefix counts as one entry of a page), copies keep or replace metadata,
deleting a missing key is fine. What it does not model: multipart ETags,
incomplete multipart uploads (there are never any), eventual consistency.

Every operation is a trio checkpoint, so tests see the same scheduling
points as with a real store.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import trio

from dgfs.errors import NotFound, PreconditionFailed, StoreError
from dgfs.store.base import (
    CopyRequest,
    ListPage,
    MultipartUpload,
    NewObject,
    ObjectHead,
    ObjectInfo,
    ObjectStore,
    decode_metadata,
    encode_metadata,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredObject:
    """One object as the memory store holds it."""

    body: bytes
    metadata: dict[str, str]
    content_type: str
    etag: str
    last_modified: datetime = field(default_factory=lambda: datetime.now(UTC))


class MemoryStore(ObjectStore):
    """A bucket held in a dict (``objects``: key -> ``StoredObject``)."""

    def __init__(
        self,
        bucket: str = "memory",
        *,
        page_size: int = 1000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.bucket = bucket
        self.page_size = page_size
        self.objects: dict[str, StoredObject] = {}
        #: The server's clock: Last-Modified of writes, and when HEADs and
        #: listings were answered (their ``observed_at``).
        self.clock = clock

    def _get(self, key: str) -> StoredObject:
        try:
            return self.objects[key]
        except KeyError:
            raise NotFound(f"s3://{self.bucket}/{key} not found") from None

    async def write(self, key: str, body: bytes | Path, new: NewObject) -> str:
        if isinstance(body, Path):
            body = await trio.Path(body).read_bytes()
        else:
            await trio.lowlevel.checkpoint()
        return self._store(key, body, new)

    def _store(self, key: str, body: bytes, new: NewObject) -> str:
        if not all(name.isascii() for name in new.metadata):
            # What botocore refuses before sending (headers are ASCII).
            raise StoreError(f"PutObject s3://{self.bucket}/{key}: metadata names must be ASCII")
        if new.if_none_match and key in self.objects:
            raise PreconditionFailed(f"PutObject s3://{self.bucket}/{key}: precondition failed")
        etag = hashlib.md5(body).hexdigest()
        # Held as S3 would hold it (names lower-case, values ASCII).
        stored_metadata = encode_metadata(new.metadata)
        self.objects[key] = StoredObject(
            bytes(body), stored_metadata, new.content_type, etag, self.clock()
        )
        return etag

    async def list_pages(
        self, prefix: str = "", delimiter: str | None = "/"
    ) -> AsyncIterator[ListPage]:
        """Pages of at most ``page_size`` entries (objects + common prefixes), in key order."""
        await trio.lowlevel.checkpoint()
        entries: list[ObjectInfo | str] = []
        for key in sorted(k for k in self.objects if k.startswith(prefix)):
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = key[: cut + len(delimiter or "")]
                if not entries or entries[-1] != common:
                    entries.append(common)
                continue
            stored = self.objects[key]
            entries.append(ObjectInfo(key, len(stored.body), stored.etag, stored.last_modified))
        for start in range(0, max(len(entries), 1), self.page_size):
            page = entries[start : start + self.page_size]
            yield ListPage(
                [entry for entry in page if isinstance(entry, ObjectInfo)],
                [entry for entry in page if isinstance(entry, str)],
                self.clock(),
            )
            await trio.lowlevel.checkpoint()

    def _head_of(self, key: str) -> ObjectHead:
        stored = self._get(key)
        return ObjectHead(
            key,
            len(stored.body),
            stored.etag,
            stored.last_modified,
            decode_metadata(stored.metadata),
            stored.content_type,
            self.clock(),
        )

    async def head(self, key: str) -> ObjectHead:
        await trio.lowlevel.checkpoint()
        return self._head_of(key)

    async def get_range(
        self, key: str, start: int, length: int, *, if_match: str | None = None
    ) -> bytes:
        await trio.lowlevel.checkpoint()
        stored = self._get(key)
        if if_match is not None and stored.etag != if_match:
            raise PreconditionFailed(f"GetObject s3://{self.bucket}/{key}: precondition failed")
        if length <= 0:
            return b""
        return stored.body[start : start + length]

    async def download(self, key: str, dest: Path) -> ObjectHead:
        await trio.lowlevel.checkpoint()
        head = self._head_of(key)
        await trio.Path(dest).write_bytes(self.objects[key].body)
        return head

    async def copy_object(self, src_key: str, dst_key: str, request: CopyRequest) -> str:
        await trio.lowlevel.checkpoint()
        metadata = request.metadata
        source = self._get(src_key)
        if request.if_match is not None and source.etag != request.if_match:
            raise PreconditionFailed(
                f"CopyObject s3://{self.bucket}/{src_key}: precondition failed"
            )
        if src_key == dst_key and metadata is None:
            raise StoreError(
                f"CopyObject s3://{self.bucket}/{dst_key} failed: InvalidRequest: "
                "copying an object to itself without changing its metadata"
            )
        new_metadata = source.metadata if metadata is None else metadata
        return self._store(dst_key, source.body, NewObject(new_metadata, source.content_type))

    async def delete(self, key: str, *, version: ObjectHead | None = None) -> None:
        await trio.lowlevel.checkpoint()
        current = self.objects.get(key)
        if version is not None and current is not None and current.etag != version.etag:
            raise PreconditionFailed(f"DeleteObject s3://{self.bucket}/{key}: precondition failed")
        self.objects.pop(key, None)

    async def delete_many(
        self, keys: list[str], *, etags: Mapping[str, str] | None = None
    ) -> list[str]:
        await trio.lowlevel.checkpoint()
        kept = []
        for key in keys:
            current = self.objects.get(key)
            if etags and key in etags and current is not None and current.etag != etags[key]:
                kept.append(key)
            else:
                self.objects.pop(key, None)
        return kept

    async def list_multipart_uploads(self, prefix: str = "") -> list[MultipartUpload]:
        await trio.lowlevel.checkpoint()
        return []

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        await trio.lowlevel.checkpoint()
