"""A directory's reference removed (rmdir, a directory rename, ``dgfs gc``)
while another mount stores a delta against it.

A writer stores its delta, then looks at the reference again and takes the
delta back if the reference is gone (``FileWriter``); whoever removes a
reference lists the directory again once it is gone and puts it back if a
delta appeared (``gc.put_back_if_needed``), never over a reference a
writer made since. Each test here lost an acknowledged file before."""

from __future__ import annotations

import errno
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from dgfs import gc
from dgfs.errors import DgfsError, FsError, NotFound
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from tests.coreharness import make_core
from tests.fsharness import (
    FAST_RETRIES,
    GID,
    RELEASES,
    ROOT,
    UID,
    home,
    lookup,
    mounted,
    write_file,
)

pytestmark = pytest.mark.timeout(60)


async def read_cold(memory: MemoryStore, root: Path, key: str) -> bytes | str:
    """``key`` as a core with an empty cache reads it; the error text if it cannot."""
    reader, cache = make_core(memory, root)
    out = root / "out"
    try:
        await reader.get(key, out)
        return out.read_bytes()
    except (DgfsError, NotFound) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    finally:
        await reader.aclose()
        cache.close()


# --- 1. directory rename vs a NEW file stored into the old directory -------------------


@pytest.mark.expected_log(r"stay under d/")
async def test_a_new_file_stored_during_a_directory_rename_keeps_its_reference(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Mount B renames ``d`` to ``e``: it lists ``d/``, copies every object,
    then deletes the old ones. Meanwhile (after the copies, before the
    deletes) mount A stores a NEW file ``d/new.zip`` as a delta against
    ``d/reference.bin``; its own check (reference still there, same SHA)
    passes and the write is acknowledged. The rename then deletes
    ``d/reference.bin`` because no *listed* delta stayed, and ``d/new.zip``
    can never be rebuilt (docs/SEMANTICS.md promises a version stored
    meanwhile stays "with its directory's reference if it is a delta")."""
    mover, c1 = make_core(memory, tmp_path / "b")
    writer, c2 = make_core(memory, tmp_path / "a")
    src = tmp_path / "src"
    src.write_bytes(RELEASES[0][1])
    await mover.put(src, "d/first.zip")  # the reference + zero-diff delta
    real_delete_many = memory.delete_many
    wrote = False

    async def write_then_delete(keys: list[str], **kwargs: Any) -> list[str]:
        nonlocal wrote
        if not wrote:  # mount A, while B's rename copies the tree
            wrote = True
            new = tmp_path / "new"
            new.write_bytes(RELEASES[1][1])
            result = await writer.put(new, "d/new.zip")
            assert result.stored.stored_key == "d/new.zip.delta"  # acknowledged, as a delta
        return await real_delete_many(keys, **kwargs)

    memory.delete_many = write_then_delete  # type: ignore[method-assign]
    await mover.rename_prefix("d", "e")
    memory.delete_many = real_delete_many  # type: ignore[method-assign]
    for core, cache in ((mover, c1), (writer, c2)):
        await core.aclose()
        cache.close()
    assert "d/new.zip.delta" in memory.objects
    assert await read_cold(memory, tmp_path / "cold", "d/new.zip") == RELEASES[1][1]


# --- 2. rmdir vs a delta stored while it removes the reference ------------------------


async def test_rmdir_never_removes_the_reference_of_a_delta_stored_after_its_listing(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Mount B: ``rm rel/first.zip; rmdir rel``. rmdir lists ``rel/`` (marker
    and reference only) and is about to delete the reference when mount A
    stores ``rel/y.zip`` as a delta against it, checks the reference (still
    there) and acknowledges (fsync returns 0). B's delete used to remove the
    reference with the rest: ``rel/y.zip`` was unreadable. Now rmdir lists
    the directory again once the reference is gone, puts it back and fails
    with ENOTEMPTY (the directory holds A's file)."""
    async with mounted(memory, home(tmp_path, "setup")) as m:
        d = await m.fs.mkdir(ROOT, "rel", 0o755, 0, 0)
        await write_file(m.fs, RELEASES[0][0], RELEASES[0][1], parent=d.ino)
    store_b = FaultyStore(memory)
    async with (
        mounted(memory, home(tmp_path, "a"), FAST_RETRIES) as a,
        mounted(store_b, home(tmp_path, "b"), FAST_RETRIES) as b,
    ):
        rel_b = await lookup(b.fs, "rel")
        rel_a = await lookup(a.fs, "rel")
        await b.fs.unlink(rel_b.ino, RELEASES[0][0])
        held = store_b.hang("delete", key="rel/reference.bin")  # listed, backed up
        outcome: list[int] = []

        async def rmdir_b() -> None:
            try:
                await b.fs.rmdir(ROOT, "rel")
                outcome.append(0)
            except FsError as exc:
                outcome.append(exc.errno)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(rmdir_b)
            await held.reached.wait()
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            handle, _ = await a.fs.create(rel_a.ino, "y.zip", 0o644, 0, 0, flags)
            await a.fs.write(handle.fh, 0, RELEASES[1][1])
            await a.fs.fsync(handle.fh)  # y.zip is in S3: acknowledged
            await a.fs.flush(handle.fh)
            await a.fs.release(handle.fh)
            assert "rel/y.zip.delta" in memory.objects
            held.release()
    assert outcome == [errno.ENOTEMPTY]
    assert await read_cold(memory, tmp_path / "cold", "rel/y.zip") == RELEASES[1][1]
    assert not [k for k in memory.objects if k.startswith(gc.GC_BACKUP_PREFIX)]


# --- 3. gc: restore of a backup clobbers a reference a writer created meanwhile ---------


async def orphan_then_needed(memory: MemoryStore, tmp_path: Path) -> tuple[Any, Any]:
    """``gone/`` held ``x.zip`` (its reference); x.zip was deleted, so gc run 1
    removes the orphaned reference. Just before its delete (after its
    re-list), mount W1 stores ``gone/a.zip`` as a delta against it (W1's check
    passes); the operator interrupts gc during its settle sleep."""
    w1, c1 = make_core(memory, tmp_path / "w1")
    src = tmp_path / "src"
    src.write_bytes(RELEASES[0][1])
    await w1.put(src, "gone/x.zip")
    await w1.delete("gone/x.zip")
    found = await gc.find_garbage(memory)
    assert [g.key for g in found] == ["gone/reference.bin"]
    real_delete = memory.delete
    wrote = False

    async def write_then_delete(key: str, **kwargs: Any) -> None:
        nonlocal wrote
        if key == "gone/reference.bin" and not wrote:
            wrote = True
            a = tmp_path / "a.zip"
            a.write_bytes(RELEASES[1][1])
            result = await w1.put(a, "gone/a.zip")
            assert result.stored.stored_key == "gone/a.zip.delta"
        await real_delete(key, **kwargs)

    memory.delete = write_then_delete  # type: ignore[method-assign]
    return (w1, c1), (found, real_delete)


@pytest.mark.expected_log(r"cannot be read")
async def test_gc_restore_never_overwrites_a_reference_created_since_it_looked(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """gc run 1 is interrupted (Ctrl-C) during its settle sleep, after deleting
    ``gone/reference.bin`` while W1 stored ``gone/a.zip`` against it. gc run 2
    finds ``a.zip.delta`` and no reference: restore-reference. Between its
    listing and the restore, mount W2 stores the new file ``gone/b.zip``: no
    reference there, so it creates one (If-None-Match succeeds) and a
    zero-diff delta; acknowledged. gc's restore then copies the old bytes
    over W2's reference unconditionally: ``b.zip`` (whose bytes were only in
    that reference) is gone for good."""
    (w1, c1), (found, real_delete) = await orphan_then_needed(memory, tmp_path)
    with trio.move_on_after(0.2):  # Ctrl-C during the settle sleep
        await gc.collect(memory, found, settle=10)
    memory.delete = real_delete  # type: ignore[method-assign]
    assert "gone/reference.bin" not in memory.objects
    found2 = await gc.find_garbage(memory)
    restore = [g for g in found2 if g.kind is gc.GarbageKind.RESTORE_REFERENCE]
    assert [g.key for g in restore] == ["gone/reference.bin"]
    # Mount W2 writes a new file into gone/ before gc acts on what it found.
    w2, c2 = make_core(memory, tmp_path / "w2")
    b = tmp_path / "b.zip"
    b.write_bytes(RELEASES[2][1])
    result = await w2.put(b, "gone/b.zip")
    assert result.created_reference
    await gc.collect(memory, found2, settle=0)
    for core, cache in ((w1, c1), (w2, c2)):
        await core.aclose()
        cache.close()
    assert await read_cold(memory, tmp_path / "cold", "gone/b.zip") == RELEASES[2][1]


@pytest.mark.expected_log(r"cannot be read")
async def test_gc_keeps_the_bytes_of_a_reference_deltas_were_stranded_without(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """gc re-lists ``gone/`` (no delta), backs the reference up and deletes
    it; just before the delete W1 stored ``gone/a.zip`` against it (its
    check passed). During gc's settle W2 writes ``gone/b.zip``: no
    reference, so it creates a new one. a.zip needs the old reference,
    which only gc's backup holds: gc used to see a reference at the key,
    restore nothing and later expire the backup (a.zip lost for good). It
    now reports the stranded deltas and keeps the backup past its expiry;
    b.zip reads."""
    (w1, c1), (found, real_delete) = await orphan_then_needed(memory, tmp_path)
    w2, c2 = make_core(memory, tmp_path / "w2")

    async def w2_writes_during_settle() -> None:
        while "gone/a.zip.delta" not in memory.objects or "gone/reference.bin" in memory.objects:
            await trio.sleep(0.01)
        b = tmp_path / "b.zip"
        b.write_bytes(RELEASES[2][1])
        assert (await w2.put(b, "gone/b.zip")).created_reference

    async with trio.open_nursery() as nursery:
        nursery.start_soon(w2_writes_during_settle)
        result = await gc.collect(memory, found, settle=0.5)
    memory.delete = real_delete  # type: ignore[method-assign]
    for core, cache in ((w1, c1), (w2, c2)):
        await core.aclose()
        cache.close()
    assert await read_cold(memory, tmp_path / "cold2", "gone/b.zip") == RELEASES[2][1]
    (failed,) = result.failed
    assert "cannot be read" in failed[1]
    (backup,) = [k for k in memory.objects if k.startswith(gc.GC_BACKUP_PREFIX)]
    later = await gc.find_garbage(memory, now=datetime.now(UTC) + timedelta(days=30))
    assert backup not in [g.key for g in later]


class IgnoresIfNoneMatch(MemoryStore):
    """A store without conditional PUT: ``If-None-Match: *`` is ignored (the
    mount logs it and sets ``conditional_create`` False)."""


@pytest.mark.expected_log(r"cannot be read")
async def test_put_back_never_overwrites_a_reference_made_meanwhile_without_conditional_puts(
    tmp_path: Path,
) -> None:
    """A reference (R1) was removed while a delta was stored against it;
    ``put_back_if_needed`` lists ``d/`` (no reference), then downloads the
    backup to PUT it with ``If-None-Match: *``. Meanwhile writer W2 stores
    ``d/b.zip``: no reference, so it makes R2 and a zero-diff delta, checks
    R2 is there, acknowledges. On a store that ignores If-None-Match the
    put-back overwrote R2 (b.zip lost); it now asks right before its PUT,
    and reports a.zip's deltas stranded instead."""
    store = IgnoresIfNoneMatch()
    w1, c1 = make_core(store, tmp_path / "w1")
    w2, c2 = make_core(store, tmp_path / "w2")
    w1.conditional_create = w2.conditional_create = False
    src = tmp_path / "a.zip"
    src.write_bytes(RELEASES[0][1])
    await w1.put(src, "d/a.zip")  # R1 + zero-diff delta: a.zip needs R1
    now = datetime.now(UTC)
    backup = await gc.remove_with_backup(store, "d/reference.bin", now + gc.DEFAULT_BACKUP_TTL, now)
    assert backup is not None
    real_download = store.download
    wrote = False

    async def w2_writes_then_download(key: str, dest: Path) -> Any:
        nonlocal wrote
        if key == backup and not wrote:  # after put_back's LIST, before its PUT
            wrote = True
            b = tmp_path / "b.zip"
            b.write_bytes(RELEASES[2][1])
            result = await w2.put(b, "d/b.zip")
            assert result.stored.stored_key == "d/b.zip.delta"  # acknowledged
        return await real_download(key, dest)

    store.download = w2_writes_then_download  # type: ignore[method-assign]
    outcome = await gc.put_back_if_needed(store, "d/reference.bin", backup)
    store.download = real_download  # type: ignore[method-assign]
    for core, cache in ((w1, c1), (w2, c2)):
        await core.aclose()
        cache.close()
    assert wrote
    assert outcome is gc.PutBack.STRANDED
    assert await read_cold(store, tmp_path / "cold", "d/b.zip") == RELEASES[2][1]


async def test_rmdir_whose_orphaned_reference_another_mount_just_removed_removes_the_directory(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """``rel/`` holds its marker and an orphaned reference. Mount B's rmdir
    lists it (HEADs the reference: DeltaGlider's, removable); before B
    removes it, another mount's rmdir or ``dgfs gc`` removes the reference.
    B's backup then finds it gone: that is no failure, the directory goes."""
    async with mounted(memory, home(tmp_path, "setup")) as m:
        d = await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        await write_file(m.fs, RELEASES[0][0], RELEASES[0][1], parent=d.ino)
        await m.fs.wait_idle()
        await m.fs.unlink(d.ino, RELEASES[0][0])
    assert "rel/reference.bin" in memory.objects
    store_b = FaultyStore(memory)
    heads = 0
    real_head = store_b.head

    async def head(key: str) -> Any:
        nonlocal heads
        if key == "rel/reference.bin":
            heads += 1
            if heads == 2:  # after dir_leftovers' HEAD: another mount's gc removes it
                await memory.delete(key)
        return await real_head(key)

    store_b.head = head  # type: ignore[method-assign]
    async with mounted(store_b, home(tmp_path, "b"), FAST_RETRIES) as b:
        await lookup(b.fs, "rel")
        err: object = None
        try:
            await b.fs.rmdir(ROOT, "rel")
        except (FsError, DgfsError) as exc:
            err = exc
    assert err is None
    assert "rel/" not in memory.objects
