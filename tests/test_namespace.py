"""Directory listings without FUSE: names, sizes, hidden objects, HEADs saved by ETag."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
import zstandard

from dgfs import format as fmt
from dgfs.fs import attrcache, dirindex
from dgfs.fs.attrcache import AttrCache, version_of
from dgfs.fs.entries import DirEntry, NodeKind
from dgfs.fs.namespace import Namespace
from dgfs.store.base import ListPage, ObjectHead
from dgfs.store.memory import MemoryStore


class CountingStore(MemoryStore):
    """A memory store that counts HEAD requests."""

    def __init__(self) -> None:
        super().__init__("counting")
        self.heads = 0

    async def head(self, key: str) -> ObjectHead:
        self.heads += 1
        return await super().head(key)


class UndatedListings(CountingStore):
    """A store whose listings carry no ``Date`` header."""

    async def list_pages(
        self, prefix: str = "", delimiter: str | None = "/"
    ) -> AsyncIterator[ListPage]:
        async for page in super().list_pages(prefix, delimiter):
            yield dataclasses.replace(page, observed_at=None)


def delta_meta(name: str, size: int) -> dict[str, str]:
    return {
        "dg-file-sha256": "ab" * 32,
        "dg-file-size": str(size),
        "dg-ref-key": "rel/reference.bin",
        "dg-ref-sha256": "cd" * 32,
        "dg-original-name": name,
        "mtime": "1700000000.5",
        "mode": str(0o100640),
    }


def namespace(store: MemoryStore, db: Path | None, prefix: str = "") -> Namespace:
    return Namespace(store, AttrCache(db), root_prefix=prefix, listing_ttl=60, mounted_at_ns=1)


async def fill(store: MemoryStore, count: int) -> None:
    await store.put_bytes("rel/reference.bin", b"R" * 100, {"dg-file-sha256": "cd" * 32})
    for i in range(count):
        name = f"app-{i}.zip"
        await store.put_bytes(f"rel/{name}.delta", b"d" * 10, delta_meta(name, 5000 + i))
    await store.put_bytes("rel/notes.txt", b"hello", {})
    await store.put_bytes("rel/sub/", b"", {"mode": str(0o40700), "mtime": "1600000000"})
    await store.put_bytes(".deltaglider/stats_quick.json", b"{}", {})
    age(store)


def age(store: MemoryStore, by: timedelta = timedelta(minutes=1)) -> None:
    """Every object written ``by`` earlier: settled (``dirindex.settled``), as
    what a real writer stored before the listing's second."""
    for key, obj in store.objects.items():
        store.objects[key] = dataclasses.replace(obj, last_modified=obj.last_modified - by)


async def test_listing_shows_original_names_and_sizes() -> None:
    store = CountingStore()
    await fill(store, 3)
    entries = await namespace(store, None).listing("rel")
    assert sorted(entries) == ["app-0.zip", "app-1.zip", "app-2.zip", "notes.txt", "sub"]
    app = entries["app-2.zip"]
    assert (app.kind, app.size, app.mode) == (NodeKind.FILE, 5002, 0o100640)
    assert app.mtime_ns == 1_700_000_000_500_000_000
    assert app.stored is not None and app.stored.kind is fmt.Kind.DELTA
    assert entries["notes.txt"].stored is not None
    assert entries["notes.txt"].stored.kind is fmt.Kind.FOREIGN
    sub = entries["sub"]
    assert (sub.kind, sub.mode, sub.mtime_ns) == (NodeKind.DIR, 0o40700, 1_600_000_000 * 10**9)
    root = await namespace(store, None).listing("")
    assert sorted(root) == ["rel"]  # .deltaglider/ is never shown


async def test_remount_does_not_head_unchanged_objects(tmp_path: Path) -> None:
    store = CountingStore()
    await fill(store, 40)
    db = tmp_path / "attrs.sqlite"
    first = namespace(store, db)
    await first.listing("rel")
    assert store.heads >= 41  # every object once (+ the sub/ marker)
    await first.flush_attr_cache()

    store.heads = 0
    second = namespace(store, db)  # a remount: new process, same cache file
    entries = await second.listing("rel")
    assert entries["app-39.zip"].size == 5039
    assert store.heads == 1  # only the directory marker; no object HEAD again

    # A changed object (new ETag) is asked again.
    await store.put_bytes("rel/app-0.zip.delta", b"changed", delta_meta("app-0.zip", 1))
    third = namespace(store, db)
    store.heads = 0
    assert (await third.listing("rel"))["app-0.zip"].size == 1
    assert store.heads == 2


async def test_a_metadata_change_keeping_the_etag_is_seen_after_a_remount(tmp_path: Path) -> None:
    """chmod/utime by another mount is a server-side copy onto the object itself:
    same content, same ETag, only LastModified moves. The cached HEAD of the
    old version must not be served for it (found by the model test)."""
    store = CountingStore()
    await fill(store, 1)
    db = tmp_path / "attrs.sqlite"
    first = namespace(store, db)
    assert (await first.listing("rel"))["app-0.zip"].mode == 0o100640
    await first.flush_attr_cache()

    key = "rel/app-0.zip.delta"
    await store.copy(key, key, {**delta_meta("app-0.zip", 5000), "mode": str(0o100600)})
    changed = store.objects[key]
    assert changed.etag == (await store.head(key)).etag  # as S3 does: the content's MD5
    # A second later than the version the cache saw.
    store.objects[key] = dataclasses.replace(
        changed, last_modified=changed.last_modified + timedelta(seconds=1)
    )
    second = namespace(store, db)
    assert (await second.listing("rel"))["app-0.zip"].mode == 0o100600


class HeldListStore(MemoryStore):
    """A memory store whose next LIST is answered only once the test lets it go."""

    def __init__(self) -> None:
        super().__init__("held")
        self.listed = trio.Event()  # the LIST was taken (its answer is held)
        self.answer = trio.Event()

    async def list(self, prefix: str = "", delimiter: str | None = "/") -> ListPage:
        page = await super().list(prefix, delimiter)
        self.listed.set()
        await self.answer.wait()
        return page


async def test_changes_noted_while_a_listing_is_fetched_are_kept() -> None:
    """A file that reaches S3 (or is removed) after the LIST was taken is listed as it is now.

    The mount notes its own changes into cached listings; one being fetched
    must not lose them (a file settling during a readdir vanished from it).
    """
    store = HeldListStore()
    await store.put_bytes("d/gone.txt", b"x", {})
    ns = namespace(store, None)
    result: dict[str, DirEntry] = {}

    async def fetch() -> None:
        result.update(await ns.listing("d"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch)
        await store.listed.wait()
        await store.put_bytes("d/new.txt", b"new", {})
        ns.note("d", DirEntry("new.txt", NodeKind.FILE, size=3))
        ns.drop("d/gone.txt")
        store.answer.set()
    assert sorted(result) == ["new.txt"]
    assert sorted(ns.cached("d") or {}) == ["new.txt"]


async def test_newer_form_wins_when_both_exist() -> None:
    store = MemoryStore()
    await store.put_bytes("a.zip.delta", b"d", delta_meta("a.zip", 10))
    await store.put_bytes(
        "a.zip", b"x" * 7, {"dg-file-sha256": "ef" * 32, "dg-compression": "none"}
    )
    entries = await namespace(store, None).listing("")
    assert entries["a.zip"].size == 7  # the direct object, written last


@pytest.mark.parametrize("prefix", ["", "mnt/root"])
async def test_prefix_mount_keys(prefix: str) -> None:
    ns = namespace(MemoryStore(), None, prefix)
    assert ns.key_of("a/b") == (f"{prefix}/a/b" if prefix else "a/b")
    assert ns.dir_prefix("") == (f"{prefix}/" if prefix else "")


@pytest.mark.expected_log("attribute cache .* unreadable")
def test_attr_cache_survives_and_recovers_from_garbage(tmp_path: Path) -> None:
    db = tmp_path / "attrs.sqlite"
    cache = AttrCache(db)
    cache.put("k", "v1", {"dg-file-size": "5", "x-unrelated": "dropped"}, settled=True)
    cache.put("k", "v0", {"dg-file-size": "4"}, settled=False)
    cache.write(cache.take_dirty())
    again = AttrCache(db)
    assert again.get("k", "v1") == {"dg-file-size": "5"}
    assert again.get("k", "v2") is None
    assert again.settled("k", "v1") and not again.settled("k", "v0")
    db.write_bytes(b"not a database at all" * 100)
    broken = AttrCache(db)  # unreadable: starts empty instead of failing the mount
    assert broken.get("k", "v1") is None


def test_a_slot_s_attribute_cache_of_an_older_format_is_removed(tmp_path: Path) -> None:
    """An upgrade starts a new cache file (its format is in the name); the
    old one, never read again, stayed in cache_dir for good."""
    old = ["attrs-b-1.sqlite", "attrs-b-1.v5.sqlite", "attrs-b-1.v5.sqlite-wal"]
    kept = [
        f"attrs-b-1.{attrcache.VERSION}.sqlite-wal",  # the current file's, in use
        f"attrs-b-1.{attrcache.VERSION}.sqlite-shm",
        "attrs-b-12.v5.sqlite",  # other slots'
        "attrs-b-1-2.v5.sqlite",
        "attrs-b-1.1.v5.sqlite",
        f"attrs-b-1.1.{attrcache.VERSION}.sqlite",
    ]
    for name in old + kept:
        (tmp_path / name).write_bytes(b"")
    cache = attrcache.for_slot(tmp_path, "b-1")
    assert cache.path == tmp_path / f"attrs-b-1.{attrcache.VERSION}.sqlite"
    assert sorted(p.name for p in tmp_path.iterdir() if p != cache.path) == sorted(kept)


def test_a_forgotten_key_is_forgotten_on_disk_too(tmp_path: Path) -> None:
    """``forget`` dropped the rows in memory only: one written earlier, or
    still waiting to be written, came back after a remount (found by review)."""
    db = tmp_path / "attrs.sqlite"
    cache = AttrCache(db)
    cache.put("k", "v1", {"dg-file-size": "5"}, settled=False)
    cache.put("other", "v1", {"dg-file-size": "7"}, settled=True)
    cache.write(cache.take_dirty())
    cache.put("k", "v2", {"dg-file-size": "6"}, settled=True)  # not written yet
    cache.forget("k")
    cache.write(cache.take_dirty())
    again = AttrCache(db)
    assert not again.knows("k")
    assert again.get("other", "v1") == {"dg-file-size": "7"}


@pytest.mark.expected_log("could not persist attribute cache")
async def test_a_forget_that_failed_to_be_written_is_written_at_the_next_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk failed the round that was to drop a forgotten key's rows:
    they were lost with it, and a remount found the old row (a new object
    with the same ETag within the second shows its attributes). Now the
    next round drops them; two failed rounds log one warning, and the
    recovery one line."""
    db = tmp_path / "attrs.sqlite"
    cache = AttrCache(db)
    cache.put("k", "v1", {"dg-file-size": "5"}, settled=False)
    cache.write(cache.take_dirty())
    ns = Namespace(MemoryStore(), cache, root_prefix="", listing_ttl=60, mounted_at_ns=1)
    real_connect = AttrCache._connect
    full = 2

    def connect(self: AttrCache) -> sqlite3.Connection:
        nonlocal full
        if full:
            full -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return real_connect(self)

    def rows_on_disk() -> int:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return int(conn.execute("SELECT count(*) FROM heads WHERE key = 'k'").fetchone()[0])

    caplog.set_level(logging.DEBUG, logger="dgfs.fs.attrcache")
    monkeypatch.setattr(AttrCache, "_connect", connect)
    cache.forget("k")
    await ns.flush_attr_cache(unmounting=True)
    assert rows_on_disk() == 1  # the round failed
    await ns.flush_attr_cache(unmounting=True)  # fails again: nothing new to say
    await ns.flush_attr_cache(unmounting=True)
    assert rows_on_disk() == 0
    said = [
        (r.levelname, r.getMessage()) for r in caplog.records if "attribute cache" in r.getMessage()
    ]
    assert [level for level, _ in said] == ["WARNING", "DEBUG", "INFO"], said


async def test_a_fresh_mount_reads_the_directory_index_instead_of_heading(
    tmp_path: Path,
) -> None:
    store = CountingStore()
    await fill(store, 40)
    first = namespace(store, None)
    await first.listing("rel")
    assert store.heads >= 41
    await first.flush_attr_cache()  # writes the index the listing found missing
    index_key = dirindex.index_key("rel/")
    assert index_key in store.objects

    store.heads = 0
    second = namespace(store, None)  # another machine: no attribute cache
    entries = await second.listing("rel")
    assert entries["app-39.zip"].size == 5039 and entries["app-39.zip"].mode == 0o100640
    assert store.heads == 1  # the sub/ marker only

    # An object changed since is not taken from the index (its version moved on).
    await store.put_bytes("rel/app-0.zip.delta", b"changed", delta_meta("app-0.zip", 1))
    store.heads = 0
    third = namespace(store, None)
    assert (await third.listing("rel"))["app-0.zip"].size == 1
    assert store.heads == 2


async def test_an_index_never_vouches_for_a_version_that_can_still_change_unseen() -> None:
    """A version is an ETag and a Last-Modified second: an object changed again
    within the second of its last write (a chmod right after an upload)
    keeps it. An index made in that second leaves the object out, so a
    fresh mount HEADs it and shows the change."""
    store = CountingStore()
    await fill(store, 20)
    key = "rel/app-3.zip.delta"
    written = store.objects[key]
    # Written in the second the listing below is made (the store's clock).
    in_the_listed_second = written.last_modified + timedelta(hours=1)
    store.objects[key] = dataclasses.replace(written, last_modified=in_the_listed_second)
    first = namespace(store, None)
    await first.listing("rel")
    await first.flush_attr_cache()
    rows = dirindex.decode("rel/", store.objects[dirindex.index_key("rel/")].body)
    assert key not in rows and "rel/app-4.zip.delta" in rows

    # A chmod within that second: the same bytes (ETag), the same second.
    await store.put_bytes(key, written.body, {**delta_meta("app-3.zip", 5003), "mode": "33152"})
    store.objects[key] = dataclasses.replace(store.objects[key], last_modified=in_the_listed_second)
    store.heads = 0
    entries = await namespace(store, None).listing("rel")  # a fresh mount
    assert entries["app-3.zip"].mode == 0o100600
    assert entries["app-4.zip"].mode == 0o100640
    assert store.heads == 2  # the sub/ marker and app-3


@pytest.mark.parametrize("listings", ["dated", "undated"])
async def test_a_row_read_in_the_second_of_its_write_stays_out_of_later_indexes(
    tmp_path: Path, listings: str
) -> None:
    """Mount A reads an object's attributes in the second of its last write;
    another mount's chmod in that same second keeps the version. When A
    writes the directory's index later, from its attribute cache, that row
    stays out: fresh mounts HEAD the object and show the chmod (found by
    review: the first rule compared with the later listing's time). A
    listing dated after that second asks the object again: its row, now
    settled, goes in with the chmod."""
    store = CountingStore() if listings == "dated" else UndatedListings()
    await fill(store, 20)
    key = "rel/app-0.zip.delta"
    written = store.objects[key]
    second = written.last_modified.replace(microsecond=100_000) + timedelta(hours=1)
    store.objects[key] = dataclasses.replace(written, last_modified=second)
    store.clock = lambda: second + timedelta(milliseconds=500)  # the same second
    a = namespace(store, tmp_path / "attrs.sqlite")
    assert (await a.listing("rel"))["app-0.zip"].mode == 0o100640

    # Another mount's chmod within that second: the same bytes, the same second.
    await store.put_bytes(key, written.body, {**delta_meta("app-0.zip", 5000), "mode": "33152"})
    store.objects[key] = dataclasses.replace(store.objects[key], last_modified=second)
    # Files come in later; A lists again and writes the index.
    store.clock = lambda: second + timedelta(minutes=1)
    for i in range(20, 25):
        await store.put_bytes(f"rel/app-{i}.zip.delta", b"d" * 10, delta_meta(f"app-{i}.zip", 1))
    store.clock = lambda: second + timedelta(minutes=2)
    await a.listing("rel", fresh=True)
    await a.flush_attr_cache()
    rows = dirindex.decode("rel/", store.objects[dirindex.index_key("rel/")].body)
    assert "rel/app-24.zip.delta" in rows
    if listings == "dated":
        assert rows[key][1]["mode"] == "33152"
    else:
        assert key not in rows

    entries = await namespace(store, None).listing("rel")  # a fresh mount
    assert entries["app-0.zip"].mode == 0o100600


async def test_a_row_read_in_the_second_of_its_write_is_asked_again_once_after_it(
    tmp_path: Path,
) -> None:
    """A row read within its version's second is asked again by the first
    listing whose ``Date`` shows that second over (plus the margin for
    gateways' clocks), then no more; one read after it is never asked again."""
    store = CountingStore()
    await fill(store, 1)
    key = "rel/app-0.zip.delta"
    second = store.objects[key].last_modified.replace(microsecond=100_000) + timedelta(hours=1)
    store.objects[key] = dataclasses.replace(store.objects[key], last_modified=second)
    mount = namespace(store, tmp_path / "attrs.sqlite")
    heads = []
    for after in (0.5, 1.5, 2.1, 3.5):  # seconds after the write
        store.clock = lambda after=after: second + timedelta(seconds=after)
        before = store.heads
        await mount.listing("rel", fresh=True)
        heads.append(store.heads - before)
    # The first listing: the directory marker, notes.txt (written long
    # before: settled) and the object; within the margin nothing; after
    # it the object once more, then it is settled.
    assert heads == [3, 0, 1, 0]


async def test_rows_asked_again_neither_read_nor_write_the_index(tmp_path: Path) -> None:
    """Found by review: rows asked again after their second counted towards
    the index's threshold, so a large directory taking a file now and then
    read and rewrote its whole index at every listing. They are HEADed on
    their own, and settle also on a store whose HEADs carry no ``Date``."""

    class UndatedHeads(CountingStore):
        reads = 0

        async def head(self, key: str) -> ObjectHead:
            return dataclasses.replace(await super().head(key), observed_at=None)

        async def get_range(
            self, key: str, start: int, length: int, *, if_match: str | None = None
        ) -> bytes:
            self.reads += 1
            return await super().get_range(key, start, length, if_match=if_match)

    store = UndatedHeads()
    await fill(store, 6)
    second = store.objects["rel/app-0.zip.delta"].last_modified + timedelta(hours=1)
    for i in range(6):
        key = f"rel/app-{i}.zip.delta"
        store.objects[key] = dataclasses.replace(store.objects[key], last_modified=second)
    store.clock = lambda: second + timedelta(milliseconds=500)
    mount = namespace(store, tmp_path / "attrs.sqlite")
    await mount.listing("rel")  # every app row read in its second
    await mount.flush_attr_cache()
    index = store.objects[dirindex.index_key("rel/")]  # of notes.txt only
    assert list(dirindex.decode("rel/", index.body)) == ["rel/notes.txt"]

    store.clock = lambda: second + timedelta(seconds=3)
    store.heads = store.reads = 0
    await mount.listing("rel", fresh=True)
    await mount.flush_attr_cache()
    assert (store.heads, store.reads) == (6, 0)  # each row once; the index not read
    assert store.objects[dirindex.index_key("rel/")] == index  # nor written
    store.heads = 0
    await mount.listing("rel", fresh=True)
    assert store.heads == 0  # settled by the listing's Date


async def test_a_listing_of_nothing_settled_writes_no_index() -> None:
    """Every object written in the second being listed: an index would hold
    no row, and only replace one another mount wrote that may hold some."""
    store = CountingStore()
    await fill(store, 20)
    age(store, timedelta(hours=-1))
    first = namespace(store, None)
    await first.listing("rel")
    await first.flush_attr_cache()
    assert dirindex.index_key("rel/") not in store.objects


async def test_an_index_of_the_format_before_settled_rows_is_not_used() -> None:
    """Indexes written before rows had to be settled may vouch for a version
    changed within its second: read as none (HEADs), then written anew."""
    store = CountingStore()
    await fill(store, 20)
    obj = store.objects["rel/app-1.zip.delta"]
    row = [version_of(obj.etag, obj.last_modified), delta_meta("app-1.zip", 1)]
    doc = {"format": "dgfs-dir-index-2", "prefix": "rel/", "objects": {"rel/app-1.zip.delta": row}}
    old = zstandard.ZstdCompressor().compress(json.dumps(doc).encode())
    assert dirindex.decode("rel/", old) == {}
    await store.put_bytes(dirindex.index_key("rel/"), old, {})
    first = namespace(store, None)
    assert (await first.listing("rel"))["app-1.zip"].size == 5001
    assert store.heads == 22  # the 20 deltas, notes.txt and the sub/ marker: no row used
    await first.flush_attr_cache()
    assert "rel/app-1.zip.delta" in dirindex.decode(
        "rel/", store.objects[dirindex.index_key("rel/")].body
    )


@pytest.mark.expected_log("directory index not used")
async def test_a_garbled_or_lying_directory_index_costs_heads_never_a_wrong_attribute() -> None:
    store = CountingStore()
    await fill(store, 20)
    # A row for the right key with another version, and one for a key of another directory.
    obj = store.objects["rel/app-1.zip.delta"]
    lying = {
        "rel/app-1.zip.delta": ("0" * 32 + "@1", {**delta_meta("app-1.zip", 1)}),
        "rel/sub/x.delta": (obj.etag, delta_meta("x", 1)),
    }
    await store.put_bytes(dirindex.index_key("rel/"), dirindex.encode("rel/", lying), {})
    entries = await namespace(store, None).listing("rel")
    assert entries["app-1.zip"].size == 5001
    await store.put_bytes(dirindex.index_key("rel/"), b"garbage" * 10, {})
    store.heads = 0
    entries = await namespace(store, None).listing("rel")
    assert entries["app-1.zip"].size == 5001
    assert store.heads == 22  # 20 deltas, notes.txt and the sub/ marker


async def test_a_read_only_mount_writes_no_index() -> None:
    store = CountingStore()
    await fill(store, 20)
    ns = Namespace(
        store, AttrCache(None), root_prefix="", listing_ttl=60, mounted_at_ns=1, write_indexes=False
    )
    await ns.listing("rel")
    await ns.flush_attr_cache()
    assert not [k for k in store.objects if k.startswith(dirindex.PREFIX)]


class GatedHeads(CountingStore):
    """HEADs of the keys in ``gated`` are answered, then held until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gated: set[str] = set()
        self.gate = trio.Event()

    async def head(self, key: str) -> ObjectHead:
        head = await super().head(key)
        if key in self.gated:
            await self.gate.wait()
        return head


async def test_no_index_is_written_for_a_directory_renamed_while_it_is_listed(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Found by review: a listing of ``rel`` (a background one, another
    process's ``ls -l``) had its HEADs out when ``mv rel new`` ended; it came
    back after and found the index of ``rel/`` due."""
    from tests.fsharness import GID, OPTIONS, ROOT, UID, mounted, rename, ticking_clock

    store = GatedHeads()
    store.clock = ticking_clock()
    async with mounted(store, tmp_path) as m:
        await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        for i in range(6):
            await store.put_bytes(f"rel/n-{i}.txt", b"n", {})  # another machine's
        store.gated = {f"rel/n-{i}.txt" for i in range(6)}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: m.fs.ns.listing("rel", fresh=True))
            await trio.testing.wait_all_tasks_blocked()  # its HEADs are answered, held
            store.gated = set()
            await rename(m.fs, "rel", "new")
            store.gate.set()  # now the listing comes back
        mock_clock.jump(OPTIONS.upload_delay)
    assert "new/n-0.txt" in store.objects
    assert not [k for k in store.objects if k.startswith(dirindex.PREFIX)]


async def test_a_directory_written_then_renamed_gets_its_index_under_the_new_name(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Found by review: files stored into ``staging``, then ``mv staging
    final`` before the uploads went quiet: the writer listed ``staging``
    (gone) for its index, and the first fresh mount HEADed every file of
    ``final``."""
    from tests.fsharness import GID, OPTIONS, ROOT, UID, mounted, rename, ticking_clock, write_file

    store = CountingStore()
    store.clock = ticking_clock()
    async with mounted(store, tmp_path) as m:
        staging = await m.fs.mkdir(ROOT, "staging", 0o755, UID, GID)
        for i in range(6):
            await write_file(m.fs, f"n-{i}.txt", b"n\n", parent=staging.ino)
        mock_clock.jump(OPTIONS.upload_delay)
        await m.fs.wait_idle()  # stored under staging/
        await rename(m.fs, "staging", "final")
    assert dirindex.index_key("final/") in store.objects
    assert dirindex.index_key("staging/") not in store.objects


@pytest.mark.parametrize("how", ["rmdir", "rename"])
async def test_no_index_is_written_for_a_directory_removed_or_renamed_after_its_listing(
    tmp_path: Path, mock_clock: trio.testing.MockClock, how: str
) -> None:
    """A listing found ``rel``'s index missing; ``rm -r rel`` (or ``mv rel
    new``) came before the index was written, which then described keys
    that no longer exist, and stayed in the bucket for good."""
    from tests.fsharness import GID, OPTIONS, ROOT, UID, mounted, rename, ticking_clock

    store = CountingStore()
    store.clock = ticking_clock()
    async with mounted(store, tmp_path) as m:
        rel = await m.fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        for i in range(6):
            await store.put_bytes(f"rel/n-{i}.txt", b"n", {})  # another machine's
        await m.fs.ns.listing("rel", fresh=True)  # finds the index missing
        if how == "rmdir":
            for i in range(6):
                await m.fs.unlink(rel.ino, f"n-{i}.txt")
            await m.fs.rmdir(ROOT, "rel")
        else:
            await rename(m.fs, "rel", "new")
        mock_clock.jump(OPTIONS.upload_delay)
    assert not [k for k in store.objects if k.startswith(dirindex.PREFIX)]


async def test_a_mount_that_stored_many_files_writes_their_directory_index(
    tmp_path: Path,
) -> None:
    """The writer lists what it wrote once its uploads go quiet (here: at
    unmount), so the first fresh mount reads one index instead of a HEAD per file."""
    from dgfs.fs.filesystem import FileSystem
    from tests.fsharness import GID, ROOT, UID, mounted, ticking_clock, write_file

    store = CountingStore()
    store.clock = ticking_clock()
    async with mounted(store, tmp_path) as m:
        fs: FileSystem = m.fs
        rel = await fs.mkdir(ROOT, "rel", 0o755, UID, GID)
        for i in range(20):
            await write_file(fs, f"notes-{i}.txt", f"note {i}\n".encode(), parent=rel.ino)
    assert dirindex.index_key("rel/") in store.objects

    store.heads = 0
    fresh = namespace(store, None)  # another machine: no attribute cache
    entries = await fresh.listing("rel")
    assert sorted(entries) == sorted(f"notes-{i}.txt" for i in range(20))
    assert store.heads <= 1  # the rel/ marker at most, no file
