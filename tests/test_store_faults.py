"""S3Store through the fault-injecting proxy (tests/faultproxy.py) in front of moto.

Every call either returns the right bytes or raises a dgfs error; a
multipart upload is completed or aborted, never left behind; a request
S3 applied whose answer was lost is recognised as done.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dgfs.errors import DgfsError, NotFound
from dgfs.store.s3 import S3Store, multipart_etag
from tests.faultproxy import NO_FAULTS, QUICK_FAULTS, FaultKind, FaultProxy, FaultSchedule
from testsupport.servers import REGION

log = logging.getLogger(__name__)

pytestmark = pytest.mark.expected_log(r"retry \d/\d")

PART = 5 << 20  # S3's smallest part


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_endpoint, stall_seconds=2.0) as running:
        yield running


@pytest.fixture
async def store(proxy: FaultProxy, bucket_name: str) -> AsyncIterator[S3Store]:
    s3 = S3Store(bucket_name, endpoint_url=proxy.endpoint_url, region=REGION, read_timeout=1.0)
    s3.multipart_threshold = PART
    s3.part_size = PART
    s3.download_threshold = 2 * PART
    s3.download_range_size = PART
    s3.retry_delays = (0.01, 0.05, 0.1)
    try:
        yield s3
    finally:
        await s3.aclose()


def _file(tmp_path: Path, name: str, size: int, seed: int) -> Path:
    path = tmp_path / name
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def test_multipart_etag_is_the_md5_of_the_part_digests() -> None:
    parts = [hashlib.md5(b"a").hexdigest(), hashlib.md5(b"b").hexdigest()]
    joined = hashlib.md5(hashlib.md5(b"a").digest() + hashlib.md5(b"b").digest()).hexdigest()
    assert multipart_etag(parts) == f"{joined}-2"
    assert multipart_etag(["not-hex"]) is None
    assert multipart_etag([]) is None


@pytest.mark.parametrize("conditional", [False, True])
async def test_multipart_upload_whose_completion_answer_is_lost(
    store: S3Store, proxy: FaultProxy, tmp_path: Path, conditional: bool
) -> None:
    """The retried CompleteMultipartUpload hears NoSuchUpload: the object is ours, not an error."""
    src = _file(tmp_path, "big", 2 * PART + 1234, seed=1)
    proxy.inject(FaultKind.RESET_RESPONSE, "POST", "uploadId=")
    etag = await store.upload("big.bin", src, {"k": "v"}, if_none_match=conditional)
    assert proxy.faults[FaultKind.RESET_RESPONSE] == 1
    head = await store.head("big.bin")
    assert head.etag == etag and head.size == src.stat().st_size
    assert await store.get_range("big.bin", 0, head.size) == src.read_bytes()
    assert await store.list_multipart_uploads() == []


async def test_multipart_completion_retried_into_no_such_upload(
    store: S3Store, proxy: FaultProxy, tmp_path: Path
) -> None:
    """As AWS may answer: the first Complete lands, its answer is lost, the
    retry hears NoSuchUpload. The object's ETag proves the upload is ours."""
    src = _file(tmp_path, "big", 2 * PART + 99, seed=3)
    proxy.inject(FaultKind.RESET_RESPONSE, "POST", "uploadId=")
    proxy.inject(FaultKind.NO_SUCH_UPLOAD, "POST", "uploadId=")
    etag = await store.upload("big.bin", src, {})
    assert proxy.faults[FaultKind.NO_SUCH_UPLOAD] == 1
    assert (await store.head("big.bin")).etag == etag
    assert await store.get_range("big.bin", 0, 3 * PART) == src.read_bytes()


async def test_multipart_completion_refused_for_an_upload_that_is_gone(
    store: S3Store, proxy: FaultProxy, tmp_path: Path
) -> None:
    """NoSuchUpload with no object of ours behind it stays an error."""
    src = _file(tmp_path, "big", 2 * PART, seed=4)
    proxy.inject(FaultKind.NO_SUCH_UPLOAD, "POST", "uploadId=", times=10)
    with pytest.raises(NotFound):
        await store.upload("gone.bin", src, {})
    assert not await store.list_multipart_uploads()


async def test_probe_whose_first_put_answer_is_lost(store: S3Store, proxy: FaultProxy) -> None:
    """The probe's own PUT landed and the retry was refused: conditional PUTs work."""
    proxy.inject(FaultKind.RESET_RESPONSE, "PUT", "probe-")
    assert await store.probe_if_none_match() is True
    assert proxy.faults[FaultKind.RESET_RESPONSE] == 1
    assert [o.key for o in (await store.list("", None)).objects] == []


@pytest.mark.parametrize("kind", [FaultKind.TRUNCATE, FaultKind.RESET_RESPONSE])
async def test_head_answer_cut_in_its_headers_is_retried(
    store: S3Store, proxy: FaultProxy, kind: FaultKind
) -> None:
    """A HEAD answer cut inside its header block is a broken connection, not
    an object without its metadata (http.client accepts the lines it got)."""
    meta = {f"dg-field-{i}": f"value-{i}" for i in range(12)}
    await store.put_bytes("meta.bin", b"x" * 10, meta)
    proxy.inject(kind, "HEAD", "/meta.bin")
    head = await store.head("meta.bin")
    assert proxy.faults[kind] == 1
    assert dict(head.metadata) == meta and head.size == 10


async def test_stall_past_the_read_timeout_is_retried(
    store: S3Store, proxy: FaultProxy, tmp_path: Path
) -> None:
    src = _file(tmp_path, "small", 70_000, seed=2)
    proxy.inject(FaultKind.STALL, "GET", "/stalled")
    await store.upload("stalled", src, {})
    assert await store.get_range("stalled", 0, 1 << 20) == src.read_bytes()
    assert proxy.faults[FaultKind.STALL] == 1
    snap = store.telemetry.snapshot()
    assert snap.s3_botocore_retries or snap.s3_retries


@pytest.mark.expected_log(r"retry \d/\d|could not abort multipart")
@pytest.mark.parametrize("seed", [1, 2])
async def test_random_faults_never_give_wrong_bytes(
    store: S3Store, proxy: FaultProxy, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    sizes = [0, 1, 70_000, PART - 1, PART + 1, 2 * PART + 7, 3 * PART]
    sources = {
        f"obj{i}": _file(tmp_path, f"src{i}", size, seed * 100 + i) for i, size in enumerate(sizes)
    }
    proxy.schedule = FaultSchedule(seed=seed, rate=0.3, kinds=QUICK_FAULTS)
    stored: dict[str, bytes] = {}
    failures: list[str] = []
    for key, src in sources.items():
        try:
            await store.upload(key, src, {"n": key})
        except DgfsError as exc:
            failures.append(f"upload {key}: {type(exc).__name__}")
            continue
        stored[key] = src.read_bytes()
    for key, data in stored.items():
        dest = tmp_path / f"dl-{key}"
        try:
            head = await store.download(key, dest)
        except DgfsError as exc:
            failures.append(f"download {key}: {type(exc).__name__}")
        else:
            assert head.size == len(data)
            assert dest.read_bytes() == data, f"{key}: wrong bytes downloaded"
        for _ in range(3):
            start = rng.randrange(len(data) + 1)
            length = rng.randrange(1, 2 * PART)
            try:
                got = await store.get_range(key, start, length)
            except DgfsError as exc:
                failures.append(f"get_range {key}: {type(exc).__name__}")
                continue
            assert got == data[start : start + length], f"{key}: wrong range bytes"
    proxy.schedule = NO_FAULTS
    # Whatever the faults did, no multipart upload is left behind and every
    # upload that reported success is in S3.
    assert await store.list_multipart_uploads() == []
    for key, data in stored.items():
        assert hashlib.sha256(await store.get_range(key, 0, len(data) + 1)).digest() == (
            hashlib.sha256(data).digest()
        )
    log.info(
        "seed %d: %s; store: %s; failed calls: %s",
        seed,
        proxy.summary(),
        store.telemetry.snapshot().s3_summary(),
        failures or "none",
    )
    assert sum(proxy.faults.values()) >= 5
    snap = store.telemetry.snapshot()
    assert snap.s3_retries + snap.s3_botocore_retries > 0
