"""deltaglider_proxy's encryption at rest, undone on local files. No S3.

The proxy (DeltaGlider's Rust successor) can encrypt every body it stores
with AES-256-GCM (its src/storage/encrypting.rs) and marks the object in
its user metadata (``proxymeta.proxy_encryption``):

- ``aes-256-gcm-v1``: ``[12-byte IV][ciphertext][16-byte tag]``, no AAD.
- ``aes-256-gcm-chunked-v1``: ``"DGE1"`` + a 12-byte base IV, then frames
  ``[u32 LE length][ciphertext + tag]`` of 64 KiB plaintext each; frame
  ``i``'s nonce is the base IV with big-endian ``i`` XORed into its last 4
  bytes, its AAD ``"DGE1" ‖ i (u32 LE) ‖ final (u8) ‖ 7 zero bytes``, so a
  reordered, dropped or truncated frame fails authentication.

The key is the proxy's ``DGP_ENCRYPTION_KEY`` (64 hex digits). The proxy
stamps ``dg-encryption-key-id`` = hex(SHA-256(backend name ‖ 0 ‖ key)[:8])
unless its operator pinned an id. Everything here runs in a worker thread;
nothing returns a byte that failed authentication (``dest`` is removed).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dgfs.errors import ConfigError, IntegrityError
from dgfs.proxymeta import PROXY_AES_GCM, PROXY_AES_GCM_CHUNKED

OPTION = "proxy_key_file"
IV_LEN = 12
TAG_LEN = 16
CHUNK_MAGIC = b"DGE1"
CHUNK_PLAINTEXT = 64 * 1024
#: The proxy's cap on one frame's length field (``CHUNK_MAX_WIRE_CIPHERTEXT``).
CHUNK_MAX_CIPHERTEXT = CHUNK_PLAINTEXT + TAG_LEN + 1024
_IO_CHUNK = 1 << 20
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


class ProxyDecryptError(IntegrityError):
    """A proxy-encrypted object that cannot be decrypted here (EIO in the mount)."""


@dataclass(frozen=True)
class ProxyKey:
    """A proxy backend's key and the key ids its objects may carry."""

    key: bytes
    key_ids: frozenset[str]
    path: Path | None = None

    def describe(self) -> str:
        ids = ", ".join(sorted(self.key_ids))
        return f"{OPTION} {self.path}" + (f" (key id {ids})" if ids else "")


def derive_key_id(backend: str, key: bytes) -> str:
    """The proxy's key id of ``key`` on the backend named ``backend``
    (src/deltaglider/engine/mod.rs ``derive_key_id``)."""
    return hashlib.sha256(backend.encode() + b"\0" + key).hexdigest()[:16]


def parse_proxy_key(text: str, path: Path | None = None) -> ProxyKey:
    """A key file: the key as 64 hex digits (``DGP_ENCRYPTION_KEY``'s value),
    then optionally ``backend=NAME`` (default ``default``: the id the proxy
    derives for that backend) and/or ``key_id=ID`` (an id its operator pinned),
    separated by white space or new lines. ``#`` starts a comment."""
    tokens = [tok for line in text.splitlines() for tok in line.split("#", 1)[0].split()]
    where = f" in {path}" if path else ""
    if not tokens or not _HEX_KEY.fullmatch(tokens[0]):
        raise ConfigError(
            f"{OPTION}{where}: expected the proxy's key as 64 hex digits (DGP_ENCRYPTION_KEY)"
        )
    key = bytes.fromhex(tokens[0])
    backends: list[str] = []
    key_ids: set[str] = set()
    for token in tokens[1:]:
        name, sep, value = token.partition("=")
        if sep and name == "backend" and value:
            backends.append(value)
        elif sep and name == "key_id" and _KEY_ID.fullmatch(value):
            key_ids.add(value)
        else:
            raise ConfigError(f"{OPTION}{where}: unexpected {token[:40]!r} (backend=, key_id=)")
    key_ids.update(derive_key_id(name, key) for name in backends or ["default"])
    return ProxyKey(key, frozenset(key_ids), path)


def load_proxy_key(path: Path) -> ProxyKey:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{OPTION} {path}: cannot read it ({exc})") from None
    return parse_proxy_key(text, path)


def decrypt_file(
    src: Path,
    dest: Path,
    *,
    scheme: str,
    key: ProxyKey | None,
    key_id: str | None,
    what: str,
) -> None:
    """Write the plaintext of the proxy-encrypted ``src`` (object ``what``) to ``dest``.

    ``ProxyDecryptError`` (and no ``dest``) when there is no key, the scheme
    is unknown, or the bytes fail authentication: a wrong key, a truncated
    or tampered body. Its message names the option and both key ids.
    """
    if scheme not in (PROXY_AES_GCM, PROXY_AES_GCM_CHUNKED):
        raise ProxyDecryptError(
            f"{what}: encrypted by deltaglider_proxy with {scheme[:40]!r}, a scheme dgfs"
            " does not know; refusing to return its ciphertext"
        )
    if key is None:
        raise ProxyDecryptError(
            f"{what}: encrypted by deltaglider_proxy ({scheme}"
            + (f", key id {key_id}" if key_id else "")
            + f"); give its key with -o {OPTION}=PATH (dgfs CLI: --proxy-key-file)"
        )
    try:
        if scheme == PROXY_AES_GCM:
            _decrypt_single(src, dest, key.key)
        else:
            _decrypt_chunked(src, dest, key.key)
    except (InvalidTag, _Malformed) as exc:
        dest.unlink(missing_ok=True)
        detail = str(exc) or "authentication failed"
        if key_id and key.key_ids and key_id not in key.key_ids:
            why = f"it was encrypted with key id {key_id}, {key.describe()} is another key"
        else:
            why = f"{detail}: a wrong key in {key.describe()}, or a truncated or tampered body"
        raise ProxyDecryptError(f"{what}: cannot decrypt ({scheme}): {why}") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


class _Malformed(Exception):
    """The body does not have the framing its scheme says."""


def _decrypt_single(src: Path, dest: Path, key: bytes) -> None:
    size = src.stat().st_size
    if size < IV_LEN + TAG_LEN:
        raise _Malformed(f"{size} bytes, shorter than an IV and a tag")
    with open(src, "rb") as f, open(dest, "wb") as out:
        iv = f.read(IV_LEN)
        f.seek(size - TAG_LEN)
        tag = f.read(TAG_LEN)
        f.seek(IV_LEN)
        decryptor = Cipher(algorithms.AES(key), modes.GCM(iv, tag)).decryptor()
        left = size - IV_LEN - TAG_LEN
        while left:
            chunk = f.read(min(_IO_CHUNK, left))
            if not chunk:
                raise _Malformed("body shorter than its size")
            left -= len(chunk)
            out.write(decryptor.update(chunk))
        decryptor.finalize()  # InvalidTag: nothing written may be used


def _chunk_nonce(base_iv: bytes, index: int) -> bytes:
    tail = bytes(a ^ b for a, b in zip(base_iv[8:], struct.pack(">I", index), strict=True))
    return base_iv[:8] + tail


def _chunk_aad(index: int, final: bool) -> bytes:
    return CHUNK_MAGIC + struct.pack("<I", index) + (b"\x01" if final else b"\x00") + bytes(7)


def _decrypt_chunked(src: Path, dest: Path, key: bytes) -> None:
    size = src.stat().st_size
    aead = AESGCM(key)
    with open(src, "rb") as f, open(dest, "wb") as out:
        header = f.read(len(CHUNK_MAGIC) + IV_LEN)
        if len(header) < len(CHUNK_MAGIC) + IV_LEN or not header.startswith(CHUNK_MAGIC):
            raise _Malformed("no DGE1 header")
        base_iv = header[len(CHUNK_MAGIC) :]
        index = 0
        while True:
            length_field = f.read(4)
            if len(length_field) != 4:
                raise _Malformed(f"truncated before frame {index}")
            (length,) = struct.unpack("<I", length_field)
            if not TAG_LEN <= length <= CHUNK_MAX_CIPHERTEXT:
                raise _Malformed(f"frame {index} claims {length} bytes")
            frame = f.read(length)
            if len(frame) != length:
                raise _Malformed(f"frame {index} truncated")
            # The last frame in the object must be the one sealed as final: a
            # body cut after any frame fails here.
            final = f.tell() == size
            out.write(aead.decrypt(_chunk_nonce(base_iv, index), frame, _chunk_aad(index, final)))
            if final:
                return
            index += 1
            if index >= 1 << 32:
                raise _Malformed("more frames than the format allows")


def decrypt_in_place(path: Path, **kwargs: object) -> None:
    """``decrypt_file`` into a sibling file, then over ``path``."""
    plain = path.with_name(f".{path.name}.plain-{os.getpid()}")
    try:
        decrypt_file(path, plain, **kwargs)  # type: ignore[arg-type]
        os.replace(plain, path)
    finally:
        plain.unlink(missing_ok=True)
