"""Reading deep files: their rebuilds' turns (one at a time per directory),
the time limit a read's rebuild has, and spliced forms read in place."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

import dgfs.deep
from dgfs import format as fmt
from dgfs.deep.spans import Span, SplicedForm
from dgfs.format import DeltaMode
from dgfs.store.memory import MemoryStore
from tests.coreharness import deep_core, make_core
from testsupport.releases import write_sdist


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _store(store: MemoryStore, root: Path, paths: list[Path], dirs: list[str]) -> None:
    writer, cache = make_core(store, root, DeltaMode.DEEP)
    try:
        for d in dirs:
            for p in paths:
                await writer.put(p, f"{d}/{p.name}")
    finally:
        await writer.aclose()
        cache.close()


async def _until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(20):
        while not condition():
            await trio.sleep(0.01)


async def test_waiting_for_the_turn_does_not_spend_the_readers_expand_time(
    memory_store: MemoryStore, tmp_path: Path
) -> None:
    """expand_time is the wall time "of rebuilding one deep file when it is
    read" (docs/configuration.md): waiting for its turn behind other rebuilds
    of its directory is not counted. Two others holding the turn 0.6 s each
    (within expand_time=1) once made a third read fail before it had rebuilt
    a byte; a hostile file taking its whole expand_time would fail every read
    queued behind it."""
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    await _store(memory_store, tmp_path / "w", paths, ["app"])
    reader, cache = deep_core(memory_store, tmp_path / "r", seconds=1.0)
    turns = reader.rebuilder._turns
    releases = [trio.Event(), trio.Event()]
    outcome: list[object] = []
    try:
        stored = await reader.locate(f"app/{paths[1].name}")
        assert stored.ref_key and stored.ref_sha256
        ref_key, ref = stored.ref_key, stored.ref_sha256
        turn = f"{ref_key}\0{ref}"

        async def other_rebuild(release: trio.Event) -> None:
            async with reader.rebuilder._turn(ref_key, ref):
                await release.wait()

        async def read() -> None:
            try:
                await reader.get(f"app/{paths[1].name}", tmp_path / "out")
                outcome.append(sha(tmp_path / "out"))
            except Exception as exc:  # noqa: BLE001
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_rebuild, releases[0])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(other_rebuild, releases[1])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(read)
            # The read has downloaded and decoded its form and waits for its turn.
            await _until(lambda: turns.users(turn) == 3, "the read queued")
            await trio.sleep(0.6)
            releases[0].set()
            await trio.sleep(0.6)
            releases[1].set()
    finally:
        await reader.aclose()
        cache.close()
    assert outcome == [sha(paths[1])], f"the read failed: {outcome}"


async def test_a_rebuild_in_one_directory_does_not_hold_up_another_directory(
    memory_store: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow rebuild holds up only its own directory's: two directories whose
    first file is the same (a copied release directory, or one a writer of
    its own directory made on purpose) have references of one SHA-256, and
    once shared a turn: a slow or hostile rebuild in app/ held up every read
    of mirror/."""
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    await _store(memory_store, tmp_path / "w", paths, ["app", "mirror"])
    reader, cache = deep_core(memory_store, tmp_path / "r")
    real = dgfs.deep.rebuild_file
    calls: list[int] = []
    blocked, release = threading.Event(), threading.Event()

    def slow_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:  # app/'s rebuild: slow (a hostile form, or a big one)
            blocked.set()
            release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(dgfs.deep, "rebuild_file", slow_first)
    turns = reader.rebuilder._turns
    try:
        app = await reader.locate(f"app/{paths[1].name}")
        mirror = await reader.locate(f"mirror/{paths[1].name}")
        assert app.ref_key != mirror.ref_key and app.ref_sha256 == mirror.ref_sha256
        turn = f"{app.ref_key}\0{app.ref_sha256}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.get, f"app/{paths[1].name}", tmp_path / "a")
            await _until(blocked.is_set, "app/'s rebuild running")
            nursery.start_soon(reader.get, f"mirror/{paths[1].name}", tmp_path / "m")
            try:
                # Either mirror/'s rebuild starts, or it queues behind app/'s.
                await _until(
                    lambda: len(calls) == 2 or turns.users(turn) == 2,
                    "mirror/'s read rebuilding or queued",
                )
                assert len(calls) == 2, "a read of mirror/ waits for a rebuild in app/"
            finally:
                release.set()
    finally:
        release.set()
        await reader.aclose()
        cache.close()


def test_a_spliced_form_reads_zero_bytes_as_none(tmp_path: Path) -> None:
    """RawIOBase: read(0) / readinto of an empty buffer return nothing, not
    FormatError ("ends early") in the middle of a well-formed form
    (BufferedReader happens to never ask; anything reading the raw form does)."""
    (tmp_path / "cut").write_bytes(b"abcdef")
    (tmp_path / "ref").write_bytes(b"XYZ")
    with open(tmp_path / "cut", "rb") as cut, open(tmp_path / "ref", "rb") as ref:
        form = SplicedForm(cut, ref, [Span(2, 0, 3)], 100)
        assert form.read(0) == b""
        assert form.readinto(bytearray(0)) == 0
        assert form.read() == b"abXYZcdef"


@pytest.mark.expected_log("does not rebuild to it; decoding its delta")
@pytest.mark.parametrize("note", ["delta", "zero-diff that lies"])
async def test_a_slow_download_does_not_spend_the_rebuilds_expand_time(
    memory_store: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, note: str
) -> None:
    """The time limit counts while the read's rebuilds run: a delta body that
    takes 1.2 s to arrive (a cold read over a slow link) with expand_time=1
    once failed as "rebuilding took over 1 s", though rebuilding took
    milliseconds; so did the fallback of a zero-diff note that lies, whose
    first try had started the clock."""
    paths = [write_sdist(tmp_path, v) for v in range(1, 3)]
    await _store(memory_store, tmp_path / "w", paths, ["app"])
    if note != "delta":
        obj = memory_store.objects[f"app/{paths[1].name}.delta"]
        lying = {**obj.metadata, "dg-note": fmt.ZERO_DIFF_NOTE}
        memory_store.objects[f"app/{paths[1].name}.delta"] = dataclasses.replace(
            obj, metadata=lying
        )
    reader, cache = deep_core(memory_store, tmp_path / "r", seconds=1.0)
    download = memory_store.download

    async def slow(key: str, dest: Path):  # type: ignore[no-untyped-def]
        if key.endswith(".delta"):
            await trio.sleep(1.2)
        return await download(key, dest)

    monkeypatch.setattr(memory_store, "download", slow)
    try:
        out = tmp_path / "out"
        await reader.get(f"app/{paths[1].name}", out)
        assert sha(out) == sha(paths[1])
    finally:
        await reader.aclose()
        cache.close()
