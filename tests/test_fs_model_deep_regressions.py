"""Divergences the deep variant of the in-process model test
(tests/test_fs_model.py, ``FsDeepModel``) found, each shrunk to a
deterministic test on a ``Core`` in deep mode.

A test marked ``xfail(strict=True)`` describes a bug not fixed yet; the
model's ``KNOWN_BUGS`` names it and keeps the model clear of it meanwhile.
"""

from __future__ import annotations

import gzip
import io
import random
import zipfile
from pathlib import Path

import pytest

from dgfs.errors import TransientError
from dgfs.format import DeltaMode
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from tests.coreharness import make_core, write

pytestmark = pytest.mark.timeout(30)


def _release(version: int) -> bytes:
    """A small zip of compressible text (and a gzip member), as wheels are."""
    words = random.Random(1).choices((b"def", b"value", b"return", b"self", b"delta"), k=2000)
    text = b" ".join(words) + b"version %d" % version
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pkg/mod.py", text, zipfile.ZIP_DEFLATED)
        archive.writestr("pkg/mod.py.gz", gzip.compress(text, mtime=1_600_000_000))
    return buffer.getvalue()


@pytest.mark.xfail(
    strict=True,
    reason=(
        "dgfs/writer.py Writer._encode_deep runs _deep_reference and _diff_deep "
        "inside a trio nursery (beside the proof), so whatever they raise "
        "(here the TransientError of the reference.deep upload) leaves "
        "Core.put wrapped in an ExceptionGroup, not as the DgfsError itself"
    ),
)
async def test_a_failed_deep_reference_upload_raises_the_store_error_itself(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """The model (a file renamed into a new deep directory while an injected
    upload failure was pending) saw ``FileSystem.rename`` raise an
    ``ExceptionGroup``; the FUSE adapter answers EIO for it, but logs it as
    "unexpected error in rename", and the upload worker judges such a group
    an unexpected *local* failure ("upload of ... failed unexpectedly", with
    its stack), so after two of them a deep candidate is stored whole, and
    a refusal for good (NoSuchBucket, AccessDenied) of the reference upload
    is retried for ever instead of going to the journal's failed/."""
    faulty = FaultyStore(memory_store)
    core, cache = make_core(faulty, tmp_path, DeltaMode.DEEP)
    try:
        faulty.fail("upload", key="d/reference.deep")
        with pytest.raises(TransientError):
            await core.put(write(tmp_path / "x.zip", _release(1)), "d/x.zip")
    finally:
        await core.aclose()
        cache.close()


@pytest.mark.xfail(
    strict=True,
    reason=(
        "dgfs/writer.py Writer._encode_deep: _diff_deep's fetch of the "
        "reference runs inside the nursery too, so its TransientError leaves "
        "Core.put wrapped in an ExceptionGroup"
    ),
)
async def test_a_failed_deep_reference_download_raises_the_store_error_itself(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """The same when the reference exists and fetching it fails (a new cache)."""
    writer, writer_cache = make_core(memory_store, tmp_path / "w", DeltaMode.DEEP)
    try:
        await writer.put(write(tmp_path / "x.zip", _release(1)), "d/x.zip")
    finally:
        await writer.aclose()
        writer_cache.close()
    faulty = FaultyStore(memory_store)
    core, cache = make_core(faulty, tmp_path / "r", DeltaMode.DEEP)
    try:
        faulty.fail("download", key="d/reference.deep", times=None)
        faulty.fail("get_range", key="d/reference.deep", times=None)
        with pytest.raises(TransientError):
            await core.put(write(tmp_path / "y.zip", _release(2)), "d/y.zip")
    finally:
        await core.aclose()
        cache.close()
