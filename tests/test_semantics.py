"""docs/SEMANTICS.md, statement by statement: the promises no other test proves.

Each test names the statement it proves (the section of docs/SEMANTICS.md
in its docstring), and that statement names the test. In-process, as
tests/test_filesystem.py drives ``FileSystem``: no kernel, a memory store.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Awaitable
from datetime import timedelta
from email.header import decode_header, make_header
from pathlib import Path

import boto3
import pytest
import trio
import trio.testing

from dgfs import format as fmt
from dgfs import proxymeta
from dgfs.errors import DgfsError, FsError, errno_of
from dgfs.fs import readers
from dgfs.fs.entries import NodeKind
from dgfs.fs.filesystem import FsOptions
from dgfs.fs.fuse_ops import FuseOperations
from dgfs.mount import MountConfig, _fuse_options
from dgfs.runtime import S3Location, Settings
from dgfs.store.faulty import FaultyStore
from dgfs.store.memory import MemoryStore
from dgfs.store.s3 import S3Store
from dgfs.verify import Status, verify_key
from tests.coreharness import flip_byte, make_core, write
from tests.fsharness import (
    FAST_RETRIES,
    OPTIONS,
    RANGED,
    RELEASES,
    ROOT,
    UID,
    bucket,
    create,
    home,
    lookup,
    mounted,
    read_file,
    read_fresh,
    write_file,
)
from tests.test_hostile import readdir
from tests.test_namespace import CountingStore, delta_meta, fill, namespace
from testsupport.proxyobjects import ProxyWriter, proxy_client_view
from testsupport.releases import ReleaseSeries
from testsupport.servers import REGION, make_bucket

pytestmark = pytest.mark.timeout(60)

GID = os.getgid()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _errno_of(call: Awaitable[object]) -> int:
    with pytest.raises(FsError) as exc:
        await call
    return exc.value.errno


# --- Names and layout -----------------------------------------------------------------


async def test_names_the_format_or_the_proxy_own_cannot_be_created(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Names and layout: ``.delta``, ``reference.bin`` and ``reference.deep``
    anywhere, ``.deltaglider`` and ``_dgp`` at the bucket root: EINVAL."""
    async with mounted(memory, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        for parent, name in (
            (d.ino, "reference.deep"),
            (d.ino, "reference.bin"),
            (d.ino, "x.zip.delta"),
            (ROOT, "_dgp"),
            (ROOT, ".deltaglider"),
        ):
            assert await _errno_of(create(m.fs, name, b"x", parent)) == errno.EINVAL
            assert await _errno_of(m.fs.mkdir(parent, name, 0o755, UID, GID)) == errno.EINVAL
            assert await _errno_of(m.fs.symlink(parent, name, b"t", UID, GID)) == errno.EINVAL
        # Below the root, _dgp is an ordinary name.
        await write_file(m.fs, "_dgp", b"mine", d.ino)
    assert memory.objects["d/_dgp"].body == b"mine"
    assert sorted(memory.objects) == ["d/", "d/_dgp"]


async def test_a_name_that_is_not_utf8_is_eilseq_not_eio(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """S3 keys are UTF-8: ``mkdir $'caf\\xe9'`` (a Latin-1 name from an old
    tree, which FUSE hands over as ``os.fsdecode`` makes it: a lone
    surrogate) cannot be stored. Creating one is EILSEQ, as on ZFS with
    ``utf8only=on``; looking one up is ENOENT (no key holds it). Before,
    both crashed the request with UnicodeEncodeError: EIO, and an
    "unexpected error" traceback in the log."""
    name = os.fsdecode(b"caf\xe9")
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "f", b"f")
        assert await _errno_of(m.fs.mkdir(ROOT, name, 0o755, UID, GID)) == errno.EILSEQ
        assert await _errno_of(create(m.fs, name, b"x")) == errno.EILSEQ
        assert await _errno_of(m.fs.symlink(ROOT, name, b"t", UID, GID)) == errno.EILSEQ
        assert await _errno_of(m.fs.rename(ROOT, "f", ROOT, name, 0)) == errno.EILSEQ
        assert await _errno_of(lookup(m.fs, name)) == errno.ENOENT
    assert sorted(memory.objects) == ["f"]


async def test_mkdir_writes_a_marker_holding_the_directorys_attributes(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Names and layout (an empty directory is a marker object ``app/``), and
    Operations, ``mkdir``: writes the marker ``dir/``."""
    async with mounted(memory, tmp_path) as m:
        await m.fs.mkdir(ROOT, "app", 0o750, 1234, 5678)
    marker = memory.objects["app/"]
    assert marker.body == b""
    assert int(marker.metadata["mode"]) == stat.S_IFDIR | 0o750
    assert (marker.metadata["uid"], marker.metadata["gid"]) == ("1234", "5678")
    assert "mtime" in marker.metadata


async def test_a_directory_without_a_marker_shows_the_defaults_and_the_mount_time(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Names and layout: a directory without a marker shows the defaults
    (``0777 & ~umask``, the mount's owner) and the mount time."""
    await memory.put_bytes("nomarker/f.txt", b"f", {})
    options = FsOptions(upload_delay=0.5, retry_delay=2.0, umask=0o027, uid=4321, gid=8765)
    async with mounted(memory, tmp_path, options) as m:
        d = await lookup(m.fs, "nomarker")
        assert d.kind.type_bits == stat.S_IFDIR
        assert (d.mode, d.uid, d.gid) == (0o750, 4321, 8765)
        assert d.mtime_ns == m.fs.mounted_at_ns


async def test_a_directorys_mtime_changes_in_memory_only(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Names and layout: a directory's mtime changes when this mount adds an
    entry, in memory only (no PUT of its marker); after a remount it shows its
    stored mtime again, which an explicit utime (``rsync -a``) sets."""
    stored_ns = 1_600_000_000_000_000_000
    async with mounted(memory, tmp_path) as m:
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        await m.fs.setattr(d.ino, mtime_ns=stored_ns)
        marker = memory.objects["d/"]
        await write_file(m.fs, "f", b"new entry", d.ino)
        assert (await m.fs.getattr(d.ino)).mtime_ns > stored_ns
        await m.fs.wait_idle()
        assert memory.objects["d/"] is marker  # not written again
    async with mounted(memory, tmp_path) as m:
        assert (await lookup(m.fs, "d")).mtime_ns == stored_ns


async def test_the_mount_roots_attributes_last_until_unmount(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Names and layout: the mount's root has no marker (a bucket has no key
    for it): a chmod or touch of the root (``rsync -a src/ /mnt/``) shows
    until unmount, stores nothing, and the next mount shows the defaults."""
    async with mounted(memory, tmp_path) as m:
        shown_mode = (await m.fs.getattr(ROOT)).mode
        await m.fs.setattr(ROOT, mode=0o700, mtime_ns=1_600_000_000_000_000_000)
        changed = await m.fs.getattr(ROOT)
        assert (changed.mode & 0o777, changed.mtime_ns) == (0o700, 1_600_000_000_000_000_000)
    assert memory.objects == {}
    async with mounted(memory, tmp_path) as m:
        assert (await m.fs.getattr(ROOT)).mode == shown_mode


async def test_another_mounts_chmod_of_a_directory_shows_after_a_remount(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Names and layout: a directory's attributes are read once per mount, so
    another mount's ``chmod`` of a directory shows after a remount."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with mounted(memory, tmp_path / "a") as a:
        d = await a.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        async with mounted(memory, tmp_path / "b") as b:
            await b.fs.setattr((await lookup(b.fs, "d")).ino, mode=stat.S_IFDIR | 0o700)
        assert int(memory.objects["d/"].metadata["mode"]) == stat.S_IFDIR | 0o700
        autojump_clock.jump(3600)  # far past the listing TTL
        await readdir(a.fs, "")
        assert (await a.fs.getattr(d.ino)).mode == 0o755
    async with mounted(memory, tmp_path / "a") as a:
        assert (await lookup(a.fs, "d")).mode == 0o700


# --- Operations -----------------------------------------------------------------------


async def test_statfs_block_size_blocks_and_link_counts(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Operations, ``statfs`` (1 PiB free, 2^32 inodes) and ``st_blksize``
    (1 MiB; ``st_blocks`` in 512-byte units); Conformance: a directory's link
    count is 2 whatever it holds."""
    async with mounted(memory, tmp_path) as m:
        ops = FuseOperations(m.fs)
        fs_stat = await ops.statfs(None)  # type: ignore[arg-type]
        assert fs_stat.f_bavail * fs_stat.f_frsize == 1 << 50
        assert fs_stat.f_bfree == fs_stat.f_blocks == fs_stat.f_bavail
        assert fs_stat.f_files == fs_stat.f_ffree == 1 << 32
        assert fs_stat.f_namemax == 255
        d = await m.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        for name in ("s1", "s2", "s3"):
            await m.fs.mkdir(d.ino, name, 0o755, UID, GID)
        await write_file(m.fs, "f", b"x" * 1025, d.ino)
        f = await lookup(m.fs, "f", d.ino)
        for ino in (f.ino, d.ino):
            attrs = ops._attrs(await m.fs.getattr(ino))
            assert attrs.st_blksize == 1 << 20
            assert attrs.st_blocks == (attrs.st_size + 511) // 512
        assert ops._attrs(f).st_blocks == 3
        assert ops._attrs(await m.fs.getattr(d.ino)).st_nlink == 2
        assert ops._attrs(f).st_nlink == 1


async def test_reads_never_update_atime(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Operations, ``atime``: reads never update it; a file with none shows
    its mtime."""
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "f.txt", b"read me")
        await m.fs.wait_idle()
        ops = FuseOperations(m.fs)
        f = ops._attrs(await lookup(m.fs, "f.txt"))
        assert f.st_atime_ns == f.st_mtime_ns
        autojump_clock.jump(5)
        assert await read_file(m.fs, "f.txt") == b"read me"
        assert ops._attrs(await m.fs.getattr(f.st_ino)).st_atime_ns == f.st_mtime_ns
    assert "atime" not in memory.objects["f.txt"].metadata
    async with mounted(memory, tmp_path) as m:
        assert await read_file(m.fs, "f.txt") == b"read me"
        f = FuseOperations(m.fs)._attrs(await lookup(m.fs, "f.txt"))
        assert f.st_atime_ns == f.st_mtime_ns


async def test_xattrs_give_the_ratio_and_sizes_of_a_file_pending_or_stored(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Operations, ``getxattr``: ``user.dgfs.kind`` is ``pending`` until the
    upload is done, then ``direct`` (or ``foreign``); ``original_size``,
    ``stored_size`` and ``ratio`` describe what S3 holds."""
    await memory.put_bytes("other.dat", b"written by another tool", {})
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "a.txt", b"a" * 100)
        a = await lookup(m.fs, "a.txt")

        async def xattr(ino: int, name: str) -> bytes:
            return await m.fs.getxattr(ino, f"user.dgfs.{name}")

        assert await xattr(a.ino, "kind") == b"pending"
        assert await xattr(a.ino, "original_size") == b"100"
        await m.fs.wait_idle()
        assert await xattr(a.ino, "kind") == b"direct"
        sizes = (await xattr(a.ino, "original_size"), await xattr(a.ino, "stored_size"))
        assert sizes == (b"100", b"100")
        assert await xattr(a.ino, "ratio") == b"1.0000"
        assert await xattr(a.ino, "sha256") == _sha(b"a" * 100).encode()
        other = await lookup(m.fs, "other.dat")
        assert await xattr(other.ino, "kind") == b"foreign"
        assert await xattr(other.ino, "key") == b"other.dat"


async def test_client_metadata_shows_as_read_only_user_s3_xattrs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Operations, ``getxattr``: an S3 client's own metadata, as
    deltaglider_proxy keeps it (``user-K``), shows as ``user.s3.K``: the
    names and values an S3 client reading through the proxy gets as
    ``x-amz-meta-K``, never the proxy's markers; read-only like the rest.
    They come from what the listing's HEAD kept (no HEAD per file when
    ``ls -l`` lists every file's attribute names, as coreutils 9.4+ does)."""
    store = CountingStore()
    writer = ProxyWriter()
    client = {"build": "42", "release.channel_1": "stable", "note": "d\u00e9j\u00e0 vu"}
    data = b"zip-ish " * 4096
    for obj in writer.put("app/a.zip", data, user=client, content_type="application/zip"):
        await store.put_bytes(obj.key, obj.body, obj.metadata)
    for obj in writer.put("app/notes.txt", b"notes", delta=False, user={"owner": "ci"}):
        await store.put_bytes(obj.key, obj.body, obj.metadata)
    async with mounted(store, tmp_path) as m:
        app = await lookup(m.fs, "app")
        a = await lookup(m.fs, "a.zip", app.ino)
        before = store.heads
        names = await m.fs.listxattr(a.ino)
        assert [n for n in names if n.startswith("user.s3.")] == sorted(
            f"user.s3.{k}" for k in client
        )
        for key, value in client.items():
            assert await m.fs.getxattr(a.ino, f"user.s3.{key}") == value.encode()
        assert store.heads == before  # the listing's HEAD kept them
        m.fs.ns.attr_cache.forget("app/a.zip.delta")  # no row: one HEAD, kept for the TTL
        assert await m.fs.listxattr(a.ino) == names
        assert await m.fs.getxattr(a.ino, "user.s3.build") == b"42"
        assert store.heads == before + 1
        # Exactly what an S3 client gets through the proxy.
        head = await store.head("app/a.zip.delta")  # non-ASCII values RFC 2047 decoded
        content_type, shown = proxy_client_view(dict(head.metadata))
        assert {k: v for k, v in shown.items() if not k.startswith("dg-")} == client
        assert content_type == "application/zip"
        notes = await lookup(m.fs, "notes.txt", app.ino)
        assert await m.fs.getxattr(notes.ino, "user.s3.owner") == b"ci"
        assert await _errno_of(m.fs.getxattr(notes.ino, "user.s3.build")) == errno.ENODATA
        assert await _errno_of(m.fs.getxattr(app.ino, "user.s3.build")) == errno.ENODATA
        with pytest.raises(FsError) as caught:
            m.fs.setxattr(a.ino, "user.s3.build", b"43")
        assert caught.value.errno == errno.ENOTSUP
        with pytest.raises(FsError) as caught:
            m.fs.removexattr(a.ino, "user.s3.build")
        assert caught.value.errno == errno.ENOTSUP
        # A file written here has none (and is not HEADed while pending).
        await write_file(m.fs, "mine.txt", b"mine")
        mine = await lookup(m.fs, "mine.txt")
        assert not [n for n in await m.fs.listxattr(mine.ino) if n.startswith("user.s3.")]


async def test_client_metadata_is_read_under_limits(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Operations, ``getxattr``: client metadata is untrusted: names that are
    not 1 to 128 of ``A-Za-z0-9_.-`` (starting with a letter or digit),
    values over 2,048 bytes and the proxy's ``dg-`` markers are left out,
    and at most 64 names show (the first in sorted order)."""
    meta = {
        "dg-tool": "deltaglider_proxy/1.19.0",
        "dg-original-name": "f.bin",
        "dg-file-sha256": _sha(b"x"),
        "dg-file-size": "1",
        "dg-note": "passthrough",
        "user-dg-encrypted": "aes-256-gcm-v1",
        "user-DG-Other": "hidden as the proxy hides it",
        "user-a/b": "slash",
        "user-..": "dots",
        "user-": "empty",
        "user-" + "n" * 129: "too long a name",
        "user-big": "v" * 2049,
        "user-edge": "v" * 2048,
        **{f"user-k{i:03d}": str(i) for i in range(100)},
    }
    assert proxymeta.client_metadata({"user-a\x00b": "nul", "user-a b": "space"}) == {}
    shown = proxymeta.client_metadata(meta)
    assert len(shown) == proxymeta.CLIENT_METADATA_MAX_ENTRIES == 64
    assert list(shown) == ["edge", *(f"k{i:03d}" for i in range(63))]
    store = MemoryStore()
    await store.put_bytes("f.bin", b"x", meta)
    async with mounted(store, tmp_path) as m:
        f = await lookup(m.fs, "f.bin")
        names = [n for n in await m.fs.listxattr(f.ino) if n.startswith("user.s3.")]
        assert names == [f"user.s3.{k}" for k in shown]
        assert await m.fs.getxattr(f.ino, "user.s3.edge") == b"v" * 2048
        for hidden in ("big", "dg-encrypted", "DG-Other", "k099"):
            assert await _errno_of(m.fs.getxattr(f.ino, f"user.s3.{hidden}")) == errno.ENODATA


async def test_special_files_only_where_a_foreign_objects_mode_says_so(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Operations, ``mkfifo``/``mknod``: an object a foreign tool wrote counts
    as a special file only when its ``mode`` says so and it is not a
    DeltaGlider file."""
    fifo_mode = str(stat.S_IFIFO | 0o640)
    body = b"a DeltaGlider file, whatever its mode says"
    await memory.put_bytes("s/fifo", b"", {"mode": fifo_mode})
    await memory.put_bytes("s/plain", b"", {})
    await memory.put_bytes(
        "s/dg",
        body,
        {
            "mode": fifo_mode,
            "dg-file-sha256": _sha(body),
            "dg-file-size": str(len(body)),
            "dg-compression": "none",
        },
    )
    async with mounted(memory, tmp_path) as m:
        names = await readdir(m.fs, "s")
        assert names["fifo"].kind.type_bits == stat.S_IFIFO
        assert names["plain"].kind.type_bits == stat.S_IFREG
        assert names["dg"].kind.type_bits == stat.S_IFREG
        assert await read_file(m.fs, "dg", (await lookup(m.fs, "s")).ino) == body


async def test_opening_a_large_direct_file_never_downloads_it_whole(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Operations, ``open``/``read``: direct files above the whole-verify size
    (32 MiB; 1 MiB here) are read by ranged GETs; opening never downloads them."""
    data = os.urandom(3 << 20)
    await memory.put_bytes("big.bin", data, {})
    store = FaultyStore(memory)
    async with mounted(store, tmp_path, RANGED) as m:
        node = await lookup(m.fs, "big.bin")
        handle = await m.fs.open(node.ino, os.O_RDONLY)
        try:
            assert await m.fs.read(handle.fh, 2 << 20, 4096) == data[2 << 20 : (2 << 20) + 4096]
        finally:
            await m.fs.release(handle.fh)
    assert store.count("download") == 0
    assert store.count("get_range") >= 1


@pytest.mark.expected_log(r"cannot read small\.txt")
async def test_a_small_direct_file_is_checked_whole_before_the_first_byte(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Integrity: files up to 32 MiB are checked whole before the first byte
    is returned: a direct file whose bytes fail their SHA-256 gives EIO on
    open or on its first read, never bytes."""
    async with mounted(memory, tmp_path) as m:
        await write_file(m.fs, "small.txt", b"0123456789" * 1000)
    flip_byte(memory, "small.txt", lambda body: len(body) - 1)
    async with mounted(memory, tmp_path) as m:
        node = await lookup(m.fs, "small.txt")

        async def first_read() -> bytes:
            handle = await m.fs.open(node.ino, os.O_RDONLY)
            try:
                return await m.fs.read(handle.fh, 0, 10)
            finally:
                await m.fs.release(handle.fh)

        assert await _errno_of(first_read()) == errno.EIO


# --- Buckets dgfs did not write ---------------------------------------------------------


async def test_rmdir_keeps_a_foreign_reference_and_a_name_too_long_to_show(
    memory: MemoryStore,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Buckets dgfs did not write: ``reference.bin`` without DeltaGlider
    metadata is hidden and never removed by ``rmdir``; a directory that lists
    empty but holds it, or a name over 255 bytes, is ``ENOTEMPTY``, and the
    daemon logs which keys at INFO."""
    caplog.set_level(logging.INFO, logger="dgfs")
    await memory.put_bytes("r/reference.bin", b"a user's file of that name", {})
    await memory.put_bytes("long/" + "L" * 256, b"too long to show", {})
    before = dict(memory.objects)
    async with mounted(memory, tmp_path) as m:
        for name in ("r", "long"):
            assert await readdir(m.fs, name) == {}
            assert await _errno_of(m.fs.rmdir(ROOT, name)) == errno.ENOTEMPTY
    assert memory.objects == before
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("rmdir r:" in line and "r/reference.bin" in line for line in logged), logged
    assert any("rmdir long:" in line and "L" * 256 in line for line in logged), logged


async def test_a_marker_with_bytes_keeps_them_through_chown_and_touch(
    memory: MemoryStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Buckets dgfs did not write: a ``dir/`` marker with bytes keeps them
    through ``chown`` and ``touch`` (``chmod``: tests/test_hostile.py)."""
    await memory.put_bytes("dm/", b"a marker with bytes", {})
    async with mounted(memory, tmp_path) as m:
        dm = await lookup(m.fs, "dm")
        await m.fs.setattr(dm.ino, uid=4242, gid=4343)
        await m.fs.setattr(dm.ino, mtime_ns=1_600_000_000_000_000_000)
    marker = memory.objects["dm/"]
    assert marker.body == b"a marker with bytes"
    assert (marker.metadata["uid"], marker.metadata["gid"]) == ("4242", "4343")
    assert marker.metadata["mtime"].startswith("1600000000")


async def test_unlink_of_a_file_in_both_forms_removes_both(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Buckets dgfs did not write: ``x`` and a usable ``x.delta`` are one
    file ``x``; an unlink of ``x`` removes both (a write replaces both:
    tests/test_core.py::test_overwrite_switches_form_and_removes_the_old_one)."""
    core, cache = make_core(memory, tmp_path / "writer")
    zips = [write(tmp_path / n, d) for n, d in ReleaseSeries(size=256 << 10).zips(2)]
    await core.put(zips[0], "two/first.zip")
    await core.put(zips[1], "two/x.zip")
    await core.aclose()
    cache.close()
    assert "two/x.zip.delta" in memory.objects
    await memory.put_bytes("two/x.zip", b"the older, direct form", {})
    async with mounted(memory, tmp_path) as m:
        two = await lookup(m.fs, "two")
        assert sorted(await readdir(m.fs, "two")) == ["first.zip", "x.zip"]
        await m.fs.unlink(two.ino, "x.zip")
    assert "two/x.zip" not in memory.objects and "two/x.zip.delta" not in memory.objects
    assert "two/first.zip.delta" in memory.objects


async def test_a_delta_whose_ref_key_points_nowhere_reads_while_the_cache_holds_its_reference(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Buckets dgfs did not write, broken content: a reference is found by
    its SHA-256 in the cache first, so a delta whose ``dg-ref-key`` points
    nowhere still reads while the cache holds the reference it names."""
    core, cache = make_core(memory, tmp_path / "core")
    try:
        zips = [write(tmp_path / n, d) for n, d in ReleaseSeries(size=256 << 10).zips(2)]
        await core.put(zips[0], "rel/first.zip")
        await core.put(zips[1], "rel/second.zip")
        delta = memory.objects["rel/second.zip.delta"]
        meta = {**delta.metadata, "dg-ref-key": "nowhere/reference.bin"}
        await memory.put_bytes("rel/second.zip.delta", delta.body, meta)
        await core.get("rel/second.zip", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == zips[1].read_bytes()
    finally:
        await core.aclose()
        cache.close()


def test_a_reader_jumping_around_a_large_direct_file_is_not_checked_end_to_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Integrity: a reader that jumps around a large direct file (further
    ahead than the kernel's read-ahead reorders) is not checked end to end.
    (Front to back, even reordered: tests/test_mount_readers.py.)"""
    monkeypatch.setattr(readers, "MAX_HELD_AHEAD", 256 << 10)
    data = os.urandom(2 << 20)
    served = bytearray(data)
    served[-1] ^= 0xFF

    async def jump_around() -> None:
        store = MemoryStore()
        await store.put_bytes("big.bin", bytes(served), {})
        reader = readers.RangeReader(store, "big.bin", len(data), _sha(data))
        chunk = 128 << 10
        offsets = list(range(0, len(data), chunk))
        for offset in offsets[::-1]:  # back to front: the first read is far ahead
            assert await reader.read(offset, chunk) == bytes(served[offset : offset + chunk])
        assert reader._check.gave_up

    trio.run(jump_around)


def test_permission_checks_are_the_kernels_and_bucket_modes_give_no_powers(
    tmp_path: Path,
) -> None:
    """Names and layout: permission checks are the kernel's
    (``default_permissions``); Buckets dgfs did not write: the mount is
    ``nosuid,nodev``, whatever the options."""
    for read_only, allow_other in ((False, False), (True, True)):
        config = MountConfig(
            location=S3Location.parse("bucket"),
            mountpoint=tmp_path,
            settings=Settings(cache_dir=tmp_path),
            fs_options=FsOptions(read_only=read_only),
            allow_other=allow_other,
        )
        assert {"default_permissions", "nosuid", "nodev"} <= _fuse_options(config)


async def test_non_ascii_metadata_is_stored_rfc_2047_encoded(
    s3_store: S3Store, moto_endpoint: str, bucket_name: str
) -> None:
    """Names and layout: metadata values that are not ASCII (file names in
    ``dg-original-name``) are stored RFC 2047 encoded, as S3 itself returns
    them; read back decoded."""
    await s3_store.put_bytes("k", b"x", {"dg-original-name": "café 東京.zip"})
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    raw = client.head_object(Bucket=bucket_name, Key="k")["Metadata"]["dg-original-name"]
    assert raw.lower().startswith("=?utf-8?") and raw.isascii()
    assert str(make_header(decode_header(raw))) == "café 東京.zip"
    assert (await s3_store.head("k")).metadata["dg-original-name"] == "café 東京.zip"


# --- Durability -----------------------------------------------------------------------


async def test_fsync_uploads_at_once_whatever_else_is_open(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Durability: a file is uploaded once the last handle that may write is
    closed, but ``fsync`` uploads at once, whatever else is open (the clock
    stands still: no upload delay ever passes)."""
    async with mounted(memory, tmp_path) as m:
        fh = await create(m.fs, "a.txt", b"synced\n")
        other = await m.fs.open((await lookup(m.fs, "a.txt")).ino, os.O_WRONLY)
        await m.fs.flush(fh)
        await m.fs.release(fh)
        assert "a.txt" not in memory.objects  # a handle that may write is still open
        await m.fs.fsync(other.fh)
        assert memory.objects["a.txt"].body == b"synced\n"
        await m.fs.flush(other.fh)
        await m.fs.release(other.fh)


async def test_what_follows_a_close_reaches_s3_in_the_same_upload(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Durability: uploads start after ``upload_delay``, so what usually
    follows a close (rsync's utimes and rename) reaches S3 in the same
    upload: one PUT, under the final name, with the final mtime."""
    assert FsOptions().upload_delay == OPTIONS.upload_delay == 0.5  # the mount's default
    async with mounted(faulty, tmp_path) as m:
        await write_file(m.fs, ".a.txt.XyZ123", b"rsync'd\n")
        tmp = await lookup(m.fs, ".a.txt.XyZ123")
        await m.fs.setattr(tmp.ino, mtime_ns=1_500_000_000_000_000_000)
        await m.fs.rename(ROOT, ".a.txt.XyZ123", ROOT, "a.txt", 0)
        assert not memory.objects
        mock_clock.jump(OPTIONS.upload_delay)
        await m.fs.wait_idle()
    assert list(memory.objects) == ["a.txt"]
    assert memory.objects["a.txt"].metadata["mtime"].startswith("1500000000")
    puts = faulty.count("upload") + faulty.count("put_bytes")
    assert (puts, faulty.count("copy"), faulty.count("delete")) == (1, 0, 0)


async def test_several_files_upload_at_once(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Durability: several files upload at once (``upload_workers=4``)."""
    assert FsOptions().upload_workers == 4  # the mount's default
    held = faulty.hang("upload", times=None)
    async with mounted(faulty, tmp_path) as m:
        for i in range(6):
            await write_file(m.fs, f"f{i}.txt", b"x")
        mock_clock.jump(OPTIONS.upload_delay)
        deadline = time.monotonic() + 20
        while faulty.in_flight("upload") < 4 and time.monotonic() < deadline:
            await trio.testing.wait_all_tasks_blocked()  # the others hash in worker threads
            time.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert faulty.in_flight("upload") == OPTIONS.upload_workers == 4
        held.release()
    assert sorted(bucket(memory)) == [f"f{i}.txt" for i in range(6)]


@pytest.mark.expected_log(r"upload of a\.txt failed for good")
async def test_sync_upload_close_returns_the_uploads_errno(
    memory: MemoryStore, faulty: FaultyStore, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Durability: with ``-o sync_upload``, the close of the last handle that
    may write waits for the upload and returns its errno."""
    faulty.fail("upload", transient=False)
    options = FsOptions(upload_delay=0.5, retry_delay=2.0, sync_upload=True)
    async with mounted(faulty, tmp_path, options) as m:
        fh = await create(m.fs, "a.txt", b"refused\n")
        with pytest.raises(DgfsError) as exc:
            await m.fs.flush(fh)
        assert errno_of(exc.value) == errno.EIO  # what the FUSE adapter replies
        await m.fs.release(fh)
        fh = await create(m.fs, "b.txt", b"stored\n")
        await m.fs.flush(fh)
        assert memory.objects["b.txt"].body == b"stored\n"  # before close returned
        await m.fs.release(fh)


@pytest.mark.seaweedfs
async def test_seaweedfs_keeps_no_metadata_on_directory_markers(seaweed_endpoint: str) -> None:
    """Names and layout: SeaweedFS keeps no user metadata on keys ending in
    ``/``, so there a directory's mode, owner and mtime last only until the
    next remount (a file's metadata is kept)."""
    bucket = f"dgfs-test-{uuid.uuid4().hex[:12]}"
    make_bucket(seaweed_endpoint, bucket)
    store = S3Store(bucket, endpoint_url=seaweed_endpoint, region=REGION)
    try:
        meta = {"mode": str(stat.S_IFDIR | 0o700), "uid": "1234", "mtime": "1600000000"}
        await store.put_bytes("d/", b"", meta)
        await store.put_bytes("d/f", b"f", {**meta, "mode": str(stat.S_IFREG | 0o600)})
        assert not {"mode", "uid", "mtime"} & set((await store.head("d/")).metadata)
        assert (await store.head("d/f")).metadata["uid"] == "1234"
    finally:
        await store.aclose()


# --- Several writers, several mounts ----------------------------------------------------


async def test_another_mounts_new_file_appears_once_the_listing_ttl_passes(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Several writers: a directory listing is cached for ``listing_ttl``
    seconds (default 10), attributes by the kernel for 1 s: another mount's
    new file appears within those times."""
    assert FsOptions().listing_ttl == 10
    fields = {f.name: f.default for f in dataclasses.fields(MountConfig)}
    attr_timeout = fields["attr_timeout"]
    assert isinstance(attr_timeout, float)
    assert attr_timeout == 1.0
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with mounted(memory, tmp_path / "a") as a:
        await a.fs.mkdir(ROOT, "d", 0o755, UID, GID)
        assert await readdir(a.fs, "d") == {}
        async with mounted(memory, tmp_path / "b", FAST_RETRIES) as b:
            await write_file(b.fs, "new.txt", b"from b", (await lookup(b.fs, "d")).ino)
        assert "d/new.txt" in memory.objects  # the clock stands still meanwhile
        mock_clock.jump(9)
        assert await readdir(a.fs, "d") == {}  # the cached listing
        mock_clock.jump(2)
        assert list(await readdir(a.fs, "d")) == ["new.txt"]
        attrs = FuseOperations(a.fs, attr_timeout=attr_timeout)._attrs(await lookup(a.fs, "d"))
        assert attrs.attr_timeout == attrs.entry_timeout == 1.0


async def test_a_directory_replaced_by_a_file_elsewhere_stops_showing_as_a_directory(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Another mount removes everything under ``d/`` and stores a file ``d``.
    Once the listing TTL is over, ``stat`` of the old inode is ENOENT and
    ``d`` is the file. Before, each stat of the old inode confirmed the
    directory S3 no longer held, and kept it showing for as long as
    something stat'ed it (a shell's cwd, a file manager)."""
    await memory.put_bytes("d/x", b"x", {})
    async with mounted(memory, tmp_path) as m:
        d = await lookup(m.fs, "d")
        assert d.kind is NodeKind.DIR
        await memory.delete("d/x")  # another mount
        await memory.put_bytes("d", b"now a file", {})
        mock_clock.jump(OPTIONS.listing_ttl + 1)
        with pytest.raises(FsError) as exc:
            await m.fs.getattr(d.ino)
        assert exc.value.errno == errno.ENOENT
        mock_clock.jump(0.5)  # within the TTL of that listing
        node = await lookup(m.fs, "d")
        assert (node.kind, node.size) == (NodeKind.FILE, len(b"now a file"))


async def test_directories_s3_does_not_list_as_such_keep_showing(
    memory: MemoryStore, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """What the rule above must not drop: a directory without a marker (a
    prefix only), and one only this mount's files not uploaded yet imply,
    even once another mount stored a file of its name (the upload makes it
    a directory again: S3 lists the directory, not the file)."""
    await memory.put_bytes("implied/x", b"x", {})
    await memory.put_bytes("d/x", b"x", {})
    async with mounted(memory, tmp_path) as m:
        implied = await lookup(m.fs, "implied")
        d = await lookup(m.fs, "d")
        fh = await create(m.fs, "new", b"not uploaded yet", d.ino)  # held open
        await memory.delete("d/x")  # another mount
        await memory.put_bytes("d", b"a file", {})
        mock_clock.jump(OPTIONS.listing_ttl + 1)
        assert (await m.fs.getattr(implied.ino)).kind is NodeKind.DIR
        assert (await m.fs.getattr(d.ino)).kind is NodeKind.DIR
        await m.fs.release(fh)


@pytest.mark.expected_log(r"cannot read rel/a\.zip")
async def test_without_conditional_puts_a_file_stored_while_another_reference_uploads_is_lost(
    memory: MemoryStore, tmp_path: Path
) -> None:
    """Several writers: on a store without conditional PUT, a mount whose file
    is stored completely while another mount's reference for the same new
    directory is still uploading loses the race: that file reads as EIO,
    and ``dgfs verify`` reports it. (With the reference stored first, the
    loser is stored again: tests/test_two_mounts.py.)"""
    async with mounted(memory, home(tmp_path, "setup")) as m:
        await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
    store_a, store_b = FaultyStore(memory), FaultyStore(memory)
    b_ref = store_b.hang("upload", key="rel/reference.bin")  # B saw none; its PUT held
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
        await a.fs.wait_idle()  # A's reference and delta stored, and checked
        b_ref.release()  # B's reference overwrites A's
        nursery.start_soon(b.fs.wait_idle)
    assert await read_fresh(memory, tmp_path, "rel/b.zip") == RELEASES[2][1]
    async with mounted(memory, home(tmp_path, "reader")) as m:
        rel = (await lookup(m.fs, "rel")).ino
        with pytest.raises(DgfsError) as exc:
            await read_file(m.fs, "a.zip", rel)
        assert errno_of(exc.value) == errno.EIO
    core, cache = make_core(memory, tmp_path / "verify")
    try:
        assert (await verify_key(core, "rel/a.zip")).status is Status.FAILED
        assert (await verify_key(core, "rel/b.zip")).status is Status.OK
    finally:
        await core.aclose()
        cache.close()


async def test_a_chmod_by_another_mount_within_the_second_of_the_last_write_shows_after_it(
    tmp_path: Path,
) -> None:
    """Several writers: object attributes are cached on disk keyed by ETag and
    Last-Modified, and a chmod by another mount within the second of the
    object's last write keeps both. A mount that read the attributes in
    that second shows the old ones until a listing dated after it (and a
    second's margin for gateways' clocks): that listing asks the object
    again, also after a remount
    (tests/test_namespace.py::test_a_row_read_in_the_second_of_its_write_is_asked_again_once_after_it)."""
    store = CountingStore()
    await fill(store, 1)
    key = "rel/app-0.zip.delta"
    written = store.objects[key]
    second = written.last_modified.replace(microsecond=100_000) + timedelta(hours=1)
    store.objects[key] = dataclasses.replace(written, last_modified=second)
    store.clock = lambda: second + timedelta(milliseconds=500)
    db = tmp_path / "attrs.sqlite"
    first = namespace(store, db)
    assert (await first.listing("rel"))["app-0.zip"].mode == 0o100640
    await first.flush_attr_cache()

    # Another mount's chmod in that second: the same ETag and Last-Modified.
    await store.copy(key, key, {**written.metadata, "mode": str(0o100600)})
    store.objects[key] = dataclasses.replace(store.objects[key], last_modified=second)
    assert (await namespace(store, db).listing("rel"))["app-0.zip"].mode == 0o100640
    store.clock = lambda: second + timedelta(seconds=2, milliseconds=100)
    assert (await namespace(store, db).listing("rel"))["app-0.zip"].mode == 0o100600


async def test_of_two_forms_in_one_second_without_created_at_the_delta_shows() -> None:
    """Buckets dgfs did not write: of ``x`` and a usable ``x.delta`` with the
    same Last-Modified second and no ``dg-created-at``, the delta shows
    (newer Last-Modified: tests/test_namespace.py; ``dg-created-at``:
    tests/test_format_proxy.py)."""
    store = MemoryStore()
    await store.put_bytes("a.zip.delta", b"d", delta_meta("a.zip", 10))
    await store.put_bytes(
        "a.zip", b"x" * 7, {"dg-file-sha256": "ef" * 32, "dg-compression": "none"}
    )
    second = store.objects["a.zip"].last_modified.replace(microsecond=0)
    for key in ("a.zip", "a.zip.delta"):
        store.objects[key] = dataclasses.replace(store.objects[key], last_modified=second)
    assert (await namespace(store, None).listing(""))["a.zip"].size == 10  # the delta's


@pytest.mark.parametrize(
    "meta",
    [
        {"dg-file-sha256": "ab" * 32, "dg-file-size": str(2**63)},
        {"dg-file-sha256": "ab" * 32, "dg-file-size": "1_000"},
        {"dg-file-sha256": "not hex", "dg-file-size": "7"},
    ],
)
def test_a_direct_object_with_garbled_metadata_is_a_plain_file(meta: dict[str, str]) -> None:
    """Buckets dgfs did not write: a direct object (no ``.delta``) whose
    DeltaGlider metadata is garbled is a plain file with its own bytes."""
    stored = fmt.classify_shown("h/x.zip", 7, meta)
    assert (stored.kind, stored.visible_key, stored.original_size) == (
        fmt.Kind.FOREIGN,
        "h/x.zip",
        7,
    )


# --- the page itself ----------------------------------------------------------------------

SEMANTICS = Path(__file__).parent.parent / "docs" / "SEMANTICS.md"


def _promises(text: str) -> list[str]:
    """The promises of SEMANTICS.md, each as one string: every table row,
    every bullet and every paragraph of prose, but for the page's
    introduction, the table titles and the pjdfstest figures (measured by
    benchmarks/pjdfstest.py, not by a test)."""
    found: list[str] = []
    headers = {"In the mount", "In the bucket", "Operation", "tests"}
    for block in re.split(r"\n\s*\n", "## " + text.split("\n## ", 1)[1]):
        lines = block.strip().splitlines()
        if lines[0].startswith("|"):
            for line in lines:
                cells = [c.strip() for c in line.strip("|").split("|")]
                if cells[0] not in headers and not all(set(c) <= {"-"} for c in cells):
                    found.append(line)
        elif lines[0].startswith("- "):
            for line in lines:
                if line.startswith("- "):
                    found.append(line)
                else:
                    found[-1] += " " + line.strip()
        elif not lines[0].startswith(("#", "[pjdfstest]", "**Names.**")):
            found.append(" ".join(lines))
    return found


def test_every_promise_names_a_test_that_exists() -> None:
    """Every promise of docs/SEMANTICS.md (table row, bullet, paragraph)
    names a test, and each test or test file it names exists."""
    text = SEMANTICS.read_text()
    promises = _promises(text)
    assert len(promises) > 60
    unproved = [p[:80] for p in promises if "`tests/test_" not in p]
    assert not unproved
    for ref in sorted(set(re.findall(r"`(tests/test_\w+\.py)(?:::(\w+))?`", text))):
        path, name = ref
        source = (SEMANTICS.parent.parent / path).read_text()
        if name:
            assert re.search(rf"^(async )?def {name}\(", source, re.MULTILINE), f"{path}::{name}"
