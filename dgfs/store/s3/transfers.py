"""Large transfers of an ``S3Store``: multipart uploads and copies, parallel
ranged downloads, and the bounded concurrency they share.

What callers may rely on: a multipart upload or copy that fails or is
cancelled is aborted. One whose CompleteMultipartUpload did succeed
although its answer was lost (the retry then hears NoSuchUpload) counts as
done once the object's ETag proves it is this upload's.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import botocore.exceptions as bexc
import trio

from dgfs.errors import DgfsError, NoSuchBucket, NotFound, first_failure
from dgfs.store.base import ObjectHead
from dgfs.store.s3.calls import Call
from dgfs.store.s3.client import etag

log = logging.getLogger(__name__)

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
STREAM_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Requests:
    """What every request of one store needs: its client, its bucket, and
    its one way to call S3."""

    client: Any
    bucket: str
    call: Call


async def upload_multipart(
    requests: Requests,
    key: str,
    src: Path,
    size: int,
    params: dict[str, Any],
    *,
    part_size: int,
    part_buffers: trio.CapacityLimiter,
    concurrency: int,
) -> str:
    """Upload ``src`` (``size`` bytes) in parts of at least ``part_size``,
    ``concurrency`` at a time, each holding one of ``part_buffers`` while its
    body is in memory; ``params``: the PutObject parameters (an ``IfNoneMatch``
    among them goes to CompleteMultipartUpload). Returns the ETag."""
    client, bucket, call = requests.client, requests.bucket, requests.call
    if_none_match = params.pop("IfNoneMatch", None)

    async def send_part(upload_id: str, number: int, offset: int, length: int) -> str:
        def send() -> str:
            with open(src, "rb") as source:
                source.seek(offset)
                body = source.read(length)
            if len(body) != length:
                raise OSError(f"{src} shrank while being uploaded")
            response = client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
            return etag(response["ETag"])

        async with part_buffers:
            return await call("UploadPart", key, send)

    return await _in_parts(
        requests,
        key,
        params,
        size,
        send_part,
        part_size=part_size,
        concurrency=concurrency,
        complete_params={"IfNoneMatch": if_none_match} if if_none_match else {},
    )


async def copy_multipart(
    requests: Requests,
    source: ObjectHead,
    dst_key: str,
    metadata: dict[str, str],
    *,
    part_size: int,
    concurrency: int,
) -> str:
    """Copy ``source`` to ``dst_key`` with UploadPartCopy, each part pinned to
    the source's ETag; ``metadata`` already encoded. Returns the new ETag."""
    client, bucket, call = requests.client, requests.bucket, requests.call

    async def copy_part(upload_id: str, number: int, offset: int, length: int) -> str:
        response = await call(
            "UploadPartCopy",
            dst_key,
            partial(
                client.upload_part_copy,
                Bucket=bucket,
                Key=dst_key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": bucket, "Key": source.key},
                CopySourceRange=f"bytes={offset}-{offset + length - 1}",
                CopySourceIfMatch=f'"{source.etag}"',
            ),
        )
        return etag(response["CopyPartResult"]["ETag"])

    create = {
        "Bucket": bucket,
        "Key": dst_key,
        "Metadata": metadata,
        "ContentType": source.content_type,
    }
    return await _in_parts(
        requests,
        dst_key,
        create,
        source.size,
        copy_part,
        part_size=part_size,
        concurrency=concurrency,
    )


#: One part: (upload id, part number, offset, length) -> the part's ETag.
PartSender = Callable[[str, int, int, int], Awaitable[str]]


async def _in_parts(
    requests: Requests,
    key: str,
    create_params: dict[str, Any],
    size: int,
    send_part: PartSender,
    *,
    part_size: int,
    concurrency: int,
    complete_params: dict[str, Any] | None = None,
) -> str:
    """A multipart upload of ``size`` bytes to ``key``: created with
    ``create_params``, its parts (at least ``part_size``, at most MAX_PARTS of
    them) sent ``concurrency`` at a time, completed with ``complete_params``
    added, or aborted on any failure. Returns the object's ETag."""
    client, call = requests.client, requests.call
    part_size = max(part_size, math.ceil(size / MAX_PARTS))
    created = await call(
        "CreateMultipartUpload", key, partial(client.create_multipart_upload, **create_params)
    )
    upload_id: str = created["UploadId"]
    etags: dict[int, str] = {}

    async def one(number: int, offset: int) -> None:
        length = min(part_size, size - offset)
        etags[number] = await send_part(upload_id, number, offset, length)

    try:
        offsets = range(0, size, part_size)
        await run_bounded(
            [partial(one, number, offset) for number, offset in enumerate(offsets, 1)],
            concurrency,
        )
        parts = [{"PartNumber": n, "ETag": f'"{etags[n]}"'} for n in sorted(etags)]
        complete = {
            "Bucket": requests.bucket,
            "Key": key,
            "UploadId": upload_id,
            "MultipartUpload": {"Parts": parts},
            **(complete_params or {}),
        }
        return await _complete(requests, key, complete, [etags[n] for n in sorted(etags)])
    except BaseException:
        await _abort_quietly(requests, key, upload_id)
        raise


async def _complete(
    requests: Requests, key: str, complete: dict[str, Any], part_etags: list[str]
) -> str:
    """CompleteMultipartUpload; returns the object's ETag.

    When an attempt completes the upload but its answer is lost, the
    retry hears NoSuchUpload: the upload is ours if the object now
    carries the ETag its parts give. (A PreconditionFailed stays one:
    the same bytes may have been stored by another writer first.)
    """
    client, bucket, call = requests.client, requests.bucket, requests.call
    try:
        response = await call(
            "CompleteMultipartUpload", key, partial(client.complete_multipart_upload, **complete)
        )
    except NotFound:
        expected = multipart_etag(part_etags)
        try:
            if expected:
                head_object = partial(client.head_object, Bucket=bucket, Key=key)
                current = etag((await call("HeadObject", key, head_object))["ETag"])
            else:
                current = None
        except NotFound:
            current = None
        if current is None or current != expected:
            raise
        log.info("multipart upload of s3://%s/%s completed; its answer was lost", bucket, key)
        return current
    return etag(response["ETag"])


async def abort(requests: Requests, key: str, upload_id: str) -> None:
    """Abort one upload; an upload that is already gone is fine."""
    abort_upload = partial(
        requests.client.abort_multipart_upload,
        Bucket=requests.bucket,
        Key=key,
        UploadId=upload_id,
    )
    try:
        await requests.call("AbortMultipartUpload", key, abort_upload)
    except NoSuchBucket:
        raise
    except NotFound:
        pass


async def _abort_quietly(requests: Requests, key: str, upload_id: str) -> None:
    """Abort after a failure, even when cancelled; never raises."""
    with trio.CancelScope(shield=True), trio.move_on_after(60):
        try:
            await abort(requests, key, upload_id)
        except DgfsError as exc:
            log.warning(
                "could not abort multipart upload %s of s3://%s/%s: %s",
                upload_id,
                requests.bucket,
                key,
                exc,
            )


async def download_ranges(
    requests: Requests,
    key: str,
    dest: Path,
    ranges: Sequence[tuple[int, int]],
    object_etag: str,
    concurrency: int,
) -> None:
    """Write each ``(first, last)`` byte range of ``key`` at its offset in
    ``dest``, ``concurrency`` at a time, each GET pinned to ``object_etag``
    (``PreconditionFailed`` once the object changed)."""

    async def fetch_range(first: int, last: int) -> None:
        def fetch() -> None:
            response = requests.client.get_object(
                Bucket=requests.bucket,
                Key=key,
                Range=f"bytes={first}-{last}",
                IfMatch=f'"{object_etag}"',
            )
            with closing(response["Body"]) as body, open(dest, "r+b") as out:
                out.seek(first)
                if copy_stream(body, out, last - first + 1) != last - first + 1:
                    raise bexc.IncompleteReadError(
                        actual_bytes=out.tell() - first, expected_bytes=last - first + 1
                    )

        await requests.call("GetObject", key, fetch)

    await run_bounded([partial(fetch_range, first, last) for first, last in ranges], concurrency)


async def run_bounded(jobs: Sequence[Callable[[], Awaitable[None]]], concurrency: int) -> None:
    """Await ``jobs``, ``concurrency`` at a time.

    The first failure cancels the rest and is raised as itself (not as an
    exception group), so callers see plain ``dgfs.errors``.
    """
    pending = iter(jobs)

    async def worker() -> None:
        for job in pending:
            await job()

    with first_failure():
        async with trio.open_nursery() as nursery:
            for _ in range(min(concurrency, len(jobs))):
                nursery.start_soon(worker)


def multipart_etag(part_etags: Sequence[str]) -> str | None:
    """The ETag S3 gives an object completed from parts with these (MD5) ETags:
    the MD5 of their digests, ``-`` and the part count. None if a part's
    ETag is not an MD5 (some encryption modes)."""
    try:
        digests = [bytes.fromhex(part) for part in part_etags]
    except ValueError:
        return None
    if not digests or any(len(digest) != 16 for digest in digests):
        return None
    combined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{combined}-{len(digests)}"


def copy_stream(body: Any, out: Any, limit: int) -> int:
    """Copy up to ``limit`` bytes from ``body`` to ``out`` in chunks; returns the count."""
    written = 0
    while written < limit:
        chunk = body.read(min(STREAM_CHUNK, limit - written))
        if not chunk:
            break
        out.write(chunk)
        written += len(chunk)
    return written
