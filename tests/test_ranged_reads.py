"""Large files read by ranges (RangeReader, InOrderCheck): every range of
one handle comes from one version of the object (If-Match), so bytes a
reader reads again, after the check or after another writer replaced the
object, are that version's or an error; a read that waited for the one
that failed the check fails too. The first three failed before (bytes
that fail the recorded SHA-256 served with no error)."""

from __future__ import annotations

import hashlib
import random

import trio
import trio.testing

from dgfs.errors import IntegrityError
from dgfs.fs.readers import RangeReader
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore

MiB = 1 << 20
CHUNK = 128 << 10


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _read_all(reader: RangeReader, size: int, order: list[int]) -> tuple[bytes, int]:
    out = bytearray(size)
    failures = 0
    for offset in order:
        try:
            piece = await reader.read(offset, CHUNK)
        except IntegrityError:
            failures += 1
            continue
        out[offset : offset + len(piece)] = piece
    return bytes(out), failures


async def test_rereading_after_the_end_never_serves_an_overwritten_object() -> None:
    """A reader that went through the whole file (checked, good), then seeks
    back and reads it again after another writer overwrote the object (same
    size): it gets bytes failing the handle's recorded SHA-256, never an error."""
    old = random.Random(1).randbytes(3 * MiB)
    new = random.Random(2).randbytes(3 * MiB)
    store = MemoryStore()
    await store.put_bytes("big.bin", old, {})
    reader = RangeReader(store, "big.bin", len(old), _sha(old))
    offsets = list(range(0, len(old), CHUNK))
    first, failures = await _read_all(reader, len(old), offsets)
    assert first == old and failures == 0
    await store.put_bytes("big.bin", new, {})  # another mount overwrote it
    second, failures = await _read_all(reader, len(old), offsets)
    # Either the old bytes again, or an error somewhere: never other bytes silently.
    assert second == old or failures > 0, "served bytes failing the recorded SHA-256, no error"


async def test_rereading_a_checked_prefix_after_an_overwrite_fails() -> None:
    """Within the first pass: 3 of 4 MiB read, the object replaced by one
    whose last 2 MiB are the same, the reader seeks back to 0 and reads the
    whole file. The end check passes (it hashed the old prefix) and the new
    first 2 MiB were served unchecked."""
    old = random.Random(3).randbytes(4 * MiB)
    new = random.Random(4).randbytes(2 * MiB) + old[2 * MiB :]
    store = MemoryStore()
    await store.put_bytes("big.bin", old, {})
    reader = RangeReader(store, "big.bin", len(old), _sha(old))
    offsets = list(range(0, len(old), CHUNK))
    await _read_all(reader, len(old), offsets[: 3 * len(offsets) // 4])  # hashed up to 3 MiB
    await store.put_bytes("big.bin", new, {})
    got, failures = await _read_all(reader, len(old), offsets)
    assert got == old or failures > 0, "served bytes failing the recorded SHA-256, no error"


async def test_a_read_waiting_for_the_failing_one_fails_too() -> None:
    """The docstring of InOrderCheck: a failed check makes every later
    add/raise_if_failed raise. A read waiting on the lock while the completing
    read fails is served anyway."""
    data = random.Random(5).randbytes(4 * MiB)
    served = bytearray(data)
    served[MiB] ^= 1  # tampered: the file fails its SHA-256
    memory = MemoryStore()
    await memory.put_bytes("big.bin", bytes(served), {})
    store = FaultyStore(memory)
    reader = RangeReader(store, "big.bin", len(data), _sha(data))
    n = len(data)
    assert len(await reader.read(0, n - CHUNK)) == n - CHUNK  # one GET: [0, n - CHUNK)
    hold = store.hang("get_range")
    results: dict[str, object] = {}

    async def read(name: str, offset: int) -> None:
        try:
            results[name] = await reader.read(offset, CHUNK)
        except IntegrityError as exc:
            results[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "last", n - CHUNK)  # completes the file: fails
        await hold.reached.wait()
        nursery.start_soon(read, "other", n - 2 * CHUNK)  # in flight meanwhile
        await trio.testing.wait_all_tasks_blocked()
        hold.release()
    assert isinstance(results["last"], IntegrityError)
    assert isinstance(results["other"], IntegrityError), "a read after the failed check was served"


async def test_last_range_first_then_the_rest_is_checked() -> None:
    data = random.Random(6).randbytes(3 * MiB)
    served = bytearray(data)
    served[MiB + 5] ^= 1
    store = MemoryStore()
    await store.put_bytes("big.bin", bytes(served), {})
    reader = RangeReader(store, "big.bin", len(data), _sha(data))
    offsets = list(range(0, len(data), CHUNK))
    order = [offsets[-1], *offsets[:-1]]
    _, failures = await _read_all(reader, len(data), order)
    assert failures >= 1
