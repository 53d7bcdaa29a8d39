"""Names S3 and the format treat specially, and directory operations on them.

Each test drives ``FileSystem`` in process (over a ``MemoryStore``, or over
``S3Store`` against moto where what real HTTP does to a key or a header
matters). The first four failed before their fixes for the reason their
docstrings give ("What they get" is what happened then).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from dgfs.errors import DgfsError, FsError, StoreError, errno_of
from dgfs.fs.filesystem import FileSystem
from dgfs.store.base import NewObject
from dgfs.store.memory import MemoryStore
from dgfs.store.s3 import S3Store
from tests.fsharness import (
    FAST_RETRIES,
    GID,
    OPTIONS,
    ROOT,
    UID,
    close,
    create,
    home,
    ino_of,
    lookup,
    mounted,
    read_file,
    readdir,
    write_file,
)

pytestmark = pytest.mark.timeout(120)


async def read_or_none(fs: FileSystem, path: str) -> bytes | None:
    """``path``'s bytes as a mount reads them; None when it does not exist."""
    parent, _, name = path.rpartition("/")
    try:
        return await read_file(fs, name, await ino_of(fs, parent))
    except FsError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


# --- 1. a foreign ``x.delta`` file is shown, writable, and its writes are dropped -----------


async def test_a_write_into_a_shown_foreign_dot_delta_file_is_never_acknowledged_then_dropped(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """What the user does: the bucket holds ``d/x.delta`` written by another
    tool (no DeltaGlider metadata). SEMANTICS ("Buckets dgfs did not write",
    Names) shows it as a plain file ``x.delta`` with its own bytes. The user
    overwrites it (``echo new > d/x.delta``: open O_TRUNC, write, close).

    What they get: open, write and close all return 0, yet the new bytes
    never reach S3: the upload calls ``FileWriter.put`` for the key
    ``d/x.delta``, which refuses every name ending in ``.delta``
    (dgfs/writer.py:202, ``fmt.is_hidden_name``, dgfs/format.py:213) with a
    ``FormatError``. That counts as a local failure (retried twice), then
    as final once stored "whole" (dgfs/fs/upload_failures.py:106), and the
    data goes to the journal's failed/ directory. After a remount the file
    shows its old bytes: an acknowledged write is lost.

    What they should get: either the write lands (the object stays a plain,
    foreign-style object under its own name, as ``put_plain`` stores
    symlinks), or the open for writing is refused up front with an errno
    (EPERM/EACCES/EINVAL), so no close() returns 0 for data that can never
    be stored. Nothing in ``FileSystem.open``/``create``/``truncate``
    (dgfs/fs/filesystem.py:240, 197, 286) checks the name the way
    ``check_new_name`` does for new entries.
    """
    await memory.put_bytes("d/x.delta", b"old bytes of another tool", {})
    refused = None
    async with mounted(memory, home(tmp_path, "writer")) as m:
        d = await ino_of(m.fs, "d")
        node = await lookup(m.fs, "x.delta", d)
        try:
            handle = await m.fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
            await m.fs.write(handle.fh, 0, b"new bytes")
            await close(m.fs, handle.fh)
        except DgfsError as exc:
            refused = errno_of(exc)  # told up front: fine
    async with mounted(memory, home(tmp_path, "reader")) as m:
        shown = await read_or_none(m.fs, "d/x.delta")
    assert refused == errno.EPERM, (
        "close() returned 0 but the new bytes never reached S3 "
        f"(a fresh mount reads {shown!r}; the data sits in the journal's failed/)"
    )
    assert shown == b"old bytes of another tool"


# --- 2. a name with CR or LF: close() is 0, the upload can never succeed ------------------


@pytest.mark.parametrize("char", ["\r", "\n"], ids=["CR", "LF"])
async def test_a_name_holding_a_line_break_is_refused_up_front(
    s3_store: S3Store, tmp_path: Path, char: str
) -> None:
    """What the user does: creates a file whose name holds a carriage return
    or a newline (``touch $'a\\rb'``; a script with a stray ``\\r`` from a
    CRLF file list does it), writes it and calls fsync.

    What they get: create, write and close return 0, but every upload fails
    before it leaves the machine: the name goes into the ``dg-original-name``
    metadata (and ``dg-delta-cmd``), ``encode_metadata``
    (dgfs/store/base.py:36-47) RFC 2047-encodes only non-ASCII values, so
    the raw ``\\r``/``\\n`` is put into an ``x-amz-meta-`` header and
    http.client refuses it ("Invalid header value"). botocore raises
    ``HTTPClientError``, which dgfs/store/s3/calls.py:80,143 treats as a
    network hiccup (``TransientError``), so the pipeline retries it forever
    (dgfs/fs/upload_failures.py:105): fsync fails with EIO every time, the
    file never reaches S3, and unmount, which drains every pending upload,
    never returns (a hang).

    What they should get: the file stored (metadata values with control
    characters encoded, as non-ASCII ones are), or the name refused at
    create with an errno (``check_new_name``, dgfs/fs/namespace.py:150,
    refuses names S3 cannot hold, as it does non-UTF-8 ones with EILSEQ).
    """
    s3_store.retry_delays = ()  # the store's own retries only slow the failure down
    name = f"a{char}b"
    # crash=True: on main, a clean unmount would wait for this upload forever.
    async with mounted(s3_store, home(tmp_path, "a"), FAST_RETRIES, crash=True) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        with pytest.raises(FsError) as refused:
            await create(m.fs, name, b"payload", d.ino)
        await write_file(m.fs, "plain", b"payload", d.ino)
        with pytest.raises(FsError) as renamed:
            await m.fs.rename(d.ino, "plain", d.ino, name, 0)
    assert (refused.value.errno, renamed.value.errno) == (errno.EINVAL, errno.EINVAL)


# --- 3. a name with an XML-invalid control character cannot be removed --------------------


async def test_a_file_whose_name_holds_an_escape_character_can_be_unlinked(
    s3_store: S3Store, tmp_path: Path
) -> None:
    """What the user does: creates ``d/$'\\e[31mred'`` (an escape sequence in
    a name: SEMANTICS, "Buckets dgfs did not write", says such names can
    occur and are listed and read as they are), then ``rm``s it.

    What they get: the create and upload work (PutObject carries the key in
    the URL), but ``rm`` fails with EIO and the file stays: unlink goes
    through ``Renamer.delete`` (dgfs/renames.py:54-62), which deletes with
    ``delete_many`` = DeleteObjects (dgfs/store/s3/store.py:397), whose XML
    body cannot carry U+001B (XML 1.0 forbids it even as a character
    reference). AWS answers 400 MalformedXML (boto/boto3#2005), moto a 500;
    either way the unlink fails. ``rm -r`` of a tree holding such a name, an
    ``rmdir`` that removes leftovers and a directory rename (which then
    leaves both trees) fail the same way; only a single-file ``mv`` works,
    because it deletes with DeleteObject (key in the URL).

    What they should get: unlink returns 0 and the object is gone (delete a
    key that XML cannot carry with DeleteObject, as renames already do).
    """
    s3_store.retry_delays = ()  # moto's 500 would be retried; AWS's 400 is not
    name = "\x1b[31mred"
    async with mounted(s3_store, home(tmp_path, "a"), FAST_RETRIES) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await write_file(m.fs, name, b"payload", d.ino)
        await m.fs.wait_idle()
        assert await s3_store.get_range(f"d/{name}", 0, 100) == b"payload"
        try:
            await m.fs.unlink(d.ino, name)
        except DgfsError as exc:
            pytest.fail(f"unlink failed with {errno.errorcode[errno_of(exc)]}: {exc}")
    keys = [o.key for o in (await s3_store.list("d/", None)).objects]
    assert f"d/{name}" not in keys


# --- 4. a directory rename that pushes a key past S3's 1,024 bytes -------------------------


class KeyLimitedStore(MemoryStore):
    """A ``MemoryStore`` that refuses keys over 1,024 bytes as S3 does: AWS
    answers PutObject/CopyObject with ``KeyTooLongError`` (HTTP 400), which
    ``S3Store`` raises as a plain ``StoreError`` (dgfs/store/s3/calls.py:139)."""

    def _store(self, key: str, body: bytes, new: NewObject) -> str:
        if len(key.encode()) > 1024:
            raise StoreError(
                f"PutObject s3://{self.bucket}/{key[:40]}... failed: "
                "KeyTooLongError: Your key is too long (HTTP 400)"
            )
        return super()._store(key, body, new)


@pytest.mark.expected_log(r"failed for good|KeyTooLongError")
async def test_a_directory_rename_pushing_a_key_past_1024_bytes_is_enametoolong_and_loses_nothing(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """What the user does: in a deep tree (``d/<250 B>/<250 B>/<250 B>/``) saves
    a file with a 250-byte name (its key is 1,005 bytes: ``check_new_name``
    allows it), then at once renames the top directory ``d`` to a 31-byte
    name (``mv d eeee…``), before the upload delay is over.

    What they get: the rename returns 0, though the file's key under the new
    name is 1,035 bytes, more than S3 holds. ``FileSystem.rename``
    (dgfs/fs/filesystem.py:387-408) checks only the new name's own key
    (``check_new_name``, dgfs/fs/namespace.py:160-163), not the keys of what
    the directory holds; ``move_dir`` (dgfs/fs/changes.py:212-227) moves the
    pending journal entry to the long key, its upload is refused with
    KeyTooLongError (a 400: final, dgfs/fs/upload_failures.py:105), and the
    file goes to the journal's failed/: after a remount it exists under
    neither name. (A file already in S3 instead makes the rename's copy
    fail: EIO rather than ENAMETOOLONG.)

    What they should get: ``ENAMETOOLONG`` from the rename (SEMANTICS,
    Conformance: "dgfs answers ENAMETOOLONG for any name whose key would be
    longer"), the tree left where it was, and the file stored under its old
    name.
    """
    mock_clock.jump(1000)
    store = KeyLimitedStore()
    renamed: int = 0
    async with mounted(store, home(tmp_path, "a")) as m:
        parent = (await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)).ino
        for c in "ABC":
            parent = (await m.fs.mkdir(parent, c * 250, 0o755, UID, GID)).ino
        await write_file(m.fs, "f" * 250, b"precious", parent)  # key: 1,005 bytes
        try:
            await m.fs.rename(ROOT, "d", ROOT, "e" * 31, 0)
        except DgfsError as exc:
            renamed = errno_of(exc)
    tail = "/".join(c * 250 for c in "ABCf")
    async with mounted(store, home(tmp_path, "b")) as m:
        under_old = await read_or_none(m.fs, f"d/{tail}")
        under_new = None if renamed else await read_or_none(m.fs, f"{'e' * 31}/{tail}")
    assert b"precious" in (under_old, under_new), (
        f"rename returned {errno.errorcode.get(renamed, renamed)}; the saved file is under "
        "neither name after a remount (its upload to a 1,035-byte key failed for good)"
    )
    assert renamed == errno.ENAMETOOLONG


# --- a directory without a marker goes with its last file (documented) ------------------


async def test_a_directory_without_a_marker_goes_with_its_last_file(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A bucket another tool filled (the DeltaGlider CLI, ``aws s3 cp``,
    rclone write no ``dir/`` markers): ``releases`` exists only through
    ``releases/notes.txt``. Once that file is removed, S3 lists no
    ``releases`` any more: when the listing TTL is over the root no longer
    shows it and a lookup is ENOENT, as on s3fs-fuse and rclone
    (docs/SEMANTICS.md). A directory made with mkdir has a marker and stays."""
    mock_clock.jump(1000)
    await memory.put_bytes("releases/notes.txt", b"written by another tool", {})
    async with mounted(memory, home(tmp_path, "a")) as m:
        releases = await lookup(m.fs, "releases")
        await m.fs.unlink(releases.ino, "notes.txt")
        assert "releases" in await readdir(m.fs, "")  # within the listing TTL
        mock_clock.jump(OPTIONS.listing_ttl + 1)
        assert "releases" not in await readdir(m.fs, "")
        with pytest.raises(FsError) as gone:
            await lookup(m.fs, "releases")
    assert gone.value.errno == errno.ENOENT
