"""DeltaGlider v6 storage format: object names and metadata keys. Pure, no I/O.

This module is the only place that knows how DeltaGlider lays a bucket out:

- ``<prefix>/reference.bin``: full copy of the first delta-eligible file of a
  deltaspace (a directory);
- ``<prefix>/<name>.delta``: VCDIFF of ``<name>`` against that reference
  (the reference's own file has a zero-diff delta too);
- ``<prefix>/<name>``: a direct object, ``dg-compression: none``;
- anything without ``dg-file-sha256``: a foreign object, served as is.

dgfs's own extension, deep deltaspaces (docs/FORMAT.md), adds
``<prefix>/reference.deep`` (the zstd-compressed expanded form of the
first file) and ``.delta`` objects marked ``dgfs-format: deep-1`` whose
body is ``DEEP_DELTA_MAGIC`` followed by a VCDIFF between expanded forms, or
``DEEP_DELTA_SPANS_MAGIC``, a table of spans the reference holds and a
VCDIFF of the rest (docs/FORMAT.md).

Metadata values written here are a superset of what deltaglider 6.2.0
writes (including its quirk of writing ``dg-created-at`` without ``Z`` on
direct objects): every key it writes, with its value, plus the keys
deltaglider_proxy (DeltaGlider's Rust successor) needs to read the object
(``dg-ref-path``, ``dg-note``, ``dg-md5``, and on references
``dg-original-name``/``dg-file-size``). Objects the proxy writes are read
here too: its relative ``dg-ref-path``, its ``dg-note`` kinds and its
``user-`` metadata (docs/FORMAT.md, "deltaglider_proxy"); the proxy's
encryption markers and an S3 client's own metadata are read in
:mod:`dgfs.proxymeta`. POSIX attributes travel beside the format's keys, in
the keys s3fs-fuse and rclone use (:mod:`dgfs.posixmeta`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from dgfs import __version__
from dgfs.errors import FormatError
from dgfs.proxymeta import (
    DEFAULT_CONTENT_TYPE,
    PROXY_MARKER_KEYS,
    content_type_metadata,
    content_type_of,
    proxy_encryption,
)

TOOL = f"dgfs/{__version__}"
REFERENCE_NAME = "reference.bin"
DEEP_REFERENCE_NAME = "reference.deep"
REFERENCE_NAMES = (REFERENCE_NAME, DEEP_REFERENCE_NAME)
DELTA_SUFFIX = ".delta"
INTERNAL_PREFIX = ".deltaglider/"
#: Bucket-root prefixes no listing shows: DeltaGlider's, and deltaglider_proxy's
#: coordination objects (``_dgp/locks/reference/…``, ``_dgp/leases/…``; its
#: src/coordination/reference_lock.rs and s3_lease.rs) when the bucket is also
#: its coordination bucket.
INTERNAL_PREFIXES = (INTERNAL_PREFIX, "_dgp/")
#: The directory names those prefixes show as at the bucket root: never shown, never created.
RESERVED_ROOT_NAMES = frozenset(prefix.rstrip("/") for prefix in INTERNAL_PREFIXES)
TMP_PREFIX = ".deltaglider/tmp/"
ZERO_DIFF_NOTE = "zero-diff (reference identical)"
REFERENCE_NOTE = "reference"
DELTA_NOTE = "delta"  # deltaglider_proxy's note on a delta
PASSTHROUGH_NOTE = "passthrough"  # deltaglider_proxy's note on a direct object
#: deltaglider_proxy's ``dg-original-name`` of a reference (src/deltaglider/engine/store.rs).
PROXY_REFERENCE_NAME = "__reference__"

# Canonical key first; older spellings DeltaGlider still reads follow.
_ALIASES: dict[str, tuple[str, ...]] = {
    "tool": ("dg-tool", "dg_tool", "tool"),
    "original_name": ("dg-original-name", "dg_original_name", "original_name", "original-name"),
    "file_sha256": ("dg-file-sha256", "dg_file_sha256", "file_sha256", "file-sha256"),
    "file_size": ("dg-file-size", "dg_file_size", "file_size", "file-size"),
    "created_at": ("dg-created-at", "dg_created_at", "created_at", "created-at"),
    "ref_key": ("dg-ref-key", "dg_ref_key", "ref_key", "ref-key"),
    "ref_sha256": ("dg-ref-sha256", "dg_ref_sha256", "ref_sha256", "ref-sha256"),
    "delta_size": ("dg-delta-size", "dg_delta_size", "delta_size", "delta-size"),
    "delta_cmd": ("dg-delta-cmd", "dg_delta_cmd", "delta_cmd", "delta-cmd"),
    "note": ("dg-note", "dg_note", "note"),
    "compression": ("dg-compression", "dg_compression", "compression"),
    "source_name": ("dg-source-name", "dg_source_name", "source_name", "source-name"),
    # deltaglider_proxy's keys (src/types.rs ``meta_keys``, read by
    # src/storage/s3.rs ``headers_to_metadata``).
    "ref_path": ("dg-ref-path", "ref-path"),
    "md5": ("dg-md5",),
}

#: Every metadata key the format reads, in any spelling (the proxy's markers included).
FORMAT_KEYS = frozenset(key for keys in _ALIASES.values() for key in keys) | frozenset(
    PROXY_MARKER_KEYS
)

# Deep deltaspaces (dgfs's extension).
META_FORMAT = "dgfs-format"
DEEP_FORMAT = "deep-1"
META_EXPANDED_SIZE = "dgfs-expanded-size"
META_ENCODING = "dgfs-encoding"  # how a deep reference's body is compressed
DEEP_REFERENCE_ENCODING = "zstd"
#: First bytes of a deep delta's body. Not VCDIFF, so xdelta3 (and with it
#: the stock DeltaGlider CLI) refuses the object instead of decoding it.
DEEP_DELTA_MAGIC = b"DGFSDEEP\x01\n"
#: A deep delta whose body starts with a table of spans the reference holds
#: (``dgfs.deep.spans``); a dgfs from before 2026-12-07 refuses it (bad magic).
#: Its metadata is a version-1 deep delta's (``dgfs-format: deep-1``): only
#: this magic tells the two apart.
DEEP_DELTA_SPANS_MAGIC = b"DGFSDEEP\x02\n"


class DeltaMode(enum.Enum):
    """How a deltaspace stores its deltas."""

    DG = "dg"  # DeltaGlider v6: byte-level deltas against reference.bin
    DEEP = "deep"  # dgfs: deltas of expanded forms against reference.deep

    @classmethod
    def parse(cls, text: str) -> DeltaMode:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise FormatError(f"deltas must be 'dg' or 'deep', not {text!r}") from None


# POSIX attributes, as s3fs-fuse and rclone store them.
def meta_value(metadata: Mapping[str, str], field: str) -> str | None:
    """First non-empty value of ``field`` under any of its known key spellings."""
    for key in _ALIASES[field]:
        value = metadata.get(key)
        if value:
            return value
    return None


def meta_sha256(metadata: Mapping[str, str], field: str = "file_sha256") -> str | None:
    """A recorded SHA-256 (``file_sha256`` or ``ref_sha256``) in lower case,
    as ``hexdigest()`` spells it and every comparison expects: writers may
    record hex in either case. Not checked to be hex (``classify`` does)."""
    value = meta_value(metadata, field)
    return None if value is None else value.lower()


class Kind(enum.Enum):
    """How an object stores a user-visible file."""

    DELTA = "delta"
    DIRECT = "direct"
    FOREIGN = "foreign"
    REFERENCE = "reference"


# --- names ---------------------------------------------------------------------


def split_key(key: str) -> tuple[str, str]:
    """``"a/b/c.zip"`` -> ``("a/b", "c.zip")``; top level -> ``("", name)``."""
    prefix, _, name = key.rpartition("/")
    return prefix, name


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def listing_root(prefix: str) -> str:
    """The LIST prefix of the directory ``prefix``: ``"a/b/"``; ``""`` for the bucket."""
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def is_delta_key(key: str) -> bool:
    """Whether ``key`` names a delta: ``x.delta`` with a non-empty ``x``."""
    name = split_key(key)[1]
    return name.endswith(DELTA_SUFFIX) and len(name) > len(DELTA_SUFFIX)


def reference_key(prefix: str, mode: DeltaMode = DeltaMode.DG) -> str:
    """Key of the reference of the deltaspace ``prefix`` (no trailing slash)."""
    return join_key(prefix, DEEP_REFERENCE_NAME if mode is DeltaMode.DEEP else REFERENCE_NAME)


def delta_key(key: str) -> str:
    """Storage key of the delta that holds the user-visible ``key``."""
    return key + DELTA_SUFFIX


def reference_mode(ref_key: str) -> DeltaMode:
    """The mode of the deltaspace a reference key belongs to."""
    return DeltaMode.DEEP if split_key(ref_key)[1] == DEEP_REFERENCE_NAME else DeltaMode.DG


def is_reference_key(key: str) -> bool:
    """A deltaspace's reference, of either mode."""
    return split_key(key)[1] in REFERENCE_NAMES


def is_internal_key(key: str) -> bool:
    return key.startswith(INTERNAL_PREFIXES)


def is_directory_marker(key: str) -> bool:
    """``"app/"``: an empty object standing for a directory (mkdir in a mount, s3fs)."""
    return key.endswith("/")


def visible_key(stored_key: str) -> str | None:
    """The user-visible key an object stands for, or None if it is hidden.

    References and ``.deltaglider/`` are hidden; ``x.zip.delta`` shows as
    ``x.zip``.
    """
    if is_internal_key(stored_key) or is_reference_key(stored_key):
        return None
    if is_delta_key(stored_key):
        return stored_key[: -len(DELTA_SUFFIX)]
    return stored_key


def is_hidden_name(name: str) -> bool:
    """Names a user may not create in the mount because the format owns them."""
    return name in REFERENCE_NAMES or name.endswith(DELTA_SUFFIX)


def delta_cmd_text(original_name: str) -> str:
    """What DeltaGlider records in ``dg-delta-cmd``."""
    return f"xdelta3 -e -9 -s {REFERENCE_NAME} {original_name} {original_name}{DELTA_SUFFIX}"


# --- metadata ------------------------------------------------------------------


def _timestamp(now: datetime) -> str:
    """DeltaGlider's timestamp: naive UTC ``isoformat()``."""
    return now.astimezone(UTC).replace(tzinfo=None).isoformat()


def reference_metadata(
    source_name: str,
    file_sha256: str,
    now: datetime,
    *,
    file_size: int | None = None,
    md5: str | None = None,
) -> dict[str, str]:
    """A reference's metadata: DeltaGlider 6.2.0's keys, plus deltaglider_proxy's
    ``dg-original-name = __reference__`` (else its legacy-reference migration
    takes the reference for an old one) and, when known, the reference's own
    ``dg-file-size`` and ``dg-md5`` (the proxy reads its size from
    ``dg-file-size``, 0 when absent; src/storage/s3.rs ``headers_to_metadata``)."""
    meta = {
        "dg-tool": TOOL,
        "dg-source-name": source_name,
        "dg-file-sha256": file_sha256,
        "dg-created-at": _timestamp(now) + "Z",
        "dg-note": REFERENCE_NOTE,
        "dg-original-name": PROXY_REFERENCE_NAME,
    }
    if file_size is not None:
        meta["dg-file-size"] = str(file_size)
    if md5:
        meta["dg-md5"] = md5
    return meta


def delta_metadata(
    *,
    original_name: str,
    file_sha256: str,
    file_size: int,
    ref_key: str,
    ref_sha256: str,
    delta_size: int,
    now: datetime,
    zero_diff: bool = False,
    md5: str | None = None,
) -> dict[str, str]:
    """A delta's metadata: DeltaGlider 6.2.0's keys (``dg-ref-key``, the
    reference's full key), plus deltaglider_proxy's ``dg-ref-path`` (the
    reference's name, relative to the delta's directory), ``dg-note: delta``
    (the self-delta keeps DeltaGlider's zero-diff note, which the proxy also
    reads as a delta) and ``dg-md5`` (the file's MD5: the proxy's ETag)."""
    meta = {
        "dg-tool": TOOL,
        "dg-original-name": original_name,
        "dg-file-sha256": file_sha256,
        "dg-file-size": str(file_size),
        "dg-created-at": _timestamp(now) + "Z",
        "dg-ref-key": ref_key,
        "dg-ref-sha256": ref_sha256,
        "dg-delta-size": str(delta_size),
        "dg-delta-cmd": delta_cmd_text(original_name),
        "dg-ref-path": split_key(ref_key)[1],
        "dg-note": ZERO_DIFF_NOTE if zero_diff else DELTA_NOTE,
    }
    if md5:
        meta["dg-md5"] = md5
    return meta


def direct_metadata(
    *,
    original_name: str,
    file_sha256: str,
    file_size: int,
    now: datetime,
    md5: str | None = None,
) -> dict[str, str]:
    """A direct object's metadata: DeltaGlider 6.2.0's ``dg-compression: none``
    and deltaglider_proxy's ``dg-note: passthrough`` and ``dg-md5``."""
    meta = {
        "dg-tool": TOOL,
        "dg-original-name": original_name,
        "dg-file-sha256": file_sha256,
        "dg-file-size": str(file_size),
        "dg-created-at": _timestamp(now),
        "dg-compression": "none",
        "dg-note": PASSTHROUGH_NOTE,
    }
    if md5:
        meta["dg-md5"] = md5
    return meta


#: A file size a stat can carry (st_size is a signed 64-bit off_t).
SIZE_MAX = 2**63 - 1
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class StoredFile:
    """What an object's metadata says about the user file it holds."""

    kind: Kind
    stored_key: str
    visible_key: str
    original_size: int
    stored_size: int
    file_sha256: str | None
    ref_key: str | None = None
    ref_sha256: str | None = None
    deep: bool = False
    """A deep delta (or reference): its bytes are an expanded form's."""
    encryption: str | None = None
    """deltaglider_proxy's ``dg-encrypted`` scheme when the object's body is
    ciphertext (``proxy_encryption``): never served by ranges, never as is."""
    zero_diff: bool = False
    """A delta whose note says its file is its reference's (the first file
    stored in its directory): a deep one is rebuilt from the reference's form
    without decoding the delta (``Rebuilder``; a note that lies costs a
    rebuild, never bytes: the result is checked by SHA-256 either way)."""

    @property
    def ratio(self) -> float:
        """stored / original (1.0 for empty files)."""
        return self.stored_size / self.original_size if self.original_size else 1.0


def classify(stored_key: str, stored_size: int, metadata: Mapping[str, str]) -> StoredFile:
    """Interpret one object (from its HEAD) in the DeltaGlider format.

    Raises ``FormatError`` for a ``.delta`` object with DeltaGlider metadata
    that lacks what is needed to rebuild it.
    """
    file_sha256 = meta_sha256(metadata, "file_sha256")
    deep = is_deep(metadata)
    encryption = proxy_encryption(metadata)
    if is_reference_key(stored_key):
        return StoredFile(
            Kind.REFERENCE,
            stored_key,
            stored_key,
            stored_size,
            stored_size,
            file_sha256,
            deep=deep,
            encryption=encryption,
        )
    visible = visible_key(stored_key) or stored_key
    if file_sha256 is None:
        # Foreign: not written by DeltaGlider; shown under its own name, a
        # ``.delta`` suffix included (its bytes are no file's delta dgfs could rebuild).
        return foreign(stored_key, stored_size, encryption)
    _check_sha256(stored_key, "dg-file-sha256", file_sha256)
    size_text = meta_value(metadata, "file_size")
    if stored_key.endswith(DELTA_SUFFIX) and not _is_passthrough(metadata):
        ref_key = reference_of(stored_key, metadata)
        ref_sha256 = meta_sha256(metadata, "ref_sha256")
        if not (size_text and ref_key and ref_sha256):
            raise FormatError(f"{stored_key}: delta metadata lacks file size or reference")
        _check_sha256(stored_key, "dg-ref-sha256", ref_sha256)
        return StoredFile(
            Kind.DELTA,
            stored_key,
            visible,
            _parse_size(stored_key, size_text),
            stored_size,
            file_sha256,
            ref_key,
            ref_sha256,
            deep=deep,
            encryption=encryption,
            zero_diff=meta_value(metadata, "note") == ZERO_DIFF_NOTE,
        )
    original_size = _parse_size(stored_key, size_text) if size_text else stored_size
    return StoredFile(
        Kind.DIRECT,
        stored_key,
        visible,
        original_size,
        stored_size,
        file_sha256,
        encryption=encryption,
    )


def _is_passthrough(metadata: Mapping[str, str]) -> bool:
    """A direct object by its metadata: DeltaGlider's ``dg-compression: none``,
    or deltaglider_proxy's ``dg-note: passthrough``."""
    return (
        meta_value(metadata, "compression") == "none"
        or meta_value(metadata, "note") == PASSTHROUGH_NOTE
    )


def reference_of(stored_key: str, metadata: Mapping[str, str]) -> str | None:
    """The key of the reference a delta was made against.

    ``dg-ref-key`` (DeltaGlider, dgfs) is the reference's full key. An
    object with only deltaglider_proxy's ``dg-ref-path`` (``reference.bin``,
    relative; older proxies wrote a full key there) is decoded, as the proxy
    decodes it, against the ``reference.bin`` beside the delta whatever the
    path says (src/storage/s3.rs ``headers_to_metadata`` keeps only its last
    segment; src/deltaglider/engine/retrieve.rs reads the sibling): a path
    pointing elsewhere, ``../`` included, never reaches outside the directory.
    """
    ref_key = meta_value(metadata, "ref_key")
    if ref_key == "/" + REFERENCE_NAME and "/" not in stored_key:
        # Proxies before dg-ref-path wrote "{deltaspace}/reference.bin": for
        # a delta at the bucket's root that is "/reference.bin", which means
        # the root's reference (keys may start with "/": only this spelling).
        return REFERENCE_NAME
    if ref_key:
        return ref_key
    if meta_value(metadata, "ref_path"):
        return reference_key(split_key(stored_key)[0])
    return None


def foreign(stored_key: str, stored_size: int, encryption: str | None) -> StoredFile:
    """An object dgfs shows as a plain file under its own name, bytes as stored."""
    return StoredFile(
        Kind.FOREIGN, stored_key, stored_key, stored_size, stored_size, None, encryption=encryption
    )


def classify_shown(stored_key: str, stored_size: int, metadata: Mapping[str, str]) -> StoredFile:
    """``classify`` as the mount shows objects: one whose DeltaGlider metadata
    cannot be used (a ``.delta`` without its size or reference, a garbled
    size) is a foreign file under its own stored name, never an error."""
    try:
        return classify(stored_key, stored_size, metadata)
    except FormatError:
        return foreign(stored_key, stored_size, proxy_encryption(metadata))


def created_at(metadata: Mapping[str, str]) -> datetime | None:
    """``dg-created-at`` as an aware UTC time; None if absent or unusable.

    DeltaGlider writes ISO 8601 with or without ``Z`` (microseconds when not
    zero), deltaglider_proxy always six fraction digits and ``Z``; an
    explicit offset is honoured, a time without one is UTC.
    """
    raw = meta_value(metadata, "created_at")
    if not raw or len(raw) > 64:
        return None
    try:
        when = datetime.fromisoformat(raw.strip())
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def form_rank(
    stored_key: str, last_modified: datetime, metadata: Mapping[str, str]
) -> tuple[datetime, datetime, bool]:
    """Of two forms of one file (``x`` and ``x.delta``, both left by a writer
    that died between storing one and removing the other), the one with the
    higher rank is shown: the newer by S3's Last-Modified (one clock, the
    store's, for every writer); within the same second, the newer
    ``dg-created-at`` (a writer's clock, microseconds: deltaglider_proxy's
    only rule); then the delta."""
    stamp = created_at(metadata) or datetime.min.replace(tzinfo=UTC)
    return last_modified, stamp, stored_key.endswith(DELTA_SUFFIX)


def is_deltaglider_reference(key: str, metadata: Mapping[str, str]) -> bool:
    """Whether the reference-named object ``key`` is a reference: for a
    ``reference.bin``, a DeltaGlider writer (the CLI, the proxy, dgfs) made it
    (a ``dg-file-sha256``); for a ``reference.deep``, dgfs made it (deep
    metadata: deltaglider_proxy reserves only ``reference.bin``, so a client
    may store a file of that name, with DeltaGlider metadata too). Anything
    else is a user's file: never an orphan, never removed, never used."""
    if reference_mode(key) is DeltaMode.DEEP:
        return is_deep(metadata) and bool(meta_value(metadata, "file_sha256"))
    return bool(meta_value(metadata, "file_sha256"))


def normalized_metadata(
    stored_key: str, metadata: Mapping[str, str], content_type: str | None = None
) -> dict[str, str] | None:
    """The metadata that makes an object readable by all three of dgfs, the
    DeltaGlider CLI and deltaglider_proxy, or None when it needs no change
    (``dgfs migrate --normalize``; docs/FORMAT.md, "deltaglider_proxy").

    Nothing is removed or changed; what is missing is added from what is
    there: the canonical ``dg-`` key of a field found only under an older
    alias; on a delta ``dg-ref-key`` (the full key of the reference it is
    read against), ``dg-ref-path`` and ``dg-note: delta``; on a direct
    object ``dg-compression: none`` and ``dg-note: passthrough``; on
    ``reference.bin`` ``dg-note: reference`` and ``dg-original-name:
    __reference__``; on a delta or direct object whose Content-Type
    (``content_type``, the object's own) is other than
    ``application/octet-stream``, the proxy's ``content-type`` key with that
    type (without it the proxy serves ``application/octet-stream``). Deep
    objects (dgfs's own), foreign objects and objects whose metadata cannot
    be used are left alone. ``dg-md5`` is not added: it needs the file's bytes.
    """
    if is_deep(metadata) or meta_value(metadata, "file_sha256") is None:
        return None
    try:
        stored = classify(stored_key, 0, metadata)
    except FormatError:
        return None
    meta = dict(metadata)
    for field, keys in _ALIASES.items():
        value = meta_value(metadata, field)
        if value and not metadata.get(keys[0]) and keys[0].startswith("dg-"):
            meta[keys[0]] = value
    if stored.kind is Kind.REFERENCE:
        if split_key(stored_key)[1] != REFERENCE_NAME:
            return None
        meta.setdefault("dg-note", REFERENCE_NOTE)
        if not metadata.get("dg-original-name"):
            meta["dg-original-name"] = PROXY_REFERENCE_NAME
    elif stored.kind is Kind.DELTA:
        assert stored.ref_key is not None
        meta["dg-ref-key"] = meta.get("dg-ref-key") or stored.ref_key
        meta["dg-ref-path"] = meta.get("dg-ref-path") or split_key(stored.ref_key)[1]
        meta["dg-note"] = meta.get("dg-note") or DELTA_NOTE
    elif stored.kind is Kind.DIRECT:
        meta["dg-compression"] = meta.get("dg-compression") or "none"
        meta["dg-note"] = meta.get("dg-note") or PASSTHROUGH_NOTE
    served = content_type_of(meta, content_type)
    if stored.kind is not Kind.REFERENCE and served != DEFAULT_CONTENT_TYPE:
        meta.update(content_type_metadata(served))
    return meta if meta != dict(metadata) else None


def is_deep(metadata: Mapping[str, str]) -> bool:
    """Whether an object belongs to a deep deltaspace (dgfs's extension)."""
    return metadata.get(META_FORMAT) == DEEP_FORMAT


def deep_reference_metadata(
    source_name: str, expanded_sha256: str, expanded_size: int, now: datetime
) -> dict[str, str]:
    """A deep reference: ``dg-file-sha256`` is that of the expanded form it holds."""
    meta = reference_metadata(source_name, expanded_sha256, now)
    meta[META_FORMAT] = DEEP_FORMAT
    meta[META_ENCODING] = DEEP_REFERENCE_ENCODING
    meta[META_EXPANDED_SIZE] = str(expanded_size)
    return meta


def deep_delta_metadata(**fields: object) -> dict[str, str]:
    """``delta_metadata`` for a deep delta (``ref_sha256``: the expanded reference's)."""
    meta = delta_metadata(**fields)  # type: ignore[arg-type]
    meta[META_FORMAT] = DEEP_FORMAT
    meta["dg-delta-cmd"] = DEEP_DELTA_CMD
    return meta


DEEP_DELTA_CMD = "dgfs deep-1: xdelta3 of expanded forms (see dgfs docs/FORMAT.md)"


def _parse_size(key: str, text: str) -> int:
    """``dg-file-size``: decimal digits, at most what a stat can carry (else
    ``FormatError``: a size of 2^63 or more made a whole listing fail)."""
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
        raise FormatError(f"{key}: bad dg-file-size {text!r}")
    size = int(digits)
    if size > SIZE_MAX:
        raise FormatError(f"{key}: dg-file-size {text!r} is beyond what a file can hold")
    return size


def _check_sha256(key: str, field: str, value: str) -> None:
    """``FormatError`` unless ``value`` is a hex SHA-256 (64 hex digits): it
    names cache entries and is compared with what is read."""
    if not _SHA256_HEX.fullmatch(value):
        raise FormatError(f"{key}: {field} {value[:80]!r} is not a hex SHA-256")


def user_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """A DeltaGlider object's metadata without the format's own keys.

    What remains is what a user or another tool attached (``mtime``,
    ``owner``...): what must follow the file when it is copied elsewhere.
    Every ``dg-``/``dg_`` key and every older alias is dropped.
    deltaglider_proxy's encryption markers go too: they describe the stored
    body, not the file (a copy written elsewhere is plain).
    """
    return {
        key: value
        for key, value in metadata.items()
        if key not in FORMAT_KEYS and not key.startswith(("dg-", "dg_", "dgfs-"))
    }


def with_original_name(metadata: Mapping[str, str], new_name: str) -> dict[str, str]:
    """Metadata copy for a renamed file (DeltaGlider fields follow the new name)."""
    meta = dict(metadata)
    for key in _ALIASES["original_name"]:
        if key in meta:
            meta[key] = new_name
    if "dg-delta-cmd" in meta and not is_deep(meta):
        meta["dg-delta-cmd"] = delta_cmd_text(new_name)
    return meta


def with_ref_key(metadata: Mapping[str, str], new_ref_key: str) -> dict[str, str]:
    """Metadata copy whose reference pointer moved (directory rename)."""
    meta = dict(metadata)
    for key in _ALIASES["ref_key"]:
        if key in meta:
            meta[key] = new_ref_key
    return meta
