"""``S3Store``: the ObjectStore on S3 (and S3-compatible stores), via boto3.

One client is created per store (``client.make_client``) and shared by
worker threads; every blocking call runs in ``trio.to_thread.run_sync``
under the store's ``CapacityLimiter``, through ``_call`` (``calls``).

What callers may rely on:

- Only ``dgfs.errors`` exceptions leave the store (``calls.translate_error``
  is the one place that maps botocore exceptions). Local file errors while
  reading an upload source or writing a download target stay ``OSError``.
- Throttling, 5xx and broken connections are retried with backoff, on top
  of botocore's own retries, before ``TransientError`` is raised. An
  endpoint that refuses connections is not retried beyond botocore: it
  raises ``EndpointUnreachable`` quickly.
- ETags are returned without quotes; timestamps are timezone-aware UTC.
- Multipart uploads and copies are aborted when they fail (``transfers``).
- ``telemetry`` counts requests and retries (botocore's and ours), for
  ``dgfs status``, the log line at close and tests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import botocore.exceptions as bexc
import trio

from dgfs.errors import (
    ConfigError,
    NoSuchBucket,
    NotFound,
    PreconditionFailed,
    StoreError,
    TransientError,
)
from dgfs.store.base import (
    MULTIPART_PART_SIZE,
    MULTIPART_THRESHOLD,
    CopyRequest,
    ListPage,
    MultipartUpload,
    NewObject,
    ObjectHead,
    ObjectInfo,
    ObjectStore,
    encode_metadata,
)
from dgfs.store.s3 import transfers
from dgfs.store.s3.calls import RETRY_DELAYS, call_retrying
from dgfs.store.s3.client import (
    READ_TIMEOUT,
    etag,
    head_from_response,
    instrument,
    make_client,
    response_date,
    utc,
)
from dgfs.telemetry import Telemetry

log = logging.getLogger(__name__)

#: Per-object DeleteObjects errors that refuse the ETag condition itself (a
#: plain delete may follow); any other (InternalError, SlowDown) is a failure.
_REFUSALS = frozenset({"NotImplemented", "InvalidArgument", "InvalidRequest", "AccessDenied"})

T = TypeVar("T")

DELETE_BATCH = 1000


class S3Store(ObjectStore):
    """An ObjectStore on one S3 bucket.

    ``max_concurrency`` bounds the worker threads (and so the requests in
    flight) of this store. The transfer tuning attributes
    (``multipart_threshold``, ``part_size``, ``download_threshold``,
    ``download_range_size``, ``copy_threshold``, ``copy_part_size``,
    ``transfer_concurrency``, ``page_size``, ``retry_delays``) start from
    the module constants and may be changed per instance (tests make them
    small). ``read_timeout``: see ``make_client``.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        max_concurrency: int = 16,
        telemetry: Telemetry | None = None,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.bucket = bucket
        self.telemetry = telemetry or Telemetry()
        try:
            self._client = make_client(
                endpoint_url, region, profile, max_concurrency + 4, read_timeout
            )
        except bexc.BotoCoreError as exc:  # e.g. ProfileNotFound
            raise ConfigError(f"cannot configure the S3 client: {exc}") from exc
        instrument(self._client, self.telemetry)
        self._endpoint: str = self._client.meta.endpoint_url
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self._requests = transfers.Requests(self._client, bucket, self._call)
        self.multipart_threshold = MULTIPART_THRESHOLD
        self.part_size = MULTIPART_PART_SIZE
        self.download_threshold = transfers.PARALLEL_DOWNLOAD_THRESHOLD
        self.download_range_size = transfers.DOWNLOAD_RANGE_SIZE
        self.copy_threshold = transfers.MAX_COPY_OBJECT_SIZE
        self.copy_part_size = transfers.COPY_PART_SIZE
        self.transfer_concurrency = min(transfers.TRANSFER_CONCURRENCY, max_concurrency)
        self._part_buffers = trio.CapacityLimiter(transfers.PART_BUFFERS)
        self.page_size = 1000
        # False once the store refused a conditional DeleteObject (see ``delete``).
        self.conditional_delete = True
        self.retry_delays = RETRY_DELAYS

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, endpoint_url={self.endpoint!r})"

    # --- the one way to call S3 --------------------------------------------

    async def _call(self, operation: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread, translating and retrying errors."""
        return await call_retrying(
            operation,
            key,
            fn,
            bucket=self.bucket,
            endpoint=self.endpoint,
            limiter=self._limiter,
            telemetry=self.telemetry,
            retry_delays=self.retry_delays,
        )

    async def check_bucket(self) -> None:
        """Check that the bucket exists and the credentials may use it.

        Raises ``NoSuchBucket``, ``AccessDenied`` or ``EndpointUnreachable``
        with a one-line message fit for the user.
        """
        await self._call("HeadBucket", None, partial(self._client.head_bucket, Bucket=self.bucket))

    # --- reading -------------------------------------------------------------

    async def list_pages(
        self, prefix: str = "", delimiter: str | None = "/"
    ) -> AsyncIterator[ListPage]:
        """Yield ``ListObjectsV2`` pages (at least one, possibly empty), in key order."""
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": prefix,
            "MaxKeys": self.page_size,
        }
        if delimiter:
            params["Delimiter"] = delimiter
        while True:
            response = await self._call(
                "ListObjectsV2", prefix, partial(self._client.list_objects_v2, **params)
            )
            objects = [
                ObjectInfo(
                    key=item["Key"],
                    size=item["Size"],
                    etag=etag(item.get("ETag", "")),
                    last_modified=utc(item["LastModified"]),
                )
                for item in response.get("Contents", [])
            ]
            prefixes = [item["Prefix"] for item in response.get("CommonPrefixes", [])]
            yield ListPage(objects, prefixes, response_date(response))
            token = response.get("NextContinuationToken")
            if not response.get("IsTruncated") or not token:
                return
            params["ContinuationToken"] = token

    async def head(self, key: str) -> ObjectHead:
        """HEAD ``key``; metadata keys lower-case as S3 returns them."""
        response = await self._call(
            "HeadObject", key, partial(self._client.head_object, Bucket=self.bucket, Key=key)
        )
        return head_from_response(key, response, response["ContentLength"])

    async def get_range(
        self, key: str, start: int, length: int, *, if_match: str | None = None
    ) -> bytes:
        """Up to ``length`` bytes from ``start``; ``b""`` at or past the end
        (``if_match``: see ``ObjectStore.get_range``)."""
        if length <= 0:
            return b""
        condition = {"IfMatch": f'"{if_match}"'} if if_match is not None else {}

        def fetch() -> bytes:
            try:
                response = self._client.get_object(
                    Bucket=self.bucket,
                    Key=key,
                    Range=f"bytes={start}-{start + length - 1}",
                    **condition,
                )
            except bexc.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""
                raise
            # closing(), not the body's own `with`: that yields the raw urllib3
            # stream, whose broken-connection errors escape botocore's
            # exceptions (and our retries) and whose length nobody checks.
            with closing(response["Body"]) as body:
                return bytes(body.read())

        return await self._call("GetObject", key, fetch)

    async def download(self, key: str, dest: Path) -> ObjectHead:
        """Stream ``key`` into ``dest`` (created or truncated) in chunks.

        Objects of at least ``download_threshold`` bytes are fetched as
        parallel ranged GETs pinned to the first response's ETag; if the
        object changes meanwhile, ``TransientError`` is raised. Returns the
        head from the GET response.
        """

        def fetch_first() -> tuple[ObjectHead, int]:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            size = response["ContentLength"]
            # Small objects: the whole body; large ones: only the first range
            # from this stream (the rest comes in parallel below).
            wanted = size if size < self.download_threshold else self.download_range_size
            with closing(response["Body"]) as body, open(dest, "wb") as out:
                written = transfers.copy_stream(body, out, wanted)
                if wanted < size:
                    out.truncate(size)
            return head_from_response(key, response, size), written

        head, written = await self._call("GetObject", key, fetch_first)
        if written < head.size:
            ranges = [
                (offset, min(offset + self.download_range_size, head.size) - 1)
                for offset in range(written, head.size, self.download_range_size)
            ]
            try:
                await transfers.download_ranges(
                    self._requests, key, dest, ranges, head.etag, self.transfer_concurrency
                )
            except PreconditionFailed as exc:
                raise TransientError(f"s3://{self.bucket}/{key} changed during download") from exc
        return head

    # --- writing -------------------------------------------------------------

    async def write(self, key: str, body: bytes | Path, new: NewObject) -> str:
        """One PUT for bytes and for files below ``multipart_threshold``, else multipart.

        A file is streamed (single PUT) or read part by part at its offset;
        all uploads of the store together hold at most ``PART_BUFFERS`` parts
        in memory. With ``if_none_match`` the PUT (``If-None-Match: *``), or
        the CompleteMultipartUpload, is conditional; losing raises
        ``PreconditionFailed`` (and the parts are aborted).
        """
        params = self._put_params(key, new)
        if isinstance(body, bytes):
            put_object = partial(self._client.put_object, Body=body, **params)
            return etag((await self._call("PutObject", key, put_object))["ETag"])
        src = body
        size = (await trio.Path(src).stat()).st_size
        if size >= self.multipart_threshold:
            return await transfers.upload_multipart(
                self._requests,
                key,
                src,
                size,
                params,
                part_size=self.part_size,
                part_buffers=self._part_buffers,
                concurrency=self.transfer_concurrency,
            )

        def put() -> dict[str, Any]:
            with open(src, "rb") as stream:
                return self._client.put_object(Body=stream, **params)

        return etag((await self._call("PutObject", key, put))["ETag"])

    def _put_params(self, key: str, new: NewObject) -> dict[str, Any]:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Metadata": encode_metadata(new.metadata),
            "ContentType": new.content_type,
        }
        if new.if_none_match:
            params["IfNoneMatch"] = "*"
        return params

    async def copy_object(self, src_key: str, dst_key: str, request: CopyRequest) -> str:
        """Server-side copy; returns the new ETag.

        ``request.metadata`` given replaces the user metadata (content type
        kept), else it is copied. Sources above ``copy_threshold`` (5 GiB,
        the CopyObject limit) are copied with UploadPartCopy.
        """
        metadata, if_match = request.metadata, request.if_match
        # HEADed even when the caller read it: some stores ignore
        # CopySourceIfMatch (moto does), and this check still holds there.
        source = await self.head(src_key)
        if if_match is not None and source.etag != if_match:
            raise PreconditionFailed(
                f"CopyObject s3://{self.bucket}/{src_key}: precondition failed"
            )
        new_metadata = encode_metadata(source.metadata if metadata is None else metadata)
        if source.size > self.copy_threshold:
            return await transfers.copy_multipart(
                self._requests,
                source,
                dst_key,
                new_metadata,
                part_size=self.copy_part_size,
                concurrency=self.transfer_concurrency,
            )
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": dst_key,
            "CopySource": {"Bucket": self.bucket, "Key": src_key},
        }
        if if_match is not None:
            params["CopySourceIfMatch"] = f'"{if_match}"'
        if metadata is None:
            params["MetadataDirective"] = "COPY"
        else:
            params.update(
                MetadataDirective="REPLACE", Metadata=new_metadata, ContentType=source.content_type
            )
        copy_object = partial(self._client.copy_object, **params)
        response = await self._call("CopyObject", dst_key, copy_object)
        return etag(response["CopyObjectResult"]["ETag"])

    # --- deleting and housekeeping -------------------------------------------

    async def delete(self, key: str, *, version: ObjectHead | None = None) -> None:
        """Delete ``key``; a missing key is not an error. With ``version``,
        only while ``key`` has its ETag (``If-Match``, ``PreconditionFailed``
        otherwise: AWS S3 and Ceph document it, SeaweedFS and moto honour it;
        a store that ignores it deletes as without). A store that refuses
        the condition itself (an error, where the same delete without it
        then succeeds) is sent none again, and the log says so once."""
        await self._delete_one(key, version.etag if version is not None else None)

    async def _delete_one(self, key: str, etag: str | None) -> None:
        """``delete``, conditional on ``etag`` when given."""
        if etag is None or not self.conditional_delete:
            await self._delete(key)
            return
        try:
            await self._delete(key, IfMatch=f'"{etag}"')
        except PreconditionFailed:
            if await self._exists(key):
                raise  # another writer's version: it stays
        except TransientError:
            raise  # the store is failing: never delete without the condition
        except StoreError as refused:  # 501 NotImplemented, a 400 naming the header, no access
            # Fails too (and that error is raised) when the store is the
            # matter, not the condition: the bucket gone, no access at all.
            await self._delete(key)
            self._conditions_refused("DeleteObject with If-Match", refused)

    def _conditions_refused(self, request: str, refused: StoreError) -> None:
        """The store refused a conditional delete that succeeded without the
        condition: none is sent again, and the log says so once."""
        if self.conditional_delete:
            self.conditional_delete = False
            log.warning(
                "s3://%s refuses %s (%s); deleting without it: a rename or removal"
                " may then delete a version another mount stored meanwhile",
                self.bucket,
                request,
                refused,
            )

    async def _delete(self, key: str, **condition: str) -> None:
        try:
            delete_object = partial(
                self._client.delete_object, Bucket=self.bucket, Key=key, **condition
            )
            await self._call("DeleteObject", key, delete_object)
        except NoSuchBucket:
            raise
        except NotFound:
            pass

    async def delete_many(
        self, keys: list[str], *, etags: Mapping[str, str] | None = None
    ) -> list[str]:
        """Delete ``keys`` with DeleteObjects, 1000 per request.

        Missing keys are fine; keys S3 refuses to delete raise one
        ``StoreError`` naming them, after every batch has been tried.
        ``etags``: as ``ObjectStore.delete_many``, sent as each object's
        ``ETag`` (AWS S3, SeaweedFS and moto honour it; a store that refuses
        it gets plain deletes from then on, as ``delete``). A key XML 1.0
        cannot carry (an escape character: S3 answers MalformedXML for the
        whole request) is deleted on its own, its name in the URL.
        """
        failures: list[str] = []
        kept: list[str] = []
        for key in [key for key in keys if not _xml_can_carry(key)]:
            try:
                await self._delete_one(key, (etags or {}).get(key))
            except PreconditionFailed:
                kept.append(key)
            except TransientError:
                raise
            except StoreError as exc:
                failures.append(f"{key} ({exc})")
        keys = [key for key in keys if _xml_can_carry(key)]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            conditions = etags if etags and self.conditional_delete else {}
            try:
                errors = await self._delete_batch(batch, conditions)
            except (PreconditionFailed, TransientError):
                raise
            except StoreError as refused:  # the whole request, for its conditions?
                if not conditions:
                    raise
                errors = await self._delete_batch(batch, {})
                self._conditions_refused("DeleteObjects with ETags", refused)
            refusals = [
                e for e in errors if e.get("Key") in conditions and e.get("Code") in _REFUSALS
            ]
            if refusals:  # refused with their conditions: deleted without them, in one request
                errors = [e for e in errors if e not in refusals]
                errors += await self._delete_batch([e["Key"] for e in refusals], {})
                self._conditions_refused(
                    "DeleteObjects with ETags", StoreError(refusals[0].get("Code", ""))
                )
            for error in errors:
                code, key = error.get("Code", ""), error.get("Key", "")
                if code == "NoSuchKey":
                    continue
                if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    kept.append(key)
                else:
                    failures.append(f"{key} ({code}: {error.get('Message')})")
        if failures:
            shown = ", ".join(failures[:5])
            more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
            raise StoreError(f"could not delete from s3://{self.bucket}: {shown}{more}")
        return [key for key in kept if await self._exists(key)]

    async def _exists(self, key: str) -> bool:
        """Whether ``key`` is there: SeaweedFS answers a conditional delete of a
        missing key with PreconditionFailed, where S3 says NoSuchKey (gone:
        as any delete of a missing key, nothing was kept)."""
        try:
            await self.head(key)
        except NotFound:
            return False
        return True

    async def _delete_batch(
        self, batch: list[str], etags: Mapping[str, str]
    ) -> list[dict[str, str]]:
        """One DeleteObjects request; the per-object errors it answers."""
        objects = [
            {"Key": key, "ETag": f'"{etags[key]}"'} if key in etags else {"Key": key}
            for key in batch
        ]
        request = {"Objects": objects, "Quiet": True}
        response = await self._call(
            "DeleteObjects",
            batch[0],
            partial(self._client.delete_objects, Bucket=self.bucket, Delete=request),
        )
        return list(response.get("Errors", []))

    async def list_multipart_uploads(self, prefix: str = "") -> list[MultipartUpload]:
        """Every incomplete multipart upload under ``prefix``."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        uploads: list[MultipartUpload] = []
        while True:
            list_uploads = partial(self._client.list_multipart_uploads, **params)
            response = await self._call("ListMultipartUploads", prefix, list_uploads)
            uploads.extend(
                MultipartUpload(
                    key=item["Key"], upload_id=item["UploadId"], initiated=utc(item["Initiated"])
                )
                for item in response.get("Uploads", [])
            )
            if not response.get("IsTruncated"):
                return uploads
            params["KeyMarker"] = response["NextKeyMarker"]
            params["UploadIdMarker"] = response["NextUploadIdMarker"]

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        """Abort one upload; an upload that is already gone is fine."""
        await transfers.abort(self._requests, key, upload_id)

    async def aclose(self) -> None:
        """Close the client's connection pool."""
        await trio.to_thread.run_sync(self._client.close, limiter=self._limiter)


def _xml_can_carry(key: str) -> bool:
    """Whether XML 1.0 (a DeleteObjects body) can hold ``key``: no control
    character but tab and line breaks, no U+FFFE or U+FFFF."""
    return not any((ord(c) < 0x20 and c not in "\t\n\r") or c in "\ufffe\uffff" for c in key)
