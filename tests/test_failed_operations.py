"""Failed operations leave things as they were, and races with another
writer lose nothing: directory renames that fail while copying or while
removing the old names, a copy-up of a file another writer filled, a
large file removed between a listing and its first read, a landed
version's attributes while a newer one is written, deletes S3 refuses
one key of, and a tab in a name DeltaGlider reads back.

In-process mounts (tests/fsharness.py) over ``MemoryStore``/``FaultyStore``;
moto (``s3_store``, ``open_core``) where the HTTP request matters; the real
DeltaGlider CLI 6.2.0 (testsupport/dgcli.py) for interop. Each test failed
before its fix for the reason its docstring gives ("Got" is what happened).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from botocore.exceptions import ClientError

from dgfs.core import Core
from dgfs.errors import DgfsError, FsError, StoreError, errno_of
from dgfs.fs.filesystem import FileSystem
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from dgfs.store.s3 import S3Store
from tests.fsharness import (
    FAST_RETRIES,
    GID,
    RANGED,
    RELEASES,
    ROOT,
    UID,
    bucket,
    close,
    create,
    home,
    let_tasks_run,
    lookup,
    mounted,
    open_for_rewrite,
    read_fresh,
    without_indexes,
    write_file,
    write_until_held,
)
from testsupport.dgcli import run_deltaglider
from testsupport.releases import ReleaseSeries

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@contextlib.asynccontextmanager
async def mv_a_to_e_while_the_copy_of_g_fails(
    faulty: FaultyStore, tmp_path: Path
) -> AsyncIterator[list[DgfsError]]:
    """``a`` holds ``f`` and ``g`` (stored); ``mv a e`` runs, its copy of
    ``a/g`` held: the block acts meanwhile, then that copy fails (S3
    refuses it). Yields the errors the rename raised (filled at the end)."""
    async with mounted(faulty, tmp_path, FAST_RETRIES) as m:
        a = await m.fs.mkdir(ROOT, "a", 0o755, UID, GID)
        await write_file(m.fs, "f", b"f\n", parent=a.ino)
        await write_file(m.fs, "g", b"g\n", parent=a.ino)
        await m.fs.wait_idle()
        held = faulty.hang("copy", key="a/g")
        faulty.fail("copy", key="a/g", transient=False)
        async with renaming(m.fs, "a", "e") as raised:
            await held.reached.wait()
            yield raised
            held.release()


async def read_under(
    store: MemoryStore, tmp_path: Path, paths: tuple[str, ...], data: bytes
) -> dict[str, bool | str]:
    """path -> whether a fresh mount reads ``data`` there (else the error it got)."""
    got: dict[str, bool | str] = {}
    for path in paths:
        try:
            got[path] = await read_fresh(store, tmp_path, path) == data
        except Exception as exc:  # noqa: BLE001 -- which error: the message says
            got[path] = repr(exc)[:160]
    return got


@contextlib.asynccontextmanager
async def renaming(fs: FileSystem, old: str, new: str) -> AsyncIterator[list[DgfsError]]:
    """``mv old new`` (names in the root) runs while the block acts; yields
    the errors it raised (filled once it ends, after the block)."""
    raised: list[DgfsError] = []

    async def mv() -> None:
        try:
            await fs.rename(ROOT, old, ROOT, new, 0)
        except DgfsError as exc:
            raised.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mv)
        yield raised


@pytest.mark.interop
async def test_deltaglider_reads_a_delta_dgfs_stored_in_a_directory_whose_name_holds_a_tab(
    moto_core: Core, moto_endpoint: str, bucket_name: str, tmp_path: Path
) -> None:
    """Through dgfs, two releases go into the directory ``rel<TAB>1/`` (the
    second is stored as a delta); then ``deltaglider cp
    s3://bucket/rel<TAB>1/plugin-1.2.0.zip out.zip``.

    Got: "download failed: Object not found: BUCKET/reference.bin" -- the
    CLI looks for the reference at the bucket root. Should: the file, as
    before 0988b40 (this test passes on 0988b40^): HTTP header values carry
    a tab as it is (RFC 9110 field-value: VCHAR, SP, HTAB), and moto/S3 and
    the CLI took ``dg-ref-key: rel<TAB>1/reference.bin`` raw.

    Cause: dgfs/store/base.py:57-58 (``_header_safe``: ``str.isprintable()``
    is False for a tab) now RFC 2047-encodes every value holding a tab, so
    ``dg-ref-key`` is ``=?UTF-8?B?cmVsCTEvcmVmZXJlbmNlLmJpbg==?=``; the CLI
    decodes no RFC 2047 (deltaglider/adapters/storage_s3.py
    ``_extract_metadata`` returns the raw value) and splits that on "/"
    (deltaglider/core/service.py:235) to find the deltaspace."""
    series = list(ReleaseSeries(size=384 << 10, seed=3).zips(2))
    for name, data in series:
        (tmp_path / name).write_bytes(data)
        await moto_core.put(tmp_path / name, f"rel\t1/{name}")
    name, data = series[1]
    out = tmp_path / "out.zip"
    result = run_deltaglider(
        moto_endpoint, "cp", f"s3://{bucket_name}/rel\t1/{name}", str(out), check=False
    )
    output = (result.stdout + result.stderr).splitlines()
    said = [line for line in output if "failed" in line]
    got = out.read_bytes() if out.exists() else f"{said}".encode()
    assert got == data


async def test_a_directory_rename_whose_deletes_fail_leaves_no_copy_in_the_target_put_back(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path
) -> None:
    """``mv a d`` where ``a`` holds ``f`` and ``d`` is an empty directory;
    S3 refuses the DeleteObjects of the old names (a 4xx, or a 5xx storm
    past the store's retries).

    Got: rename fails (EIO), ``a`` is whole, and ``d`` -- "put back" by
    38f4647 -- now holds a copy of ``f``: the bucket gains ``d/f``, so a
    failed ``mv`` duplicated the tree into the target, and a second ``mv a d``
    is ENOTEMPTY. Should: as docs/SEMANTICS.md (rename of a directory,
    38f4647) says, "One that fails (in S3, ...) removes its copies and
    reports the error, and an empty directory it was to replace is put back":
    the bucket as before.

    Cause: dgfs/renames.py:217-218 (``rename_prefix``): only ``_copy_tree``
    rolls back; a failure in ``_delete_tree`` (dgfs/renames.py:286-292)
    leaves every copy, and dgfs/fs/filesystem.py:414-418 then writes the
    target's marker back over the copied tree (``_put_back_dir``, 437)."""
    async with mounted(faulty, tmp_path, FAST_RETRIES) as m:
        a = await m.fs.mkdir(ROOT, "a", 0o755, UID, GID)
        await write_file(m.fs, "f", b"data\n", parent=a.ino)
        await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await m.fs.wait_idle()
        before = sorted(memory.objects)
        faulty.fail("delete_many", key="a/f", transient=False)
        with pytest.raises(DgfsError):
            await m.fs.rename(ROOT, "a", ROOT, "d", 0)
        after = sorted(memory.objects)
    assert after == before, f"the failed mv left {sorted(set(after) - set(before))}"


async def test_a_directory_rename_whose_delete_reply_was_lost_keeps_the_moved_directorys_mode(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path
) -> None:
    """``mkdir -m 700 a; echo data > a/f; mkdir d; mv a d``; the DeleteObjects
    of the old names is carried out but its reply is lost (the store's
    retries spent): the rename happened in S3, ``a/`` and ``a/f`` are gone,
    ``d/`` and ``d/f`` are the moved tree.

    Got: a fresh mount shows ``d`` with mode 755 -- the replaced empty
    directory's -- though ``d`` is ``a`` moved (700). Should: 700, the
    attributes of the directory that was moved (``_put_back_dir`` is meant
    for a target that the failed rename left removed, not one the rename
    filled).

    Cause: dgfs/fs/filesystem.py:414-418: on any exception from
    ``move_dir`` the target is put back unconditionally;
    ``_put_back_dir`` (dgfs/fs/filesystem.py:437-441) PUTs ``d/`` with the
    old target's ``posix_metadata()`` over the marker the rename had copied
    from ``a/`` (a marker with bytes would lose them too)."""
    async with mounted(faulty, tmp_path, FAST_RETRIES) as m:
        a = await m.fs.mkdir(ROOT, "a", 0o700, UID, GID)
        await write_file(m.fs, "f", b"data\n", parent=a.ino)
        await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await m.fs.wait_idle()
        faulty.fail("delete_many", key="a/f", transient=False, after=True)
        with pytest.raises(DgfsError):
            await m.fs.rename(ROOT, "a", ROOT, "d", 0)
    assert sorted(memory.objects) == ["d/", "d/f"]  # moved in S3
    async with mounted(memory, home(tmp_path, "fresh")) as m:
        mode = (await lookup(m.fs, "d")).mode
    assert oct(mode) == oct(0o700)


async def test_a_failed_directory_rename_never_deletes_what_another_writer_stored_at_a_new_name(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path
) -> None:
    """``mv a e`` (``a`` holds ``f`` and ``g``; ``e`` does not exist). While
    the copy of ``a/g`` is in flight another mount or tool stores ``e/g``;
    S3 then refuses the copy of ``a/g`` (a 4xx: nothing was copied).

    Got: the rename fails and its rollback deletes ``e/g`` -- the other
    writer's file, which this rename never wrote: lost data. Should: the
    rollback removes only the copies this rename made (``e/f``, and a copy
    whose reply was lost, which is this rename's version of the key).

    Cause: 0240f50, dgfs/renames.py:238-241 (``_copy_tree.move_one``): a
    failed copy's new key is now appended to ``copied`` whatever the
    failure, and the rollback (dgfs/renames.py:249) deletes every key in
    ``copied`` unconditionally, on the assumption (docstring: "the new names
    are the rename's: the target was empty or absent") that nothing else
    can be there."""
    async with mv_a_to_e_while_the_copy_of_g_fails(faulty, tmp_path) as raised:
        await memory.put_bytes("e/g", b"another writer's g\n", {})
    assert raised
    assert "e/g" in memory.objects, f"deleted; left {sorted(memory.objects)}"


@pytest.mark.expected_log(r"big\.img")  # (once fixed: the EIO, if logged)
async def test_a_large_file_removed_between_the_fresh_listing_and_its_pin_fails_with_eio(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path
) -> None:
    """``cat big.img`` (another tool's 3 MiB file, read by ranges) after the
    other tool replaced it (within the listing TTL); while the mount lists
    the directory again and pins the new version, the other tool removes it.

    Got: read(2) fails with ENOENT, about a file the program holds open.
    Should: EIO -- docs/SEMANTICS.md (38f4647): "A file another writer
    removed after it was opened here fails its first read or write ... with
    EIO, never ENOENT".

    Cause: dgfs/fs/dirview.py:82 (``using_current``): the second ``use``
    (after the fresh listing) lets ``NotFound`` through; 38f4647 made the
    HEAD in ``RangeReader.pin`` (dgfs/fs/readers.py:120, called at 402
    under ``broken``, which maps only IntegrityError/FormatError) raise it
    there, and ``errno_of(NotFound)`` is ENOENT. The same holds for a delta
    whose object goes between the listing and its download."""
    await memory.put_bytes("big.img", os.urandom(3 * MiB), {})
    async with mounted(faulty, home(tmp_path, "m"), RANGED) as m:
        node = await lookup(m.fs, "big.img")
        await memory.put_bytes("big.img", os.urandom(3 * MiB), {})  # the other tool
        fh = (await m.fs.open(node.ino, os.O_RDONLY)).fh
        # HEADs of big.img from here: the first pin, the listing's, the second pin.
        held = faulty.hang("head", key="big.img", nth=3)
        got = ""

        async def cat() -> None:
            nonlocal got
            try:
                got = "data" if await m.fs.read(fh, 0, 4096) else "empty"
            except DgfsError as exc:
                got = errno.errorcode[errno_of(exc)]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cat)
            await held.reached.wait()
            await memory.delete("big.img")  # the other tool's rm
            held.release()
        await m.fs.release(fh)
    assert got == "EIO"


async def test_a_first_write_into_an_empty_file_another_writer_filled_starts_from_its_content(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Another tool's empty ``notes.txt``; the mount looks it up; the other
    tool then stores 12 bytes in it. Within the listing TTL a program opens
    it for writing (no O_TRUNC), writes one byte at 0 and closes.

    Got: S3 holds ``V`` -- the other writer's 12 bytes are gone. Should:
    ``Version two\\n``: docs/SEMANTICS.md (92c19e5) "a first write into it
    (no O_TRUNC) starts from the new version", as it does when the old
    version was 3 bytes
    (tests/test_failed_and_replaced.py::test_a_first_write_into_a_foreign_file_replaced_meanwhile_shows_its_new_size).

    Cause: dgfs/fs/uploads.py:191 (``_copy_current``): ``and node.size``
    skips the copy-up, and so ``DirectoryView.using_current``, whenever the
    mount last saw the file empty."""
    await memory.put_bytes("notes.txt", b"", {})
    async with mounted(memory, home(tmp_path, "b"), FAST_RETRIES) as b:
        node = await lookup(b.fs, "notes.txt")
        await memory.put_bytes("notes.txt", b"version two\n", {})  # the other tool
        handle = await b.fs.open(node.ino, os.O_WRONLY)
        await b.fs.write(handle.fh, 0, b"V")
        await close(b.fs, handle.fh)
        await b.fs.wait_idle()
    assert memory.objects["notes.txt"].body == b"Version two\n"


async def test_writes_to_a_newer_version_do_not_keep_rewriting_the_landed_ones_metadata(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
) -> None:
    """``echo v1 > a`` (its upload in flight); a program opens ``a`` with
    O_TRUNC and keeps writing it (a log, a download into the mount) while
    v1's upload lands.

    Got: one CopyObject (plus a HEAD) of v1 onto itself per write of v2 --
    6 for 5 writes here; the upload worker stays in ``_follow_up`` for as
    long as the writer keeps writing faster than a copy round trip (each
    copy of a large object is a full server-side copy), and each copy gives
    v1 the newest mtime of v2's writes. Should: v1's attributes stored once
    (before 92c19e5: one rewrite); v2's own upload carries what follows.

    Cause: dgfs/fs/uploads.py:525-531 (``_follow_up``, 92c19e5): ``while
    node.posix_metadata() != meta`` loops on the node's attributes, whose
    mtime every write of the newer version changes
    (``Node.content_changed``); ``_superseded`` (dgfs/fs/uploads.py:488)
    runs it for a version the newer one replaces."""
    held = faulty.hang("upload", key="a")
    async with mounted(faulty, tmp_path) as m:
        await write_until_held(m.fs, "a", b"v1\n", held, mock_clock)
        fh = await open_for_rewrite(m.fs, "a", b"v2\n")
        rewrite = faulty.hang("copy", key="a")
        held.release()
        await rewrite.reached.wait()  # v1 landed: its attributes are being stored
        for _ in range(5):
            await m.fs.write(fh, 0, b"v2\n")  # the program goes on writing
        rewrite.release()
        await let_tasks_run()
        rewrites = faulty.count("copy", key="a")
        await close(m.fs, fh)
    assert rewrites <= 1, f"v1's metadata rewritten {rewrites} times"


async def test_delete_many_deletes_the_others_when_one_key_xml_cannot_carry_is_refused(
    s3_store: S3Store,
) -> None:
    """``rm -r logs`` (or a directory rename's deletes): ``logs/`` holds
    ``ESC[31mred`` (an escape-sequence name another tool stored) and
    ``plain``; S3 refuses the DeleteObject of the first (AccessDenied: a
    bucket policy, an object lock).

    Got: ``delete_many`` raises at once and ``logs/plain`` is never deleted.
    Should: as its docstring says, "keys S3 refuses to delete raise one
    StoreError naming them, after every batch has been tried": ``plain``
    deleted, the refused key named (what a refusal inside a DeleteObjects
    batch gets).

    Cause: dgfs/store/s3/store.py:416-420 (0988b40): the one-by-one
    deletes of keys XML cannot carry catch only ``PreconditionFailed``; any
    other error escapes before the batches run."""
    odd = "logs/\x1b[31mred"
    await s3_store.put_bytes(odd, b"1", {})
    await s3_store.put_bytes("logs/plain", b"2", {})
    client: Any = s3_store._client
    real = client.delete_object

    def refusing(**kwargs: Any) -> Any:
        if kwargs["Key"] == odd:
            error = {"Code": "AccessDenied", "Message": "denied by policy"}
            raise ClientError(
                {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 403}}, "DeleteObject"
            )
        return real(**kwargs)

    client.delete_object = refusing
    with pytest.raises(StoreError):
        await s3_store.delete_many([odd, "logs/plain"])
    left = [o.key for o in (await s3_store.list("logs/", delimiter=None)).objects]
    assert left == [odd]


class RefusingOneKey(MemoryStore):
    """A bucket whose DeleteObjects refuses ``locked`` (S3: AccessDenied for
    one object -- an object lock, a legal hold, a bucket policy): the other
    keys are deleted and one ``StoreError`` names the refused one, as
    ``S3Store.delete_many`` reports it after every batch was tried."""

    locked: set[str]

    async def delete_many(
        self, keys: list[str], *, etags: Mapping[str, str] | None = None
    ) -> list[str]:
        refused = [key for key in keys if key in self.locked]
        kept = await super().delete_many(
            [key for key in keys if key not in self.locked], etags=etags
        )
        if refused:
            raise StoreError(f"could not delete: {refused[0]} (AccessDenied)")
        return kept


@pytest.mark.expected_log(r"reference\.bin is missing|rel/|new/")
async def test_a_directory_rename_whose_delete_is_refused_for_one_delta_keeps_the_others_readable(
    tmp_path: Path,
) -> None:
    """``mv rel new`` where ``rel`` holds three releases stored as deltas
    (``rel/reference.bin`` + three ``.delta``); S3 refuses the delete of
    one of them (``plugin-1.1.0.zip.delta``: AccessDenied, an object lock),
    deleting the others.

    Got: the rename fails (EIO) and ``plugin-1.2.0.zip`` is lost: its
    only object left is ``new/plugin-1.2.0.zip.delta`` (the source was
    deleted), whose ``dg-ref-key`` names ``new/reference.bin`` -- and
    ``_undo_copies`` deleted that, because ``rel/reference.bin`` "still
    stands" (references are deleted last, so it always does when the
    deletes of the files fail). A fresh mount cannot read the file.
    Should: every file readable under one of the names (docs/SEMANTICS.md,
    rename of a directory: "never neither"); the copy of a reference goes
    only when no copy that needs it stays.

    Cause: dgfs/renames.py:292-298 (``_undo_copies``): a copy goes when its
    source key is still listed, without regard to the copied deltas
    (sources deleted, copies kept) that name the copied reference; called
    from dgfs/renames.py:217-221. The same happens to a reference
    ``_delete_tree`` deleted and put back (``gc.put_back_if_needed``: it
    stands again, with the same ETag) when a later step of it fails. Before
    18c0ebf the copies stayed (two trees, every file readable)."""
    store = RefusingOneKey("fs-bucket")
    store.locked = set()
    async with mounted(store, home(tmp_path, "m"), FAST_RETRIES) as m:
        rel = await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        for name, data in RELEASES:
            await write_file(m.fs, name, data, parent=rel.ino)
        await m.fs.wait_idle()
        assert "rel/reference.bin" in store.objects
        store.locked = {"rel/plugin-1.1.0.zip.delta"}
        with pytest.raises(DgfsError):
            await m.fs.rename(ROOT, "rel", ROOT, "new", 0)
    store.locked = set()
    left = sorted(k for k in store.objects if not k.startswith(".dg"))
    name, data = RELEASES[1]
    got = await read_under(store, tmp_path, (f"rel/{name}", f"new/{name}"), data)
    assert any(v is True for v in got.values()), f"{name} lost: {got}; bucket {left}"


async def test_a_chmod_during_the_landed_versions_attribute_rewrite_survives_a_crash(
    memory: MemoryStore,
    faulty: FaultyStore,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
) -> None:
    """``echo v1 > a`` (its upload in flight); a program opens ``a`` with
    O_TRUNC and writes v2 (not closed yet); v1 lands and its attributes
    are rewritten (``_superseded``'s follow-up: v2's writes changed the
    mtime); during that rewrite ``chmod 640 a`` returns 0. The machine
    then crashes (v2 was never closed: v1 is the file's content).

    Got: a fresh mount shows ``a`` with mode 644 -- the acknowledged chmod
    is gone. Should: 640: docs/SEMANTICS.md (chmod): "on a file ... being
    uploaded, the journal entry changes too, so a crash keeps them, and the
    upload stores them". The chmod went into v1's journal entry
    (``carries_attributes``: v2 is not committed), but the follow-up
    stopped after the rewrite in flight, and v1's entry was then dropped.

    Cause: dgfs/fs/uploads.py:531-532 (``_follow_up``, 18c0ebf): ``if
    node.staged is not staged: break`` stops after one rewrite although
    the newer version is not committed (nothing durable carries the
    attributes); ``_superseded`` (dgfs/fs/uploads.py:488-489) then sees
    ``failed is None`` and calls ``forget_superseded``, removing the only
    entry that held the chmod."""
    held = faulty.hang("upload", key="a")
    async with mounted(faulty, tmp_path, crash=True) as m:
        await write_until_held(m.fs, "a", b"v1\n", held, mock_clock)
        await open_for_rewrite(m.fs, "a", b"v2\n")  # its handle left open: not closed
        rewrite = faulty.hang("copy", key="a")
        held.release()
        await rewrite.reached.wait()  # v1 landed: its attributes are being rewritten
        node = await lookup(m.fs, "a")
        await m.fs.setattr(node.ino, mode=stat.S_IFREG | 0o640)  # returns 0
        rewrite.release()
        await let_tasks_run()
        assert memory.objects["a"].body == b"v1\n"
    async with mounted(memory, tmp_path) as again:  # the same machine: its journal recovered
        await again.fs.wait_idle()
    async with mounted(memory, home(tmp_path, "fresh")) as fresh:  # what S3 holds
        mode = (await lookup(fresh.fs, "a")).mode
    assert oct(stat.S_IMODE(mode)) == oct(0o640)


async def test_a_directory_rename_whose_deletes_fail_leaves_no_copy_of_a_multipart_file(
    s3_store: S3Store, tmp_path: Path
) -> None:
    """``mv a d`` where ``a`` holds ``big.bin`` (6 MiB, stored by another
    tool in a multipart upload: ETag ``...-2``) and ``small.txt``, and
    ``d`` is an empty directory; S3 refuses the DeleteObjects of the old
    names (moto, an S3 API as AWS answers it).

    Got: the rename fails and ``d`` keeps ``d/big.bin`` -- the copy's ETag
    is the MD5 of its bytes (CopyObject makes one part), never the source's
    multipart ETag, so the conditional delete of ``_undo_copies`` keeps it
    as "another writer's": ``d`` shows a duplicate of ``big.bin`` and a
    second ``mv a d`` is ENOTEMPTY. Should: docs/SEMANTICS.md (rename of a
    directory, 18c0ebf): "one that fails while removing the old names
    removes the copies of what still stands there"; the bucket as before
    (as ``test_a_directory_rename_whose_deletes_fail_leaves_no_copy_in_the_target_put_back``
    has it for a small file). The same holds for a copy whose reply was
    lost (``_copy_tree``'s ``maybe``).

    Cause: dgfs/renames.py:292-298 (``_undo_copies``) and 245/259
    (``_copy_tree``, ``maybe[new_key] = obj.etag``): the copy is deleted
    on condition of the *source's* ETag, which a copy of a multipart
    object never has."""
    s3_store.multipart_threshold = 5 << 20
    s3_store.part_size = 5 << 20
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 << 20))
    await s3_store.upload("a/big.bin", big, {})
    await s3_store.put_bytes("a/small.txt", b"small\n", {})
    assert (await s3_store.head("a/big.bin")).etag.endswith("-2")
    faulty = FaultyStore(s3_store)
    async with mounted(faulty, home(tmp_path, "m"), FAST_RETRIES) as m:
        await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await m.fs.wait_idle()
        await lookup(m.fs, "a")
        faulty.fail("delete_many", key="a/small.txt", transient=False)
        with pytest.raises(DgfsError):
            await m.fs.rename(ROOT, "a", ROOT, "d", 0)
    under_d = [o.key for o in (await s3_store.list("d/", delimiter=None)).objects]
    assert under_d == ["d/"], f"the failed mv left {under_d}"


@pytest.mark.expected_log(r"rel/|new/")
async def test_after_a_directory_rename_failing_once_s3_moved_the_tree_the_mount_shows_it(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path
) -> None:
    """``mv rel new`` (``rel`` holds ``f`` and ``g``, ``new`` does not
    exist); the DeleteObjects of the old names is carried out but its reply
    is lost (the store's retries spent): in S3 the tree now stands under
    ``new/`` only, and the rename reports EIO. The user then looks.

    Got: within the listing TTL (10 s) the mount still shows the tree of
    before its own failed rename: ``stat new`` is ENOENT though S3 holds
    ``new/f`` and ``new/g``, ``ls rel`` lists both files, and ``cat rel/g``
    is EIO "removed by another writer since it was opened" (no other
    writer did). Should: a failed rename that changed S3 leaves this mount
    showing what S3 holds (its own change, as after any change it made:
    the cached listings of both parents and of the tree are dropped).

    Cause: dgfs/fs/filesystem.py:408-414 (``rename``): on a failure of
    ``move_dir`` only a replaced target's parent listing is forgotten
    (``_put_back_dir``, 445), and only when there was a target;
    ``move_dir`` forgets the listings (dgfs/fs/changes.py:236-238) only
    once ``rename_prefix`` returned. 18c0ebf's ``_undo_copies`` makes such
    half-moved trees an expected outcome of a failed rename."""
    async with mounted(faulty, home(tmp_path, "m"), FAST_RETRIES) as m:
        rel = await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        await write_file(m.fs, "f", b"f\n", parent=rel.ino)
        await write_file(m.fs, "g", b"g\n", parent=rel.ino)
        await m.fs.wait_idle()
        assert (await lookup(m.fs, "rel")).ino == rel.ino
        with pytest.raises(FsError):
            await lookup(m.fs, "new")  # (the root's listing is cached from here)
        faulty.fail("delete_many", key="rel/f", transient=False, after=True)
        with pytest.raises(DgfsError):
            await m.fs.rename(ROOT, "rel", ROOT, "new", 0)
        assert sorted(without_indexes(memory.objects)) == ["new/", "new/f", "new/g"]
        try:
            shown = f"new is a directory: {(await lookup(m.fs, 'new')).kind.name}"
        except FsError as exc:
            shown = f"stat new: {errno.errorcode[exc.errno]}"
    assert shown == "new is a directory: DIR"


FOUR = list(ReleaseSeries(size=512 << 10).zips(4))


@pytest.mark.expected_log(r"rel/|new/|reference")
async def test_a_delta_stored_during_a_dir_rename_whose_reference_delete_lost_its_reply_stays(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path
) -> None:
    """Mount A: ``mv rel new`` where ``rel`` holds three releases stored as
    deltas (``rel/reference.bin`` + three ``.delta``). While A's rename
    removes the old names (its listing and copies done), mount B stores a
    fourth release, ``rel/<4th>.zip``: a delta against
    ``rel/reference.bin``, which stands (B's writer checks it after the
    store: it is there). A's DeleteObjects of the references is carried out
    but its reply is lost (the store's retries spent).

    Got: A's rename fails (EIO) and B's file is lost: its only object,
    ``rel/<4th>.zip.delta``, names ``rel/reference.bin`` as its reference,
    and that is gone (the copy ``new/reference.bin`` is not where the delta
    points); no name reads it. Should: what ``_delete_tree`` does when the
    delete returns -- ``gc.put_back_if_needed`` puts the reference back
    from its copy because a delta in its directory needs it
    (docs/SEMANTICS.md, rename of a directory: "every file stays readable
    under one name or the other").

    Cause: dgfs/renames.py:330 (``_delete_tree``): ``delete_many(removing)``
    raising (reply lost, or S3 refusing one of several references) skips
    the put-back loop (dgfs/renames.py:332-337) for every reference that
    was deleted; ``_undo_copies`` (dgfs/renames.py:292-310) only deletes
    copies, it never puts a reference back. The same when one
    ``put_back_if_needed`` of several raises: the references after it are
    never looked at."""
    a_home, b_home = home(tmp_path, "a"), home(tmp_path, "b")
    async with mounted(faulty, a_home, FAST_RETRIES) as a:
        rel = await a.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        for name, data in FOUR[:3]:
            await write_file(a.fs, name, data, parent=rel.ino)
        await a.fs.wait_idle()
        assert "rel/reference.bin" in memory.objects
        assert f"rel/{FOUR[0][0]}.delta" in memory.objects
        # The first DeleteObjects (the files) is held; the second (the
        # references) is done and its reply lost.
        files_deleted = faulty.hang("delete_many", key=f"rel/{FOUR[0][0]}.delta")
        faulty.fail("delete_many", key="rel/reference.bin", after=True)
        async with renaming(a.fs, "rel", "new") as raised:
            await files_deleted.reached.wait()  # copies made, old names about to go
            async with mounted(memory, b_home, FAST_RETRIES) as b:  # another machine
                name, data = FOUR[3]
                await write_file(b.fs, name, data, parent=(await lookup(b.fs, "rel")).ino)
                await b.fs.wait_idle()
            assert f"rel/{name}.delta" in memory.objects  # stored as a delta against rel/
            files_deleted.release()
    assert raised, "the rename was to fail"
    bucket = sorted(k for k in memory.objects if not k.startswith(".dg"))
    got = await read_under(memory, tmp_path, (f"rel/{name}", f"new/{name}"), data)
    assert any(v is True for v in got.values()), f"{name} lost: {got}; bucket {bucket}"


@pytest.mark.expected_log(r"a/|e/")
async def test_a_dir_rename_failing_while_copying_keeps_what_another_writer_stored_over_a_copy(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path
) -> None:
    """``mv a e`` (``a`` holds ``f`` and ``g``; ``e`` does not exist). The
    copy of ``a/f`` is made (``e/f``); while the copy of ``a/g`` is in
    flight another mount or tool stores its own ``e/f`` (over the copy);
    S3 then refuses the copy of ``a/g`` (a 4xx: nothing was copied).

    Got: the rename fails and its rollback deletes ``e/f`` -- the other
    writer's file, stored after the copy: lost data. Should: the rollback
    removes a copy only while it holds what was copied (docs/SEMANTICS.md,
    rename of a directory: "what another writer stored at a new name
    stays"; ``_undo_copies`` already deletes on the ETags ``made``
    recorded, and a lost-reply copy on the source's ETag).

    Cause: dgfs/renames.py:261-262 (``_copy_tree``): ``delete_many(list(copied))`` (262)
    has no ``etags`` although ``copied`` maps each copy to the ETag its
    copy returned (fccd03b); only the ``maybe`` copies are deleted on
    condition."""
    async with mv_a_to_e_while_the_copy_of_g_fails(faulty, tmp_path) as raised:
        await faulty.wait_calls("copy", 1, key="a/f")  # e/f is the rename's copy now
        assert memory.objects["e/f"].body == b"f\n"
        await memory.put_bytes("e/f", b"another writer's f\n", {})
    assert raised
    assert "e/f" in memory.objects, f"deleted; left {sorted(memory.objects)}"


@pytest.mark.expected_log(r"rel/|new/")
async def test_a_dir_rename_failing_after_s3_moved_the_tree_shows_no_overwritten_version(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``rel`` holds ``f`` (v1, stored) and ``g``; ``echo v2 > rel/f``
    (closed: acknowledged; its upload still in its delay); ``mv rel new``,
    whose DeleteObjects of the old names is carried out but its reply lost
    (the store's retries spent): the rename fails, S3 holds the tree under
    ``new/`` only.

    Got: once the upload runs, S3 holds ``rel/f`` = v2 and ``new/f`` = v1:
    ``cat new/f`` shows the content the user overwrote before the mv, with
    ``rel`` back as a directory holding only ``f`` (and a second ``mv rel
    new`` is ENOTEMPTY). Should: never an older version under either name
    (as docs/SEMANTICS.md has it for a file rename); a moved directory
    (``_undo_copies`` keeps its copies: "that directory is moved") takes
    its pending files' journal entries with it, as a rename that returns
    does (``versions.follow_rename``).

    Cause: dgfs/fs/filesystem.py:408-418 (``rename``, the ``except`` at 410): on a failure of
    ``move_dir`` nothing local follows what S3 now holds; the journal
    entries of the files pending under the directory are moved only after
    ``rename_prefix`` returned (dgfs/fs/changes.py:225-234), so they upload
    under the old names while the copies of their older versions stay under
    the new ones (dgfs/renames.py:292-310 keeps every copy of a directory
    partly removed)."""
    async with mounted(faulty, tmp_path) as m:
        rel = await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        for name in ("f", "g"):
            fh = await create(m.fs, name, f"{name} v1\n".encode(), rel.ino)
            await m.fs.fsync(fh)  # stored now (the clock stands still otherwise)
            await m.fs.release(fh)
        node = await lookup(m.fs, "f", rel.ino)
        fh = (await m.fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)).fh
        await m.fs.write(fh, 0, b"f v2\n")
        await close(m.fs, fh)  # acknowledged: v2 is the file
        assert memory.objects["rel/f"].body == b"f v1\n"
        faulty.fail("delete_many", key="rel/g", after=True)
        with pytest.raises(DgfsError):
            await m.fs.rename(ROOT, "rel", ROOT, "new", 0)
    held = {k: v for k, v in bucket(memory).items() if not k.endswith("/")}
    assert b"f v1\n" not in held.values(), f"an overwritten version shows: {held}"


async def _stored_dir(m, names: tuple[str, ...] = ("f", "g")) -> int:  # type: ignore[no-untyped-def]
    """``rel/`` holding ``names``, each ``<name> v1`` and stored (fsync)."""
    rel = await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
    for name in names:
        fh = await create(m.fs, name, f"{name} v1\n".encode(), rel.ino)
        await m.fs.fsync(fh)
        await m.fs.release(fh)
    return rel.ino


@pytest.mark.expected_log(r"rel/|new/")
async def test_a_failed_dir_rename_keeps_a_stored_file_an_open_handle_still_holds(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``rel`` holds ``f`` and ``g``. A process opens ``rel/f`` (O_RDWR),
    writes v2 and fsyncs it: ``rel/f`` = v2 is stored, the handle stays open
    (a log file, a database). ``mv rel new``: the DeleteObjects of the old
    names is carried out but its reply is lost (retries spent): the rename
    fails, S3 held the tree under ``new/`` only. The process then closes f.

    Got: no object holds v2 (nor any f): ``new/f`` -- the only object
    holding it once S3 deleted ``rel/f`` -- was deleted by the rollback as
    "pending", yet nothing is pending (v2 is settled, nothing is uploaded
    again), and the close drops the local copy: the fsync'd file is lost.
    Should: a settled file's copy stays like any other in a directory
    partly removed (docs/SEMANTICS.md, rename of a directory: "every file
    stays readable under one name or the other"; fsync: "the bytes are in
    S3").

    Cause: dgfs/fs/changes.py:225-227 (``move_dir``): ``pending`` is every
    node with ``staged is not None``; an open handle keeps a settled
    ``staged`` (dgfs/fs/uploads.py:621, ``_settle`` returns while
    ``node.open_handles``), so its key is in ``pending`` and
    dgfs/renames.py:318-322 (``_undo_copies``) deletes ``new/f`` although
    no newer version follows under the old name."""
    async with mounted(faulty, tmp_path) as m:
        rel = await _stored_dir(m)
        node = await lookup(m.fs, "f", rel)
        fh = (await m.fs.open(node.ino, os.O_RDWR)).fh
        await m.fs.write(fh, 0, b"f v2\n")
        await m.fs.fsync(fh)  # v2 is in S3; the handle stays open
        assert memory.objects["rel/f"].body == b"f v2\n"
        assert node.staged is not None and node.staged.is_settled
        faulty.fail("delete_many", key="rel/g", after=True)
        with pytest.raises(DgfsError):
            await m.fs.rename(ROOT, "rel", ROOT, "new", 0)
        await close(m.fs, fh)
        await m.fs.wait_idle()
    held = {k: v for k, v in bucket(memory).items() if not k.endswith("/")}
    assert b"f v2\n" in held.values(), f"the fsync'd f is lost: {held}"


@pytest.mark.expected_log(r"rel/|new/")
async def test_a_failed_dir_rename_keeps_the_acknowledged_version_of_a_file_being_written(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``rel`` holds ``f`` (v1, stored) and ``g``. A process opens
    ``rel/f`` (O_WRONLY, no O_TRUNC) and writes, not closed yet: v1 is the
    file's acknowledged content (docs/SEMANTICS.md, close: only the close
    commits; move_file: "What S3 holds is the acknowledged content (any
    local writes are not closed yet)"). ``mv rel new`` fails after S3
    deleted the old names (DeleteObjects reply lost). The mount then
    crashes before the close.

    Got: no object holds v1 (or any f): the rollback deleted ``new/f``, the
    only copy of the acknowledged content once ``rel/f`` was gone, and the
    unclosed write was never in the journal: after the crash f is nowhere.
    Should: the copy stays until a newer version is committed (a crash
    leaves "never neither" -- docs/SEMANTICS.md, rename of a directory).

    Cause: dgfs/fs/changes.py:225-227: ``staged is not None`` holds as soon
    as a write made a staging file (dgfs/fs/filesystem.py:285), committed or
    not; dgfs/renames.py:318-322 then deletes the copy of a file whose newer
    version is not acknowledged, let alone stored."""
    async with mounted(faulty, tmp_path, crash=True) as m:
        rel = await _stored_dir(m)
        node = await lookup(m.fs, "f", rel)
        fh = (await m.fs.open(node.ino, os.O_WRONLY)).fh
        await m.fs.write(fh, 0, b"f v2\n")  # not closed: v1 is the file
        assert node.staged is not None and not node.staged.is_committed
        faulty.fail("delete_many", key="rel/g", after=True)
        with pytest.raises(DgfsError):
            await m.fs.rename(ROOT, "rel", ROOT, "new", 0)
        # the mount dies here, f still open
    async with mounted(memory, tmp_path):  # the next mount recovers the journal
        pass
    held = {k: v for k, v in bucket(memory).items() if not k.endswith("/")}
    assert any(v in (b"f v1\n", b"f v2\n") for v in held.values()), f"f is lost: {held}"


@pytest.mark.expected_log(r"rel/|new/")
async def test_a_file_closed_during_a_failing_dir_rename_shows_no_older_version(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``rel`` holds ``f`` (v1, stored) and ``g``; ``mv rel new`` starts.
    While its DeleteObjects is in flight, ``echo v2 > rel/f`` (open
    O_TRUNC, write, close: acknowledged; its upload waits for the rename).
    The DeleteObjects is carried out, its reply lost: the rename fails.

    Got: S3 holds ``new/f`` = v1 and, once the upload runs, ``rel/f`` = v2:
    the content overwritten before the rename failed shows under the new
    name -- what fd997a1 set out to prevent. Should: no older version under
    either name (docs/SEMANTICS.md, rename of a file; fd997a1's own test
    ``test_a_dir_rename_failing_after_s3_moved_the_tree_shows_no_overwritten_version``).

    Cause: dgfs/fs/changes.py:225-227: ``pending`` is computed once, before
    ``rename_prefix``; a file written and closed while the rename runs
    (only uploads are held, ``FileSystem.rename``) is not in it, so
    dgfs/renames.py:317-322 keeps its copy."""
    async with mounted(faulty, tmp_path) as m:
        rel = await _stored_dir(m)
        node = await lookup(m.fs, "f", rel)
        held = faulty.hang("delete_many", key="rel/g")
        faulty.fail("delete_many", key="rel/g", after=True)
        async with renaming(m.fs, "rel", "new") as raised:
            await held.reached.wait()  # copies made, the old names being deleted
            fh = (await m.fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)).fh
            await m.fs.write(fh, 0, b"f v2\n")
            await close(m.fs, fh)  # acknowledged: v2 is the file
            held.release()
        assert raised, "the rename was to fail"
        faulty.clear()
        mock_clock.jump(100)
        await m.fs.wait_idle()
    files = {k: v for k, v in bucket(memory).items() if not k.endswith("/")}
    assert b"f v1\n" not in files.values(), f"an overwritten version shows: {files}"


@pytest.mark.expected_log(r"rel/|new/")
async def test_a_failed_dir_rename_shows_no_version_older_than_a_superseded_acknowledged_one(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """``rel`` holds ``f`` (v1, stored) and ``g``. ``echo v2 > rel/f``
    (closed: acknowledged); its upload starts, and while it is in flight
    a process opens ``rel/f`` again and writes v3 (not closed): v3 goes to a
    new staging file, v2 is superseded. v2's upload fails (transient): it is
    never tried again, its journal entry stays (``superseded_failed``:
    the newer one is not committed), v2 is the file's acknowledged content.
    ``mv rel new`` fails after S3 deleted the old names (reply lost). Then
    the writer closes (v3 uploads under ``rel/f``).

    Got: ``new/f`` = v1 stays: a version older than the acknowledged v2
    shows under the new name (and v3 lands under ``rel/f``). Cause:
    ``move_dir``'s ``pending()`` looks only at ``n.staged`` (v3, not
    committed: ``needs_upload`` False), never at ``n.superseded`` (v2,
    committed, not stored), so ``_undo_copies`` keeps ``new/f``."""
    async with mounted(faulty, tmp_path) as m:
        rel = await _stored_dir(m)
        node = await lookup(m.fs, "f", rel)
        fh = (await m.fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)).fh
        await m.fs.write(fh, 0, b"f v2\n")
        await close(m.fs, fh)  # acknowledged: v2 is the file
        held = faulty.hang("upload", key="rel/f")
        faulty.fail("upload", key="rel/f")  # transient
        mock_clock.jump(100)  # past the upload delay
        await held.reached.wait()  # v2 being uploaded
        fh = (await m.fs.open(node.ino, os.O_WRONLY)).fh
        await m.fs.write(fh, 0, b"f v3\n")  # a new staging file; v2 superseded
        held.release()
        await let_tasks_run()
        assert node.superseded and node.superseded[0].needs_upload
        assert node.staged is not None and not node.staged.is_committed
        assert memory.objects["rel/f"].body == b"f v1\n"
        faulty.clear()
        faulty.fail("delete_many", key="rel/g", after=True)
        with pytest.raises(DgfsError):
            await m.fs.rename(ROOT, "rel", ROOT, "new", 0)
        faulty.clear()
        await close(m.fs, fh)
        mock_clock.jump(100)
        await m.fs.wait_idle()
    files = {k: v for k, v in bucket(memory).items() if not k.endswith("/")}
    assert b"f v1\n" not in files.values(), f"an overwritten version shows: {files}"
