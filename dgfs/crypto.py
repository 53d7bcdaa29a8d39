"""Authenticated encryption helpers and keyed content ids for the disk cache.

One 32-byte *cache key* (random per mount, or loaded from
``DG_CACHE_ENCRYPTION_KEY`` / a key file) is never used directly: HKDF-SHA256
derives independent subkeys from it, one to name cache entries
(:func:`content_id`) and one to encrypt them (:class:`ChunkAead`). So a cache
file name reveals nothing about the content hash it holds, and the naming
key and the encryption key cannot be confused for each other.

The chunked construction in :class:`ChunkAead` binds every chunk to its
position, to "is this the last chunk", and to caller-chosen associated data
(the cache puts its entry header and the content SHA-256 there), so
reordering, truncation, bit flips and swapping whole entries all fail
authentication. Entry layout on disk is :mod:`dgfs.cache`'s business.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dgfs import environment
from dgfs.errors import ConfigError

log = logging.getLogger(__name__)

KEY_SIZE = 32
"""Bytes in a cache key (AES-256, and the size of a Fernet key)."""

NONCE_PREFIX_SIZE = 8
"""Random per-entry part of each AES-GCM nonce; the other 4 bytes are the chunk index."""

TAG_SIZE = 16
"""Bytes AES-GCM adds to every sealed chunk."""

MAX_CHUNKS = 0xFFFF_FFFF
"""Chunk indices are 0 .. MAX_CHUNKS - 1; index MAX_CHUNKS is reserved for the header tag."""

KEY_ENV = "DG_CACHE_ENCRYPTION_KEY"
"""Environment variable DeltaGlider uses for its cache key; dgfs reads the same one."""

MAKE_KEY_COMMAND = (
    'python -c "import base64,os;print(base64.urlsafe_b64encode(os.urandom(32)).decode())"'
)

_NAMING_INFO = b"dgfs cache v1: entry names"
_ENCRYPTION_INFO = b"dgfs cache v1: entry encryption"
_NONCE_INDEX = struct.Struct(">I")
_AAD_TRAILER = struct.Struct(">IB")  # chunk index, is_last flag
_SHA256_HEX_LEN = 64


def new_key() -> bytes:
    """A fresh random cache key (for an ephemeral cache)."""
    return os.urandom(KEY_SIZE)


def encode_key(key: bytes) -> str:
    """``key`` in the text form :func:`parse_key` accepts (urlsafe base64, like Fernet)."""
    _check_key(key)
    return base64.urlsafe_b64encode(key).decode("ascii")


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"cache key must be {KEY_SIZE} bytes, got {len(key)}")


def _subkey(key: bytes, info: bytes) -> bytes:
    _check_key(key)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(key)


def naming_key(key: bytes) -> bytes:
    """The subkey of ``key`` that names cache entries (HKDF-SHA256)."""
    return _subkey(key, _NAMING_INFO)


def encryption_key(key: bytes) -> bytes:
    """The subkey of ``key`` that encrypts cache entries (HKDF-SHA256)."""
    return _subkey(key, _ENCRYPTION_INFO)


def sha256_bytes(sha256_hex: str) -> bytes:
    """The 32 raw bytes of a hex SHA-256 (either case); ValueError if it is not one."""
    if len(sha256_hex) != _SHA256_HEX_LEN:
        raise ValueError(f"not a hex SHA-256: {sha256_hex!r}")
    try:
        return bytes.fromhex(sha256_hex)
    except ValueError:
        raise ValueError(f"not a hex SHA-256: {sha256_hex!r}") from None


def content_id(key: bytes, sha256_hex: str) -> str:
    """The file name of the cache entry holding content ``sha256_hex`` under cache key ``key``.

    64 lower-case hex characters: HMAC-SHA256 of the raw content hash under
    the naming subkey. Deterministic for one key; without the key it reveals
    nothing about the hash. Upper- and lower-case spellings of a hash give
    the same id. ValueError if ``sha256_hex`` is not a hex SHA-256.
    """
    return hmac.new(naming_key(key), sha256_bytes(sha256_hex), hashlib.sha256).hexdigest()


def key_check(key: bytes) -> str:
    """A value that identifies ``key`` without revealing it (to tell whether a cache used it)."""
    return hmac.new(naming_key(key), b"dgfs cache key check", hashlib.sha256).hexdigest()


class ChunkAead:
    """AES-256-GCM over the chunks of one stream (one cache entry).

    Chunk ``i`` is sealed with nonce ``nonce_prefix || i`` (4-byte big-endian
    index) and associated data ``aad || i || is_last``. The header tag is
    sealed with the reserved index :data:`MAX_CHUNKS`, so it never shares a
    nonce with a chunk. Each stream must use its own random ``nonce_prefix``
    (see :meth:`new_nonce_prefix`); the prefix need not be secret.

    :meth:`open` and :meth:`verify_header` raise
    ``cryptography.exceptions.InvalidTag`` when anything does not match:
    wrong key, prefix, index, last-flag, associated data, or altered bytes.
    Instances are immutable and safe to share between threads.
    """

    def __init__(self, enc_key: bytes, nonce_prefix: bytes, aad: bytes) -> None:
        if len(nonce_prefix) != NONCE_PREFIX_SIZE:
            raise ValueError(f"nonce prefix must be {NONCE_PREFIX_SIZE} bytes")
        self._aead = AESGCM(enc_key)
        self._nonce_prefix = nonce_prefix
        self._aad = aad

    @staticmethod
    def new_nonce_prefix() -> bytes:
        """A random nonce prefix for a new stream."""
        return os.urandom(NONCE_PREFIX_SIZE)

    def _nonce(self, index: int) -> bytes:
        return self._nonce_prefix + _NONCE_INDEX.pack(index)

    def _chunk_aad(self, index: int, is_last: bool) -> bytes:
        if not 0 <= index < MAX_CHUNKS:
            raise ValueError(f"chunk index out of range: {index}")
        return self._aad + _AAD_TRAILER.pack(index, is_last)

    def seal(self, index: int, is_last: bool, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Chunk ``index`` encrypted and authenticated (``len(plaintext) + TAG_SIZE`` bytes)."""
        return self._aead.encrypt(self._nonce(index), plaintext, self._chunk_aad(index, is_last))

    def open(self, index: int, is_last: bool, sealed: bytes) -> bytes:
        """The plaintext of chunk ``index``; InvalidTag unless it is exactly what was sealed."""
        return self._aead.decrypt(self._nonce(index), sealed, self._chunk_aad(index, is_last))

    def header_tag(self) -> bytes:
        """A tag over the associated data alone, so a header can be checked before any chunk."""
        return self._aead.encrypt(self._nonce(MAX_CHUNKS), b"", self._aad)

    def verify_header(self, tag: bytes) -> None:
        """InvalidTag unless ``tag`` is :meth:`header_tag` for this key, prefix and data."""
        self._aead.decrypt(self._nonce(MAX_CHUNKS), tag, self._aad)


# --- loading a persistent key -------------------------------------------------------


def parse_key(text: str, source: str) -> bytes:
    """The 32-byte key encoded in ``text``: urlsafe (Fernet) or standard base64.

    Surrounding whitespace and missing ``=`` padding are tolerated. Raises
    ConfigError naming ``source`` and saying how to make a valid key.
    """
    value = text.strip()
    # Fernet keys use the urlsafe alphabet; translating it lets one strict
    # decoder accept both spellings (the two alphabets differ only in -_ vs +/).
    normalized = value.replace("-", "+").replace("_", "/")
    normalized += "=" * (-len(normalized) % 4)
    try:
        key = base64.b64decode(normalized, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise ConfigError(
            f"{source} is not a valid cache key: expected {KEY_SIZE} random bytes in base64 "
            f"(a Fernet key, 44 characters); make one with: {MAKE_KEY_COMMAND}"
        )
    return key


def read_key_file(path: Path) -> bytes:
    """The key stored in ``path``; ConfigError if unreadable, malformed or not private.

    The file must be a regular file that neither group nor others can read or
    write (mode 0600 or stricter), like an ssh private key.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read cache key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # fstat: checks the file we read, not whatever the path names later
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"cache key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"cache key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(4096)
    finally:
        os.close(fd)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return parse_key(text, f"cache key file {path}")


def load_cache_key(environ: Mapping[str, str] | None, key_file: Path | None) -> bytes | None:
    """The persistent cache key, or None for an ephemeral (per-mount) cache.

    ``DG_CACHE_ENCRYPTION_KEY`` wins if set and not blank; otherwise
    ``key_file`` if given. Both hold 32 bytes in urlsafe or standard base64
    (DeltaGlider's Fernet keys qualify). Raises ConfigError, with a message
    fit to show the user, when the value or file is malformed or the file is
    readable by group or others.
    """
    env_value = environment.cache_key_text(environ)
    if env_value.strip():
        log.debug("cache key from %s", KEY_ENV)
        return parse_key(env_value, KEY_ENV)
    if key_file is not None:
        log.debug("cache key from %s", key_file)
        return read_key_file(key_file)
    return None
