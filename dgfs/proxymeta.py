"""deltaglider_proxy's own metadata keys: its at-rest encryption markers, and
an S3 client's own metadata and Content-Type as the proxy keeps them
(``user-<k>``, ``content-type``). Pure, no I/O; callers import these names
from here (``dgfs.format`` uses the encryption markers to classify objects).

What a bucket holds is untrusted: ``client_metadata`` reads under limits
and never raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: deltaglider_proxy's at-rest encryption markers (src/storage/encrypting.rs
#: ``ENCRYPTION_MARKER_KEY``/``ENCRYPTION_KEY_ID_KEY``). The proxy keeps them
#: among a client's own metadata, which it stores as ``user-<k>``
#: (src/types.rs ``to_bare_metadata_map``); the bare spelling is read too.
PROXY_ENCRYPTED_KEYS = ("user-dg-encrypted", "dg-encrypted")
PROXY_KEY_ID_KEYS = ("user-dg-encryption-key-id", "dg-encryption-key-id")
PROXY_MARKER_KEYS = PROXY_ENCRYPTED_KEYS + PROXY_KEY_ID_KEYS
#: ``dg-encrypted`` values: ``[12-byte IV][ciphertext+tag]`` and the chunked ``DGE1`` framing.
PROXY_AES_GCM = "aes-256-gcm-v1"
PROXY_AES_GCM_CHUNKED = "aes-256-gcm-chunked-v1"


def proxy_encryption(metadata: Mapping[str, str]) -> str | None:
    """deltaglider_proxy's at-rest encryption scheme of an object (its
    ``dg-encrypted`` marker), or None for plain bytes. Native SSE-S3/KMS
    objects (``dg-encrypted-native``) come back from S3 as plain bytes: None."""
    for key in PROXY_ENCRYPTED_KEYS:
        value = metadata.get(key)
        if value:
            return value.strip()
    return None


def proxy_key_id(metadata: Mapping[str, str]) -> str | None:
    """The key-id stamp of a proxy-encrypted object (``dg-encryption-key-id``), if any."""
    for key in PROXY_KEY_ID_KEYS:
        value = metadata.get(key)
        if value:
            return value.strip()
    return None


# --- an S3 client's own metadata, as deltaglider_proxy keeps it ---------------------

#: The proxy stores an S3 client's own metadata ``x-amz-meta-<k>`` as
#: ``user-<k>`` (src/types.rs ``to_bare_metadata_map``); ``headers_to_metadata``
#: (src/storage/s3.rs) strips the prefix on read.
CLIENT_PREFIX = "user-"
#: The proxy's ``FileMetadata.content_type``, a client's Content-Type, kept
#: among the user metadata (the object's own Content-Type is always
#: ``application/octet-stream``). ``headers_to_metadata`` reads it with
#: ``get_value(&["content-type"])``: an empty value counts as none.
CONTENT_TYPE_KEY = "content-type"
#: What the proxy serves when there is none (src/s3_adapter_s3s.rs
#: ``head_object_output_from_metadata``).
DEFAULT_CONTENT_TYPE = "application/octet-stream"
#: Limits on the client metadata read from an object (untrusted: any writer
#: of the bucket). S3 itself caps a whole object's user metadata at 2 KiB.
CLIENT_METADATA_MAX_ENTRIES = 64
CLIENT_NAME_MAX = 128
CLIENT_VALUE_MAX = 2048  # bytes, UTF-8
_CLIENT_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{CLIENT_NAME_MAX - 1}}}")


def client_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """An S3 client's own metadata in an object, name -> value, as
    deltaglider_proxy hands it back to its clients: every ``user-<k>`` key
    but those whose ``k`` starts with ``dg-`` (its encryption markers;
    src/s3_adapter_s3s.rs ``response_metadata_map``).

    Read under limits: a name that is not 1 to ``CLIENT_NAME_MAX``
    characters of ``A-Za-z0-9_.-`` (starting with a letter or digit) and a
    value over ``CLIENT_VALUE_MAX`` bytes are left out, and of what remains
    only the first ``CLIENT_METADATA_MAX_ENTRIES`` names in sorted order are
    kept. Never raises on what a bucket holds.
    """
    found: dict[str, str] = {}
    for key, value in metadata.items():
        if not key.startswith(CLIENT_PREFIX):
            continue
        name = key[len(CLIENT_PREFIX) :]
        if not _CLIENT_NAME.fullmatch(name) or name.lower().startswith("dg-"):
            continue
        if len(value.encode("utf-8", "replace")) > CLIENT_VALUE_MAX:
            continue
        found[name] = value
    return {name: found[name] for name in sorted(found)[:CLIENT_METADATA_MAX_ENTRIES]}


def content_type_metadata(content_type: str) -> dict[str, str]:
    """The ``content-type`` key the proxy writes for a file stored with this
    Content-Type (``to_bare_metadata_map``), so that it serves the same type
    S3 does; nothing for an empty one (the proxy reads it as none)."""
    content_type = content_type.strip()
    return {CONTENT_TYPE_KEY: content_type} if content_type else {}


def content_type_of(metadata: Mapping[str, str], object_content_type: str | None) -> str:
    """The Content-Type a file was stored with: the proxy's ``content-type``
    key when it is there (the proxy stores every object as
    ``application/octet-stream`` and keeps the client's type in that key),
    else the object's own Content-Type."""
    stored = (metadata.get(CONTENT_TYPE_KEY) or "").strip()
    return stored or (object_content_type or "").strip() or DEFAULT_CONTENT_TYPE
