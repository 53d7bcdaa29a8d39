"""Which files are stored as deltas: pure decisions, no I/O.

A file is a delta candidate when it is at least ``min_delta_size`` bytes
and either its name carries one of DeltaGlider 6.2.0's archive extensions
or its first bytes say it is an archive. Content counts as much as the
name because rsync writes to ``.name.XXXXXX`` and renames afterwards, and
because DeltaGlider's list misses formats that delta well (wheels are zip
files). After encoding, :meth:`Policy.accepts_ratio` decides whether the
delta is worth keeping or the file goes direct.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from dgfs import environment
from dgfs.errors import ConfigError

DEFAULT_MAX_RATIO = 0.5
DEFAULT_MIN_DELTA_SIZE = 64 * 1024

#: DeltaGlider 6.2.0's list (``deltaglider/core/delta_extensions.py``), kept
#: identical so both tools make the same name-based decision.
DG_COMPOUND_EXTENSIONS: tuple[str, ...] = (".tar.gz", ".tar.bz2", ".tar.xz")
DG_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".dmg",
        ".iso", ".pkg", ".deb", ".rpm", ".apk", ".jar", ".war", ".ear",
    }
)  # fmt: skip

# ISO 9660: the first volume descriptor sits after 32 KiB of system area.
_ISO_OFFSET = 0x8001
_ISO_MAGIC = b"CD001"
_TAR_OFFSET = 257
_TAR_MAGIC = b"ustar"  # POSIX "ustar\x0000" and GNU "ustar  \x00" alike

#: How many leading bytes of a file :func:`sniff_kind` and
#: :meth:`Policy.is_delta_candidate` need: enough to reach ISO 9660's
#: ``CD001`` at offset 0x8001, the deepest signature detected. Passing fewer
#: (a short file, or a short read) is fine; formats whose signature lies
#: beyond the bytes given are simply not detected.
SNIFF_BYTES: int = _ISO_OFFSET + len(_ISO_MAGIC)

# Signatures at offset 0, most specific first.
_PREFIX_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"!<arch>\ndebian", "deb"),  # ar archive whose first member is debian-binary
    (b"PK\x03\x04", "zip"),  # zip, jar, apk, whl, war, docx...
    (b"PK\x05\x06", "zip"),  # empty zip (end-of-central-directory only)
    (b"PK\x07\x08", "zip"),  # spanned zip
    (b"\x1f\x8b", "gzip"),
    (b"\x1f\x9d", "compress"),  # compress(1), .Z
    (b"\xfd7zXZ\x00", "xz"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"Rar!\x1a\x07", "rar"),  # RAR 1.5-4 (\x00) and 5 (\x01\x00)
    (b"\xed\xab\xee\xdb", "rpm"),
    (b"xar!", "xar"),  # macOS .pkg
)
_BZIP2 = re.compile(rb"BZh[1-9]")

#: Every kind :func:`sniff_kind` can return; all of them are archives or
#: compressed streams, so all make a file a delta candidate.
ARCHIVE_KINDS: frozenset[str] = frozenset(
    {kind for _, kind in _PREFIX_MAGIC} | {"bzip2", "tar", "iso"}
)

#: Kinds that xdelta3 (without ``-D``) decompresses on its own, by magic.
#: A delta whose *reference* is one of these can only be decoded with ``-D``:
#: the stock DeltaGlider CLI needs ``XDELTA=-D`` in its environment to read it.
XDELTA_AUTO_DECOMPRESSED_KINDS: frozenset[str] = frozenset({"gzip", "bzip2", "xz", "compress"})

# rsync's temporary name for NAME: ".NAME.XXXXXX" (mkstemp-style suffix).
_RSYNC_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9]{6}$")


def sniff_kind(head: bytes) -> str | None:
    """The archive or compression format that ``head`` (a file's first bytes) starts.

    One of :data:`ARCHIVE_KINDS` ("zip", "gzip", "tar", "xz", "bzip2",
    "zstd", "7z", "deb", "rpm", "iso", "rar", "lz4", "compress", "xar"), or
    None when nothing is recognised. Pass at least :data:`SNIFF_BYTES` bytes
    when the file has them.
    """
    for magic, kind in _PREFIX_MAGIC:
        if head.startswith(magic):
            return kind
    if _BZIP2.match(head):
        return "bzip2"
    if head[_TAR_OFFSET : _TAR_OFFSET + len(_TAR_MAGIC)] == _TAR_MAGIC:
        return "tar"
    if head[_ISO_OFFSET : _ISO_OFFSET + len(_ISO_MAGIC)] == _ISO_MAGIC:
        return "iso"
    return None


def has_delta_extension(name: str) -> bool:
    """Whether DeltaGlider 6.2.0 would delta ``name`` by its extension.

    Case-insensitive, like DeltaGlider. An rsync temporary name
    (``.app-1.2.dmg.Xy12ab``) is judged by the name it will be renamed to.
    """
    if _matches_dg_list(name):
        return True
    base = name.rsplit("/", 1)[-1]
    temp = _RSYNC_TEMP.match(base)
    return temp is not None and _matches_dg_list(temp.group("name"))


def _matches_dg_list(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(DG_COMPOUND_EXTENSIONS) or lowered.endswith(tuple(DG_EXTENSIONS))


@dataclass(frozen=True)
class Policy:
    """The delta decision. Invalid values raise :class:`ConfigError` on creation."""

    max_ratio: float = DEFAULT_MAX_RATIO
    """Keep a delta only if it is at most this fraction of the file (0..1)."""
    min_delta_size: int = DEFAULT_MIN_DELTA_SIZE
    """Files smaller than this many bytes are always stored direct."""

    def __post_init__(self) -> None:
        ratio = self.max_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, int | float)
            or not math.isfinite(ratio)
            or not 0 <= ratio <= 1
        ):
            raise ConfigError(f"max_ratio must be a number from 0 to 1, not {ratio!r}")
        size = self.min_delta_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"min_delta_size must be a whole number >= 0, not {size!r}")

    def is_delta_candidate(self, name: str, head: bytes, size: int, *, deep: bool = False) -> bool:
        """Whether to try storing this file as a delta.

        ``name`` is the file's name (or path), ``head`` its first
        :data:`SNIFF_BYTES` bytes (fewer if the file is shorter), ``size``
        its length in bytes. ``deep``: for a deep deltaspace, where gzip
        and friends are welcome (their deltas are taken of the expanded
        form and never decoded by the stock CLI).
        """
        if size < self.min_delta_size:
            return False
        kind = sniff_kind(head)
        if kind in XDELTA_AUTO_DECOMPRESSED_KINDS and not deep:
            # Stock DeltaGlider decodes without -D, so xdelta3 would
            # decompress such a reference and fail: store direct, which
            # costs little (a correct gzip delta is ~0.94 of the file).
            return False
        return kind is not None or has_delta_extension(name)

    def accepts_ratio(self, delta_size: int, file_size: int) -> bool:
        """Whether a delta of ``delta_size`` bytes is worth keeping for a file
        of ``file_size`` bytes: ``delta_size <= max_ratio * file_size``."""
        return delta_size <= self.max_ratio * file_size

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Policy:
        """A policy from DeltaGlider's environment variables, then ``overrides``.

        Reads ``DG_MAX_RATIO`` (a number from 0 to 1; unset or blank means
        the default). Keyword ``overrides`` (field names) win over the
        environment, which is then not read for that field; an override of
        None is ignored, so unset options can be passed through. Raises
        :class:`ConfigError` on invalid values, :class:`TypeError` on an
        unknown field name.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown Policy fields: {', '.join(sorted(unknown))}")
        given = {k: v for k, v in overrides.items() if v is not None}
        raw_ratio = environment.max_ratio_text(environ)
        if raw_ratio and "max_ratio" not in given:
            given["max_ratio"] = _parse_ratio("DG_MAX_RATIO", raw_ratio)
        return cls(**given)


def _parse_ratio(source: str, text: str) -> float:
    """``text`` as a ratio from 0 to 1, or ConfigError naming ``source``."""
    try:
        ratio = float(text)
    except ValueError:
        ratio = math.nan
    if not 0 <= ratio <= 1:  # also false for nan
        raise ConfigError(f"{source} must be a number from 0 to 1, not {text!r}")
    return ratio
