"""deltaglider_proxy interop, in process: dgfs reads what the proxy writes, and
writes what the proxy reads (docs/FORMAT.md, "deltaglider_proxy").

Proxy objects come from ``testsupport/proxyobjects.py`` (its metadata map and
xdelta3 argv, ported from its source); dgfs's objects are checked with the
proxy's own parse rules ported there (``proxy_parse``).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgfs import format as fmt
from dgfs import proxymeta
from dgfs.core import Core
from dgfs.errors import ConfigError, FsError, MissingReference, WriteConflict
from dgfs.format import Kind
from dgfs.fs.readers import StoredContent
from dgfs.gc import find_garbage
from dgfs.migrate import SourceFile, copy_file
from dgfs.proxycrypt import (
    ProxyDecryptError,
    ProxyKey,
    decrypt_file,
    parse_proxy_key,
)
from dgfs.stats import compute_stats
from dgfs.store.memory import MemoryStore
from dgfs.verify import Status, verify_all
from tests.coreharness import make_core
from testsupport.proxyobjects import (
    ProxyEncryption,
    ProxyWriter,
    StoredObject,
    derive_key_id,
    encrypt_chunked,
    encrypt_single,
    proxy_client_view,
    proxy_parse,
    store_all,
)
from testsupport.releases import ReleaseSeries


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


async def test_dgfs_writes_the_content_type_the_proxy_serves(
    core: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    """dgfs writes the proxy's ``content-type`` key (src/types.rs
    ``to_bare_metadata_map``) with the Content-Type it sets on the object,
    so the proxy serves what S3 does; the reference has none (it is never
    served)."""
    series = ReleaseSeries(size=256 << 10, seed=23)
    files: dict[str, bytes] = {f"app/{name}": data for name, data in series.zips(2)}
    files["app/notes.txt"] = b"notes\n" * 300
    for key, data in files.items():
        (tmp_path / "src").write_bytes(data)
        await core.put(tmp_path / "src", key, content_type="application/zip")
    (tmp_path / "src").write_bytes(b"plain")
    await core.put(tmp_path / "src", "app/plain.bin")  # the mount's: no type given
    for stored_key in (*(k + ".delta" for k in files if k.endswith(".zip")), "app/notes.txt"):
        obj = memory_store.objects[stored_key]
        assert obj.content_type == "application/zip", stored_key
        assert proxy_client_view(obj.metadata)[0] == "application/zip", stored_key
    plain = memory_store.objects["app/plain.bin"]
    assert plain.metadata["content-type"] == plain.content_type == "application/octet-stream"
    assert "content-type" not in memory_store.objects["app/reference.bin"].metadata


async def test_migrate_and_rename_keep_the_proxys_content_type_and_client_metadata(
    core: Core, memory_store: MemoryStore, tmp_path: Path
) -> None:
    """The proxy keeps a client's Content-Type in its ``content-type`` key
    (the object's own is ``application/octet-stream``): ``dgfs migrate``
    and a rename into another directory keep that type, on the object and
    in the key, and the client's ``user-`` metadata."""
    writer = ProxyWriter()
    zips = []
    for name, data in ReleaseSeries(size=256 << 10, seed=24).zips(2):
        zips.append(f"app/{name}")
        objects = writer.put(zips[-1], data, user={"build": "7"}, content_type="application/zip")
        await store_all(memory_store, objects)
    assert memory_store.objects[zips[1] + ".delta"].content_type == "application/octet-stream"
    source = dataclasses.replace(migrate_source(zips[1]), dest_key="copy/x.zip")
    await copy_file(core, core, source)
    await core.rename(zips[1], "moved/y.zip")
    for stored_key in ("copy/x.zip.delta", "moved/y.zip.delta"):
        obj = memory_store.objects[stored_key]
        assert obj.content_type == "application/zip", stored_key
        assert proxy_client_view(obj.metadata)[0] == "application/zip", stored_key
        assert obj.metadata["user-build"] == "7", stored_key


def migrate_source(key: str) -> SourceFile:
    return SourceFile(key=key, rel_key=key, dest_key=key, size=0, delta=True)


class ProxyOverwritesReference(MemoryStore):
    """A bucket a proxy also writes: just before dgfs uploads ``trigger``, the
    proxy stores its own first file of the directory, which PUTs
    ``reference.bin`` unconditionally (src/storage/s3.rs ``put_reference``,
    after its ``has_reference`` in src/deltaglider/engine/store.rs
    ``store_inner``: no If-None-Match, no lock a single instance shares)."""

    def __init__(self, trigger: str, proxy_objects: list[StoredObject]) -> None:
        super().__init__("proxy-race")
        self.trigger = trigger
        self.proxy_objects = proxy_objects

    async def upload(
        self,
        key: str,
        src: Path,
        metadata: Mapping[str, str],
        *,
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> str:
        if key == self.trigger and self.proxy_objects:
            for obj in self.proxy_objects:
                await self.put_bytes(obj.key, obj.body, obj.metadata)  # unconditional
            self.proxy_objects = []
        return await super().upload(
            key, src, metadata, content_type=content_type, if_none_match=if_none_match
        )


async def test_a_reference_the_proxy_overwrites_is_caught_or_fails_loudly(
    tmp_path: Path,
) -> None:
    """docs/FORMAT.md, "What does not meet": the proxy replaces
    ``reference.bin`` without a condition. Landing while dgfs stores a delta
    against the old one, ``_store_delta``'s re-check sees it: the delta is
    withdrawn (``WriteConflict``) and stored again against the proxy's
    reference. Deltas dgfs stored before the replacement no longer match
    their ``dg-ref-sha256``: reading them fails, never with wrong bytes."""
    (first, v1), (second, v2), (third, v3) = ReleaseSeries(size=256 << 10, seed=25).zips(3)
    proxy = ProxyWriter().put("app/proxy-first.zip", v3)  # the proxy's own reference
    store = ProxyOverwritesReference(f"app/{second}.delta", proxy)
    core, cache = make_core(store, tmp_path)
    try:
        for name, data in ((first, v1), (second, v2)):
            (tmp_path / name).write_bytes(data)
        await core.put(tmp_path / first, f"app/{first}")
        with pytest.raises(WriteConflict):
            await core.put(tmp_path / second, f"app/{second}")
        assert f"app/{second}.delta" not in store.objects  # withdrawn, never left orphaned
        assert store.objects["app/reference.bin"].body == v3  # the proxy's, as it wrote it
        await core.put(tmp_path / second, f"app/{second}")  # the upload pipeline's retry
        assert store.objects[f"app/{second}.delta"].metadata["dg-ref-sha256"] == sha(v3)
        out = tmp_path / "out"
        await core.get(f"app/{second}", out)
        assert out.read_bytes() == v2
        await core.get("app/proxy-first.zip", out)
        assert out.read_bytes() == v3
        await core.get(f"app/{first}", out)  # this cache still holds the old reference
        assert out.read_bytes() == v1
        fresh, fresh_cache = make_core(store, tmp_path / "fresh")  # another mount
        try:
            with pytest.raises(MissingReference):  # stored before the overwrite: lost, loudly
                await fresh.get(f"app/{first}", out)
        finally:
            await fresh.aclose()
            fresh_cache.close()
    finally:
        await core.aclose()
        cache.close()


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


# --- deltaglider_proxy's encryption at rest ---------------------------------------------------

KEY = bytes(range(32))
KEY_HEX = KEY.hex()


def proxy_key(text: str = KEY_HEX) -> ProxyKey:
    return parse_proxy_key(text)


def decrypt(
    tmp_path: Path, body: bytes, scheme: str, key: ProxyKey | None, key_id: str | None = None
) -> bytes:
    src, dest = tmp_path / "ct", tmp_path / "pt"
    src.write_bytes(body)
    decrypt_file(src, dest, scheme=scheme, key=key, key_id=key_id, what="app/x")
    return dest.read_bytes()


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536, 200_001])
def test_both_schemes_decrypt_what_the_proxy_encrypts(tmp_path: Path, size: int) -> None:
    data = bytes(i * 7 % 251 for i in range(size))
    assert (
        decrypt(tmp_path, encrypt_single(KEY, data), proxymeta.PROXY_AES_GCM, proxy_key()) == data
    )
    chunked = encrypt_chunked(KEY, data)
    assert decrypt(tmp_path, chunked, proxymeta.PROXY_AES_GCM_CHUNKED, proxy_key()) == data


def test_key_file_and_key_ids() -> None:
    key = proxy_key(f"# the proxy's DGP_ENCRYPTION_KEY\n{KEY_HEX}\n")
    assert key.key == KEY and key.key_ids == {derive_key_id("default", KEY)}
    key = proxy_key(f"{KEY_HEX} backend=eu-archive key_id=pinned-1")
    assert key.key_ids == {derive_key_id("eu-archive", KEY), "pinned-1"}
    for bad in ("", "abc", KEY_HEX[:-2], f"{KEY_HEX} colour=blue"):
        with pytest.raises(ConfigError, match="proxy_key_file"):
            proxy_key(bad)


def test_hostile_and_wrong_encrypted_bodies_never_decrypt(tmp_path: Path) -> None:
    data = b"x" * (3 * 65536 + 5)
    chunked = encrypt_chunked(KEY, data)
    frame = 4 + 65536 + 16
    header = 16
    hostile = {
        "truncated inside a frame": chunked[:-10],
        "last frame dropped": chunked[: header + 3 * frame],
        "frames swapped": chunked[:header]
        + chunked[header + frame : header + 2 * frame]
        + chunked[header : header + frame]
        + chunked[header + 2 * frame :],
        "huge length field": chunked[:header] + b"\xff\xff\xff\x7f" + chunked[header + 4 :],
        "no header": chunked[:10],
        "trailing bytes": chunked + b"\0",
        "bit flipped": chunked[:100] + bytes([chunked[100] ^ 1]) + chunked[101:],
    }
    for what, body in hostile.items():
        with pytest.raises(ProxyDecryptError):
            decrypt(tmp_path, body, proxymeta.PROXY_AES_GCM_CHUNKED, proxy_key())
        assert not (tmp_path / "pt").exists(), what
    single = encrypt_single(KEY, data)
    for body in (single[:-1], single[:20], single[:50] + b"!" + single[51:]):
        with pytest.raises(ProxyDecryptError):
            decrypt(tmp_path, body, proxymeta.PROXY_AES_GCM, proxy_key())
    other = proxy_key(bytes(range(1, 33)).hex())
    stamp = derive_key_id("default", KEY)
    with pytest.raises(ProxyDecryptError, match=f"key id {stamp}"):
        decrypt(tmp_path, single, proxymeta.PROXY_AES_GCM, other, key_id=stamp)
    with pytest.raises(ProxyDecryptError, match="-o proxy_key_file=PATH"):
        decrypt(tmp_path, single, proxymeta.PROXY_AES_GCM, None, key_id=stamp)
    with pytest.raises(ProxyDecryptError, match="does not know"):
        decrypt(tmp_path, single, "rot13-v9", proxy_key())


@pytest.fixture
def encrypted_files() -> dict[str, bytes]:
    series = ReleaseSeries(size=200 << 10, seed=21)
    files = {f"sec/{name}": data for name, data in series.zips(3)}
    files["sec/big.bin"] = bytes(range(256)) * 1200  # passthrough, several DGE1 frames
    files["sec/small.txt"] = b"secret notes\n"
    return files


async def write_encrypted_bucket(store: MemoryStore, files: dict[str, bytes]) -> None:
    # Passthrough PUTs streamed in: chunked; references and deltas: single-shot.
    writer = ProxyWriter(encryption=ProxyEncryption(KEY, chunked_passthrough=True))
    for key, data in files.items():
        await store_all(store, writer.put(key, data, delta=key.endswith(".zip")))


async def test_core_reads_what_the_proxy_encrypted_with_its_key(
    core: Core, memory_store: MemoryStore, encrypted_files: dict[str, bytes], tmp_path: Path
) -> None:
    await write_encrypted_bucket(memory_store, encrypted_files)
    markers = {o.metadata["user-dg-encrypted"] for o in memory_store.objects.values()}
    assert markers == {proxymeta.PROXY_AES_GCM, proxymeta.PROXY_AES_GCM_CHUNKED}  # the premise
    core.proxy_key = proxy_key()
    for key, data in encrypted_files.items():
        stored = await core.locate(key)
        assert stored.encryption is not None and stored.original_size == len(data)
        out = tmp_path / "out"
        await core.get(key, out)
        assert out.read_bytes() == data, key
        assert await core.materialize(stored) == sha(data)


async def test_core_without_the_key_refuses_encrypted_objects(
    core: Core, memory_store: MemoryStore, encrypted_files: dict[str, bytes], tmp_path: Path
) -> None:
    await write_encrypted_bucket(memory_store, encrypted_files)
    for key in encrypted_files:
        stored = await core.locate(key)
        with pytest.raises(ProxyDecryptError, match="proxy_key_file"):
            await core.get(key, tmp_path / "out")
        with pytest.raises(ProxyDecryptError):
            await core.materialize(stored)
        assert not (tmp_path / "out").exists()
    core.proxy_key = proxy_key(bytes(32).hex())  # the wrong key
    with pytest.raises(ProxyDecryptError, match="another key"):
        await core.get("sec/small.txt", tmp_path / "out")


@pytest.mark.expected_log(r"cannot read sec/big.bin: .*proxy_key_file")
async def test_encrypted_files_are_never_read_by_ranges(
    core: Core, memory_store: MemoryStore, encrypted_files: dict[str, bytes]
) -> None:
    """A passthrough file above ``verify_whole_below`` is read by ranges when
    plain; encrypted, ranges would be ciphertext, so it goes through the cache
    (decrypted, verified), or fails with EIO without the key."""
    await write_encrypted_bucket(memory_store, encrypted_files)
    content = StoredContent(core, trio.CapacityLimiter(2), verify_whole_below=1024)
    stored = await core.locate("sec/big.bin")
    assert stored.original_size > 1024 and stored.kind is Kind.DIRECT
    with pytest.raises(FsError) as caught:
        await content.reader(stored)
    assert caught.value.errno == errno.EIO
    core.proxy_key = proxy_key()
    reader = await content.reader(stored)
    try:
        assert await reader.read(0, stored.original_size) == encrypted_files["sec/big.bin"]
    finally:
        await reader.close()


# --- fuzzing the decoders: whatever the bytes, plaintext that authenticated or the error ---


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(max_size=3 * 65536 + 100),
    cut=st.integers(min_value=0, max_value=4 * 65536),
    flip=st.integers(min_value=0, max_value=4 * 65536),
    garbage=st.binary(max_size=64),
)
def test_fuzz_chunked_bodies(
    tmp_path: Path, data: bytes, cut: int, flip: int, garbage: bytes
) -> None:
    body = bytearray(encrypt_chunked(KEY, data))
    body = body[: min(cut, len(body))] + garbage if cut < len(body) else body
    if body and flip < len(body):
        body[flip] ^= 0x40
    try:
        plain = decrypt(tmp_path, bytes(body), proxymeta.PROXY_AES_GCM_CHUNKED, proxy_key())
    except ProxyDecryptError:
        assert not (tmp_path / "pt").exists()
    else:
        assert plain == data  # only the untouched body decrypts, to exactly its plaintext


@pytest.mark.parametrize("newer", ["delta", "passthrough"])
async def test_of_two_forms_within_a_second_the_newer_created_at_shows(
    core: Core, memory_store: MemoryStore, tmp_path: Path, newer: str
) -> None:
    """``x`` and ``x.delta`` both there (a writer died between storing one and
    removing the other) with the same Last-Modified second: the newer
    ``dg-created-at`` wins, as in the proxy (its ``dedup_keep_latest``)."""
    series = ReleaseSeries(size=128 << 10, seed=22)
    (_, old), (_, new) = series.zips(2)
    early = datetime(2026, 5, 1, 12, 0, 0, 100000, tzinfo=UTC)
    late = early.replace(microsecond=900000)
    writer = ProxyWriter()
    objects = writer.put(
        "app/x.zip", old if newer == "passthrough" else new, now=late if newer == "delta" else early
    )
    objects += writer.put(
        "app/x.zip",
        new if newer == "passthrough" else old,
        delta=False,
        now=late if newer == "passthrough" else early,
    )
    await store_all(memory_store, objects)
    second = early.replace(microsecond=0)
    for key, obj in memory_store.objects.items():
        memory_store.objects[key] = dataclasses.replace(obj, last_modified=second)
    stored = await core.locate("app/x.zip")
    assert stored.kind is (Kind.DELTA if newer == "delta" else Kind.DIRECT)
    out = tmp_path / "out"
    await core.get("app/x.zip", out)
    assert out.read_bytes() == new
    # A whole second apart, Last-Modified (the store's one clock) decides.
    other_key = "app/x.zip" if newer == "delta" else "app/x.zip.delta"
    memory_store.objects[other_key] = dataclasses.replace(
        memory_store.objects[other_key], last_modified=second.replace(second=1)
    )
    assert (await core.locate("app/x.zip")).stored_key == other_key


def test_created_at_parses_both_tools_spellings() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    for text in (
        "2026-01-02T03:04:05.678901Z",  # deltaglider_proxy
        "2026-01-02T03:04:05.678901",  # DeltaGlider, direct objects
        "2026-01-02T05:04:05.678901+02:00",
    ):
        assert fmt.created_at({"dg-created-at": text}) == when, text
    assert fmt.created_at({"dg-created-at": "2026-01-02T03:04:05Z"}) == when.replace(microsecond=0)
    for bad in ("", "yesterday", "9" * 100):
        assert fmt.created_at({"dg-created-at": bad}) is None


# --- the operator commands on a proxy bucket ---------------------------------------------------


@pytest.mark.expected_log(r"sec/.*encrypted by deltaglider_proxy.*proxy_key_file")
async def test_verify_stats_and_gc_on_a_proxy_bucket(
    core: Core,
    memory_store: MemoryStore,
    proxy_files: dict[str, bytes],
    encrypted_files: dict[str, bytes],
) -> None:
    await write_proxy_bucket(memory_store, proxy_files)
    await write_encrypted_bucket(memory_store, encrypted_files)
    core.proxy_key = proxy_key()
    report = await verify_all(core)
    assert report.ok, [(r.stored_key, r.detail) for r in report.failures]
    checked = {r.stored_key for r in report.results if r.status is Status.OK}
    assert {"app/reference.bin", "sec/reference.bin"} <= checked
    assert all(
        (k + ".delta" if k.endswith(".zip") else k) in checked
        for k in [*proxy_files, *encrypted_files]
    )
    stats = await compute_stats(memory_store, "", "detailed", use_cache=False)
    everything = {**proxy_files, **encrypted_files}
    assert stats.file_count == len(everything)
    assert stats.original_bytes == sum(len(v) for v in everything.values())
    assert await find_garbage(memory_store) == []  # the proxy's references are in use

    core.proxy_key = None  # without the key: the encrypted files fail, named
    report = await verify_all(core)
    failed = {r.stored_key for r in report.failures}
    assert failed and all(k.startswith("sec/") for k in failed)


@pytest.mark.expected_log(r"cannot read sec/big.bin: .*proxy_key_file")
async def test_encrypted_file_known_without_its_marker_is_never_read_by_ranges(
    core: Core, memory_store: MemoryStore, encrypted_files: dict[str, bytes]
) -> None:
    """Attributes kept from before dgfs knew the markers (a directory index an
    older dgfs wrote holds the other keys only): the object's size is not the
    recorded one, so it is read whole, from a download whose metadata says."""
    await write_encrypted_bucket(memory_store, encrypted_files)
    obj = memory_store.objects["sec/big.bin"]
    stale = {k: v for k, v in obj.metadata.items() if k not in proxymeta.PROXY_MARKER_KEYS}
    stored = fmt.classify("sec/big.bin", len(obj.body), stale)
    assert stored.encryption is None and stored.stored_size != stored.original_size
    content = StoredContent(core, trio.CapacityLimiter(2), verify_whole_below=1024)
    with pytest.raises(FsError) as caught:
        await content.reader(stored)
    assert caught.value.errno == errno.EIO
    core.proxy_key = proxy_key()
    reader = await content.reader(stored)
    try:
        assert await reader.read(0, stored.original_size) == encrypted_files["sec/big.bin"]
    finally:
        await reader.close()
