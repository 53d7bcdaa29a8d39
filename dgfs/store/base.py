"""The async object-store interface every other layer talks to.

An ``ObjectStore`` is bound to one bucket. Keys are plain S3 keys (no
leading slash). Metadata dicts hold user metadata *without* the
``x-amz-meta-`` prefix, keys lower-case, values as text: stores encode
non-ASCII values on write and decode them on read (``encode_metadata``).

Implementations raise only ``dgfs.errors`` exceptions: ``NotFound`` for a
missing key, ``PreconditionFailed`` when a conditional create loses,
``AccessDenied``, ``TransientError`` once retries are exhausted.
"""

from __future__ import annotations

import abc
import base64
import builtins
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from pathlib import Path
from typing import TypedDict, Unpack

import trio

from dgfs.errors import DgfsError, NotFound
from dgfs.proxymeta import DEFAULT_CONTENT_TYPE

#: The longest key S3 holds, in bytes of UTF-8.
KEY_MAX = 1024

# Objects at least this large are uploaded in parts.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_PART_SIZE = 16 * 1024 * 1024


def encode_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Metadata as S3 accepts it: names lower-case, values a header cannot
    carry as they are RFC 2047 encoded.

    Metadata travels in HTTP headers, which hold printable ASCII only and
    lose leading and trailing blanks, yet file names go into
    ``dg-original-name`` and friends (``a\rb`` and `` notes `` are file names).
    RFC 2047 is what S3 itself answers with for such values. Stores apply
    this on every write.
    """
    return {
        name.lower(): value
        if _header_safe(value)
        else "=?UTF-8?B?" + base64.b64encode(value.encode()).decode() + "?="
        for name, value in metadata.items()
    }


def _header_safe(value: str) -> bool:
    # A tab travels in a header as it is (and DeltaGlider reads dg-ref-key
    # raw): only other control characters and edge blanks are encoded.
    return value.isascii() and value.replace("\t", " ").isprintable() and value == value.strip()


def decode_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Metadata as text: RFC 2047 encoded values decoded. Stores apply this on HEAD."""
    decoded = {}
    for name, value in metadata.items():
        if value.startswith("=?") and value.endswith("?="):
            with contextlib.suppress(ValueError, LookupError, HeaderParseError):
                value = str(make_header(decode_header(value)))
        decoded[name] = value
    return decoded


@dataclass(frozen=True)
class ObjectInfo:
    """One object as a listing reports it (no user metadata)."""

    key: str
    size: int
    etag: str
    last_modified: datetime


@dataclass(frozen=True)
class ObjectHead:
    """One object as HEAD reports it.

    ``observed_at``: when the store answered, by its own clock (the
    ``Date`` of the response, the clock ``last_modified`` comes from);
    None if it did not say, or the head was not read from the store. An
    object can change again within its ``last_modified`` second and keep
    both its ETag and ``last_modified``: what a HEAD answered in that
    second may be stale without its version showing it
    (``dgfs.fs.dirindex.settled``)."""

    key: str
    size: int
    etag: str
    last_modified: datetime
    metadata: Mapping[str, str] = field(default_factory=dict)
    content_type: str = DEFAULT_CONTENT_TYPE
    observed_at: datetime | None = None


@dataclass(frozen=True)
class CopyRequest:
    """What a server-side copy changes: ``metadata`` replaced (None: the
    source's kept), and only while the source is ``version`` (its head as the
    caller read it, compared by ETag; None: whatever it is)."""

    metadata: Mapping[str, str] | None = None
    version: ObjectHead | None = None

    @property
    def if_match(self) -> str | None:
        """The ETag the source must still have (None: no condition)."""
        return self.version.etag if self.version is not None else None


@dataclass(frozen=True)
class NewObject:
    """What a write stores beside the body, and on what condition.

    ``metadata``: user metadata as in ``ObjectHead``. ``if_none_match``: the
    object is created only if the key does not exist yet
    (``PreconditionFailed`` otherwise).
    """

    metadata: Mapping[str, str]
    content_type: str = DEFAULT_CONTENT_TYPE
    if_none_match: bool = False


class Creation(TypedDict, total=False):
    """How ``upload`` and ``put_bytes`` create an object, beside its metadata
    (as ``NewObject``): its ``content_type`` (default
    ``application/octet-stream``), and with ``if_none_match`` only if the key
    does not exist yet (``PreconditionFailed`` otherwise)."""

    content_type: str
    if_none_match: bool


@dataclass(frozen=True)
class ListPage:
    """One page of ``ListObjectsV2``: objects, and common prefixes (with trailing '/')."""

    objects: list[ObjectInfo]
    prefixes: list[str]
    # When the store answered, by its own clock (its ``Date`` header); None
    # if it did not say. Tells whether a version's second is over
    # (``dgfs.fs.dirindex.settled``).
    observed_at: datetime | None = None


@dataclass(frozen=True)
class MultipartUpload:
    """An incomplete multipart upload (for gc)."""

    key: str
    upload_id: str
    initiated: datetime


class ObjectStore(abc.ABC):
    """Async access to one bucket."""

    bucket: str

    @property
    def endpoint(self) -> str | None:
        """The URL of the service this store talks to; None for one that has none
        (in memory). The mount shows it as ``user.dgfs.endpoint``."""
        return None

    @abc.abstractmethod
    def list_pages(self, prefix: str = "", delimiter: str | None = "/") -> AsyncIterator[ListPage]:
        """Yield listing pages under ``prefix`` (pagination handled here)."""

    async def list(self, prefix: str = "", delimiter: str | None = "/") -> ListPage:
        """The whole listing under ``prefix`` as one page."""
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        observed_at: datetime | None = None
        async for page in self.list_pages(prefix, delimiter):
            objects.extend(page.objects)
            prefixes.extend(page.prefixes)
            # The first dated page's: the earliest (any would do: it only
            # tells whether a version's second is over).
            observed_at = observed_at or page.observed_at
        return ListPage(objects, prefixes, observed_at)

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectHead:
        """Metadata of ``key``; ``NotFound`` if absent."""

    @abc.abstractmethod
    async def get_range(
        self, key: str, start: int, length: int, *, if_match: str | None = None
    ) -> bytes:
        """Up to ``length`` bytes of ``key`` from ``start`` (short at end of object);
        with ``if_match`` only of the object with that ETag (``PreconditionFailed``
        once another replaced it)."""

    @abc.abstractmethod
    async def download(self, key: str, dest: Path) -> ObjectHead:
        """Stream ``key`` into the file ``dest`` (created/truncated); returns its head."""

    async def upload(
        self, key: str, src: Path, metadata: Mapping[str, str], **new: Unpack[Creation]
    ) -> str:
        """Upload the file ``src`` (multipart when large) as ``new`` says
        (``Creation``); returns the new ETag. A failed multipart upload is
        aborted, never left behind."""
        return await self.write(key, src, NewObject(metadata, **new))

    async def put_bytes(
        self, key: str, body: bytes, metadata: Mapping[str, str], **new: Unpack[Creation]
    ) -> str:
        """Store a small body as ``new`` says (``Creation``); returns the new ETag."""
        return await self.write(key, body, NewObject(metadata, **new))

    @abc.abstractmethod
    async def write(self, key: str, body: bytes | Path, new: NewObject) -> str:
        """Store ``body`` (bytes, or the file at that path) under ``key`` as
        ``new`` says; returns the new ETag. ``upload`` and ``put_bytes`` come
        here: implementations write this one method."""

    async def copy(
        self,
        src_key: str,
        dst_key: str,
        metadata: Mapping[str, str] | None = None,
        *,
        version: ObjectHead | None = None,
    ) -> str:
        """Server-side copy; ``metadata`` given means replace it, else keep it.

        ``version``: the source's head as the caller read it; the copy is
        made only while the source is still that version (its ETag;
        ``PreconditionFailed`` otherwise), so metadata read from one version
        never lands on another."""
        return await self.copy_object(src_key, dst_key, CopyRequest(metadata, version))

    @abc.abstractmethod
    async def copy_object(self, src_key: str, dst_key: str, request: CopyRequest) -> str:
        """Copy ``src_key`` to ``dst_key`` in the store as ``request`` says;
        returns the new ETag. ``copy`` comes here: implementations write
        this one method."""

    @abc.abstractmethod
    async def delete(self, key: str, *, version: ObjectHead | None = None) -> None:
        """Delete ``key``; deleting a missing key is not an error.

        ``version``: delete only while ``key`` is still that version (its
        ETag; ``PreconditionFailed`` otherwise): another writer's newer
        object under the key is never deleted in its place."""

    @abc.abstractmethod
    async def delete_many(
        self, keys: builtins.list[str], *, etags: Mapping[str, str] | None = None
    ) -> builtins.list[str]:
        """Delete several keys (implementations batch them); missing ones are fine.

        ``etags`` (key -> ETag): such a key is deleted only while it still
        has that ETag. Those another writer changed meanwhile are kept and
        returned, not raised: what a rename or removal read is gone, what
        came after it stays."""

    @abc.abstractmethod
    async def list_multipart_uploads(self, prefix: str = "") -> builtins.list[MultipartUpload]:
        """Incomplete multipart uploads under ``prefix``."""

    @abc.abstractmethod
    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        """Abort one incomplete multipart upload."""

    async def probe_if_none_match(self) -> bool:
        """Whether the store refuses a second ``If-None-Match: *`` create.

        Uses a scratch key under ``.deltaglider/tmp/`` and removes it.
        """
        import uuid

        from dgfs.errors import PreconditionFailed

        key = f".deltaglider/tmp/probe-{uuid.uuid4().hex}"
        try:
            await self.put_bytes(key, b"1", {}, if_none_match=True)
        except PreconditionFailed:
            # The key is new, so the PUT that exists is our own: an attempt
            # landed, its answer was lost, and the retry was refused.
            await self.delete(key)
            return True
        try:
            await self.put_bytes(key, b"2", {}, if_none_match=True)
        except PreconditionFailed:
            return True
        finally:
            await self.delete(key)
        return False

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources (thread pools, connections)."""


async def head_many(
    store: ObjectStore,
    keys: Iterable[str],
    *,
    concurrency: int | None = None,
    on_head: Callable[[str, ObjectHead | None], None] | None = None,
    on_error: Callable[[str, DgfsError], None] | None = None,
) -> dict[str, ObjectHead]:
    """HEAD ``keys`` concurrently (at most ``concurrency`` at once; None: all).

    Returns the heads of the keys that exist; a ``NotFound`` is skipped.
    ``on_head(key, head or None)`` is called as each HEAD succeeds or finds
    nothing. A failed HEAD goes to ``on_error(key, exc)`` when given;
    otherwise, once the others finish, the first failure is raised as
    itself, not as an exception group, so callers can tell a transient
    store error from a real one.
    """
    heads: dict[str, ObjectHead] = {}
    errors: list[DgfsError] = []
    limiter = trio.CapacityLimiter(max(1, concurrency)) if concurrency is not None else None

    async def head(key: str) -> None:
        try:
            if limiter is None:
                found: ObjectHead | None = await store.head(key)
            else:
                async with limiter:
                    found = await store.head(key)
        except NotFound:
            found = None
        except DgfsError as exc:
            if on_error is None:
                errors.append(exc)
            else:
                on_error(key, exc)
            return
        if found is not None:
            heads[key] = found
        if on_head is not None:
            on_head(key, found)

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(head, key)
    if errors:
        raise errors[0]
    return heads
