"""Directory indexes: what a cold ``ls -l`` needs from a directory, in one object.

Sizes, modes and times of deltas live in each object's user metadata, which
only a HEAD returns; a directory of N files would cost N HEADs on a fresh
mount (the attribute cache only helps the machine that filled it). The
index of a directory holds, for each of its objects, the metadata the
mount uses and the version it describes (ETag + Last-Modified second, as
``attrcache.version_of``): a fresh mount reads it with one GET beside the
LIST and HEADs only the objects it does not describe.

It is a hint checked against the LIST: a row counts only while its
version is the one the LIST shows, so an object written since, by any
tool, is HEADed as before. It is trusted as the bucket is: a version is
public (any LIST shows it), so whoever may write ``.deltaglider/`` can
make rows that show wrong attributes, never other bytes than the
object's (docs/SEMANTICS.md). A version is whole seconds, so an object
can change again within the second of its last write and keep it (a chmod right after an upload):
an index holds only rows read after that second was over (``settled``),
which nothing can change unseen any more. Any
mount may therefore rewrite it at any time (last writer wins, no
conditional request needed): a lost, stale or garbled index costs
HEADs, never a wrong attribute. It lives under ``.deltaglider/``,
which DeltaGlider and dgfs never show, at
``.deltaglider/dgfs-index/v1/<directory prefix>dir.index`` (zstd JSON).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime

import zstandard

from dgfs import format as fmt

FORMAT = "dgfs-dir-index-3"  # 2: rows carry client metadata (user-<k>); 3: settled rows only
#: Indexes of this format may hold rows of versions that changed within their
#: second: read as no index (the directory is HEADed, and a new one written).
_UNSETTLED_FORMATS = ("dgfs-dir-index-2",)
PREFIX = f"{fmt.INTERNAL_PREFIX}dgfs-index/v1/"

# An index is bucket content anyone with write access may have written: it
# is parsed under limits a real directory's index never meets (~600 bytes
# of JSON and ~30 strings per object), each checked before the work it
# bounds. A hostile one costs no more than a real index of MAX_ENTRIES
# objects (measured: ~170 MB for a second at most), then is ignored
# (``ValueError``) and the listing HEADs the directory's objects instead.
#: The stored (zstd) object, read at most this far.
MAX_BYTES = 8 << 20
#: The JSON inside it (50,000 objects of ~600 bytes: 30 MB).
MAX_TEXT = 32 << 20
#: Objects described.
MAX_ENTRIES = 50_000
#: JSON strings (dict keys included) per object described, on average.
MAX_STRINGS_PER_ENTRY = 40
#: Commas and colons per object described, on average: one of each per
#: metadata item and row, a few more inside values (a time's colons). Every
#: JSON value but the first in its array or object follows one, so this
#: bounds the numbers, ``true``s and ``null``s no quote or bracket counts.
MAX_SEPARATORS_PER_ENTRY = 56
#: Metadata entries of one object, and the characters of one value (S3
#: allows 2 KB of user metadata per object).
MAX_META_ITEMS = 64
MAX_META_VALUE = 2048

#: key -> (version, metadata)
Rows = dict[str, tuple[str, dict[str, str]]]

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


#: Seconds a row must have been read after its version's second: the
#: ``Date`` and ``Last-Modified`` of a store behind several gateways may
#: come from clocks that differ by that much.
SETTLE_MARGIN = 1


def settled(last_modified: datetime, observed_at: datetime | None) -> bool:
    """Whether the metadata of an object version last modified at
    ``last_modified``, as the store answered it at ``observed_at`` (its own
    clock), is that version's for good: only if that second was over when
    it was read. Any change made since has a later second, so a reader
    tells it from the version; one within the same second keeps the
    version, and a row read before it would vouch for metadata the object
    no longer has. Only such rows go into an index."""
    if observed_at is None:
        return False
    return int(last_modified.timestamp()) + SETTLE_MARGIN < int(observed_at.timestamp())


_NAME = "dir.index"


def index_key(dir_prefix: str) -> str:
    """Where the index of the directory ``dir_prefix`` ("" or ending in "/") is kept."""
    return f"{PREFIX}{dir_prefix}{_NAME}"


def directory_of(key: str) -> str | None:
    """The directory prefix whose index ``key`` is (``index_key``'s inverse);
    None for a key that is no directory index."""
    if not key.startswith(PREFIX) or not key.endswith(_NAME):
        return None
    prefix = key[len(PREFIX) : -len(_NAME)]
    return prefix if prefix == "" or prefix.endswith("/") else None


def encode(dir_prefix: str, rows: Mapping[str, tuple[str, Mapping[str, str]]]) -> bytes:
    doc = {
        "format": FORMAT,
        "prefix": dir_prefix,
        "objects": {key: [version, dict(meta)] for key, (version, meta) in sorted(rows.items())},
    }
    return zstandard.ZstdCompressor(level=3).compress(json.dumps(doc).encode())


def decode(dir_prefix: str, body: bytes) -> Rows:
    """The rows of an index of ``dir_prefix``.

    ``ValueError`` (naming the limit when one is the reason) if ``body`` is
    not one, or larger than the limits above allow; rows that are not
    well-formed rows of this directory are left out.
    """
    if len(body) > MAX_BYTES:
        raise ValueError(f"directory index larger than {MAX_BYTES} bytes")
    text = _decompress(body)
    _check_size_of_parse(text)
    try:
        doc = json.loads(text)
    except RecursionError:
        # An index nests 4 deep; the parser stops at the interpreter's
        # recursion limit (~1,000), long before that costs anything.
        raise ValueError("not a directory index: nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a directory index: {exc}") from None
    if isinstance(doc, dict) and doc.get("format") in _UNSETTLED_FORMATS:
        return {}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not a directory index (format)")
    if doc.get("prefix") != dir_prefix:
        raise ValueError(f"index of {doc.get('prefix')!r}, not of {dir_prefix!r}")
    objects = doc.get("objects")
    if not isinstance(objects, dict):
        raise ValueError("not a directory index (objects)")
    if len(objects) > MAX_ENTRIES:
        raise ValueError(f"directory index of more than {MAX_ENTRIES} objects")
    rows: Rows = {}
    for key, row in objects.items():
        # Only rows of this directory's own objects, with string metadata.
        if (
            not (isinstance(key, str) and key.startswith(dir_prefix))
            or "/" in key[len(dir_prefix) :]
        ):
            continue
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)):
            continue
        meta = row[1]
        if (
            isinstance(meta, dict)
            and len(meta) <= MAX_META_ITEMS
            and all(
                isinstance(k, str) and isinstance(v, str) and len(v) <= MAX_META_VALUE
                for k, v in meta.items()
            )
        ):
            rows[key] = (row[0], meta)
    return rows


def _decompress(body: bytes) -> bytes:
    """The zstd frame ``body`` decompressed, never more than MAX_TEXT bytes of it
    (whatever size its header claims)."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=False)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_TEXT:
            chunk = reader.read(min(1 << 20, MAX_TEXT + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except zstandard.ZstdError as exc:
        raise ValueError(f"not a directory index: {exc}") from None
    if size > MAX_TEXT:
        raise ValueError(f"directory index holds more than {MAX_TEXT} bytes of JSON")
    return b"".join(chunks)


def _check_size_of_parse(text: bytes) -> None:
    """``ValueError`` if parsing the JSON ``text`` could build more values
    than MAX_ENTRIES rows need: strings counted as quotes, arrays and
    objects as brackets, all values as the commas and colons between them,
    which are upper bounds (such a byte inside a string counts too) found
    without building anything."""
    if text.count(b'"') > 2 * (MAX_STRINGS_PER_ENTRY * MAX_ENTRIES + 8):
        raise ValueError(f"directory index of more than {MAX_ENTRIES} objects (strings)")
    if len(text.translate(None, _NOT_BRACKETS)) > 2 * (2 * MAX_ENTRIES + 2):
        raise ValueError(f"directory index of more than {MAX_ENTRIES} objects (containers)")
    if text.count(b",") + text.count(b":") > MAX_SEPARATORS_PER_ENTRY * MAX_ENTRIES + 8:
        raise ValueError(f"directory index of more than {MAX_ENTRIES} objects (values)")
