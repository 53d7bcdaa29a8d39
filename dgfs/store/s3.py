"""``S3Store``: the ObjectStore on S3 (and S3-compatible stores), via boto3.

The only module that imports boto3/botocore. One client is created per
store and shared by worker threads; every blocking call runs in
``trio.to_thread.run_sync`` under the store's ``CapacityLimiter``.

What callers may rely on:

- Only ``dgfs.errors`` exceptions leave this module (``translate_error`` is
  the one place that maps botocore exceptions). Local file errors while
  reading an upload source or writing a download target stay ``OSError``.
- Throttling, 5xx and broken connections are retried here with backoff,
  on top of botocore's own retries, before ``TransientError`` is raised.
  An endpoint that refuses connections is not retried beyond botocore:
  it raises ``EndpointUnreachable`` quickly.
- ETags are returned without quotes; timestamps are timezone-aware UTC.
- A multipart upload that fails or is cancelled is aborted. One whose
  CompleteMultipartUpload did succeed although its answer was lost (the
  retry then hears NoSuchUpload) counts as done once the object's ETag
  proves it is this upload's.
- ``telemetry`` counts requests and retries (botocore's and ours), for
  ``dgfs status``, the log line at close and tests.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import closing
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bexc
import trio
from botocore.config import Config

from dgfs import __version__, environment
from dgfs.errors import (
    AccessDenied,
    ConfigError,
    DgfsError,
    EndpointUnreachable,
    NoSuchBucket,
    NotFound,
    PreconditionFailed,
    StoreError,
    TransientError,
    exception_leaves,
)
from dgfs.store.base import (
    DEFAULT_CONTENT_TYPE,
    MULTIPART_PART_SIZE,
    MULTIPART_THRESHOLD,
    ListPage,
    MultipartUpload,
    NewObject,
    ObjectHead,
    ObjectInfo,
    ObjectStore,
    decode_metadata,
    encode_metadata,
)
from dgfs.telemetry import Telemetry

log = logging.getLogger(__name__)

T = TypeVar("T")

# Downloads at least this large are fetched as parallel ranged GETs.
PARALLEL_DOWNLOAD_THRESHOLD = 32 * 1024 * 1024
DOWNLOAD_RANGE_SIZE = 8 * 1024 * 1024
# Parts (upload or download ranges) in flight at once for one object. A 2 GiB
# download from a local SeaweedFS took 5.2-5.8 s with 4, 4.4-4.8 s with 8 and
# 4.3-4.6 s with 10 (boto3's download_file: 4.1-8.2 s); uploads are bounded
# by PART_BUFFERS below whatever this is.
TRANSFER_CONCURRENCY = 8
# Part bodies held in memory at once by all uploads of one store together:
# several files uploading at once share them, so memory stays bounded.
PART_BUFFERS = 6
# CopyObject refuses sources above 5 GiB; those are copied part by part.
MAX_COPY_OBJECT_SIZE = 5 * 1024**3
COPY_PART_SIZE = 512 * 1024 * 1024
MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * 1024 * 1024
DELETE_BATCH = 1000
STREAM_CHUNK = 1024 * 1024
# Our retries after botocore's own; the delays are scaled by a random jitter.
RETRY_DELAYS: tuple[float, ...] = (0.5, 2.0, 5.0)
# Seconds a request may wait for the connection and then for each read from
# it. The read timeout is also how long a stalled endpoint holds a request
# before it is retried (mount option s3_timeout).
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0

_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
_ACCESS_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
}
_PRECONDITION_CODES = {"PreconditionFailed", "412"}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_CONNECT_ERRORS = (
    bexc.EndpointConnectionError,
    bexc.ConnectTimeoutError,
    bexc.ProxyConnectionError,
    bexc.SSLError,
)
_NETWORK_ERRORS = (
    bexc.ReadTimeoutError,
    bexc.ConnectionClosedError,
    bexc.ResponseStreamingError,
    bexc.IncompleteReadError,
    bexc.HTTPClientError,
    bexc.ConnectionError,
)
_CREDENTIAL_ERRORS = (
    bexc.NoCredentialsError,
    bexc.PartialCredentialsError,
    bexc.CredentialRetrievalError,
)


def make_client(
    endpoint_url: str | None,
    region: str | None,
    profile: str | None,
    max_pool: int,
    read_timeout: float = READ_TIMEOUT,
) -> Any:
    """One boto3 S3 client, safe to share between threads.

    Credentials come from AWS's own chain (environment, ``profile`` or the
    default profile, instance role) and are resolved lazily, on the first
    request. Checksums are sent and validated only when an operation
    requires them: several S3-compatible stores reject boto3's default
    CRC headers. A custom ``endpoint_url`` gets path-style addressing.
    ``read_timeout`` bounds each wait for data from the endpoint (and the
    connect timeout, which is at most ``CONNECT_TIMEOUT``).
    """
    session = boto3.session.Session(profile_name=profile)
    config = Config(
        region_name=region,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max_pool,
        retries={"mode": "standard", "total_max_attempts": 3},
        connect_timeout=min(CONNECT_TIMEOUT, read_timeout),
        read_timeout=read_timeout,
        tcp_keepalive=True,
        user_agent_extra=f"dgfs/{__version__}",
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    try:
        return session.client("s3", endpoint_url=endpoint_url, config=config)
    except ValueError as exc:  # botocore: "Invalid endpoint: ..."
        raise ConfigError(
            f"bad endpoint URL {endpoint_url!r}: expected http(s)://HOST[:PORT] ({exc})"
        ) from None


def credential_source(profile: str | None) -> str | None:
    """Which provider in AWS's chain supplies the credentials, by botocore's
    name for it (``env``, ``shared-credentials-file``, ``iam-role``,
    ``assume-role``...), or None when none does. The credentials themselves
    never leave this function. ``ConfigError`` for a profile that does not exist.
    """
    try:
        credentials = boto3.session.Session(profile_name=profile).get_credentials()
    except bexc.BotoCoreError as exc:  # ProfileNotFound, a broken config file...
        raise ConfigError(f"cannot read the AWS configuration: {exc}") from None
    return None if credentials is None else str(credentials.method)


def ca_bundle() -> str | None:
    """The CA certificates boto3 verifies TLS endpoints with (``AWS_CA_BUNDLE``, else
    botocore's default: certifi's bundle when installed)."""
    from botocore.httpsession import get_cert_path

    return environment.ca_bundle() or get_cert_path(True)


def translate_error(
    exc: BaseException,
    *,
    bucket: str,
    key: str | None,
    endpoint: str,
    operation: str,
) -> DgfsError:
    """The dgfs error for a botocore exception (the only such mapping).

    ``key`` None means a bucket-level request, where a bare 404 means the
    bucket is missing. ``TransientError`` results (other than
    ``EndpointUnreachable``) are the ones worth retrying.
    """
    where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message") or ""
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        detail = f"{code}: {message}" if message else code
        if code == "NoSuchBucket" or (key is None and status == 404):
            return NoSuchBucket(f"bucket {bucket!r} does not exist at {endpoint}")
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(f"{where} not found")
        if code in _ACCESS_CODES or status == 403:
            return AccessDenied(
                f"access denied to {where} at {endpoint} ({detail}); "
                "check the AWS credentials (environment, profile or instance role)"
            )
        if code in _PRECONDITION_CODES or status == 412:
            return PreconditionFailed(f"{operation} {where}: precondition failed ({detail})")
        if code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return TransientError(f"{operation} {where} failed: {detail} (HTTP {status})")
        return StoreError(f"{operation} {where} failed: {detail} (HTTP {status})")
    if isinstance(exc, _CONNECT_ERRORS):
        return EndpointUnreachable(f"cannot reach S3 endpoint {endpoint}: {exc}")
    if isinstance(exc, _NETWORK_ERRORS):
        return TransientError(f"{operation} {where} failed: {exc}")
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return AccessDenied(
            f"no usable AWS credentials for {endpoint} ({exc}); set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, choose a profile, or run with an instance role"
        )
    return StoreError(f"{operation} {where} failed: {exc}")


class _CutHeadFilter(logging.Filter):
    """urllib3's "Failed to parse headers" warning (with a traceback) at DEBUG:
    ``_refuse_cut_head`` turns such an answer into a retried request, which
    logs its own one-line warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to parse headers"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("urllib3.connection").addFilter(_CutHeadFilter())


def _refuse_cut_head(response: Any = None, endpoint: Any = None, **_: Any) -> None:
    """botocore hook, run on every answer: refuse one whose header block was cut off.

    http.client takes whatever header lines arrived before the connection
    closed, and urllib3 only logs the damage, so a cut answer would parse
    as a success without its ETag, metadata or length (a HEAD with no
    ``dg-file-sha256``, a GET with an empty body). Every S3 answer frames
    its body (Content-Length or chunked; 204 has none), so one that does not, or whose
    headers did not parse, is a broken connection: ``ConnectionClosedError``,
    which ``_call`` retries.
    """
    if response is None:
        return
    http_response = response[0]
    original = getattr(getattr(http_response, "raw", None), "_original_response", None)
    defects = getattr(getattr(original, "msg", None), "defects", None)
    headers = getattr(http_response, "headers", {})
    status = getattr(http_response, "status_code", 0)
    bodiless = status in (204, 304) or 100 <= status < 200
    framed = bodiless or "content-length" in headers or "transfer-encoding" in headers
    if defects or not framed:
        raw = getattr(http_response, "raw", None)
        if raw is not None:
            raw.close()  # the connection is broken: it must not go back to the pool
        url = getattr(endpoint, "host", None) or "the S3 endpoint"
        raise bexc.ConnectionClosedError(endpoint_url=url)


def _retryable(err: DgfsError) -> bool:
    return isinstance(err, TransientError) and not isinstance(err, EndpointUnreachable)


def _etag(raw: str) -> str:
    return raw.strip('"')


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _head_from_response(key: str, response: Mapping[str, Any], size: int) -> ObjectHead:
    return ObjectHead(
        key=key,
        size=size,
        etag=_etag(response["ETag"]),
        last_modified=_utc(response["LastModified"]),
        metadata=decode_metadata(response.get("Metadata") or {}),
        content_type=response.get("ContentType") or DEFAULT_CONTENT_TYPE,
    )


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
        events = self._client.meta.events
        events.register("before-call.s3", lambda **_: self.telemetry.s3_api_call())
        events.register("before-send.s3", lambda **_: self.telemetry.s3_http_request())
        events.register("needs-retry.s3", _refuse_cut_head)
        self._endpoint: str = self._client.meta.endpoint_url
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self.multipart_threshold = MULTIPART_THRESHOLD
        self.part_size = MULTIPART_PART_SIZE
        self.download_threshold = PARALLEL_DOWNLOAD_THRESHOLD
        self.download_range_size = DOWNLOAD_RANGE_SIZE
        self.copy_threshold = MAX_COPY_OBJECT_SIZE
        self.copy_part_size = COPY_PART_SIZE
        self.transfer_concurrency = min(TRANSFER_CONCURRENCY, max_concurrency)
        self._part_buffers = trio.CapacityLimiter(PART_BUFFERS)
        self.page_size = 1000
        self.retry_delays = RETRY_DELAYS

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, endpoint_url={self.endpoint!r})"

    # --- the one way to call S3 --------------------------------------------

    async def _call(self, operation: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread, translating and retrying errors."""
        attempts = len(self.retry_delays) + 1
        for attempt in range(attempts):
            self.telemetry.s3_request(operation)
            try:
                return await trio.to_thread.run_sync(fn, limiter=self._limiter)
            except (bexc.BotoCoreError, bexc.ClientError) as exc:
                err = translate_error(
                    exc, bucket=self.bucket, key=key, endpoint=self.endpoint, operation=operation
                )
                retry = _retryable(err) and attempt < attempts - 1
                self.telemetry.s3_error(operation, type(err).__name__, retried=retry)
                if not retry:
                    raise err from exc
            delay = self.retry_delays[attempt] * random.uniform(0.5, 1.5)
            log.warning(
                "%s; retry %d/%d in %.1fs",
                err,
                attempt + 1,
                attempts - 1,
                delay,
            )
            await trio.sleep(delay)
        raise AssertionError("unreachable")

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
                    etag=_etag(item.get("ETag", "")),
                    last_modified=_utc(item["LastModified"]),
                )
                for item in response.get("Contents", [])
            ]
            prefixes = [item["Prefix"] for item in response.get("CommonPrefixes", [])]
            yield ListPage(objects, prefixes)
            token = response.get("NextContinuationToken")
            if not response.get("IsTruncated") or not token:
                return
            params["ContinuationToken"] = token

    async def head(self, key: str) -> ObjectHead:
        """HEAD ``key``; metadata keys lower-case as S3 returns them."""
        response = await self._call(
            "HeadObject", key, partial(self._client.head_object, Bucket=self.bucket, Key=key)
        )
        return _head_from_response(key, response, response["ContentLength"])

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``start``; ``b""`` at or past the end."""
        if length <= 0:
            return b""

        def fetch() -> bytes:
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}"
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
                written = _copy_stream(body, out, wanted)
                if wanted < size:
                    out.truncate(size)
            return _head_from_response(key, response, size), written

        head, written = await self._call("GetObject", key, fetch_first)
        if written < head.size:
            ranges = [
                (offset, min(offset + self.download_range_size, head.size) - 1)
                for offset in range(written, head.size, self.download_range_size)
            ]
            jobs = [
                partial(self._download_range, key, dest, first, last, head.etag)
                for first, last in ranges
            ]
            try:
                await self._run_bounded(jobs)
            except PreconditionFailed as exc:
                raise TransientError(f"s3://{self.bucket}/{key} changed during download") from exc
        return head

    async def _download_range(self, key: str, dest: Path, first: int, last: int, etag: str) -> None:
        def fetch() -> None:
            response = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={first}-{last}", IfMatch=f'"{etag}"'
            )
            with closing(response["Body"]) as body, open(dest, "r+b") as out:
                out.seek(first)
                if _copy_stream(body, out, last - first + 1) != last - first + 1:
                    raise bexc.IncompleteReadError(
                        actual_bytes=out.tell() - first, expected_bytes=last - first + 1
                    )

        await self._call("GetObject", key, fetch)

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
            return _etag((await self._call("PutObject", key, put_object))["ETag"])
        src = body
        size = (await trio.Path(src).stat()).st_size
        if size >= self.multipart_threshold:
            return await self._upload_multipart(key, src, size, params)

        def put() -> dict[str, Any]:
            with open(src, "rb") as stream:
                return self._client.put_object(Body=stream, **params)

        return _etag((await self._call("PutObject", key, put))["ETag"])

    async def _upload_multipart(
        self, key: str, src: Path, size: int, params: dict[str, Any]
    ) -> str:
        part_size = max(self.part_size, math.ceil(size / MAX_PARTS))
        offsets = range(0, size, part_size)
        if_none_match = params.pop("IfNoneMatch", None)
        created = await self._call(
            "CreateMultipartUpload", key, partial(self._client.create_multipart_upload, **params)
        )
        upload_id: str = created["UploadId"]
        etags: dict[int, str] = {}

        async def send_part(number: int, offset: int) -> None:
            length = min(part_size, size - offset)

            def send() -> str:
                with open(src, "rb") as source:
                    source.seek(offset)
                    body = source.read(length)
                if len(body) != length:
                    raise OSError(f"{src} shrank while being uploaded")
                response = self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
                return _etag(response["ETag"])

            async with self._part_buffers:
                etags[number] = await self._call("UploadPart", key, send)

        try:
            await self._run_bounded(
                [partial(send_part, number, offset) for number, offset in enumerate(offsets, 1)]
            )
            complete: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": key,
                "UploadId": upload_id,
                "MultipartUpload": {
                    "Parts": [{"PartNumber": n, "ETag": f'"{etags[n]}"'} for n in sorted(etags)]
                },
            }
            if if_none_match:
                complete["IfNoneMatch"] = if_none_match
            return await self._complete(key, complete, [etags[n] for n in sorted(etags)])
        except BaseException:
            await self._abort_quietly(key, upload_id)
            raise

    async def _complete(self, key: str, complete: dict[str, Any], part_etags: list[str]) -> str:
        """CompleteMultipartUpload; returns the object's ETag.

        When an attempt completes the upload but its answer is lost, the
        retry hears NoSuchUpload: the upload is ours if the object now
        carries the ETag its parts give. (A PreconditionFailed stays one:
        the same bytes may have been stored by another writer first.)
        """
        try:
            response = await self._call(
                "CompleteMultipartUpload",
                key,
                partial(self._client.complete_multipart_upload, **complete),
            )
        except NotFound:
            expected = multipart_etag(part_etags)
            try:
                current = (await self.head(key)).etag if expected else None
            except NotFound:
                current = None
            if current is None or current != expected:
                raise
            log.info(
                "multipart upload of s3://%s/%s completed; its answer was lost", self.bucket, key
            )
            return current
        return _etag(response["ETag"])

    async def _abort_quietly(self, key: str, upload_id: str) -> None:
        """Abort after a failure, even when cancelled; never raises."""
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            try:
                await self.abort_multipart_upload(key, upload_id)
            except DgfsError as exc:
                log.warning(
                    "could not abort multipart upload %s of s3://%s/%s: %s",
                    upload_id,
                    self.bucket,
                    key,
                    exc,
                )

    async def _run_bounded(self, jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
        """Await ``jobs``, ``transfer_concurrency`` at a time.

        The first failure cancels the rest and is raised as itself (not as an
        exception group), so callers see plain ``dgfs.errors``.
        """
        pending = iter(jobs)

        async def worker() -> None:
            for job in pending:
                await job()

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.transfer_concurrency, len(jobs))):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            failures = exception_leaves(group)
            errors = [exc for exc in failures if not isinstance(exc, trio.Cancelled)]
            if not errors:
                raise  # only cancellation: trio's cancel scopes handle the group
            for other in errors[1:]:
                log.debug("further transfer failure: %r", other)
            raise errors[0] from None

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

    async def copy(
        self,
        src_key: str,
        dst_key: str,
        metadata: Mapping[str, str] | None = None,
        *,
        if_match: str | None = None,
    ) -> str:
        """Server-side copy; returns the new ETag.

        ``metadata`` given replaces the user metadata (content type kept),
        else it is copied. Sources above ``copy_threshold`` (5 GiB, the
        CopyObject limit) are copied with UploadPartCopy.
        """
        source = await self.head(src_key)
        if if_match is not None and source.etag != if_match:
            raise PreconditionFailed(
                f"CopyObject s3://{self.bucket}/{src_key}: precondition failed"
            )
        new_metadata = encode_metadata(source.metadata if metadata is None else metadata)
        if source.size > self.copy_threshold:
            return await self._copy_multipart(source, dst_key, new_metadata)
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
        return _etag(response["CopyObjectResult"]["ETag"])

    async def _copy_multipart(
        self, source: ObjectHead, dst_key: str, metadata: dict[str, str]
    ) -> str:
        part_size = max(self.copy_part_size, math.ceil(source.size / MAX_PARTS))
        created = await self._call(
            "CreateMultipartUpload",
            dst_key,
            partial(
                self._client.create_multipart_upload,
                Bucket=self.bucket,
                Key=dst_key,
                Metadata=metadata,
                ContentType=source.content_type,
            ),
        )
        upload_id: str = created["UploadId"]
        etags: dict[int, str] = {}

        async def copy_part(number: int, offset: int) -> None:
            last = min(offset + part_size, source.size) - 1
            response = await self._call(
                "UploadPartCopy",
                dst_key,
                partial(
                    self._client.upload_part_copy,
                    Bucket=self.bucket,
                    Key=dst_key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": source.key},
                    CopySourceRange=f"bytes={offset}-{last}",
                    CopySourceIfMatch=f'"{source.etag}"',
                ),
            )
            etags[number] = _etag(response["CopyPartResult"]["ETag"])

        try:
            offsets = range(0, source.size, part_size)
            await self._run_bounded(
                [partial(copy_part, number, offset) for number, offset in enumerate(offsets, 1)]
            )
            parts = [{"PartNumber": n, "ETag": f'"{etags[n]}"'} for n in sorted(etags)]
            complete = {
                "Bucket": self.bucket,
                "Key": dst_key,
                "UploadId": upload_id,
                "MultipartUpload": {"Parts": parts},
            }
            return await self._complete(dst_key, complete, [etags[n] for n in sorted(etags)])
        except BaseException:
            await self._abort_quietly(dst_key, upload_id)
            raise

    # --- deleting and housekeeping -------------------------------------------

    async def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""
        try:
            delete_object = partial(self._client.delete_object, Bucket=self.bucket, Key=key)
            await self._call("DeleteObject", key, delete_object)
        except NoSuchBucket:
            raise
        except NotFound:
            pass

    async def delete_many(self, keys: list[str]) -> None:
        """Delete ``keys`` with DeleteObjects, 1000 per request.

        Missing keys are fine; keys S3 refuses to delete raise one
        ``StoreError`` naming them, after every batch has been tried.
        """
        failures: list[str] = []
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            request = {"Objects": [{"Key": key} for key in batch], "Quiet": True}
            response = await self._call(
                "DeleteObjects",
                batch[0],
                partial(self._client.delete_objects, Bucket=self.bucket, Delete=request),
            )
            for error in response.get("Errors", []):
                if error.get("Code") == "NoSuchKey":
                    continue
                failures.append(f"{error.get('Key')} ({error.get('Code')}: {error.get('Message')})")
        if failures:
            shown = ", ".join(failures[:5])
            more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
            raise StoreError(f"could not delete from s3://{self.bucket}: {shown}{more}")

    async def list_multipart_uploads(self, prefix: str = "") -> list[MultipartUpload]:
        """Every incomplete multipart upload under ``prefix``."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        uploads: list[MultipartUpload] = []
        while True:
            list_uploads = partial(self._client.list_multipart_uploads, **params)
            response = await self._call("ListMultipartUploads", prefix, list_uploads)
            uploads.extend(
                MultipartUpload(
                    key=item["Key"], upload_id=item["UploadId"], initiated=_utc(item["Initiated"])
                )
                for item in response.get("Uploads", [])
            )
            if not response.get("IsTruncated"):
                return uploads
            params["KeyMarker"] = response["NextKeyMarker"]
            params["UploadIdMarker"] = response["NextUploadIdMarker"]

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        """Abort one upload; an upload that is already gone is fine."""
        try:
            await self._call(
                "AbortMultipartUpload",
                key,
                partial(
                    self._client.abort_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                ),
            )
        except NoSuchBucket:
            raise
        except NotFound:
            pass

    async def aclose(self) -> None:
        """Close the client's connection pool."""
        await trio.to_thread.run_sync(self._client.close, limiter=self._limiter)


def multipart_etag(part_etags: Sequence[str]) -> str | None:
    """The ETag S3 gives an object completed from parts with these (MD5) ETags:
    the MD5 of their digests, ``-`` and the part count. None if a part's
    ETag is not an MD5 (some encryption modes)."""
    try:
        digests = [bytes.fromhex(etag) for etag in part_etags]
    except ValueError:
        return None
    if not digests or any(len(digest) != 16 for digest in digests):
        return None
    combined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{combined}-{len(digests)}"


def _copy_stream(body: Any, out: Any, limit: int) -> int:
    """Copy up to ``limit`` bytes from ``body`` to ``out`` in chunks; returns the count."""
    written = 0
    while written < limit:
        chunk = body.read(min(STREAM_CHUNK, limit - written))
        if not chunk:
            break
        out.write(chunk)
        written += len(chunk)
    return written
