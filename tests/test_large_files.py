"""Large files and memory bounds: a read-ahead on a streamed rebuild, a
foreign file replaced or removed while read by ranges, a directory rename
over a marker with bytes. Each test failed before its fix for the reason
its docstring gives ("What they get" is what happened then)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from dgfs.errors import DgfsError, errno_of
from dgfs.fs import readers
from dgfs.rebuild import RecentRebuilds
from dgfs.store.memory import MemoryStore
from tests.fsharness import RANGED, fds_under, lookup, mounted
from tests.test_streaming import (
    SIZE,
    HeldDecode,
    new_dir,
    open_v2,
    store_versions,
    streamed_over_1mib,  # noqa: F401 - a fixture
)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
CHUNK = 128 << 10


@pytest.mark.usefixtures("streamed_over_1mib")
async def test_two_reads_far_ahead_on_one_handle_leave_no_cache_entry_open_after_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the user does: opens a large delta that is not cached yet (served
    while xdelta3 rebuilds it, ``StreamReader``) and reads near its end, as
    ``unzip`` does for the central directory; the kernel sends two such reads
    on the handle at once (its read-ahead). Then closes the file.

    What they get: both reads see ``StreamReader._cached is None`` and each
    opens its own cached reader (``await self._open_cached()``, no lock); the
    second assignment drops the first, which is never closed. The dropped
    reader holds a descriptor on the cache entry for the daemon's lifetime:
    once the entry is evicted its disk space is never freed (the cache
    budget no longer counts it), and every such open leaks one descriptor.

    What they should get: one cached reader per handle, closed at release;
    after release and eviction no descriptor stays on any cache entry."""
    memory = MemoryStore()
    v2 = await store_versions(memory, tmp_path)
    held = HeldDecode(monkeypatch)
    monkeypatch.setattr(readers, "MAX_HELD_AHEAD", 256 << 10)  # "far ahead" within 3 MiB
    home = new_dir(tmp_path / "reader")
    async with mounted(memory, home, RANGED) as m:
        # A file too large for a plain copy beside the cache (over 128 MiB by
        # default): the cached reader reads the encrypted cache entry itself.
        m.fs.core.rebuilder.recent = RecentRebuilds(max_bytes=0)
        fh = await open_v2(m.fs)
        assert await m.fs.read(fh, 0, 4096) == v2[:4096]
        got: dict[int, bytes] = {}

        async def read_at(offset: int) -> None:
            got[offset] = await m.fs.read(fh, offset, 4096)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_at, SIZE - 8192)
            nursery.start_soon(read_at, SIZE - 4096)
            await trio.testing.wait_all_tasks_blocked()
            held.release.set()
        assert got == {SIZE - 8192: v2[-8192:-4096], SIZE - 4096: v2[-4096:]}
        await m.fs.release(fh)
        cache = m.fs.core.cache
        cache.discard(hashlib.sha256(v2).hexdigest())  # evicted
        entries = [p for p in fds_under(cache.directory).values() if not p.endswith("/lock")]
        assert entries == [], f"cache entries still held open after release: {entries}"


@pytest.mark.expected_log(r"cannot read disk\.img: disk\.img was replaced while it was read")
async def test_a_foreign_large_file_replaced_by_one_of_its_size_is_never_read_half_and_half(
    tmp_path: Path,
) -> None:
    """What the user does: reads a large object another tool wrote (no
    DeltaGlider metadata: aws s3 cp, rclone; read by ranges, If-Match on its
    ETag) while that tool uploads a new version of the same size (a disk
    image, a fixed-size database dump).

    What they get: the first ranges from the old version, the rest from the
    new one, with no error: the ETag changed (PreconditionFailed), and
    ``RangeReader._same_content_relabelled`` (dgfs/fs/readers.py:127-137)
    takes the new object for a metadata-only rewrite (chmod/touch) because
    its size is the same and its recorded SHA-256 equals the expected one:
    both None. A torn file, silently.

    What they should get (docs/SEMANTICS.md, "Several writers": "one replaced
    while read gives EIO at the next read"): EIO, or bytes of one version."""
    old = random.Random(1).randbytes(3 * MiB)
    new = random.Random(2).randbytes(3 * MiB)
    memory = MemoryStore()
    await memory.put_bytes("disk.img", old, {})
    async with mounted(memory, new_dir(tmp_path / "reader"), RANGED) as m:
        node = await lookup(m.fs, "disk.img")
        fh = (await m.fs.open(node.ino, os.O_RDONLY)).fh
        got = bytearray()
        failed: list[int] = []
        for offset in range(0, len(old), CHUNK):
            if offset == 2 * MiB:  # another tool uploads a new version meanwhile
                await memory.put_bytes("disk.img", new, {})
            try:
                got += await m.fs.read(fh, offset, CHUNK)
            except DgfsError as exc:
                failed.append(errno_of(exc))
                break
        await m.fs.release(fh)
    torn = bytes(got[: 2 * MiB]) == old[: 2 * MiB] and bytes(got[2 * MiB :]) == new[2 * MiB :]
    assert failed == [errno.EIO] or bytes(got) in (old, new), (
        f"served {len(got)} bytes, no error; the old version's first 2 MiB and"
        f" the new one's rest: {torn}"
    )


class _LargestRead(MemoryStore):
    """A memory store that remembers the largest body one ``get_range`` returned."""

    largest = 0

    async def get_range(
        self, key: str, start: int, length: int, *, if_match: str | None = None
    ) -> bytes:
        body = await super().get_range(key, start, length, if_match=if_match)
        self.largest = max(self.largest, len(body))
        return body


async def test_renaming_a_directory_never_holds_a_whole_marker_body_in_memory(
    tmp_path: Path,
) -> None:
    """What the user does: ``mv d e`` where the directory's marker ``d/`` (or
    any marker below it) is an object with bytes, as another tool made it
    (docs/SEMANTICS.md: such markers are kept, their bytes copied along).

    What they get: ``Renamer._copy_tree_object`` (dgfs/renames.py:238-244)
    reads the marker with one ``get_range(key, 0, head.size)`` and writes it
    back with ``put_bytes``: the daemon holds the whole body in memory (here
    64 MiB; a 3 GiB marker is 3 GiB of RSS), and one over 5 GiB, which a
    single PUT cannot store, makes every rename of the directory fail after
    reading it all. docs/operations.md, "Memory": "files are streamed,
    never held whole".

    What they should get: the bytes copied server-side or streamed through
    a scratch file (download, then upload in parts): memory bounded like
    every other transfer (a range reader holds at most 16 MiB)."""
    memory = _LargestRead()
    marker = random.Random(3).randbytes(64 * MiB)
    await memory.put_bytes("d/", marker, {"mode": str(0o40755)})
    await memory.put_bytes("d/f", b"f", {})
    async with mounted(memory, new_dir(tmp_path / "m")) as m:
        await m.fs.ns.listing("")
        await m.fs.rename(1, "d", 1, "e", 0)
    assert memory.objects["e/"].body == marker
    assert memory.largest <= readers.MAX_WINDOW, (
        f"one read held {memory.largest // MiB} MiB: the whole marker"
    )


@pytest.mark.expected_log(r"cannot read big\.img: big\.img was removed while it was read")
async def test_a_large_file_removed_while_read_by_ranges_fails_the_next_read_with_eio(
    tmp_path: Path,
) -> None:
    """What the user does: ``sha256sum big.img`` (or ``cp``) on a large file,
    read by ranges, while another mount or tool removes it.

    What they get: the next ranged GET (If-Match on the version being read)
    answers 404, ``RangeReader._fetch`` (dgfs/fs/readers.py:113-125) lets
    ``NotFound`` through (``_Reported`` turns only IntegrityError/FormatError
    into EIO) and read(2) fails with ENOENT, an errno read(2) never has:
    ``sha256sum: big.img: No such file or directory`` about a file it holds
    open. On a real mount the FUSE layer also logs an ERROR line for each
    such read (the kernel retries them), where a broken object gets one.

    What they should get: the version the handle reads is gone, as when it is
    replaced (docs/SEMANTICS.md: "one replaced while read gives EIO at the
    next read"): EIO."""
    data = random.Random(1).randbytes(3 * MiB)
    memory = MemoryStore()
    await memory.put_bytes("big.img", data, {})
    async with mounted(memory, new_dir(tmp_path / "reader"), RANGED) as m:
        node = await lookup(m.fs, "big.img")
        fh = (await m.fs.open(node.ino, os.O_RDONLY)).fh
        assert await m.fs.read(fh, 0, CHUNK) == data[:CHUNK]
        await memory.delete("big.img")  # another mount's rm
        with pytest.raises(DgfsError) as failed:
            await m.fs.read(fh, 2 * MiB, CHUNK)  # past the first window: a new GET
        await m.fs.release(fh)
    got = errno_of(failed.value)
    assert got == errno.EIO, f"read(2) failed with {errno.errorcode[got]}: {failed.value}"
