"""The first write into a stored file copies its content into a staging file
(copy-up); every later write, read of the handle and the upload work on that
copy. Each way the content arrives is checked: through the encrypted cache,
a verified whole download (foreign objects, large direct files) and a cache
entry found corrupt and fetched again."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from dgfs.cache import HEADER_SIZE
from dgfs.fs.filesystem import FileSystem
from dgfs.store.memory import MemoryStore
from tests.fsharness import RANGED, home, lookup, mounted, read_file, write_file

pytestmark = pytest.mark.timeout(60)

#: notes.txt after ``echo second line >> notes.txt``.
APPENDED = b"first line\nsecond line\n"


async def _append(fs: FileSystem, name: str, data: bytes) -> None:
    """``echo data >> name``: open O_APPEND, one write at the end, close."""
    node = await lookup(fs, name)
    handle = await fs.open(node.ino, os.O_WRONLY | os.O_APPEND)
    await fs.write(handle.fh, node.size, data)
    await fs.flush(handle.fh)
    await fs.release(handle.fh)


async def test_appending_to_a_file_another_tool_wrote_keeps_its_bytes(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """A foreign object (no DeltaGlider metadata: written by s3fs, rclone,
    the aws CLI) is downloaded whole, verified, and moved into the staging
    file's place. The descriptor writes went to used to be opened before,
    on the empty file that move replaced: reads showed zeros before the new
    bytes, and the upload stored the old content (the write was lost)."""
    await memory.put_bytes("notes.txt", b"first line\n", {})
    async with mounted(memory, home(tmp_path, "a")) as m:
        await _append(m.fs, "notes.txt", b"second line\n")
        got = await read_file(m.fs, "notes.txt")
        await m.fs.wait_idle()
    assert (got, memory.objects["notes.txt"].body) == (APPENDED, APPENDED)


@pytest.mark.parametrize("hashed", [True, False], ids=["with-sha256", "foreign"])
async def test_writing_into_a_large_direct_file_keeps_the_rest_of_its_bytes(
    memory: MemoryStore, tmp_path: Path, hashed: bool
) -> None:
    """A file read by ranges (over verify_whole_below), stored whole by dgfs
    or by another tool: one byte written at offset 0 of a 3 MiB file."""
    data = os.urandom(3 << 20)
    meta = {"dg-file-sha256": hashlib.sha256(data).hexdigest()} if hashed else {}
    await memory.put_bytes("big.bin", data, meta)
    async with mounted(memory, home(tmp_path, "a"), RANGED) as m:
        node = await lookup(m.fs, "big.bin")
        handle = await m.fs.open(node.ino, os.O_RDWR)
        try:
            assert await m.fs.write(handle.fh, 0, b"X") == 1
            got = await m.fs.read(handle.fh, 0, len(data) + 1)
        finally:
            await m.fs.flush(handle.fh)
            await m.fs.release(handle.fh)
        await m.fs.wait_idle()
    want = b"X" + data[1:]
    assert (got == want, memory.objects["big.bin"].body == want) == (True, True)


@pytest.mark.expected_log(r"is corrupt")
async def test_appending_to_a_file_whose_cache_entry_is_corrupt_keeps_its_bytes(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Through the cache: the export finds the entry corrupt, removes its
    output, fetches the object again and exports it into a new file at the
    staging file's path."""
    async with mounted(memory, home(tmp_path, "a")) as m:
        await write_file(m.fs, "notes.txt", b"first line\n")
        await m.fs.wait_idle()
        assert await read_file(m.fs, "notes.txt") == b"first line\n"  # now cached
        cache_dir = m.fs.core.cache.directory
        (entry,) = [p for p in cache_dir.iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name)]
        with open(entry, "r+b") as f:  # one bit of the first chunk flipped
            f.seek(HEADER_SIZE)
            byte = f.read(1)
            f.seek(HEADER_SIZE)
            f.write(bytes([byte[0] ^ 1]))
        await _append(m.fs, "notes.txt", b"second line\n")
        got = await read_file(m.fs, "notes.txt")
        await m.fs.wait_idle()
    assert (got, memory.objects["notes.txt"].body) == (APPENDED, APPENDED)
