"""A large file's metadata rewritten (chmod, chown, touch copy the object
onto itself, and S3 gives the copy a new ETag: a multipart upload's
``-N`` form becomes a plain MD5) while a reader takes its ranges from one
version (If-Match): the same file, so the reader goes on. It failed with
EIO ("replaced while it was read") on moto and AWS before."""

from __future__ import annotations

import hashlib
import random
import uuid
from pathlib import Path

import pytest

from dgfs.errors import IntegrityError, PreconditionFailed
from dgfs.fs.readers import RangeReader
from dgfs.store.base import CopyRequest, NewObject
from dgfs.store.s3 import S3Store
from testsupport.servers import REGION, make_bucket

MiB = 1 << 20


async def _multipart_then_chmod(store: S3Store, tmp_path: Path) -> None:
    """A large file stored multipart (as dgfs stores every large file), a
    reader opened on its listed ETag, then a chmod/utime (metadata rewritten
    by CopyObject onto itself, Renamer.update_metadata): the bytes are the
    same, the reader must go on."""
    store.multipart_threshold = 5 * MiB
    store.part_size = 5 * MiB
    data = random.Random(7).randbytes(6 * MiB)
    sha = hashlib.sha256(data).hexdigest()
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    await store.write("big.bin", src, NewObject({"dg-file-sha256": sha}))
    listed = (await store.list("", None)).objects[0].etag
    reader = RangeReader(store, "big.bin", len(data), sha, listed)
    assert await reader.read(0, 128 << 10) == data[: 128 << 10]
    head = await store.head("big.bin")
    meta = {"dg-file-sha256": sha, "mode": "33188"}
    await store.copy_object("big.bin", "big.bin", CopyRequest(meta, head))
    try:
        got = await reader.read(5 * MiB, 128 << 10)
    except IntegrityError as exc:
        pytest.fail(f"same bytes, only metadata changed, yet: {exc}")
    assert got == data[5 * MiB : 5 * MiB + (128 << 10)]


async def test_a_chmod_of_a_large_file_leaves_its_open_readers_reading_moto(
    s3_store: S3Store, tmp_path: Path
) -> None:
    await _multipart_then_chmod(s3_store, tmp_path)


@pytest.mark.seaweedfs
async def test_get_range_if_match_on_seaweedfs(seaweed_endpoint: str, tmp_path: Path) -> None:
    bucket = f"dgfs-test-{uuid.uuid4().hex[:12]}"
    make_bucket(seaweed_endpoint, bucket)
    store = S3Store(bucket, endpoint_url=seaweed_endpoint, region=REGION)
    try:
        await store.write("a.bin", b"x" * 1000, NewObject({}))
        listed = (await store.list("", None)).objects[0].etag
        assert await store.get_range("a.bin", 0, 10, if_match=listed) == b"x" * 10

        with pytest.raises(PreconditionFailed):
            await store.get_range("a.bin", 0, 10, if_match="0" * 32)
    finally:
        await store.aclose()


@pytest.mark.seaweedfs
async def test_a_chmod_of_a_large_file_leaves_its_open_readers_reading_seaweedfs(
    seaweed_endpoint: str, tmp_path: Path
) -> None:
    bucket = f"dgfs-test-{uuid.uuid4().hex[:12]}"
    make_bucket(seaweed_endpoint, bucket)
    store = S3Store(bucket, endpoint_url=seaweed_endpoint, region=REGION)
    try:
        await _multipart_then_chmod(store, tmp_path)
    finally:
        await store.aclose()
