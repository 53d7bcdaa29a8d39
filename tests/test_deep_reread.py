"""Reading deep files again and by a detour: the same bytes whatever the
memos of rebuilt subtrees hold, and the time limit of a zero-diff read that
falls back to decoding its delta."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from dgfs import format as fmt
from dgfs.deep import recompress, spans
from dgfs.deep.segments import MAGIC, TAG_DEFLATE, TAG_END, TAG_RAW, varint
from dgfs.format import DeltaMode
from dgfs.store.memory import MemoryStore
from tests.coreharness import deep_core, make_core
from testsupport.releases import write_sdist


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raw(data: bytes) -> bytes:
    return bytes((TAG_RAW,)) + varint(len(data)) + data


def test_a_form_rebuilds_to_the_same_bytes_whatever_the_memo_holds(tmp_path: Path) -> None:
    """docs/FORMAT.md allows DEFLATE level 0, whose stored blocks depend on
    how the input is cut into compress() calls: a subtree found in a memo
    reaches its parent in the pieces a rebuild gives (FROM_REFERENCE once
    joined them, and a level-0 DEFLATE around a small one, read a second
    time in one process, rebuilt to other bytes and failed its SHA-256)."""
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta"]
    text = " ".join(rng.choice(words) + str(rng.randrange(999)) for _ in range(120_000)).encode()
    inner = bytes((TAG_DEFLATE, 6, 8, 15, 0)) + _raw(text[:600_000]) + bytes((TAG_END,))
    outer = (
        bytes((TAG_DEFLATE, 0, 8, 15, 0))
        + _raw(b"x" * 1000)
        + inner
        + b"".join(_raw(rng.randbytes(1 << 20)) for _ in range(4))  # past PARALLEL_PAYLOAD
        + bytes((TAG_END,))
    )
    form = tmp_path / "form.dgx"
    form.write_bytes(MAGIC + outer + bytes((TAG_END,)))
    recompress.FROM_REFERENCE.clear()
    recompress.REBUILT_SUBTREES.clear()
    try:
        written, _ = recompress.rebuild_digest(form, tmp_path)  # the writer's check: no memo
        in_reference = spans.InReference(sha(form))  # the zero-diff read: the form is the reference
        got = [
            recompress.rebuild_file(form, tmp_path / "out", tmp_path, 2, in_reference=in_reference)[
                0
            ]
            for _ in range(2)
        ]
    finally:
        recompress.FROM_REFERENCE.clear()
        recompress.REBUILT_SUBTREES.clear()
    assert got == [written, written], "the same form rebuilt to other bytes once the memo was warm"


async def _lying_store(store: MemoryStore, root: Path) -> list[Path]:
    """pkg-1 and pkg-2 stored deep under app/, pkg-2's delta noted as zero-diff."""
    paths = [write_sdist(root, v) for v in range(1, 3)]
    writer, cache = make_core(store, root / "w", DeltaMode.DEEP)
    try:
        for p in paths:
            await writer.put(p, f"app/{p.name}")
    finally:
        await writer.aclose()
        cache.close()
    key = f"app/{paths[1].name}.delta"
    obj = store.objects[key]
    lying = {**obj.metadata, "dg-note": fmt.ZERO_DIFF_NOTE}
    store.objects[key] = dataclasses.replace(obj, metadata=lying)
    return paths


@pytest.mark.expected_log("does not rebuild to it; decoding its delta")
async def test_the_fallbacks_wait_for_its_turn_does_not_spend_expand_time(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """expand_time counts while the read's rebuilds run: when a zero-diff
    note lies, the fallback queues again for its directory's turn, behind
    another read's rebuild (1.2 s here), which is not counted (the slow
    download's case is in tests/test_deep_reads.py)."""
    paths = await _lying_store(memory_store, tmp_path)
    reader, cache = deep_core(memory_store, tmp_path / "r", seconds=1.0)
    rebuilder = reader.rebuilder
    real = rebuilder._rebuilt_from_reference
    outcome: list[object] = []
    try:
        async with trio.open_nursery() as nursery:

            async def other_rebuild(ref_key: str, ref: str) -> None:
                async with rebuilder._turn(ref_key, ref):
                    await trio.sleep(1.2)

            async def shortcut(stored, out, deadline):  # type: ignore[no-untyped-def]
                done = await real(stored, out, deadline)
                # Another read of the directory takes the turn meanwhile.
                nursery.start_soon(other_rebuild, stored.ref_key, stored.ref_sha256)
                await trio.testing.wait_all_tasks_blocked()
                return done

            rebuilder._rebuilt_from_reference = shortcut  # type: ignore[method-assign]
            try:
                await reader.get(f"app/{paths[1].name}", tmp_path / "out")
                outcome.append(sha(tmp_path / "out"))
            except Exception as exc:  # noqa: BLE001
                outcome.append(exc)
    finally:
        await reader.aclose()
        cache.close()
    assert outcome == [sha(paths[1])], f"the read failed: {outcome}"
