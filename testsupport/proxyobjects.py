"""Objects laid out exactly as deltaglider_proxy 1.19 writes them, and its read rules.

deltaglider_proxy (github:beshu-tech/deltaglider_proxy, Rust) cannot be
built here, so its wire format is ported from its source, field by field;
each function names the file and function it follows. ``ProxyWriter``
builds what the proxy's engine stores for a PUT; ``proxy_parse`` is the
proxy's reading of an object's metadata, to check what dgfs writes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dgfs.store.base import ObjectStore

#: src/types.rs ``DELTAGLIDER_TOOL`` = CARGO_PKG_NAME "/" CARGO_PKG_VERSION (Cargo.toml: 1.19.0).
PROXY_TOOL = "deltaglider_proxy/1.19.0"
#: src/deltaglider/engine/store.rs ``INTERNAL_REFERENCE_NAME``: a reference's ``dg-original-name``.
REFERENCE_ORIGINAL_NAME = "__reference__"


def created_at(now: datetime) -> str:
    """src/types.rs ``to_bare_metadata_map``: ``created_at.format("%Y-%m-%dT%H:%M:%S%.6fZ")``."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def proxy_metadata(
    storage: str,
    *,
    original_name: str,
    sha256: str,
    md5: str,
    size: int,
    now: datetime,
    content_type: str | None = None,
    user: dict[str, str] | None = None,
    source_name: str | None = None,
    ref_path: str = "reference.bin",
    ref_sha256: str | None = None,
    delta_size: int | None = None,
) -> dict[str, str]:
    """The user metadata (bare keys, as S3 stores them after ``x-amz-meta-``)
    of one object: a port of src/types.rs ``FileMetadata::to_bare_metadata_map``,
    with the values ``FileMetadata::new_reference``/``new_delta``/``new_passthrough``
    put there. ``storage``: ``reference``, ``delta`` or ``passthrough``."""
    meta = {
        "dg-tool": PROXY_TOOL,
        "dg-original-name": original_name,
        "dg-file-sha256": sha256,
        "dg-file-size": str(size),
        "dg-md5": md5,
        "dg-created-at": created_at(now),
    }
    if content_type is not None:
        meta["content-type"] = content_type  # kept among user metadata, not as Content-Type
    if storage == "reference":
        meta["dg-note"] = "reference"
        meta["dg-source-name"] = source_name or original_name
    elif storage == "delta":
        assert ref_sha256 is not None and delta_size is not None
        meta["dg-note"] = "delta"
        meta["dg-ref-path"] = ref_path  # never dg-ref-key
        meta["dg-ref-sha256"] = ref_sha256
        meta["dg-delta-size"] = str(delta_size)
        # FileMetadata::new_delta: cosmetic, and not the argv it ran.
        meta["dg-delta-cmd"] = (
            f"xdelta3 -e -9 -s reference.bin {original_name} {original_name}.delta"
        )
    else:
        assert storage == "passthrough"
        meta["dg-note"] = "passthrough"
    for key, value in (user or {}).items():
        meta[f"user-{key}"] = value
    return meta


def xdelta_encode(reference: bytes, target: bytes) -> bytes:
    """src/deltaglider/codec.rs ``run_xdelta3("-e")``: ``xdelta3 -e -D -s REF -c``
    with the target on stdin (``-a`` only on xdelta3 3.1+; Debian's is 3.0.11).
    Default level (3) and secondary compression (lzma)."""
    with tempfile.NamedTemporaryFile(suffix=".ref") as ref:
        ref.write(reference)
        ref.flush()
        return subprocess.run(
            ["xdelta3", "-e", "-D", "-s", ref.name, "-c"],
            input=target,
            capture_output=True,
            check=True,
        ).stdout


# --- encryption at rest (src/storage/encrypting.rs) -------------------------------------

CHUNK_PLAINTEXT = 64 * 1024  # CHUNK_PLAINTEXT_SIZE


def derive_key_id(backend_name: str, key: bytes) -> str:
    """src/deltaglider/engine/mod.rs ``derive_key_id``: hex(SHA-256(name ‖ 0 ‖ key)[:8])."""
    return hashlib.sha256(backend_name.encode() + b"\0" + key).hexdigest()[:16]


def encrypt_single(key: bytes, plaintext: bytes, iv: bytes | None = None) -> bytes:
    """``encrypt``: ``[12-byte IV][ciphertext + 16-byte tag]``, no AAD."""
    iv = iv or os.urandom(12)
    return iv + AESGCM(key).encrypt(iv, plaintext, None)


def _chunk_nonce(base_iv: bytes, index: int) -> bytes:
    """``chunk_nonce``: the big-endian u32 index XORed into the IV's last 4 bytes."""
    tail = bytes(a ^ b for a, b in zip(base_iv[8:], struct.pack(">I", index), strict=True))
    return base_iv[:8] + tail


def _chunk_aad(index: int, final: bool) -> bytes:
    """``chunk_aad``: ``"DGE1" ‖ index u32 LE ‖ final u8 ‖ 0 0 0 0 0 0 0`` (16 bytes)."""
    return b"DGE1" + struct.pack("<I", index) + bytes([1 if final else 0]) + bytes(7)


def encrypt_chunked(key: bytes, plaintext: bytes, base_iv: bytes | None = None) -> bytes:
    """``ChunkFramer``: ``"DGE1" ‖ base_iv`` then frames ``[u32 LE len][ct+tag]`` of
    64 KiB plaintext windows; only the last is final (an empty file: one empty final frame)."""
    base_iv = base_iv or os.urandom(12)
    windows = [
        plaintext[i : i + CHUNK_PLAINTEXT] for i in range(0, len(plaintext), CHUNK_PLAINTEXT)
    ] or [b""]
    out = bytearray(b"DGE1" + base_iv)
    aead = AESGCM(key)
    for index, window in enumerate(windows):
        final = index == len(windows) - 1
        ct = aead.encrypt(_chunk_nonce(base_iv, index), window, _chunk_aad(index, final))
        out += struct.pack("<I", len(ct)) + ct
    return bytes(out)


@dataclass
class ProxyEncryption:
    """A backend's ``encryption`` setting: the key and how its objects are marked
    (``mark_encrypted``/``mark_chunked_encrypted``: into user metadata, hence ``user-``)."""

    key: bytes
    backend: str = "default"
    chunked_passthrough: bool = False  # put_passthrough_chunked (streamed PUTs)

    @property
    def key_id(self) -> str:
        return derive_key_id(self.backend, self.key)

    def seal(self, body: bytes, meta: dict[str, str], *, chunked: bool) -> bytes:
        scheme = "aes-256-gcm-chunked-v1" if chunked else "aes-256-gcm-v1"
        meta["user-dg-encrypted"] = scheme
        meta["user-dg-encryption-key-id"] = self.key_id
        return encrypt_chunked(self.key, body) if chunked else encrypt_single(self.key, body)


# --- the engine's PUT ----------------------------------------------------------------------


@dataclass
class StoredObject:
    key: str
    body: bytes
    metadata: dict[str, str]


@dataclass
class ProxyWriter:
    """What src/deltaglider/engine/store.rs stores for each PUT into a bucket.

    The first delta-eligible object of a directory becomes ``reference.bin``
    (``new_reference``: original name ``__reference__``, source name the full
    key) and is then stored as a delta against it (a tiny self-delta); later
    eligible objects are deltas, the others passthrough under their own name.
    """

    encryption: ProxyEncryption | None = None
    references: dict[str, bytes] = field(default_factory=dict)

    def put(
        self,
        key: str,
        body: bytes,
        *,
        delta: bool = True,
        now: datetime | None = None,
        user: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> list[StoredObject]:
        now = now or datetime.now(UTC)
        prefix, _, name = key.rpartition("/")
        sha256 = hashlib.sha256(body).hexdigest()
        md5 = hashlib.md5(body).hexdigest()
        common = {"sha256": sha256, "md5": md5, "size": len(body), "now": now}
        out: list[StoredObject] = []
        if not delta:
            meta = proxy_metadata(
                "passthrough", original_name=name, user=user, content_type=content_type, **common
            )
            out.append(StoredObject(key, self._seal(body, meta, passthrough=True), meta))
            return out
        ref_key = f"{prefix}/reference.bin" if prefix else "reference.bin"
        reference = self.references.get(ref_key)
        if reference is None:
            reference = self.references[ref_key] = body
            meta = proxy_metadata(
                "reference",
                original_name=REFERENCE_ORIGINAL_NAME,
                source_name=key,
                content_type=content_type,
                **common,
            )
            out.append(StoredObject(ref_key, self._seal(body, meta), meta))
        patch = xdelta_encode(reference, body)
        meta = proxy_metadata(
            "delta",
            original_name=name,
            ref_sha256=hashlib.sha256(reference).hexdigest(),
            delta_size=len(patch),
            user=user,
            content_type=content_type,
            **common,
        )
        out.append(StoredObject(key + ".delta", self._seal(patch, meta), meta))
        return out

    def _seal(self, body: bytes, meta: dict[str, str], *, passthrough: bool = False) -> bytes:
        if self.encryption is None:
            return body
        chunked = passthrough and self.encryption.chunked_passthrough
        return self.encryption.seal(body, meta, chunked=chunked)


# --- the proxy's reading of metadata ---------------------------------------------------------


class ProxyParseError(Exception):
    """What ``headers_to_metadata`` returns as ``Err``: the proxy then serves the
    object as an unmanaged passthrough (a ``.delta`` or ``reference.bin``: broken)."""


def proxy_parse(headers: dict[str, str]) -> dict[str, object]:
    """A port of src/storage/s3.rs ``S3Backend::headers_to_metadata``: how the
    proxy reads an object's user metadata (bare keys). Returns the fields it
    keeps; raises ``ProxyParseError`` where it returns ``Err``."""

    def get(*keys: str) -> str | None:
        for key in keys:
            value = headers.get(key)
            if value:  # empty values are skipped
                return value
        return None

    def require(*keys: str) -> str:
        value = get(*keys)
        if value is None:
            raise ProxyParseError(f"Missing {keys[0]}")
        return value

    tool = require("dg-tool", "tool")
    original_name = require("dg-original-name", "original-name", "dg-source-name", "source-name")
    file_sha256 = require("dg-file-sha256", "file-sha256")
    size_text = get("dg-file-size", "file-size") or "0"
    if not size_text.isdigit():
        raise ProxyParseError(f"Invalid file size: {size_text}")
    note = get("dg-note", "note")
    ref_path = get("dg-ref-path", "dg-ref-key", "ref-path", "ref-key")
    is_reference = note == "reference"
    is_delta = ref_path is not None or (
        note is not None and (note == "delta" or note.startswith("zero-diff"))
    )
    parsed: dict[str, object] = {
        "tool": tool,
        "original_name": original_name,
        "file_sha256": file_sha256,
        "file_size": int(size_text),
        # ``md5`` is read with a raw ``headers.get``: absent -> "" (an empty ETag).
        "md5": headers.get("dg-md5", ""),
        "created_at": get("dg-created-at", "created-at"),
        "content_type": get("content-type"),
        "user_metadata": {k[5:]: v for k, v in headers.items() if k.startswith("user-")},
    }
    if is_reference:
        parsed["storage"] = "reference"
        parsed["source_name"] = get("dg-source-name", "source-name") or original_name
    elif is_delta:
        if ref_path is None:
            raise ProxyParseError("Missing dg-ref-path")
        parsed["storage"] = "delta"
        # An absolute (legacy) path: only its last segment is kept.
        parsed["ref_path"] = ref_path.rsplit("/", 1)[-1]
        parsed["ref_sha256"] = require("dg-ref-sha256", "ref-sha256")
        delta_size = get("dg-delta-size", "delta-size") or "0"
        if not delta_size.isdigit():
            raise ProxyParseError(f"Invalid delta size: {delta_size}")
        parsed["delta_size"] = int(delta_size)
    else:
        parsed["storage"] = "passthrough"
    return parsed


def proxy_client_view(headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """What an S3 client HEADing the object through the proxy gets: its
    Content-Type and its ``x-amz-meta-*`` (bare names). A port of
    src/s3_adapter_s3s.rs ``head_object_output_from_metadata`` (the stored
    ``content-type`` trimmed, blank -> ``application/octet-stream``) and
    ``response_metadata_map`` (the ``dg-`` map without ``content-type`` and
    ``user-`` keys, plus each client key whose name does not start with
    ``dg-``, case-insensitively)."""
    parsed = proxy_parse(headers)
    content_type = str(parsed["content_type"] or "").strip() or "application/octet-stream"
    shown = {k: v for k, v in headers.items() if k.startswith("dg-")}
    user = parsed["user_metadata"]
    assert isinstance(user, dict)
    for key, value in user.items():
        if not key.lower().startswith("dg-"):
            shown[key] = value
    return content_type, shown


async def store_all(store: ObjectStore, objects: list[StoredObject]) -> None:
    """Put ``objects`` into ``store`` as the proxy wrote them."""
    for obj in objects:
        await store.put_bytes(obj.key, obj.body, obj.metadata)
