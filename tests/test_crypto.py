"""Unit tests of dgfs.crypto: subkeys, keyed content ids, chunked AES-GCM, key loading."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet

from dgfs import crypto
from dgfs.errors import ConfigError

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()
# A key whose base64 forms differ between the alphabets ('+/' vs '-_').
AWKWARD_KEY = bytes([0xFB, 0xFF, 0xBF] * 10 + [0xFB, 0xFF])


def test_new_key_is_random_and_sized() -> None:
    keys = {crypto.new_key() for _ in range(10)}
    assert len(keys) == 10
    assert all(len(k) == crypto.KEY_SIZE for k in keys)


def test_subkeys_are_distinct_and_deterministic() -> None:
    key = crypto.new_key()
    naming, encryption = crypto.naming_key(key), crypto.encryption_key(key)
    assert len({key, naming, encryption}) == 3
    assert crypto.naming_key(key) == naming
    assert crypto.encryption_key(key) == encryption
    with pytest.raises(ValueError):
        crypto.naming_key(b"short")


def test_content_id_is_keyed_hmac_of_the_hash() -> None:
    key = crypto.new_key()
    cid = crypto.content_id(key, SHA_A)
    assert len(cid) == 64 and all(c in "0123456789abcdef" for c in cid)
    assert cid == crypto.content_id(key, SHA_A)
    assert cid == crypto.content_id(key, SHA_A.upper())
    assert cid != crypto.content_id(key, SHA_B)
    assert cid != crypto.content_id(crypto.new_key(), SHA_A)
    assert cid != SHA_A
    # Under the naming subkey, not the master key.
    assert cid != hmac.new(key, bytes.fromhex(SHA_A), hashlib.sha256).hexdigest()
    expected = hmac.new(crypto.naming_key(key), bytes.fromhex(SHA_A), hashlib.sha256)
    assert cid == expected.hexdigest()


@pytest.mark.parametrize("bad", ["", "abc", SHA_A[:-1], SHA_A + "0", "g" * 64])
def test_content_id_rejects_non_hashes(bad: str) -> None:
    with pytest.raises(ValueError):
        crypto.content_id(crypto.new_key(), bad)


def test_key_check_identifies_key() -> None:
    key = crypto.new_key()
    assert crypto.key_check(key) == crypto.key_check(key)
    assert crypto.key_check(key) != crypto.key_check(crypto.new_key())


# --- ChunkAead ----------------------------------------------------------------------


def _aead(prefix: bytes = b"p" * 8, aad: bytes = b"header") -> crypto.ChunkAead:
    return crypto.ChunkAead(crypto.encryption_key(b"k" * 32), prefix, aad)


def test_chunk_round_trip_and_overhead() -> None:
    aead = _aead()
    sealed = aead.seal(3, False, b"hello")
    assert len(sealed) == 5 + crypto.TAG_SIZE
    assert b"hello" not in sealed
    assert aead.open(3, False, sealed) == b"hello"
    assert aead.open(0, True, aead.seal(0, True, b"")) == b""
    assert aead.open(1, True, aead.seal(1, True, memoryview(b"xyz"))) == b"xyz"


@pytest.mark.parametrize(
    "opener",
    [
        pytest.param(lambda s: _aead().open(4, False, s), id="other-index"),
        pytest.param(lambda s: _aead().open(3, True, s), id="claims-last"),
        pytest.param(lambda s: _aead(aad=b"headex").open(3, False, s), id="other-aad"),
        pytest.param(lambda s: _aead(prefix=b"q" * 8).open(3, False, s), id="other-prefix"),
        pytest.param(
            lambda s: _aead().open(3, False, s[:2] + bytes([s[2] ^ 1]) + s[3:]), id="bit-flip"
        ),
        pytest.param(lambda s: _aead().open(3, False, s[:-1]), id="truncated"),
    ],
)
def test_chunk_binding_is_enforced(opener) -> None:  # type: ignore[no-untyped-def]
    sealed = _aead().seal(3, False, b"some chunk")
    with pytest.raises(InvalidTag):
        opener(sealed)


def test_header_tag() -> None:
    tag = _aead().header_tag()
    assert len(tag) == crypto.TAG_SIZE
    _aead().verify_header(tag)
    with pytest.raises(InvalidTag):
        _aead(aad=b"other").verify_header(tag)
    with pytest.raises(InvalidTag):
        _aead(prefix=b"q" * 8).verify_header(tag)
    # The header tag's nonce index is reserved: no chunk can collide with it.
    with pytest.raises(ValueError):
        _aead().seal(crypto.MAX_CHUNKS, True, b"")


def test_nonce_prefix_checked_and_random() -> None:
    assert crypto.ChunkAead.new_nonce_prefix() != crypto.ChunkAead.new_nonce_prefix()
    with pytest.raises(ValueError):
        crypto.ChunkAead(crypto.new_key(), b"short", b"")


# --- key loading --------------------------------------------------------------------


def test_env_key_urlsafe_standard_unpadded_and_fernet() -> None:
    urlsafe = base64.urlsafe_b64encode(AWKWARD_KEY).decode()
    standard = base64.b64encode(AWKWARD_KEY).decode()
    assert urlsafe != standard  # the test means something only if the alphabets differ
    for value in (urlsafe, standard, urlsafe.rstrip("="), f"  {standard}\n"):
        assert crypto.load_cache_key({crypto.KEY_ENV: value}, None) == AWKWARD_KEY
    fernet = Fernet.generate_key()
    assert crypto.load_cache_key({crypto.KEY_ENV: fernet.decode()}, None) == (
        base64.urlsafe_b64decode(fernet)
    )
    assert crypto.parse_key(crypto.encode_key(AWKWARD_KEY), "x") == AWKWARD_KEY


@pytest.mark.parametrize(
    "value",
    [
        "hunter2",
        base64.b64encode(os.urandom(16)).decode(),
        base64.b64encode(os.urandom(33)).decode(),
        base64.b64encode(os.urandom(32)).decode()[:-2] + "!=",
        "A" * 45,
        os.urandom(32).hex(),
    ],
)
def test_env_key_rejects_bad_values_helpfully(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        crypto.load_cache_key({crypto.KEY_ENV: value}, None)
    message = str(info.value)
    assert crypto.KEY_ENV in message
    assert "base64" in message and "32" in message
    assert crypto.MAKE_KEY_COMMAND in message
    assert value not in message  # never echo a secret, even a malformed one


def test_make_key_command_in_message_makes_a_valid_key() -> None:
    code = shlex.split(crypto.MAKE_KEY_COMMAND)[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(crypto.parse_key(out.stdout, "generated")) == crypto.KEY_SIZE


def test_no_key_configured_means_ephemeral() -> None:
    assert crypto.load_cache_key({}, None) is None
    assert crypto.load_cache_key({crypto.KEY_ENV: "  "}, None) is None


def _key_file(tmp_path: Path, mode: int, content: str | None = None) -> Path:
    path = tmp_path / "cache.key"
    path.write_text(content if content is not None else crypto.encode_key(AWKWARD_KEY) + "\n")
    path.chmod(mode)
    return path


def test_key_file_private_is_read(tmp_path: Path) -> None:
    path = _key_file(tmp_path, 0o600)
    assert crypto.load_cache_key({}, path) == AWKWARD_KEY
    path.chmod(0o400)
    assert crypto.load_cache_key({}, path) == AWKWARD_KEY


def test_env_wins_over_key_file(tmp_path: Path) -> None:
    path = _key_file(tmp_path, 0o600)
    env_key = crypto.new_key()
    environ = {crypto.KEY_ENV: crypto.encode_key(env_key)}
    assert crypto.load_cache_key(environ, path) == env_key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_key_file_readable_or_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, mode)
    with pytest.raises(ConfigError) as info:
        crypto.load_cache_key({}, path)
    assert str(path) in str(info.value)
    assert "chmod 600" in str(info.value)


def test_key_file_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        crypto.load_cache_key({}, tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="not a regular file"):
        crypto.load_cache_key({}, tmp_path)
    bad = _key_file(tmp_path, 0o600, "not a key\n")
    with pytest.raises(ConfigError) as info:
        crypto.load_cache_key({}, bad)
    assert str(bad) in str(info.value) and crypto.MAKE_KEY_COMMAND in str(info.value)
    binary = tmp_path / "binary.key"
    binary.write_bytes(os.urandom(32) + b"\xff")
    binary.chmod(0o600)
    with pytest.raises(ConfigError):
        crypto.load_cache_key({}, binary)


def test_encode_key_checks_length() -> None:
    with pytest.raises(ValueError):
        crypto.encode_key(b"x" * 31)
