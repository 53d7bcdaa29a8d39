"""Directory indexes: what a cold ``ls -l`` needs from a directory, in one object.

Sizes, modes and times of deltas live in each object's user metadata, which
only a HEAD returns; a directory of N files would cost N HEADs on a fresh
mount (the attribute cache only helps the machine that filled it). The
index of a directory holds, for each of its objects, the metadata the
mount uses and the version it describes (ETag + Last-Modified second, as
``attrcache.version_of``): a fresh mount reads it with one GET beside the
LIST and HEADs only the objects it does not describe.

It is a hint, never trusted: a row counts only while its version is the
one the LIST shows, so an object written since, by any tool, is HEADed as
before. Any mount may therefore rewrite it at any time (last writer wins,
no conditional request needed): a lost, stale, foreign or garbled index
costs HEADs, never a wrong attribute. It lives under ``.deltaglider/``,
which DeltaGlider and dgfs never show, at
``.deltaglider/dgfs-index/v1/<directory prefix>dir.index`` (zstd JSON).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import zstandard

from dgfs import format as fmt

FORMAT = "dgfs-dir-index-1"
PREFIX = f"{fmt.INTERNAL_PREFIX}dgfs-index/v1/"
#: An index larger than this is not read (a directory of ~500,000 files).
MAX_BYTES = 64 << 20

#: key -> (version, metadata)
Rows = dict[str, tuple[str, dict[str, str]]]


def index_key(dir_prefix: str) -> str:
    """Where the index of the directory ``dir_prefix`` ("" or ending in "/") is kept."""
    return f"{PREFIX}{dir_prefix}dir.index"


def encode(dir_prefix: str, rows: Mapping[str, tuple[str, Mapping[str, str]]]) -> bytes:
    doc = {
        "format": FORMAT,
        "prefix": dir_prefix,
        "objects": {key: [version, dict(meta)] for key, (version, meta) in sorted(rows.items())},
    }
    return zstandard.ZstdCompressor(level=3).compress(json.dumps(doc).encode())


def decode(dir_prefix: str, body: bytes) -> Rows:
    """The rows of an index of ``dir_prefix``; ``ValueError`` if it is not one."""
    try:
        text = zstandard.ZstdDecompressor().decompress(body, max_output_size=8 * MAX_BYTES)
        doc = json.loads(text)
    except (zstandard.ZstdError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a directory index: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not a directory index (format)")
    if doc.get("prefix") != dir_prefix:
        raise ValueError(f"index of {doc.get('prefix')!r}, not of {dir_prefix!r}")
    objects = doc.get("objects")
    if not isinstance(objects, dict):
        raise ValueError("not a directory index (objects)")
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
        if isinstance(meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            rows[key] = (row[0], meta)
    return rows
