"""Unit tests of dgfs.cache.ContentCache: round trips, tampering, LRU, keys, threads."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dgfs.cache import HEADER_SIZE, CacheEntryReader, ContentCache, stored_size
from dgfs.crypto import TAG_SIZE, ChunkAead, content_id, encryption_key, new_key
from dgfs.errors import CacheCorrupt, ConfigError, IntegrityError

pytestmark = pytest.mark.expected_log("is corrupt|vanished from")

CHUNK = 4096

MakeCache = Callable[..., ContentCache]


@pytest.fixture
def make_cache(tmp_path: Path) -> Iterator[MakeCache]:
    """Build caches in tmp_path/cache (by default) and close them all at the end."""
    made: list[ContentCache] = []

    def make(
        budget: int = 1 << 30,
        key: bytes | None = None,
        directory: Path | None = None,
        chunk_size: int = CHUNK,
    ) -> ContentCache:
        cache = ContentCache(directory or tmp_path / "cache", budget, key, chunk_size=chunk_size)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def _put(cache: ContentCache, data: bytes, scratch: Path) -> str:
    """Add ``data`` to ``cache`` through a source file; return its SHA-256."""
    sha = hashlib.sha256(data).hexdigest()
    src = scratch / f"src-{sha[:16]}"
    src.write_bytes(data)
    assert cache.add_file(sha, src) == len(data)
    return sha


def _entry_path(cache: ContentCache, key: bytes, sha: str) -> Path:
    return cache.directory / content_id(key, sha)


def _read_all(cache: ContentCache, sha: str) -> bytes:
    reader = cache.open(sha)
    assert reader is not None
    with reader:
        return reader.read(0, reader.size + 1)


def _entry_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name not in ("lock", "key-check")}


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17])
def test_round_trip_and_random_reads(make_cache: MakeCache, tmp_path: Path, size: int) -> None:
    rng = random.Random(size)
    data = rng.randbytes(size)
    cache = make_cache()
    sha = _put(cache, data, tmp_path)
    assert cache.contains(sha) and cache.entry_count == 1

    reader = cache.open(sha)
    assert reader is not None
    with reader:
        assert reader.size == size and reader.sha256 == sha
        assert reader.read(0, size) == data
        assert reader.read(0, size + 100) == data
        assert reader.read(size, 10) == b""
        assert reader.read(size + 5000, 10) == b""
        assert reader.read(0, 0) == b""
        offsets = [0, CHUNK - 1, CHUNK, CHUNK + 1, size - 1] + [
            rng.randrange(size + 1) for _ in range(200)
        ]
        for offset in offsets:
            offset = max(offset, 0)
            length = rng.choice(
                [1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, rng.randrange(1, 9000)]
            )
            assert reader.read(offset, length) == data[offset : offset + length], (offset, length)

    dest = tmp_path / "out"
    assert cache.export(sha, dest)
    assert dest.read_bytes() == data
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_absent_content(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache()
    sha = hashlib.sha256(b"nothing").hexdigest()
    assert not cache.contains(sha)
    assert cache.open(sha) is None
    assert not cache.export(sha, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cache.discard(sha)  # no error


def test_entries_are_encrypted_and_names_hide_hashes(make_cache: MakeCache, tmp_path: Path) -> None:
    key = new_key()
    cache = make_cache(key=key)
    data = b"plaintext marker " * 1000
    sha = _put(cache, data, tmp_path)
    (name,) = _entry_files(cache.directory)
    assert name == content_id(key, sha) and name != sha
    raw = (cache.directory / name).read_bytes()
    assert b"plaintext marker" not in raw
    assert bytes.fromhex(sha) not in raw
    assert len(raw) == stored_size(len(data), CHUNK) == cache.stored_bytes


def test_add_is_idempotent_and_skips_reading(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache()
    sha = _put(cache, b"x" * 10000, tmp_path)
    before = cache.stored_bytes
    assert cache.add_file(sha, tmp_path / "does-not-exist") == 10000
    assert cache.add_file(sha.upper(), tmp_path / "does-not-exist") == 10000
    assert cache.entry_count == 1 and cache.stored_bytes == before
    assert _read_all(cache, sha.upper()) == b"x" * 10000


def test_add_with_wrong_sha_stores_nothing(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * CHUNK + 5))
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(IntegrityError):
        cache.add_file(wrong, src)
    assert not cache.contains(wrong)
    assert cache.entry_count == 0 and cache.stored_bytes == 0
    assert _entry_files(cache.directory) == set()  # no entry, no temp file left behind


def test_bad_hash_argument(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache()
    src = tmp_path / "src"
    src.write_bytes(b"x")
    for call in (cache.contains, cache.open, lambda s: cache.add_file(s, src)):
        with pytest.raises(ValueError):
            call("not-a-hash")


def test_export_replaces_existing_dest_privately(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache()
    sha = _put(cache, b"short", tmp_path)
    dest = tmp_path / "dest"
    dest.write_bytes(b"a much longer previous content")
    dest.chmod(0o644)
    assert cache.export(sha, dest)
    assert dest.read_bytes() == b"short"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_closed_reader_refuses_reads(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache()
    sha = _put(cache, b"data", tmp_path)
    reader = cache.open(sha)
    assert isinstance(reader, CacheEntryReader)
    reader.close()
    reader.close()
    with pytest.raises(ValueError):
        reader.read(0, 1)


# --- tampering ------------------------------------------------------------------------

TAMPER_SIZE = 4 * CHUNK + 100  # five chunks, the last one partial
SEALED_CHUNK = CHUNK + TAG_SIZE


def _flip(offset: int) -> Callable[[Path], None]:
    def tamper(path: Path) -> None:
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 0x01
        path.write_bytes(bytes(raw))

    return tamper


def _truncate(count: int) -> Callable[[Path], None]:
    def tamper(path: Path) -> None:
        os.truncate(path, path.stat().st_size - count)

    return tamper


def _append(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"garbage")


def _swap_chunks(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    one = slice(HEADER_SIZE + SEALED_CHUNK, HEADER_SIZE + 2 * SEALED_CHUNK)
    two = slice(HEADER_SIZE + 2 * SEALED_CHUNK, HEADER_SIZE + 3 * SEALED_CHUNK)
    raw[one], raw[two] = raw[two], raw[one]
    path.write_bytes(bytes(raw))


def _drop_last_chunk_and_fix_size(path: Path) -> None:
    """Truncate consistently: remove the last chunk and shrink the header's size to match."""
    raw = bytearray(path.read_bytes())
    del raw[HEADER_SIZE + 4 * SEALED_CHUNK :]
    raw[12:20] = struct.pack(">Q", 4 * CHUNK)
    path.write_bytes(bytes(raw))


TAMPERS = {
    "header-magic": _flip(0),
    "header-version": _flip(6),
    "header-chunk-size": _flip(11),
    "header-plain-size": _flip(19),
    "header-nonce": _flip(22),
    "header-tag": _flip(HEADER_SIZE - 1),
    "first-chunk": _flip(HEADER_SIZE),
    "middle-chunk": _flip(HEADER_SIZE + 2 * SEALED_CHUNK + 100),
    "middle-chunk-tag": _flip(HEADER_SIZE + 3 * SEALED_CHUNK - 1),
    "last-chunk": _flip(HEADER_SIZE + 4 * SEALED_CHUNK + 3),
    "last-byte": _flip(-1),
    "truncate-1": _truncate(1),
    "truncate-chunk": _truncate(SEALED_CHUNK),
    "truncate-last-chunk-consistently": _drop_last_chunk_and_fix_size,
    "append": _append,
    "reorder-chunks": _swap_chunks,
}


@pytest.mark.parametrize("how", ["read", "export"])
@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampering_is_detected_and_dropped(
    make_cache: MakeCache,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    tamper: str,
    how: str,
) -> None:
    key = new_key()
    cache = make_cache(key=key)
    data = os.urandom(TAMPER_SIZE)
    sha = _put(cache, data, tmp_path)
    path = _entry_path(cache, key, sha)
    TAMPERS[tamper](path)

    dest = tmp_path / "dest"
    with caplog.at_level(logging.WARNING, logger="dgfs.cache"), pytest.raises(CacheCorrupt):
        if how == "read":
            _read_all(cache, sha)
        else:
            cache.export(sha, dest)
    assert "corrupt" in caplog.text
    assert not dest.exists()
    assert not cache.contains(sha)
    assert not path.exists()
    assert cache.entry_count == 0 and cache.stored_bytes == 0
    assert cache.open(sha) is None
    # The caller refetches and re-adds: works as new.
    _put(cache, data, tmp_path)
    assert _read_all(cache, sha) == data


def test_reader_decrypts_only_what_it_needs_then_fails_for_good(
    make_cache: MakeCache, tmp_path: Path
) -> None:
    key = new_key()
    cache = make_cache(key=key)
    data = os.urandom(TAMPER_SIZE)
    sha = _put(cache, data, tmp_path)
    TAMPERS["middle-chunk"](_entry_path(cache, key, sha))
    reader = cache.open(sha)
    assert reader is not None
    with reader:
        assert reader.read(0, 2 * CHUNK) == data[: 2 * CHUNK]  # chunks 0, 1 are intact
        assert reader.read(3 * CHUNK, 10) == data[3 * CHUNK : 3 * CHUNK + 10]
        with pytest.raises(CacheCorrupt):
            reader.read(2 * CHUNK + 5, 1)
        assert not cache.contains(sha)
        with pytest.raises(CacheCorrupt):
            reader.read(0, 10)


@pytest.mark.parametrize("same_size", [True, False])
def test_swapped_entries_are_detected(
    make_cache: MakeCache, tmp_path: Path, same_size: bool
) -> None:
    key = new_key()
    cache = make_cache(key=key)
    sha_a = _put(cache, os.urandom(2 * CHUNK + 1), tmp_path)
    sha_b = _put(cache, os.urandom(2 * CHUNK + (1 if same_size else 99)), tmp_path)
    path_a, path_b = _entry_path(cache, key, sha_a), _entry_path(cache, key, sha_b)
    tmp = path_a.with_name("swap")
    os.rename(path_a, tmp)
    os.rename(path_b, path_a)
    os.rename(tmp, path_b)
    with pytest.raises(CacheCorrupt):
        cache.open(sha_a)
    with pytest.raises(CacheCorrupt):
        cache.export(sha_b, tmp_path / "dest")
    assert not cache.contains(sha_a) and not cache.contains(sha_b)
    assert cache.entry_count == 0 and _entry_files(cache.directory) == set()


def test_entry_from_another_key_is_detected(make_cache: MakeCache, tmp_path: Path) -> None:
    """A file planted under the right name but sealed with another key is refused."""
    key = new_key()
    other = make_cache(key=new_key(), directory=tmp_path / "other")
    data = os.urandom(100)
    sha = _put(other, data, tmp_path)
    cache = make_cache(key=key)
    _put(cache, data, tmp_path)
    os.replace(next(other.directory.glob("[0-9a-f]*")), _entry_path(cache, key, sha))
    with pytest.raises(CacheCorrupt):
        cache.open(sha)
    assert not cache.contains(sha)


def test_corrupt_reader_does_not_drop_a_fresh_copy(make_cache: MakeCache, tmp_path: Path) -> None:
    key = new_key()
    cache = make_cache(key=key)
    data = os.urandom(TAMPER_SIZE)
    sha = _put(cache, data, tmp_path)
    stale = cache.open(sha)
    assert stale is not None
    TAMPERS["middle-chunk"](_entry_path(cache, key, sha))  # same inode as the open reader
    cache.discard(sha)
    _put(cache, data, tmp_path)  # a fresh, good copy under the same name
    with stale, pytest.raises(CacheCorrupt):
        stale.read(2 * CHUNK, 10)
    assert cache.contains(sha)
    assert _read_all(cache, sha) == data


def test_vanished_entry_reads_as_absent(make_cache: MakeCache, tmp_path: Path) -> None:
    key = new_key()
    cache = make_cache(key=key)
    sha = _put(cache, b"here today", tmp_path)
    _entry_path(cache, key, sha).unlink()
    assert cache.open(sha) is None
    assert not cache.contains(sha) and cache.entry_count == 0 and cache.stored_bytes == 0


def _seal_by_hand(key: bytes, sha: str, content: bytes, chunk_size: int) -> bytes:
    """An entry built from the format described in dgfs.cache's docstring, not from its code."""
    prefix = os.urandom(8)
    header = b"DGFSCE" + bytes([1, 0]) + struct.pack(">IQ", chunk_size, len(content)) + prefix
    aead = ChunkAead(encryption_key(key), prefix, header + bytes.fromhex(sha))
    chunks = [content[i : i + chunk_size] for i in range(0, len(content), chunk_size)] or [b""]
    sealed = [aead.seal(i, i == len(chunks) - 1, chunk) for i, chunk in enumerate(chunks)]
    return header + aead.header_tag() + b"".join(sealed)


def test_entry_format_is_as_documented(make_cache: MakeCache, tmp_path: Path) -> None:
    key = new_key()
    data = os.urandom(3 * 1000 + 1)
    sha = hashlib.sha256(data).hexdigest()
    first = make_cache(key=key)
    _put(first, b"placeholder", tmp_path)
    first.close()
    # Written by hand with another chunk size: the header's chunk size is what counts.
    (first.directory / content_id(key, sha)).write_bytes(_seal_by_hand(key, sha, data, 1000))
    cache = make_cache(key=key)
    assert cache.contains(sha)
    assert _read_all(cache, sha) == data
    assert cache.export(sha, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data


def test_export_checks_the_whole_content_hash(make_cache: MakeCache, tmp_path: Path) -> None:
    """An entry that authenticates but holds other bytes (a bug, or a leaked key) is refused."""
    key = new_key()
    sha = hashlib.sha256(b"what was asked for").hexdigest()
    first = make_cache(key=key)
    first.close()
    forged = _seal_by_hand(key, sha, b"something else", CHUNK)
    (first.directory / content_id(key, sha)).write_bytes(forged)
    cache = make_cache(key=key)
    with pytest.raises(CacheCorrupt):
        cache.export(sha, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not cache.contains(sha)


def test_sequential_small_reads_decrypt_each_chunk_once(
    make_cache: MakeCache, tmp_path: Path
) -> None:
    cache = make_cache()
    data = os.urandom(3 * CHUNK)
    sha = _put(cache, data, tmp_path)
    reader = cache.open(sha)
    assert reader is not None
    opened: list[int] = []
    real_open = reader._aead.open

    def counting_open(index: int, is_last: bool, sealed: bytes) -> bytes:
        opened.append(index)
        return real_open(index, is_last, sealed)

    reader._aead.open = counting_open  # type: ignore[method-assign]
    with reader:
        pieces = [reader.read(offset, 512) for offset in range(0, len(data), 512)]
    assert b"".join(pieces) == data
    assert opened == [0, 1, 2]


# --- eviction -------------------------------------------------------------------------

ENTRY_DATA = 3 * CHUNK
ENTRY_STORED = stored_size(ENTRY_DATA, CHUNK)


def test_lru_eviction_respects_use_order(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache(budget=3 * ENTRY_STORED)
    a, b, c = (_put(cache, os.urandom(ENTRY_DATA), tmp_path) for _ in range(3))
    assert cache.entry_count == 3 and cache.stored_bytes == 3 * ENTRY_STORED
    reader = cache.open(a)  # a is now the most recently used
    assert reader is not None
    reader.close()
    d = _put(cache, os.urandom(ENTRY_DATA), tmp_path)
    assert [cache.contains(x) for x in (a, b, c, d)] == [True, False, True, True]
    assert cache.export(c, tmp_path / "c")  # export is a use too
    assert cache.contains(a)  # contains() is not
    e = _put(cache, os.urandom(ENTRY_DATA), tmp_path)
    assert [cache.contains(x) for x in (a, c, d, e)] == [False, True, True, True]
    assert cache.lookup(d)  # a reader's lookup is (one served from a plain copy)
    f = _put(cache, os.urandom(ENTRY_DATA), tmp_path)
    assert [cache.contains(x) for x in (c, d, e, f)] == [False, True, True, True]
    assert cache.stored_bytes == 3 * ENTRY_STORED <= cache.budget_bytes
    assert len(_entry_files(cache.directory)) == 3


def test_readding_counts_as_use(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache(budget=2 * ENTRY_STORED)
    data_a = os.urandom(ENTRY_DATA)
    a = _put(cache, data_a, tmp_path)
    b = _put(cache, os.urandom(ENTRY_DATA), tmp_path)
    _put(cache, data_a, tmp_path)
    c = _put(cache, os.urandom(ENTRY_DATA), tmp_path)
    assert [cache.contains(x) for x in (a, b, c)] == [True, False, True]


def test_entry_larger_than_budget_stays_until_next_add(
    make_cache: MakeCache, tmp_path: Path
) -> None:
    cache = make_cache(budget=ENTRY_STORED)
    big = _put(cache, os.urandom(10 * CHUNK), tmp_path)
    assert cache.contains(big) and cache.stored_bytes > cache.budget_bytes
    small = _put(cache, os.urandom(10), tmp_path)
    assert not cache.contains(big) and cache.contains(small)
    assert cache.stored_bytes <= cache.budget_bytes


def test_discard(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache()
    a = _put(cache, b"a" * 100, tmp_path)
    b = _put(cache, b"b" * 100, tmp_path)
    cache.discard(a)
    assert not cache.contains(a) and cache.contains(b)
    assert cache.entry_count == 1 and cache.stored_bytes == stored_size(100, CHUNK)
    assert len(_entry_files(cache.directory)) == 1


def test_reader_survives_eviction_and_discard(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache(budget=ENTRY_STORED)
    data = os.urandom(ENTRY_DATA)
    sha = _put(cache, data, tmp_path)
    reader = cache.open(sha)
    assert reader is not None
    with reader:
        _put(cache, os.urandom(ENTRY_DATA), tmp_path)
        assert not cache.contains(sha)
        assert cache.entry_count == 1
        assert reader.read(0, ENTRY_DATA) == data
        assert reader.read(CHUNK + 7, CHUNK) == data[CHUNK + 7 : 2 * CHUNK + 7]
    other = _put(cache, data, tmp_path)
    reader = cache.open(other)
    assert reader is not None
    with reader:
        cache.discard(other)
        assert reader.read(0, ENTRY_DATA) == data


# --- directory, keys, restarts --------------------------------------------------------


def test_directory_created_private(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache(directory=tmp_path / "a" / "b" / "cache")
    assert stat.S_IMODE(cache.directory.stat().st_mode) == 0o700


def test_existing_loose_directory_is_tightened(make_cache: MakeCache, tmp_path: Path) -> None:
    directory = tmp_path / "loose"
    directory.mkdir()
    directory.chmod(0o755)
    make_cache(directory=directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_directory_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ConfigError):
        ContentCache(path, 1000)


def test_ephemeral_cache_starts_empty(make_cache: MakeCache, tmp_path: Path) -> None:
    first = make_cache()
    sha = _put(first, os.urandom(5000), tmp_path)
    assert first.contains(sha)
    first.close()
    directory = first.directory
    stray_temp = directory / ("0" * 64 + ".abc.tmp")
    stray_temp.write_bytes(b"half-written")
    unrelated = directory / "README"
    unrelated.write_text("not ours")

    second = make_cache()
    assert not second.contains(sha)
    assert second.open(sha) is None
    assert second.entry_count == 0 and second.stored_bytes == 0
    assert _entry_files(directory) == {"README"}  # old entry and temp file removed
    assert unrelated.read_text() == "not ours"


def test_persistent_cache_survives_restart(make_cache: MakeCache, tmp_path: Path) -> None:
    key = new_key()
    first = make_cache(key=key)
    data = {_put(first, payload, tmp_path): payload for payload in (b"", b"one", os.urandom(9999))}
    stored = first.stored_bytes
    first.close()
    stray_temp = first.directory / (content_id(key, next(iter(data))) + ".x.tmp")
    stray_temp.write_bytes(b"half-written")

    second = make_cache(key=key)
    assert second.entry_count == 3 and second.stored_bytes == stored
    for sha, payload in data.items():
        assert _read_all(second, sha) == payload
    assert not stray_temp.exists()


def test_persistent_cache_with_another_key_starts_empty(
    make_cache: MakeCache, tmp_path: Path
) -> None:
    first = make_cache(key=new_key())
    sha = _put(first, b"secret", tmp_path)
    first.close()
    second = make_cache(key=new_key())
    assert not second.contains(sha) and second.entry_count == 0
    assert _entry_files(second.directory) == set()


def test_restart_keeps_lru_order_and_trims_to_budget(make_cache: MakeCache, tmp_path: Path) -> None:
    key = new_key()
    first = make_cache(key=key)
    a, b, c = (_put(first, os.urandom(ENTRY_DATA), tmp_path) for _ in range(3))
    for age, sha in ((300, a), (200, b), (100, c)):  # a oldest, c newest
        when = 1_700_000_000 - age
        os.utime(_entry_path(first, key, sha), (when, when))
    reader = first.open(a)  # opening touches a: now the newest
    assert reader is not None
    reader.close()
    first.close()

    second = make_cache(key=key, budget=2 * ENTRY_STORED)
    assert [second.contains(x) for x in (a, b, c)] == [True, False, True]
    assert not _entry_path(second, key, b).exists()
    assert second.stored_bytes == 2 * ENTRY_STORED


def test_restart_drops_entries_of_another_format_version(
    make_cache: MakeCache, tmp_path: Path
) -> None:
    key = new_key()
    first = make_cache(key=key)
    old = _put(first, b"old format", tmp_path)
    current = _put(first, b"current format", tmp_path)
    TAMPERS["header-version"](_entry_path(first, key, old))
    first.close()
    second = make_cache(key=key)
    assert not second.contains(old) and second.contains(current)
    assert not _entry_path(second, key, old).exists()


def test_one_cache_per_directory(make_cache: MakeCache) -> None:
    first = make_cache()
    with pytest.raises(ConfigError, match="in use"):
        make_cache()
    first.close()
    make_cache()


# --- threads --------------------------------------------------------------------------


def test_concurrent_add_read_export_evict(make_cache: MakeCache, tmp_path: Path) -> None:
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.randrange(0, 6 * CHUNK)) for _ in range(12)]
    sources: list[tuple[str, Path, bytes]] = []
    for i, payload in enumerate(payloads):
        src = tmp_path / f"payload-{i}"
        src.write_bytes(payload)
        sources.append((hashlib.sha256(payload).hexdigest(), src, payload))
    budget = 4 * stored_size(6 * CHUNK, CHUNK)
    cache = make_cache(budget=budget)
    errors: list[BaseException] = []
    reads = 0
    reads_lock = threading.Lock()
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        nonlocal reads
        wrng = random.Random(worker)
        dest = tmp_path / f"dest-{worker}"
        readers: list[tuple[CacheEntryReader, bytes]] = []
        try:
            start.wait()
            for _ in range(300):
                sha, src, payload = wrng.choice(sources)
                action = wrng.random()
                if action < 0.4:
                    assert cache.add_file(sha, src) == len(payload)
                elif action < 0.7:
                    reader = cache.open(sha)
                    if reader is not None:
                        readers.append((reader, payload))
                elif action < 0.85:
                    if cache.export(sha, dest):
                        assert dest.read_bytes() == payload
                else:
                    cache.discard(sha)
                # Readers opened earlier keep reading while others evict their entries.
                for reader, expected in readers:
                    offset = wrng.randrange(len(expected) + 1)
                    length = wrng.randrange(1, 2 * CHUNK)
                    assert reader.read(offset, length) == expected[offset : offset + length]
                    with reads_lock:
                        reads += 1
                if len(readers) > 3:
                    readers.pop(0)[0].close()
        except BaseException as exc:
            errors.append(exc)
        finally:
            for reader, _ in readers:
                reader.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert reads > 100
    # The index and the directory agree, and the budget holds.
    names = _entry_files(cache.directory)
    assert not any(name.endswith(".tmp") for name in names)
    assert len(names) == cache.entry_count
    assert cache.stored_bytes == sum((cache.directory / n).stat().st_size for n in names)
    assert cache.stored_bytes <= budget
    for sha, _, payload in sources:
        if cache.contains(sha):
            assert _read_all(cache, sha) == payload


def test_concurrent_adds_of_the_same_content(make_cache: MakeCache, tmp_path: Path) -> None:
    cache = make_cache()
    payload = os.urandom(20 * CHUNK)
    sha = hashlib.sha256(payload).hexdigest()
    sources = []
    for i in range(6):
        src = tmp_path / f"copy-{i}"
        src.write_bytes(payload)
        sources.append(src)
    errors: list[BaseException] = []
    start = threading.Barrier(len(sources))

    def add(src: Path) -> None:
        try:
            start.wait()
            assert cache.add_file(sha, src) == len(payload)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(src,)) for src in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.entry_count == 1
    assert cache.stored_bytes == stored_size(len(payload), CHUNK)
    assert _entry_files(cache.directory) == {next(iter(_entry_files(cache.directory)))}
    assert _read_all(cache, sha) == payload
