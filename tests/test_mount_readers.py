"""The readers behind open files of a mount, driven directly (no kernel).

The kernel reads ahead with several requests at once and they reach the
filesystem in any order; a large direct file read front to back must still
be checked against its SHA-256, and a failed check must stick, because the
kernel retries a failed read-ahead page with a read of its own.
"""

from __future__ import annotations

import random

import pytest

from dgfs.errors import IntegrityError
from dgfs.fs.readers import RangeReader
from dgfs.store.memory import MemoryStore
from tests.mountutil import sha256_bytes


def _shuffled_reads(size: int, chunk: int, seed: int) -> list[int]:
    """Offsets of consecutive chunks, each group of four reordered like concurrent reads."""
    offsets = list(range(0, size, chunk))
    rng = random.Random(seed)
    for start in range(0, len(offsets), 4):
        group = offsets[start : start + 4]
        rng.shuffle(group)
        offsets[start : start + 4] = group
    return offsets


@pytest.mark.parametrize("tampered", [False, True], ids=["intact", "tampered"])
async def test_range_reader_verifies_out_of_order_reads(tampered: bool) -> None:
    data = random.Random(17).randbytes(3 << 20)
    served = bytearray(data)
    if tampered:
        served[2 << 20] ^= 1
    store = MemoryStore()
    await store.put_bytes("big.bin", bytes(served), {})
    reader = RangeReader(store, "big.bin", len(data), sha256_bytes(data))
    chunk = 128 << 10
    failures = 0
    for offset in _shuffled_reads(len(data), chunk, seed=1):
        try:
            assert await reader.read(offset, chunk) == bytes(served[offset : offset + chunk])
        except IntegrityError:
            failures += 1
    assert failures == (1 if tampered else 0)
    if tampered:
        # The kernel retries a failed read-ahead page: it must fail again.
        with pytest.raises(IntegrityError):
            await reader.read(len(data) - chunk, chunk)
    else:
        assert await reader.read(0, 10) == data[:10]
