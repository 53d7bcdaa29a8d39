"""Two machines, one name: two in-process mounts of one bucket, interleaved.

Each test runs two ``FileSystem`` mounts (tests/fsharness.py's
``mounted``), each through its own ``FaultyStore`` over one shared
``MemoryStore``, and holds one mount's upload at a chosen point while the
other acts. Whatever the interleaving, one of the two versions survives
and reads back exactly — never neither, never bytes nobody wrote
(docs/SEMANTICS.md, "Several writers, several mounts").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from dgfs import format as fmt
from dgfs.errors import DgfsError, FsError, NotFound
from dgfs.store import memory as memory_module
from dgfs.store.faulty import Fault, FaultyStore
from dgfs.store.memory import MemoryStore
from tests.fsharness import (
    FAST_RETRIES,
    GID,
    RELEASES,
    ROOT,
    UID,
    Mount,
    close,
    create,
    home,
    lookup,
    mounted,
    read_file,
    read_fresh,
    write_file,
)

pytestmark = pytest.mark.timeout(60)

SMALL = b"a small file of that name, stored whole\n"  # under 64 KiB: direct


async def with_reference(memory: MemoryStore, tmp_path: Path) -> None:
    """Directory ``rel`` holding the first release (its reference)."""
    async with mounted(memory, home(tmp_path, "setup")) as m:
        d = await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        await write_file(m.fs, RELEASES[0][0], RELEASES[0][1], parent=d.ino)


@dataclass
class OneNameTwoForms:
    """Mount ``a`` writes ``rel/x.zip`` as a delta, mount ``b`` the same
    name small enough to go whole; ``first`` (the ``held`` one) stops after
    storing its form, before removing the other's, until ``gate`` lets it go."""

    a: Mount
    b: Mount
    first: Mount
    second: Mount
    first_store: FaultyStore
    gate: Fault

    async def create(self) -> tuple[int, int]:
        """Both files created and written, left open: the handles of ``first`` and ``second``."""
        fh_a = await create(
            self.a.fs, "x.zip", RELEASES[1][1], (await lookup(self.a.fs, "rel")).ino
        )
        fh_b = await create(self.b.fs, "x.zip", SMALL, (await lookup(self.b.fs, "rel")).ino)
        return (fh_a, fh_b) if self.first is self.a else (fh_b, fh_a)


@contextlib.asynccontextmanager
async def one_name_two_forms(
    memory: MemoryStore, tmp_path: Path, held: str
) -> AsyncIterator[OneNameTwoForms]:
    await with_reference(memory, tmp_path)
    store_a, store_b = FaultyStore(memory), FaultyStore(memory)
    first_store, form = (store_a, "rel/x.zip.delta") if held == "a" else (store_b, "rel/x.zip")
    gate = first_store.hang("upload", key=form, after=True)
    async with (
        mounted(store_a, home(tmp_path, "a"), FAST_RETRIES) as a,
        mounted(store_b, home(tmp_path, "b"), FAST_RETRIES) as b,
    ):
        first, second = (a, b) if held == "a" else (b, a)
        yield OneNameTwoForms(a, b, first, second, first_store, gate)
    assert await read_fresh(memory, tmp_path, "rel/x.zip") in (RELEASES[1][1], SMALL)


@pytest.mark.parametrize("held", ["a", "b"], ids=["delta-writer", "direct-writer"])
async def test_one_name_stored_as_a_delta_and_as_a_whole_file_at_once_keeps_one(
    memory: MemoryStore, tmp_path: Path, held: str
) -> None:
    """Mount A stores ``rel/x.zip`` as a delta, mount B a small file of the
    same name whole. Each removed the other's form after storing its own,
    so when the two overlapped both were gone. The one held here has stored
    its object and not yet removed the other form."""
    async with one_name_two_forms(memory, tmp_path, held) as race:
        fh_first, fh_second = await race.create()
        await close(race.first.fs, fh_first)
        await close(race.second.fs, fh_second)
        await race.gate.reached.wait()
        await race.second.fs.wait_idle()  # the other stored and cleaned up fully
        race.gate.release()
        await race.first.fs.wait_idle()


@pytest.mark.parametrize("held", ["a", "b"], ids=["delta-writer", "direct-writer"])
async def test_an_fsync_across_a_lost_race_with_another_writer_waits_for_the_redo(
    memory: MemoryStore, tmp_path: Path, held: str
) -> None:
    """As above, but the held writer fsyncs its open file. Losing the race
    (the other mount removed its form) is no failure of the store: the
    upload is redone at once, and fsync returns once that redo is stored.
    It returned EIO (the real-mount test saw it), and the mount logged an
    error, though nothing had failed and nothing was lost."""
    async with one_name_two_forms(memory, tmp_path, held) as race:
        fh_first, fh_second = await race.create()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(race.first.fs.fsync, fh_first)
            await race.gate.reached.wait()
            await race.second.fs.fsync(fh_second)  # stored its form, removed ours
            race.gate.release()
        assert race.first_store.count("upload", race.gate.key) == 2  # redone once
        assert race.first.fs.uploads.counts().pending == 0  # fsync returned once stored
        await close(race.first.fs, fh_first)
        await close(race.second.fs, fh_second)


async def test_a_delta_whose_reference_an_rmdir_removed_meanwhile_is_stored_again(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Mount B removes ``rel`` (it lists empty: its only file was deleted,
    the reference stays until the directory goes) while mount A encodes a
    new file's delta against that reference. The delta pointed at a
    deleted reference: the file was lost though A's close() returned."""
    await with_reference(memory, tmp_path)
    store_a = FaultyStore(memory)
    gate = store_a.hang("upload", key="rel/y.zip.delta")  # encoded, not stored yet
    async with (
        mounted(store_a, home(tmp_path, "a"), FAST_RETRIES) as a,
        mounted(memory, home(tmp_path, "b"), FAST_RETRIES) as b,
    ):
        await b.fs.unlink((await lookup(b.fs, "rel")).ino, RELEASES[0][0])
        await write_file(a.fs, "y.zip", RELEASES[1][1], parent=(await lookup(a.fs, "rel")).ino)
        await gate.reached.wait()
        await b.fs.rmdir(ROOT, "rel")
        assert "rel/reference.bin" not in memory.objects
        gate.release()
        await a.fs.wait_idle()
    assert await read_fresh(memory, tmp_path, "rel/y.zip") == RELEASES[1][1]


async def test_the_loser_of_a_reference_race_without_conditional_puts_is_stored_again(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """A store without If-None-Match: mount B finds no reference and starts
    storing its file as one; meanwhile mount A does the same, stores its
    reference and its zero-diff delta; then B's reference overwrites A's.
    A's delta could not be rebuilt any more."""
    async with mounted(memory, home(tmp_path, "setup")) as m:
        await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
    store_a, store_b = FaultyStore(memory), FaultyStore(memory)
    b_ref = store_b.hang("upload", key="rel/reference.bin")  # B saw none; PUT held
    a_delta = store_a.hang("upload", key="rel/a.zip.delta", after=True)
    async with (
        mounted(store_a, home(tmp_path, "a"), FAST_RETRIES) as a,
        mounted(store_b, home(tmp_path, "b"), FAST_RETRIES) as b,
        trio.open_nursery() as nursery,
    ):
        a.fs.core.conditional_create = b.fs.core.conditional_create = False
        da, db = await lookup(a.fs, "rel"), await lookup(b.fs, "rel")
        await write_file(b.fs, "b.zip", RELEASES[2][1], parent=db.ino)
        await b_ref.reached.wait()
        await write_file(a.fs, "a.zip", RELEASES[1][1], parent=da.ino)
        await a_delta.reached.wait()  # A's reference and delta are stored
        b_ref.release()
        nursery.start_soon(b.fs.wait_idle)
        await store_b.wait_calls("upload", 2)  # B's reference and its delta
        a_delta.release()
        await a.fs.wait_idle()
    for name, data in (("a.zip", RELEASES[1][1]), ("b.zip", RELEASES[2][1])):
        try:
            assert await read_fresh(memory, tmp_path, f"rel/{name}") == data
        except DgfsError as exc:
            pytest.fail(f"rel/{name} is unreadable: {exc}")


class _OneSecond:
    """``datetime`` for the memory store: every write in the same second, as
    stores with whole-second Last-Modified (moto, S3 itself) show them."""

    @staticmethod
    def now(tz: object = None) -> datetime:
        return datetime(2030, 1, 1, tzinfo=UTC)


async def test_a_file_stored_whole_within_the_second_of_its_delta_replaces_it(
    memory: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One mount: a delta, then the same file truncated below the delta size
    and stored whole within the same second. The delta's Last-Modified ties
    with the new object's, and a tie kept the delta (the form listings show
    on a tie): the truncated file's bytes were in S3 but the old version
    showed (found by tests/test_mount_basic.py on moto)."""
    monkeypatch.setattr(memory_module, "datetime", _OneSecond)
    await with_reference(memory, tmp_path)
    async with mounted(memory, home(tmp_path, "a"), FAST_RETRIES) as a:
        rel = await lookup(a.fs, "rel")
        await write_file(a.fs, "x.zip", RELEASES[1][1], parent=rel.ino)
        await a.fs.wait_idle()
        assert "rel/x.zip.delta" in memory.objects
        node = await lookup(a.fs, "x.zip", rel.ino)
        await a.fs.setattr(node.ino, size=1000)
        await a.fs.wait_idle()
    assert "rel/x.zip.delta" not in memory.objects
    assert await read_fresh(memory, tmp_path, "rel/x.zip") == RELEASES[1][1][:1000]


async def test_a_symlink_renamed_over_a_delta_replaces_it(
    memory: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mv link file.zip`` where file.zip is a delta: the symlink's object
    took the name, the delta stayed beside it, and within the same second
    the listing showed the delta (found by the real-mount model, seed 107)."""
    monkeypatch.setattr(memory_module, "datetime", _OneSecond)
    await with_reference(memory, tmp_path)
    async with mounted(memory, home(tmp_path, "a"), FAST_RETRIES) as a:
        rel = await lookup(a.fs, "rel")
        await write_file(a.fs, "x.zip", RELEASES[1][1], parent=rel.ino)
        await a.fs.wait_idle()
        assert "rel/x.zip.delta" in memory.objects
        await a.fs.symlink(rel.ino, "link", b"elsewhere", UID, GID)
        await a.fs.rename(rel.ino, "link", rel.ino, "x.zip", 0)
    assert "rel/x.zip.delta" not in memory.objects
    async with mounted(memory, home(tmp_path, "reader")) as m:
        rel = await lookup(m.fs, "rel")
        node = await lookup(m.fs, "x.zip", rel.ino)
        assert await m.fs.readlink(node.ino) == b"elsewhere"


async def test_a_reference_replaced_between_its_head_and_its_download_is_used_as_it_is_now(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """A mount HEADs the directory's reference, then downloads it to encode
    against; meanwhile another mount's directory rename put another
    reference there. The download failed its SHA-256 check, and the upload
    waited for a retry with a warning (before that fix: went to failed/).
    Now the put looks at the directory again at once (found by the
    real-mount model, seed 512)."""
    await with_reference(memory, tmp_path)
    store_b = FaultyStore(memory)
    held = store_b.hang("download", key="rel/reference.bin")
    async with mounted(store_b, home(tmp_path, "b"), FAST_RETRIES) as b:
        rel = await lookup(b.fs, "rel")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_file, b.fs, "y.zip", RELEASES[1][1], rel.ino)
            await held.reached.wait()
            other, other_data = RELEASES[2]
            sha = hashlib.sha256(other_data).hexdigest()
            meta = fmt.reference_metadata(other, sha, datetime.now(UTC))
            await memory.put_bytes("rel/reference.bin", other_data, meta)
            held.release()
        await b.fs.wait_idle()
    assert await read_fresh(memory, tmp_path, "rel/y.zip") == RELEASES[1][1]


async def _what_a_reads_after_b_stored_over_its_delta(
    memory: MemoryStore, tmp_path: Path, new: bytes
) -> bytes:
    """Mount A stores ``rel/x.zip`` as a delta and keeps knowing it; mount B
    then stores ``new`` under the name. What A's next open (within
    listing_ttl) reads."""
    await with_reference(memory, tmp_path)
    async with (
        mounted(memory, home(tmp_path, "a"), FAST_RETRIES) as a,
        mounted(memory, home(tmp_path, "b"), FAST_RETRIES) as b,
    ):
        da, db = await lookup(a.fs, "rel"), await lookup(b.fs, "rel")
        await write_file(a.fs, "x.zip", RELEASES[1][1], parent=da.ino)
        await a.fs.wait_idle()
        assert "rel/x.zip.delta" in memory.objects
        await write_file(b.fs, "x.zip", new, parent=db.ino)
        await b.fs.wait_idle()
        return await read_file(a.fs, "x.zip", da.ino)


async def test_a_delta_the_other_mount_overwrote_in_the_same_form_reads_its_new_version(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """B stores other bytes as a delta too (the same key, rel/x.zip.delta).
    A's open checked the new object's bytes against the old version's
    SHA-256 and size, logged it as broken and gave EIO until the listing
    expired. Now a failed check asks a fresh listing whether the object
    changed, and reads the new version."""
    assert (
        await _what_a_reads_after_b_stored_over_its_delta(memory, tmp_path, RELEASES[2][1])
        == RELEASES[2][1]
    )
    assert "rel/x.zip.delta" in memory.objects


async def test_a_small_direct_file_the_other_mount_overwrote_reads_its_new_version(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """The same with a small file stored whole (read whole through the cache)."""
    async with (
        mounted(memory, home(tmp_path, "a"), FAST_RETRIES) as a,
        mounted(memory, home(tmp_path, "b"), FAST_RETRIES) as b,
    ):
        await write_file(a.fs, "notes.txt", b"version one\n")
        await a.fs.wait_idle()
        await lookup(b.fs, "notes.txt")
        await write_file(b.fs, "notes.txt", b"version two, longer\n")
        await b.fs.wait_idle()
        assert await read_file(a.fs, "notes.txt") == b"version two, longer\n"


async def test_a_file_the_other_mount_stored_in_its_other_form_reads_its_new_version(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """B stores the name whole, which removes the delta. A's next open went
    to the delta it remembered and failed ("not found", ENOENT and an ERROR
    line on every read) until its listing expired; now it reads B's version."""
    assert await _what_a_reads_after_b_stored_over_its_delta(memory, tmp_path, SMALL) == SMALL
    assert "rel/x.zip.delta" not in memory.objects


async def test_a_metadata_update_never_gives_another_writers_new_version_the_old_hash(
    memory: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chmod (or a same-size truncate) reads the object's metadata, then copies
    it onto itself with the change. Another mount that stores a new version
    in between must keep its own dg-file-sha256: the copy is made only while
    the object is the version read, else read again (before: EIO for good)."""
    from tests.coreharness import make_core

    core, cache = make_core(memory, tmp_path)
    src = tmp_path / "v"
    src.write_bytes(b"version one\n" * 10)
    await core.put(src, "f")
    renamer = core.renamer
    real_locate = renamer._forms.locate_with_head
    rewritten = False

    async def locate_then_rewrite(key: str) -> object:
        nonlocal rewritten
        found = await real_locate(key)
        if not rewritten:  # another mount stores version two right after the read
            rewritten = True
            src.write_bytes(b"version two, longer\n" * 10)
            await core.put(src, "f")
        return found

    monkeypatch.setattr(renamer._forms, "locate_with_head", locate_then_rewrite)
    await core.update_metadata("f", {"mode": "33152"})
    out = tmp_path / "out"
    await core.get("f", out)
    assert out.read_bytes() == b"version two, longer\n" * 10
    assert memory.objects["f"].metadata["mode"] == "33152"
    await core.aclose()
    cache.close()


VERSIONS = {
    # Text under make_core's 1 KiB: stored whole; zips: deltas against a reference.
    "direct": ("f.txt", "g.txt", b"version one\n" * 10, b"version two, longer\n" * 10),
    "delta": ("f.zip", "g.zip", RELEASES[1][1], RELEASES[2][1]),
}


StoredOutcome = dict[str, bytes | None]  # key -> its bytes, None: no such file


async def read_cold(memory: MemoryStore, tmp_path: Path, keys: list[str]) -> StoredOutcome:
    """What each of ``keys`` reads as through a core with nothing cached (a
    delta whose reference went, or whose metadata lies, fails here)."""
    from tests.coreharness import make_core

    reader, cache = make_core(memory, tmp_path / "cold-reader")
    outcome: StoredOutcome = {}
    for key in keys:
        out = tmp_path / "cold-out"
        try:
            await reader.get(key, out)
            outcome[key] = out.read_bytes()
        except NotFound:
            outcome[key] = None
    await reader.aclose()
    cache.close()
    return outcome


async def renamed_racing_a_rewrite(
    memory: MemoryStore, tmp_path: Path, kind: str, rewrite_after: str
) -> tuple[bytes, bytes, bytes | None]:
    """Rename ``d/f`` to ``d/g`` while another writer stores version two of
    ``d/f`` right after the rename's ``rewrite_after`` step ("read" or "copy");
    returns both versions and what ``d/f`` holds afterwards (None: gone)."""
    from tests.coreharness import make_core

    src_name, dst_name, one, two = VERSIONS[kind]
    core, cache = make_core(memory, tmp_path)
    src = tmp_path / src_name
    src.write_bytes(RELEASES[0][1])
    await core.put(src, "d/first.zip")  # the directory's reference
    src.write_bytes(one)
    await core.put(src, f"d/{src_name}")
    done = False

    async def rewrite() -> None:
        nonlocal done
        if not done:  # another mount stores version two, once
            done = True
            src.write_bytes(two)
            await core.put(src, f"d/{src_name}")

    renamer = core.renamer
    if rewrite_after == "read":
        real_locate = renamer._forms.locate_with_head

        async def locate_then_rewrite(key: str) -> object:
            found = await real_locate(key)
            await rewrite()
            return found

        renamer._forms.locate_with_head = locate_then_rewrite  # type: ignore[method-assign]
    else:
        real_copy = memory.copy_object

        async def copy_then_rewrite(src_key: str, dst_key: str, request: object) -> str:
            etag = await real_copy(src_key, dst_key, request)  # type: ignore[arg-type]
            await rewrite()
            return etag

        memory.copy_object = copy_then_rewrite  # type: ignore[method-assign]
    await core.rename(f"d/{src_name}", f"d/{dst_name}")
    await core.aclose()
    cache.close()
    outcome = await read_cold(memory, tmp_path, [f"d/{dst_name}", f"d/{src_name}"])
    renamed = outcome[f"d/{dst_name}"]
    assert renamed is not None
    return renamed, two, outcome[f"d/{src_name}"]


@pytest.mark.parametrize("kind", VERSIONS)
async def test_a_rename_never_gives_another_writers_new_version_the_old_hash(
    memory: MemoryStore, tmp_path: Path, kind: str
) -> None:
    """A rename reads the file's metadata, copies it to the new name with the
    name changed, then removes the old. Another mount storing a new version
    between the read and the copy: the copy carried the old dg-file-sha256
    onto the new bytes (every read of the renamed file failed: EIO for
    good). Now the copy is made only while the file is the version read,
    else it is read again: the new name holds version two, whole."""
    renamed, two, left = await renamed_racing_a_rewrite(memory, tmp_path, kind, "read")
    assert renamed == two
    assert left is None


@pytest.mark.expected_log("stored a new version while it was renamed .* it stays")
@pytest.mark.parametrize("kind", VERSIONS)
async def test_a_version_stored_during_a_rename_stays_under_the_old_name(
    memory: MemoryStore, tmp_path: Path, kind: str
) -> None:
    """Another mount stores a new version after the rename's copy, before its
    delete: the delete removed it (an acknowledged write gone). Now the old
    name is deleted only while it is the version copied, so version two
    stays under it, as if stored just after the rename."""
    renamed, two, left = await renamed_racing_a_rewrite(memory, tmp_path, kind, "copy")
    assert renamed == VERSIONS[kind][2]
    assert left == two


async def removed_racing_a_rewrite(
    memory: MemoryStore, tmp_path: Path, remove: str, name: str = "f.txt"
) -> tuple[bytes, bytes, StoredOutcome]:
    """Remove ``d/<name>`` (``remove``: "file", an rm; "dir", ``d`` renamed to
    ``e``) while another writer stores version two of it just before the
    removal's first delete; returns both versions and what each name holds
    (a ``.zip`` is a delta against the directory's reference)."""
    from tests.coreharness import make_core

    core, cache = make_core(memory, tmp_path)
    src = tmp_path / name
    one, two = (
        (RELEASES[1][1], RELEASES[2][1])
        if name.endswith(".zip")
        else (b"version one\n", b"version two, stored meanwhile\n")
    )
    src.write_bytes(RELEASES[0][1])
    await core.put(src, "d/first.zip")  # the directory's reference
    src.write_bytes(one)
    await core.put(src, f"d/{name}")
    src.write_bytes(b"other\n")
    await core.put(src, "d/other.txt")
    real_delete_many = memory.delete_many
    rewritten = False

    async def rewrite_then_delete(keys: list[str], **kwargs: Any) -> list[str]:
        nonlocal rewritten
        if not rewritten:  # another mount, after the removal read it
            rewritten = True
            src.write_bytes(two)
            await core.put(src, f"d/{name}")
        return await real_delete_many(keys, **kwargs)

    memory.delete_many = rewrite_then_delete  # type: ignore[method-assign]
    if remove == "file":
        await core.delete("d/f.txt")
    else:
        await core.rename_prefix("d", "e")
    memory.delete_many = real_delete_many  # type: ignore[method-assign]
    await core.aclose()
    cache.close()
    keys = [f"d/{name}", f"e/{name}", "d/other.txt", "e/other.txt"]
    return one, two, await read_cold(memory, tmp_path, keys)


@pytest.mark.expected_log("stored .* meanwhile; it stays")
async def test_a_version_stored_during_an_rm_stays(memory: MemoryStore, tmp_path: Path) -> None:
    """rm HEADs the file's forms, then deletes them: another mount's new
    version stored in between was deleted with them (an acknowledged write
    gone). Now only the versions read go; the new one stays, as if stored
    after the rm."""
    _, two, outcome = await removed_racing_a_rewrite(memory, tmp_path, "file")
    assert outcome["d/f.txt"] == two
    assert outcome["d/other.txt"] == b"other\n"


@pytest.mark.expected_log("another writer changed meanwhile stay")
@pytest.mark.parametrize("name", ["f.txt", "f.zip"])
async def test_a_version_stored_during_a_directory_rename_stays_under_the_old_name(
    memory: MemoryStore, tmp_path: Path, name: str
) -> None:
    """A directory rename copies every object, then deletes the old tree with
    DeleteObjects: a version another mount stored after the copy was
    deleted. Now only the versions listed go: the new one stays under the
    old name, readable (a delta keeps its reference there), and the renamed
    tree holds what was copied."""
    one, two, outcome = await removed_racing_a_rewrite(memory, tmp_path, "dir", name)
    assert outcome[f"e/{name}"] == one
    assert outcome[f"d/{name}"] == two
    assert outcome["e/other.txt"] == b"other\n"
    assert outcome["d/other.txt"] is None


async def test_writing_into_a_file_another_mount_replaced_is_no_eio(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Mount B has looked at ``notes.txt``; mount A then stores a new
    version of it (same size, stored whole). Within B's listing TTL, a
    program on B opens ``notes.txt`` for writing (no O_TRUNC) and writes one
    byte: the write fails with EIO, and B logs "does not match its recorded
    SHA-256 (replaced or corrupted)" about an object that is neither. Reads
    on B handle exactly this case (docs/SEMANTICS.md: "Opening a file
    another mount replaced within that time reads the new version, never
    EIO"); the first write, which copies the file's current content into
    the staging file (Operations: "however it arrives"), should too: the
    write succeeds on A's version, and the last upload wins.

    (Before: the copy-up copied ``node.stored`` as this mount last listed
    it, and the ``IntegrityError`` became EIO; reads listed again. Both go
    by ``DirectoryView.using_current`` now.)"""
    async with (
        mounted(memory, home(tmp_path, "a"), FAST_RETRIES) as a,
        mounted(memory, home(tmp_path, "b"), FAST_RETRIES) as b,
    ):
        await write_file(a.fs, "notes.txt", b"version one\n")
        await a.fs.wait_idle()
        node_b = await lookup(b.fs, "notes.txt")
        await write_file(a.fs, "notes.txt", b"version two\n")
        await a.fs.wait_idle()
        handle = await b.fs.open(node_b.ino, os.O_WRONLY)
        try:
            await b.fs.write(handle.fh, 0, b"V")
            outcome = "written"
        except FsError as exc:
            outcome = f"{os.strerror(exc.errno)}: {exc}"
        await close(b.fs, handle.fh)
        await b.fs.wait_idle()
    assert outcome == "written"
    assert await read_fresh(memory, tmp_path, "notes.txt") == b"Version two\n"
