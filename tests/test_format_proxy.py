"""deltaglider_proxy interop, in process: dgfs reads what the proxy writes, and
writes what the proxy reads (docs/FORMAT.md, "deltaglider_proxy").

Proxy objects come from ``tests/proxyobjects.py`` (its metadata map and
xdelta3 argv, ported from its source); dgfs's objects are checked with the
proxy's own parse rules ported there (``proxy_parse``).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dgfs import format as fmt
from dgfs.cache import ContentCache
from dgfs.core import Core
from dgfs.delta import DeltaEngine
from dgfs.format import Kind
from dgfs.policy import Policy
from dgfs.store.memory import MemoryStore
from tests.proxyobjects import ProxyWriter, StoredObject, proxy_parse
from tests.releases import ReleaseSeries


@pytest.fixture
async def core(memory_store: MemoryStore, tmp_path: Path) -> AsyncIterator[Core]:
    cache = ContentCache(tmp_path / "cache", 1 << 30)
    core = Core(
        memory_store,
        cache,
        DeltaEngine(),
        Policy(min_delta_size=1024),
        scratch_dir=tmp_path / "scratch",
    )
    yield core
    await core.aclose()
    cache.close()


async def store_all(store: MemoryStore, objects: list[StoredObject]) -> None:
    for obj in objects:
        await store.put_bytes(obj.key, obj.body, obj.metadata)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def proxy_files() -> dict[str, bytes]:
    """What a client PUT through the proxy: key -> bytes."""
    series = ReleaseSeries(size=256 << 10, seed=18)
    files = {f"app/{name}": data for name, data in series.zips(3)}
    files["app/CHANGES.txt"] = b"1.0 first\n1.1 second\n" * 50
    return files


async def write_proxy_bucket(store: MemoryStore, files: dict[str, bytes]) -> None:
    writer = ProxyWriter()
    for key, data in files.items():
        delta = key.endswith(".zip")
        objects = writer.put(key, data, delta=delta, user={"build": "42"}, content_type="x/y")
        await store_all(store, objects)


async def test_proxy_bucket_layout_is_what_the_proxy_writes(
    memory_store: MemoryStore, proxy_files: dict[str, bytes]
) -> None:
    await write_proxy_bucket(memory_store, proxy_files)
    zips = sorted(k for k in proxy_files if k.endswith(".zip"))
    assert set(memory_store.objects) == {
        "app/reference.bin",
        "app/CHANGES.txt",
        *(k + ".delta" for k in zips),
    }
    delta_meta = memory_store.objects[zips[1] + ".delta"].metadata
    # The premise of the tests below: no DeltaGlider v6 keys at all.
    assert "dg-ref-key" not in delta_meta and "dg-compression" not in delta_meta
    assert delta_meta["dg-ref-path"] == "reference.bin"
    assert delta_meta["dg-created-at"].count(".") == 1  # microseconds
    ref_meta = memory_store.objects["app/reference.bin"].metadata
    assert ref_meta["dg-original-name"] == "__reference__"


async def test_core_reads_every_object_the_proxy_writes(
    core: Core, memory_store: MemoryStore, proxy_files: dict[str, bytes], tmp_path: Path
) -> None:
    await write_proxy_bucket(memory_store, proxy_files)
    for key, data in proxy_files.items():
        stored = await core.locate(key)
        assert stored.visible_key == key
        assert stored.original_size == len(data), key
        assert stored.kind is (Kind.DELTA if key.endswith(".zip") else Kind.DIRECT), key
        out = tmp_path / "out"
        await core.get(key, out)
        assert out.read_bytes() == data, key
        # Through the cache, as the mount reads.
        assert await core.materialize(stored) == sha(data)


def test_proxy_delta_classifies_against_its_sibling_reference() -> None:
    meta = {
        "dg-tool": "deltaglider_proxy/1.19.0",
        "dg-original-name": "a.zip",
        "dg-file-sha256": "a" * 64,
        "dg-file-size": "10",
        "dg-note": "delta",
        "dg-ref-sha256": "b" * 64,
    }
    for ref_path in (
        "reference.bin",
        "x/y/reference.bin",  # older proxies: a full key
        "../../other/reference.bin",  # hostile: points outside its directory
        "/etc/passwd",
    ):
        stored = fmt.classify("rel/app/a.zip.delta", 3, {**meta, "dg-ref-path": ref_path})
        assert stored.kind is Kind.DELTA
        assert stored.ref_key == "rel/app/reference.bin", ref_path
        assert stored.visible_key == "rel/app/a.zip"
    top = fmt.classify("a.zip.delta", 3, {**meta, "dg-ref-path": "reference.bin"})
    assert top.ref_key == "reference.bin"


def test_proxy_passthrough_note_is_direct() -> None:
    meta = {
        "dg-tool": "deltaglider_proxy/1.19.0",
        "dg-original-name": "a.zip",
        "dg-file-sha256": "a" * 64,
        "dg-file-size": "10",
        "dg-note": "passthrough",
    }
    assert fmt.classify("app/a.zip", 10, meta).kind is Kind.DIRECT


def test_proxy_reserved_names_are_hidden() -> None:
    for key in ("_dgp/locks/reference/ab.json", "_dgp/leases/replication/r1.json"):
        assert fmt.visible_key(key) is None
        assert fmt.is_internal_key(key)
    assert fmt.visible_key("app/_dgp/x") == "app/_dgp/x"  # only at the bucket root


def test_user_metadata_keeps_the_clients_own_and_drops_the_markers() -> None:
    meta = {
        "dg-tool": "deltaglider_proxy/1.19.0",
        "dg-md5": "0" * 32,
        "dg-ref-path": "reference.bin",
        "user-build": "42",
        "content-type": "x/y",
        "user-dg-encrypted": "aes-256-gcm-v1",
        "user-dg-encryption-key-id": "0123456789abcdef",
    }
    assert fmt.user_metadata(meta) == {"user-build": "42", "content-type": "x/y"}


# --- what dgfs writes, read by the proxy's rules ------------------------------------------


async def test_dgfs_objects_parse_as_the_proxy_reads_them(
    core: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    series = ReleaseSeries(size=256 << 10, seed=19)
    files: dict[str, bytes] = {f"app/{name}": data for name, data in series.zips(2)}
    files["app/notes.txt"] = b"notes\n" * 300
    for key, data in files.items():
        src = tmp_path / "src"
        src.write_bytes(data)
        await core.put(src, key)
    first, second = sorted(k for k in files if k.endswith(".zip"))
    parsed = {key: proxy_parse(dict(obj.metadata)) for key, obj in memory_store.objects.items()}

    ref = parsed["app/reference.bin"]
    ref_body = memory_store.objects["app/reference.bin"].body
    assert ref["storage"] == "reference"
    assert ref["original_name"] == "__reference__"
    assert ref["file_size"] == len(ref_body)  # the proxy's stored_size of a reference
    assert ref["md5"] == hashlib.md5(ref_body).hexdigest()
    assert ref["file_sha256"] == sha(ref_body)

    for key in (first, second):
        delta = parsed[key + ".delta"]
        assert delta["storage"] == "delta"
        assert delta["ref_path"] == "reference.bin"
        assert delta["ref_sha256"] == sha(ref_body)
        assert delta["file_size"] == len(files[key])
        assert delta["md5"] == hashlib.md5(files[key]).hexdigest()  # its ETag
        assert delta["delta_size"] == len(memory_store.objects[key + ".delta"].body)
        assert delta["original_name"] == key.rsplit("/", 1)[1]

    direct = parsed["app/notes.txt"]
    assert direct["storage"] == "passthrough"
    assert direct["md5"] == hashlib.md5(files["app/notes.txt"]).hexdigest()
    assert direct["file_size"] == len(files["app/notes.txt"])


async def test_dgfs_objects_keep_every_deltaglider_key(
    core: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    """The union: the proxy's keys are added, DeltaGlider 6.2.0's all stay
    (its ``DeltaMeta.from_dict`` requires each of these)."""
    series = ReleaseSeries(size=256 << 10, seed=20)
    (name1, data1), (name2, data2) = series.zips(2)
    for name, data in ((name1, data1), (name2, data2)):
        (tmp_path / name).write_bytes(data)
        await core.put(tmp_path / name, f"app/{name}")
    meta = memory_store.objects[f"app/{name2}.delta"].metadata
    for key in (
        "dg-tool",
        "dg-original-name",
        "dg-file-sha256",
        "dg-file-size",
        "dg-created-at",
        "dg-ref-key",
        "dg-ref-sha256",
        "dg-delta-size",
        "dg-delta-cmd",
    ):
        assert meta.get(key), key
    assert meta["dg-ref-key"] == "app/reference.bin"
    assert meta["dg-note"] == "delta"
    zero = memory_store.objects[f"app/{name1}.delta"].metadata
    assert zero["dg-note"] == fmt.ZERO_DIFF_NOTE  # DeltaGlider's; the proxy reads it as a delta
    assert proxy_parse(dict(zero))["storage"] == "delta"


def test_dgfs_metadata_functions_write_the_union() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    direct = fmt.direct_metadata(
        original_name="a.txt", file_sha256="a" * 64, file_size=3, now=now, md5="c" * 32
    )
    assert direct["dg-compression"] == "none" and direct["dg-note"] == "passthrough"
    assert direct["dg-md5"] == "c" * 32
    ref = fmt.reference_metadata("a.zip", "a" * 64, now, file_size=9, md5="d" * 32)
    assert ref["dg-note"] == "reference" and ref["dg-source-name"] == "a.zip"
    assert ref["dg-original-name"] == "__reference__" and ref["dg-file-size"] == "9"
    parsed = proxy_parse(ref)
    assert parsed["storage"] == "reference" and parsed["md5"] == "d" * 32
