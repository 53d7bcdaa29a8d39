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

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from botocore.exceptions import ClientError

from dgfs.core import Core
from dgfs.errors import DgfsError, StoreError, errno_of
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from dgfs.store.s3 import S3Store
from tests.fsharness import (
    FAST_RETRIES,
    GID,
    RANGED,
    ROOT,
    UID,
    close,
    home,
    let_tasks_run,
    lookup,
    mounted,
    open_for_rewrite,
    write_file,
    write_until_held,
)
from testsupport.dgcli import run_deltaglider
from testsupport.releases import ReleaseSeries

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


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
    async with mounted(faulty, tmp_path, FAST_RETRIES) as m:
        a = await m.fs.mkdir(ROOT, "a", 0o755, UID, GID)
        await write_file(m.fs, "f", b"f\n", parent=a.ino)
        await write_file(m.fs, "g", b"g\n", parent=a.ino)
        await m.fs.wait_idle()
        held = faulty.hang("copy", key="a/g")
        faulty.fail("copy", key="a/g", transient=False)
        raised: BaseException | None = None

        async def mv() -> None:
            nonlocal raised
            try:
                await m.fs.rename(ROOT, "a", ROOT, "e", 0)
            except DgfsError as exc:
                raised = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(mv)
            await held.reached.wait()
            await memory.put_bytes("e/g", b"another writer's g\n", {})
            held.release()
    assert raised is not None
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
