"""This machine failing, not the bucket: a full scratch disk during a
rebuild, a second process (in a PID namespace of its own, as a container
sharing a cache_dir volume) starting beside a live mount. The first read
EIO and logged the object as corrupt; the second removed the live mount's
cache and scratch directories. Both need root (a tmpfs, unshare)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from dgfs.cache import ContentCache
from dgfs.core import Core
from dgfs.delta import DeltaEngine
from dgfs.errors import DgfsError, IntegrityError
from dgfs.format import StoredFile
from dgfs.fs.readers import StoredContent
from dgfs.policy import Policy
from dgfs.store.memory import MemoryStore
from tests.coreharness import make_core, write


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root): a real full disk, ENOSPC from the kernel."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_full_scratch_disk_during_a_rebuild_is_enospc_not_a_corrupt_object(
    memory_store: MemoryStore, tmp_path: Path, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Scratch fills up while xdelta3 writes a rebuild: a local error (ENOSPC),
    not "the object cannot be decoded" (IntegrityError -> EIO, logged as a
    broken object, as readers.py's StreamReader says it must not be)."""
    rng = __import__("random").Random(7)
    ref = rng.randbytes(512 << 10)
    big = ref * 6  # 3 MiB, a tiny delta against ref
    writer, wcache = make_core(memory_store, tmp_path / "w")
    await writer.put(write(tmp_path / "a.zip", ref), "d/a.zip")
    put = await writer.put(write(tmp_path / "b.zip", big), "d/b.zip")
    await writer.aclose()
    wcache.close()
    assert put.stored.kind.name == "DELTA"

    cache = ContentCache(tmp_path / "rcache", 1 << 30)  # the cache has room
    core = Core(
        memory_store, cache, DeltaEngine(), Policy(min_delta_size=1024), scratch_dir=small_disk
    )
    try:
        stored = await core.locate("d/b.zip")
        with pytest.raises(Exception) as caught:
            await core.materialize(stored)
        exc = caught.value
        content = StoredContent(core, trio.CapacityLimiter(2), verify_whole_below=64 << 20)
        with caplog.at_level(logging.ERROR), pytest.raises(DgfsError) as fs_caught:
            await content.reader(stored)
        assert not [r for r in caplog.records if "cannot read" in r.getMessage()]
        # Room again: the file reads.
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        assert sha(await _read_all(content, stored)) == sha(big)
        assert not isinstance(exc, IntegrityError), f"disk full reported as corruption: {exc}"
        assert fs_caught.value.errno == errno.ENOSPC
    finally:
        await core.aclose()
        cache.close()


async def _read_all(content: StoredContent, stored: StoredFile) -> bytes:
    reader = await content.reader(stored)
    try:
        return await reader.read(0, 1 << 30)
    finally:
        await reader.close()


def test_a_process_in_another_pid_namespace_leaves_a_live_mounts_cache_and_scratch(
    tmp_path: Path,
) -> None:
    """Two mounts share one cache_dir (documented), one of them in a container
    (its own PID namespace). The second one's start removes the first one's
    *live* ephemeral cache and scratch directory: it judges them by a PID it
    cannot see, never by the cache's flock. The first mount then cannot cache
    or stage anything (ENOENT) until it is remounted."""
    if os.geteuid() != 0:
        pytest.skip("needs root for unshare --pid")
    from dgfs.runtime import Settings, _open_cache, new_scratch
    from dgfs.telemetry import Telemetry

    root = tmp_path / "cache_dir"
    root.mkdir(mode=0o700)
    # Mount A (this process): what open_core makes.
    cache, ephemeral = _open_cache(root, Settings(cache_dir=root), Telemetry())
    assert ephemeral
    scratch, scratch_lock = new_scratch(root)
    data = os.urandom(4096)
    cache.add_file(sha(data), write(scratch / "x", data))
    try:
        # Mount B starts in a PID namespace of its own, same cache_dir.
        script = (
            "import sys; from pathlib import Path;"
            "from dgfs.runtime import Settings, _open_cache;"
            "from dgfs.telemetry import Telemetry;"
            "r = Path(sys.argv[1]); c, _ = _open_cache(r, Settings(cache_dir=r), Telemetry());"
            "c.close()"
        )
        subprocess.run(
            ["unshare", "--pid", "--fork", __import__("sys").executable, "-c", script, str(root)],
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )
        assert scratch.exists(), "mount A's live scratch directory was removed"
        assert cache.directory.exists(), "mount A's live cache directory was removed"
        more = os.urandom(4096)
        cache.add_file(sha(more), write(tmp_path / "y", more))
        assert cache.open(sha(data)) is not None
    finally:
        cache.close()
        os.close(scratch_lock)
