"""ObjectStore behaviour: S3Store against moto (and SeaweedFS), MemoryStore alike."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions as bexc
import pytest
import trio

from dgfs.cache import ContentCache
from dgfs.core import Core
from dgfs.delta import DeltaEngine
from dgfs.errors import (
    AccessDenied,
    ConfigError,
    CredentialsUnavailable,
    EndpointUnreachable,
    NoSuchBucket,
    NotFound,
    PreconditionFailed,
    StoreError,
    TransientError,
    UserError,
)
from dgfs.policy import Policy
from dgfs.store.base import ObjectStore
from dgfs.store.memory import MemoryStore
from dgfs.store.s3 import S3Store, translate_error
from testsupport.servers import REGION, free_port, make_bucket

MiB = 1024 * 1024


def md5(body: bytes) -> str:
    return hashlib.md5(body).hexdigest()


def small_transfers(store: ObjectStore) -> None:
    """Multipart from 5 MiB in 5 MiB parts (S3's minimum part size)."""
    if isinstance(store, S3Store):
        store.multipart_threshold = 5 * MiB
        store.part_size = 5 * MiB


@pytest.fixture(params=["memory", "s3"])
async def store(
    request: pytest.FixtureRequest, moto_endpoint: str, bucket_name: str
) -> AsyncIterator[ObjectStore]:
    """The same behaviour suite on a MemoryStore and on an S3Store over moto."""
    if request.param == "memory":
        yield MemoryStore()
        return
    s3 = S3Store(bucket_name, endpoint_url=moto_endpoint, region=REGION)
    try:
        yield s3
    finally:
        await s3.aclose()


async def put_keys(store: ObjectStore, keys: list[str]) -> None:
    limiter = trio.CapacityLimiter(16)

    async def put(key: str) -> None:
        async with limiter:
            await store.put_bytes(key, key.encode(), {})

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(put, key)


# --- listing ---------------------------------------------------------------------


async def test_list_with_delimiter(store: ObjectStore) -> None:
    keys = ["a/1", "a/2", "a/b/3", "a/b/c/4", "b/5", "c", "a-x", "a/"]
    await put_keys(store, keys)
    before = datetime.now(UTC)

    top = await store.list("")
    assert [info.key for info in top.objects] == ["a-x", "c"]
    assert top.prefixes == ["a/", "b/"]
    in_a = await store.list("a/")
    assert [info.key for info in in_a.objects] == ["a/", "a/1", "a/2"]
    assert in_a.prefixes == ["a/b/"]
    flat = await store.list("a/", delimiter=None)
    assert [info.key for info in flat.objects] == ["a/", "a/1", "a/2", "a/b/3", "a/b/c/4"]
    assert flat.prefixes == []
    assert (await store.list("nothing/")).objects == []

    info = next(info for info in top.objects if info.key == "c")
    assert info.size == 1
    assert info.etag == md5(b"c")
    assert info.last_modified.tzinfo is not None
    assert abs(info.last_modified - before) < timedelta(minutes=5)
    # When the store answered a HEAD, by the clock of last_modified (its Date header).
    head = await store.head("c")
    assert head.observed_at is not None and head.observed_at.tzinfo is not None
    assert info.last_modified - timedelta(seconds=1) <= head.observed_at
    assert abs(head.observed_at - before) < timedelta(minutes=5)
    # And a listing (a row read in its version's second is asked again after it).
    assert top.observed_at is not None
    assert info.last_modified - timedelta(seconds=1) <= top.observed_at


async def test_list_pagination(store: ObjectStore) -> None:
    keys = [f"k{i:02d}" for i in range(10)] + [f"d{i}/x" for i in range(3)]
    await put_keys(store, keys)
    store.page_size = 4  # type: ignore[attr-defined]

    pages = [page async for page in store.list_pages("")]
    assert len(pages) == 4  # 13 entries: 10 objects + 3 common prefixes
    assert all(len(page.objects) + len(page.prefixes) <= 4 for page in pages)
    listed = [info.key for page in pages for info in page.objects]
    assert listed == sorted(key for key in keys if "/" not in key)
    assert [p for page in pages for p in page.prefixes] == ["d0/", "d1/", "d2/"]

    flat_pages = [page async for page in store.list_pages("", delimiter=None)]
    assert [info.key for page in flat_pages for info in page.objects] == sorted(keys)


async def test_more_than_1000_keys_list_and_delete_many(store: ObjectStore) -> None:
    keys = [f"many/{i:05d}" for i in range(1003)]
    await put_keys(store, keys)

    pages = [page async for page in store.list_pages("many/")]
    assert len(pages) == 2
    assert [info.key for page in pages for info in page.objects] == keys

    await store.delete_many([*keys, "many/not-there"])
    assert (await store.list("many/")).objects == []


# --- reading ---------------------------------------------------------------------


async def test_head_metadata_round_trip(store: ObjectStore) -> None:
    metadata = {"dg-file-sha256": "ab" * 32, "mtime": "1700000000", "Mixed-Case": "Value"}
    etag = await store.put_bytes("obj", b"body", metadata, content_type="application/zip")

    head = await store.head("obj")
    assert head.key == "obj"
    assert head.size == 4
    assert head.etag == etag == md5(b"body")
    assert head.content_type == "application/zip"
    assert dict(head.metadata) == {
        "dg-file-sha256": "ab" * 32,
        "mtime": "1700000000",
        "mixed-case": "Value",
    }
    assert head.last_modified.utcoffset() == timedelta(0)


async def test_head_missing_is_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        await store.head("missing")


async def test_get_range(store: ObjectStore) -> None:
    body = bytes(range(100))
    await store.put_bytes("r", body, {})

    assert await store.get_range("r", 0, 10) == body[:10]
    assert await store.get_range("r", 50, 1) == body[50:51]
    assert await store.get_range("r", 95, 10) == body[95:]
    assert await store.get_range("r", 100, 5) == b""
    assert await store.get_range("r", 1000, 5) == b""
    assert await store.get_range("r", 3, 0) == b""
    with pytest.raises(NotFound):
        await store.get_range("missing", 0, 1)


async def test_get_range_of_one_version(store: ObjectStore) -> None:
    """``if_match``: the ranges of the version with that ETag, and
    ``PreconditionFailed`` once another replaced it (ranged reads of large
    files take every range from one version)."""
    body = bytes(range(100))
    etag = await store.put_bytes("r", body, {})
    assert await store.get_range("r", 10, 5, if_match=etag) == body[10:15]
    await store.put_bytes("r", body[::-1], {})
    with pytest.raises(PreconditionFailed):
        await store.get_range("r", 10, 5, if_match=etag)


@pytest.mark.parametrize("parallel", [False, True], ids=["stream", "ranges"])
async def test_download_large_object(store: ObjectStore, tmp_path: Path, parallel: bool) -> None:
    body = os.urandom(20 * MiB + 12345)
    src = tmp_path / "src"
    src.write_bytes(body)
    await store.upload("big", src, {"dg-note": "x"})
    ranges: list[str] = []
    if isinstance(store, S3Store):
        real_get_object = store._client.get_object

        def recording_get_object(**params: Any) -> Any:
            ranges.append(params.get("Range", "all"))
            return real_get_object(**params)

        store._client.get_object = recording_get_object
        if parallel:
            store.download_threshold = 8 * MiB
            store.download_range_size = 3 * MiB

    dest = tmp_path / "dest"
    dest.write_bytes(b"\xff" * (len(body) + 1000))  # longer: must be truncated
    head = await store.download("big", dest)

    assert dest.stat().st_size == len(body)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(body).digest()
    assert head.size == len(body)
    assert head.metadata == {"dg-note": "x"}
    if isinstance(store, S3Store):
        # One plain GET, then (parallel) the rest in 3 MiB ranges.
        expected = ["all"]
        if parallel:
            starts = range(3 * MiB, len(body), 3 * MiB)
            expected += [f"bytes={a}-{min(a + 3 * MiB, len(body)) - 1}" for a in starts]
        assert sorted(ranges) == sorted(expected)
    with pytest.raises(NotFound):
        await store.download("missing", tmp_path / "nothing")


async def test_download_of_object_replaced_midway(s3_store: S3Store, tmp_path: Path) -> None:
    s3_store.download_threshold = 5 * MiB
    s3_store.download_range_size = 2 * MiB
    await s3_store.put_bytes("big", os.urandom(6 * MiB), {})
    real_get_object = s3_store._client.get_object

    def replacing_get_object(**params: Any) -> Any:
        response = real_get_object(**params)
        if "Range" not in params:  # the first GET: replace the object behind it
            s3_store._client.put_object(Bucket=s3_store.bucket, Key="big", Body=b"new")
        return response

    s3_store._client.get_object = replacing_get_object
    with pytest.raises(TransientError, match="changed during download"):
        await s3_store.download("big", tmp_path / "dest")


async def test_download_empty_object(store: ObjectStore, tmp_path: Path) -> None:
    await store.put_bytes("empty", b"", {})
    dest = tmp_path / "dest"
    head = await store.download("empty", dest)
    assert head.size == 0
    assert dest.read_bytes() == b""


# --- writing ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 12 * MiB + 7], ids=["single", "multipart"])
async def test_upload(store: ObjectStore, tmp_path: Path, size: int) -> None:
    small_transfers(store)
    body = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(body)
    metadata = {"dg-file-size": str(size), "dg-tool": "dgfs/0.1.0"}

    etag = await store.upload("up/file.zip", src, metadata, content_type="application/zip")

    head = await store.head("up/file.zip")
    assert head.etag == etag
    assert head.size == size
    assert dict(head.metadata) == metadata
    assert head.content_type == "application/zip"
    multipart = isinstance(store, S3Store) and size >= store.multipart_threshold
    assert etag == (etag.split("-")[0] + "-3" if multipart else md5(body))
    assert await store.get_range("up/file.zip", size - 5, 10) == body[-5:]
    assert await store.get_range("up/file.zip", 5 * MiB - 1, 2) == body[5 * MiB - 1 : 5 * MiB + 1]
    assert await store.list_multipart_uploads() == []


@pytest.mark.parametrize("size", [1000, 11 * MiB], ids=["single", "multipart"])
async def test_upload_if_none_match(store: ObjectStore, tmp_path: Path, size: int) -> None:
    small_transfers(store)
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"1" * size)
    second.write_bytes(b"2" * size)

    etag = await store.upload("ref.bin", first, {"n": "1"}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.upload("ref.bin", second, {"n": "2"}, if_none_match=True)

    head = await store.head("ref.bin")
    assert (head.etag, head.metadata["n"]) == (etag, "1")
    assert await store.get_range("ref.bin", 0, 4) == b"1111"
    assert await store.list_multipart_uploads() == []
    # Without the condition the second write wins.
    await store.upload("ref.bin", second, {"n": "2"})
    assert (await store.head("ref.bin")).metadata["n"] == "2"


async def test_put_bytes_if_none_match(store: ObjectStore) -> None:
    await store.put_bytes("k", b"first", {}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put_bytes("k", b"second", {}, if_none_match=True)
    assert await store.get_range("k", 0, 100) == b"first"


async def test_probe_if_none_match(store: ObjectStore) -> None:
    assert await store.probe_if_none_match() is True
    assert (await store.list(".deltaglider/", delimiter=None)).objects == []


async def test_copy_keeps_or_replaces_metadata(store: ObjectStore) -> None:
    await store.put_bytes("src", b"payload", {"a": "1", "b": "2"}, content_type="text/plain")

    etag = await store.copy("src", "kept")
    kept = await store.head("kept")
    assert etag == kept.etag == md5(b"payload")
    assert dict(kept.metadata) == {"a": "1", "b": "2"}
    assert kept.content_type == "text/plain"

    await store.copy("src", "replaced", {"c": "3"})
    replaced = await store.head("replaced")
    assert dict(replaced.metadata) == {"c": "3"}
    assert replaced.content_type == "text/plain"
    assert await store.get_range("replaced", 0, 100) == b"payload"
    assert dict((await store.head("src")).metadata) == {"a": "1", "b": "2"}

    # Rewriting an object's own metadata in place (what a rename of a delta needs).
    await store.copy("replaced", "replaced", {"d": "4"})
    assert dict((await store.head("replaced")).metadata) == {"d": "4"}
    with pytest.raises(NotFound):
        await store.copy("missing", "x")
    # S3 refuses to copy an object onto itself without changing anything.
    with pytest.raises(StoreError, match="InvalidRequest"):
        await store.copy("src", "src")


async def test_non_ascii_metadata_round_trips(store: ObjectStore) -> None:
    # Headers are ASCII: stores encode such values (RFC 2047, as S3 answers) and decode them.
    await store.put_bytes("k", b"x", {"dg-original-name": "café 東京.zip", "plain": "ok"})
    head = await store.head("k")
    assert dict(head.metadata) == {"dg-original-name": "café 東京.zip", "plain": "ok"}
    await store.copy("k", "k2", {**head.metadata, "mtime": "1"})
    assert (await store.head("k2")).metadata["dg-original-name"] == "café 東京.zip"


async def test_delete(store: ObjectStore) -> None:
    await store.put_bytes("gone", b"x", {})
    await store.delete("gone")
    with pytest.raises(NotFound):
        await store.head("gone")
    await store.delete("gone")  # missing key: fine
    await store.delete_many([])


# --- S3Store only: multipart edge cases, error mapping, retries ---------------------


async def test_multipart_failure_is_aborted(s3_store: S3Store, tmp_path: Path) -> None:
    small_transfers(s3_store)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(11 * MiB))
    real_upload_part = s3_store._client.upload_part

    def failing_upload_part(**params: Any) -> Any:
        if params["PartNumber"] == 2:
            raise client_error("InvalidArgument", 400, "part refused")
        return real_upload_part(**params)

    s3_store._client.upload_part = failing_upload_part
    with pytest.raises(StoreError, match="InvalidArgument: part refused"):
        await s3_store.upload("k", src, {})
    assert await s3_store.list_multipart_uploads() == []
    with pytest.raises(NotFound):
        await s3_store.head("k")


async def test_cancelled_multipart_is_aborted(s3_store: S3Store, tmp_path: Path) -> None:
    small_transfers(s3_store)
    s3_store.transfer_concurrency = 1
    src = tmp_path / "src"
    src.write_bytes(os.urandom(11 * MiB))
    first_part_sent = trio.Event()
    real_upload_part = s3_store._client.upload_part

    def signalling_upload_part(**params: Any) -> Any:
        response = real_upload_part(**params)
        trio.from_thread.run_sync(first_part_sent.set)
        return response

    s3_store._client.upload_part = signalling_upload_part
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s3_store.upload, "k", src, {})
        await first_part_sent.wait()
        nursery.cancel_scope.cancel()

    assert await s3_store.list_multipart_uploads() == []
    with pytest.raises(NotFound):
        await s3_store.head("k")


async def test_multipart_copy(s3_store: S3Store) -> None:
    s3_store.copy_threshold = 5 * MiB
    s3_store.copy_part_size = 5 * MiB
    body = os.urandom(11 * MiB)
    await s3_store.put_bytes("big", body, {"a": "1"}, content_type="application/zip")

    await s3_store.copy("big", "kept")
    await s3_store.copy("big", "replaced", {"b": "2"})

    for key, metadata in [("kept", {"a": "1"}), ("replaced", {"b": "2"})]:
        head = await s3_store.head(key)
        assert head.size == len(body)
        assert dict(head.metadata) == metadata
        assert head.content_type == "application/zip"
        assert head.etag.endswith("-3")
        assert await s3_store.get_range(key, 5 * MiB - 2, 4) == body[5 * MiB - 2 : 5 * MiB + 2]
        assert await s3_store.get_range(key, len(body) - 3, 9) == body[-3:]
    assert await s3_store.list_multipart_uploads() == []


async def test_list_and_abort_multipart_uploads(s3_store: S3Store) -> None:
    created = s3_store._client.create_multipart_upload(Bucket=s3_store.bucket, Key="tmp/part")
    uploads = await s3_store.list_multipart_uploads("tmp/")
    assert [(u.key, u.upload_id) for u in uploads] == [("tmp/part", created["UploadId"])]
    assert uploads[0].initiated.tzinfo is not None
    assert await s3_store.list_multipart_uploads("other/") == []

    await s3_store.abort_multipart_upload("tmp/part", created["UploadId"])
    assert await s3_store.list_multipart_uploads() == []
    await s3_store.abort_multipart_upload("tmp/part", created["UploadId"])  # already gone: fine


async def test_delete_many_reports_refused_keys(s3_store: S3Store) -> None:
    def refusing_delete_objects(**params: Any) -> Any:
        keys = [item["Key"] for item in params["Delete"]["Objects"]]
        return {"Errors": [{"Key": keys[0], "Code": "AccessDenied", "Message": "no"}]}

    s3_store._client.delete_objects = refusing_delete_objects
    with pytest.raises(StoreError, match="locked.*AccessDenied"):
        await s3_store.delete_many(["locked", "other"])


async def test_check_bucket(s3_store: S3Store, moto_endpoint: str) -> None:
    await s3_store.check_bucket()

    missing = S3Store("no-such-bucket-dgfs", endpoint_url=moto_endpoint, region=REGION)
    try:
        with pytest.raises(NoSuchBucket, match="no-such-bucket-dgfs") as caught:
            await missing.check_bucket()
        assert isinstance(caught.value, UserError)
        with pytest.raises(NoSuchBucket, match="no-such-bucket-dgfs"):
            await missing.list("")
        with pytest.raises(NotFound):
            await missing.head("key")
    finally:
        await missing.aclose()


async def test_unreachable_endpoint(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store("bucket", endpoint_url=endpoint, region=REGION)
    started = time.monotonic()
    try:
        with pytest.raises(EndpointUnreachable, match=endpoint) as caught:
            await store.check_bucket()
        assert isinstance(caught.value, UserError)
        with pytest.raises(EndpointUnreachable):
            await store.put_bytes("k", b"x", {})
    finally:
        await store.aclose()
    assert time.monotonic() - started < 15  # botocore's retries only, not ours


@pytest.mark.expected_log("retry \\d/\\d")
async def test_transient_errors_are_retried(
    s3_store: S3Store, caplog: pytest.LogCaptureFixture
) -> None:
    await s3_store.put_bytes("k", b"x", {})
    s3_store.retry_delays = (0.0, 0.0, 0.0)
    calls = flaky(s3_store, "head_object", failures=2, error=client_error("SlowDown", 503))

    with caplog.at_level(logging.WARNING, logger="dgfs.store.s3"):
        assert (await s3_store.head("k")).size == 1
    assert calls() == 3
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2

    calls = flaky(
        s3_store, "head_object", failures=99, error=bexc.ReadTimeoutError(endpoint_url="x")
    )
    with pytest.raises(TransientError, match="HeadObject s3://.*/k"):
        await s3_store.head("k")
    assert calls() == 4


async def test_non_transient_errors_are_not_retried(s3_store: S3Store) -> None:
    s3_store.retry_delays = (0.0, 0.0, 0.0)
    calls = flaky(s3_store, "head_object", failures=99, error=client_error("AccessDenied", 403))
    with pytest.raises(AccessDenied):
        await s3_store.head("k")
    assert calls() == 1


async def test_unknown_profile_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no-such-profile"):
        S3Store("bucket", profile="no-such-profile")


def client_error(code: str, status: int, message: str = "") -> bexc.ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return bexc.ClientError(response, "TestOperation")


def flaky(store: S3Store, method: str, *, failures: int, error: Exception) -> Callable[[], int]:
    """Make the client method fail ``failures`` times; returns a call counter."""
    real = getattr(store._client, method)
    count = 0

    def wrapper(**params: Any) -> Any:
        nonlocal count
        count += 1
        if count <= failures:
            raise error
        return real(**params)

    setattr(store._client, method, wrapper)
    return lambda: count


@pytest.mark.parametrize(
    ("error", "expected", "text"),
    [
        (client_error("NoSuchKey", 404, "gone"), NotFound, "s3://bkt/key not found"),
        (client_error("404", 404), NotFound, "not found"),
        (client_error("NoSuchBucket", 404), NoSuchBucket, "bucket 'bkt' does not exist"),
        (client_error("AccessDenied", 403, "Access Denied"), AccessDenied, "access denied"),
        (client_error("403", 403), AccessDenied, "credentials"),
        (client_error("InvalidAccessKeyId", 403, "bad key"), AccessDenied, "InvalidAccessKeyId"),
        (client_error("SignatureDoesNotMatch", 403), AccessDenied, "SignatureDoesNotMatch"),
        (client_error("PreconditionFailed", 412), PreconditionFailed, "precondition"),
        (client_error("SlowDown", 503), TransientError, "SlowDown"),
        (client_error("InternalError", 500), TransientError, "InternalError"),
        (client_error("BadGateway", 502), TransientError, "502"),
        (client_error("Throttling", 400), TransientError, "Throttling"),
        (client_error("InvalidStorageClass", 400, "nope"), StoreError, "InvalidStorageClass: nope"),
        (bexc.EndpointConnectionError(endpoint_url="http://h:1"), EndpointUnreachable, "http://e"),
        (bexc.ConnectTimeoutError(endpoint_url="http://h:1"), EndpointUnreachable, "cannot reach"),
        (bexc.ReadTimeoutError(endpoint_url="http://h:1"), TransientError, "GetObject"),
        (bexc.ResponseStreamingError(error="reset"), TransientError, "reset"),
        (bexc.NoCredentialsError(), CredentialsUnavailable, "credentials"),
        (bexc.ParamValidationError(report="bad"), StoreError, "bad"),
    ],
)
def test_translate_error(error: Exception, expected: type[Exception], text: str) -> None:
    translated = translate_error(
        error, bucket="bkt", key="key", endpoint="http://e", operation="GetObject"
    )
    assert type(translated) is expected
    assert text in str(translated)


def test_translate_error_bucket_level_404_is_no_such_bucket() -> None:
    translated = translate_error(
        client_error("404", 404),
        bucket="bkt",
        key=None,
        endpoint="http://e",
        operation="HeadBucket",
    )
    assert isinstance(translated, NoSuchBucket)
    assert "bkt" in str(translated)


# --- the core behaviours, on moto and on a real SeaweedFS --------------------------


async def core_behaviours(store: S3Store, tmp_path: Path) -> None:
    """What dgfs needs from any S3-compatible store."""
    small_transfers(store)
    await store.check_bucket()
    assert await store.probe_if_none_match() is True

    etag = await store.put_bytes(
        "app/v1.zip", b"0123456789", {"dg-tool": "dgfs"}, content_type="application/zip"
    )
    head = await store.head("app/v1.zip")
    assert (head.size, head.etag, dict(head.metadata)) == (10, etag, {"dg-tool": "dgfs"})
    assert head.content_type == "application/zip"
    assert await store.get_range("app/v1.zip", 8, 5) == b"89"
    assert await store.get_range("app/v1.zip", 10, 5) == b""
    with pytest.raises(PreconditionFailed):
        await store.put_bytes("app/v1.zip", b"other", {}, if_none_match=True)

    body = os.urandom(11 * MiB)
    src = tmp_path / "big"
    src.write_bytes(body)
    await store.upload("app/reference.bin", src, {"dg-note": "reference"}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.upload("app/reference.bin", src, {}, if_none_match=True)
    assert await store.list_multipart_uploads() == []
    dest = tmp_path / "dest"
    downloaded = await store.download("app/reference.bin", dest)
    assert dest.read_bytes() == body
    assert downloaded.metadata == {"dg-note": "reference"}

    await store.copy("app/v1.zip", "app/v2.zip")
    await store.copy("app/v1.zip", "app/sub/v3.zip", {"dg-note": "moved"})
    assert dict((await store.head("app/v2.zip")).metadata) == {"dg-tool": "dgfs"}
    assert dict((await store.head("app/sub/v3.zip")).metadata) == {"dg-note": "moved"}
    assert await store.get_range("app/sub/v3.zip", 0, 100) == b"0123456789"

    listing = await store.list("app/")
    assert [info.key for info in listing.objects] == [
        "app/reference.bin",
        "app/v1.zip",
        "app/v2.zip",
    ]
    assert listing.prefixes == ["app/sub/"]
    # Not an exact match: SeaweedFS keeps emptied "folders" (here the probe's
    # .deltaglider/) as common prefixes until its delayed cleaner runs.
    assert "app/" in (await store.list("")).prefixes

    await store.delete_many(["app/v1.zip", "app/v2.zip", "app/missing"])
    await store.delete("app/sub/v3.zip")
    await store.delete("app/sub/v3.zip")
    assert [info.key for info in (await store.list("app/", None)).objects] == ["app/reference.bin"]


async def test_core_behaviours_moto(s3_store: S3Store, tmp_path: Path) -> None:
    await core_behaviours(s3_store, tmp_path)


@pytest.mark.seaweedfs
async def test_core_behaviours_seaweedfs(
    seaweed_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = f"dgfs-test-{uuid.uuid4().hex[:12]}"
    make_bucket(seaweed_endpoint, bucket)
    store = S3Store(bucket, endpoint_url=seaweed_endpoint, region=REGION)
    missing = S3Store("no-such-bucket-dgfs", endpoint_url=seaweed_endpoint, region=REGION)
    try:
        await core_behaviours(store, tmp_path)
        with pytest.raises(NoSuchBucket, match="no-such-bucket-dgfs"):
            await missing.check_bucket()
    finally:
        await store.aclose()
        await missing.aclose()

    # A directory rename moves markers too (SeaweedFS cannot copy a key ending in "/").
    store = S3Store(bucket, endpoint_url=seaweed_endpoint, region=REGION)
    cache = ContentCache(tmp_path / "rename-cache", 1 << 20)
    core = Core(store, cache, DeltaEngine(), Policy(), scratch_dir=tmp_path / "rename-scratch")
    try:
        await store.put_bytes("d1/", b"", {"mode": "16877"})
        await store.put_bytes("d1/sub/", b"", {"mode": "16832"})
        await store.put_bytes("d1/f.txt", b"text", {})
        assert await core.rename_prefix("d1", "d2") == 3
        await store.head("d2/sub/")  # (SeaweedFS keeps no metadata on markers)
        assert await store.get_range("d2/f.txt", 0, 10) == b"text"
        assert not (await store.list("d1/", None)).objects
    finally:
        await core.aclose()
        cache.close()
        await store.aclose()

    # SeaweedFS checks signatures (moto does not): a wrong secret is AccessDenied.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    refused = S3Store(bucket, endpoint_url=seaweed_endpoint, region=REGION)
    try:
        with pytest.raises(AccessDenied, match=bucket):
            await refused.check_bucket()
        with pytest.raises(AccessDenied, match="SignatureDoesNotMatch"):
            await refused.get_range("app/reference.bin", 0, 1)
    finally:
        await refused.aclose()


#: How a store answers If-Match on DeleteObject -> whether dgfs deletes without it.
CONDITION_ANSWERS = {
    "refused-501": ("NotImplemented", 501, True),
    "refused-400": ("InvalidArgument", 400, True),
    "failing-503": ("SlowDown", 503, False),
    "conflict-409": ("ConditionalRequestConflict", 409, False),
}


@pytest.mark.expected_log("refuses DeleteObject with If-Match|failed")
@pytest.mark.parametrize("answer", CONDITION_ANSWERS)
async def test_only_a_store_refusing_conditional_deletes_gets_plain_ones(
    s3_store: S3Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    """A store that refuses If-Match on DeleteObject (501 NotImplemented, a
    400 naming it) must not fail every rename: the delete is made without
    the condition, the log says so once, and none is sent again. A store
    that is failing (503) or a delete that raced another write (409) is no
    refusal: deleting without the condition could remove another mount's
    new version, so the error is raised and the condition kept."""
    code, status, refused = CONDITION_ANSWERS[answer]
    real = s3_store._client.delete_object
    sent: list[bool] = []

    def delete_object(**kwargs: Any) -> Any:
        sent.append("IfMatch" in kwargs)
        if "IfMatch" in kwargs:
            response: Any = {"Error": {"Code": code, "Message": "If-Match"}}
            response["ResponseMetadata"] = {"HTTPStatusCode": status}
            raise bexc.ClientError(response, "DeleteObject")
        return real(**kwargs)

    monkeypatch.setattr(s3_store._client, "delete_object", delete_object)
    s3_store.retry_delays = ()
    for key in ("a", "b"):
        await s3_store.put_bytes(key, b"x", {})
        version = await s3_store.head(key)
        if not refused:
            with pytest.raises(PreconditionFailed if status == 409 else TransientError):
                await s3_store.delete(key, version=version)
            assert (await s3_store.head(key)).etag == version.etag
            continue
        await s3_store.delete(key, version=version)
        with pytest.raises(NotFound):
            await s3_store.head(key)
    assert sent == ([True, False, False] if refused else [True, True])
    assert s3_store.conditional_delete is not refused
    warned = [r for r in caplog.records if "refuses DeleteObject" in r.getMessage()]
    assert len(warned) == refused


#: How a store answers ETags in DeleteObjects -> whether dgfs deletes without them.
ETAG_ANSWERS = {
    "whole-request-400": True,
    "per-object-NotImplemented": True,
    "per-object-InternalError": False,
}


@pytest.mark.expected_log("refuses DeleteObjects with ETags|could not delete")
@pytest.mark.parametrize("how", ETAG_ANSWERS)
async def test_a_store_refusing_etags_in_delete_objects_gets_plain_ones(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """A store that refuses ETags in DeleteObjects, for the whole request (a
    400) or object by object, must not leave a renamed directory's old tree
    behind: its objects are deleted without them, with one warning. An
    error that is no refusal (InternalError: the store could not check) is
    raised, and nothing is deleted without the condition."""
    refused = ETAG_ANSWERS[how]
    real = s3_store._client.delete_objects
    requests = 0

    def delete_objects(**kwargs: Any) -> Any:
        nonlocal requests
        requests += 1
        objects = kwargs["Delete"]["Objects"]
        if not any("ETag" in o for o in objects):
            return real(**kwargs)
        if how == "whole-request-400":
            response: Any = {"Error": {"Code": "MalformedXML", "Message": "ETag"}}
            response["ResponseMetadata"] = {"HTTPStatusCode": 400}
            raise bexc.ClientError(response, "DeleteObjects")
        code = how.rpartition("-")[2]
        return {"Errors": [{"Key": o["Key"], "Code": code, "Message": "ETag"} for o in objects]}

    monkeypatch.setattr(s3_store._client, "delete_objects", delete_objects)
    s3_store.retry_delays = ()
    keys = ["t/a", "t/b"]
    for key in keys:
        await s3_store.put_bytes(key, b"x", {})
    etags = {key: (await s3_store.head(key)).etag for key in keys}
    if refused:
        assert await s3_store.delete_many(keys, etags=etags) == []
        assert requests == 2  # with the ETags, then all the refused ones without
        for key in keys:
            with pytest.raises(NotFound):
                await s3_store.head(key)
    else:
        with pytest.raises(StoreError, match="InternalError"):
            await s3_store.delete_many(keys, etags=etags)
        assert [(await s3_store.head(key)).etag for key in keys] == list(etags.values())
    assert s3_store.conditional_delete is not refused
    warned = [r for r in caplog.records if "refuses DeleteObjects" in r.getMessage()]
    assert len(warned) == refused
