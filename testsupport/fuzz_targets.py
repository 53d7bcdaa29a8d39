"""Fuzz targets: every parser dgfs runs on bytes someone else wrote.

Each target is a function of one ``bytes`` input that drives a parser the
way the daemon does and lets through only what that parser is documented
to raise: anything else escaping ``Target.run`` is a crash (a bug). The
same targets run for long under atheris (``benchmarks/fuzz.py``) and for a
few seconds, seeded, in the test suite (``tests/test_fuzz.py``), which
also replays every input kept in ``tests/fuzz_corpus/<target>/``.

- ``deep``: zip/gzip expansion of a file (``dgfs.deep.expand.expand_file``,
  whose output must rebuild to the file), the rebuild of an expanded form
  from the bucket (the recipe: ``rebuild_file``), and the bodies of deep
  objects (``dgfs.deep.objects``: the zstd reference, the wrapped delta).
- ``dirindex``: directory indexes (``dgfs.fs.dirindex.decode``).
- ``metadata``: S3 user metadata to a file's kind, size and stat
  (``dgfs.format`` and the listing's ``_entry_from_head``), down to the
  ``EntryAttributes`` the kernel gets, and to its client metadata
  (``proxymeta.client_metadata``, the ``user.s3.*`` attributes).
- ``dgzip``: the search for the gzip bytes the stock DeltaGlider CLI lost
  (``dgfs.dgzip.recover_gzip``): the reference's gzip header, the tar
  inside, the recorded name, size and SHA-256.
- ``proxycrypt``: bodies deltaglider_proxy encrypted at rest
  (``dgfs.proxycrypt.decrypt_file``: ``aes-256-gcm-v1`` and chunked
  ``DGE1``): plaintext only when it authenticates, else the declared error
  and no output file.
- ``control``: the status socket's request line (``dgfs.control``) and the
  metrics endpoint's HTTP request head (``dgfs.metrics``).

GNU gzip (``zgz``) is a separate program whose output is checked; the
targets run without it (``DGFS_ZGZ=``, see ``without_zgz``) so that one
input never costs a process start.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pyfuse3
import zstandard

from dgfs import control, dgzip, metrics, posixmeta, proxycrypt, proxymeta
from dgfs import format as fmt
from dgfs.deep import expand, gnuzip, objects, spans
from dgfs.deep.deflate import DeflateParams
from dgfs.errors import DecodeLimit, DgfsError, ExpansionLimit, FormatError
from dgfs.fs import dirindex, xattrs
from dgfs.fs.namespace import Namespace
from dgfs.store.base import ObjectHead

#: Bytes of one input, at most (atheris's ``-max_len``).
MAX_LEN = 16 * 1024
#: The limits the deep target expands and rebuilds under: small, so that a
#: bomb costs milliseconds, and a time limit under the 5 s hang bound.
LIMITS = expand.ExpansionLimits(ratio=100.0, max_bytes=8 << 20, members=5000, seconds=3.0)
_REBUILD_MAX = 1 << 20


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    """Feeds one input; raises only on a crash (anything undeclared)."""
    seeds: Callable[[], list[bytes]]
    """Valid inputs to start from (built here, deterministic)."""
    dictionary: tuple[bytes, ...] = ()
    """Tokens the mutator may insert (atheris ``-dict``)."""
    max_len: int = MAX_LEN
    """Bytes of one input, at most (atheris ``-max_len``)."""
    not_instrumented: tuple[str, ...] = ()
    """Functions (``module.name``) long runs leave without coverage
    instrumentation: loops over candidates the parser's output only
    sizes, which atheris would slow tenfold and which decide nothing."""


class Scratch:
    """One scratch directory per process, on tmpfs when there is one."""

    _dir: Path | None = None

    @classmethod
    def path(cls) -> Path:
        if cls._dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            cls._dir = Path(tempfile.mkdtemp(prefix="dgfs-fuzz-", dir=base))
        return cls._dir

    @classmethod
    def file(cls, name: str, data: bytes | None = None) -> Path:
        path = cls.path() / name
        if data is not None:
            path.write_bytes(data)
        return path

    @classmethod
    def clean(cls) -> None:
        if cls._dir is not None:
            shutil.rmtree(cls._dir, ignore_errors=True)
            cls._dir = None


@contextlib.contextmanager
def without_zgz() -> Iterator[None]:
    """GNU gzip's compressor switched off (``DGFS_ZGZ=``) for the block."""
    old = os.environ.get(gnuzip.ZGZ_ENV)
    os.environ[gnuzip.ZGZ_ENV] = ""
    gnuzip.zgz_path.cache_clear()
    try:
        yield
    finally:
        if old is None:
            del os.environ[gnuzip.ZGZ_ENV]
        else:
            os.environ[gnuzip.ZGZ_ENV] = old
        gnuzip.zgz_path.cache_clear()


# --- deep: expansion, the recipe, deep objects --------------------------------------

DEEP_EXPAND, DEEP_REBUILD, DEEP_REFERENCE, DEEP_DELTA = range(4)


def run_deep(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 4, data[1:]
    # Each input starts afresh: what earlier inputs proved is forgotten.
    expand.VERIFIED_SPANS.clear()
    expand.REBUILT_SUBTREES.clear()
    with without_zgz():
        # One input in 8 rebuilds with worker threads (their own code path).
        _run_deep(mode, body, workers=2 if data[0] // 4 % 8 == 1 else 1)


def _run_deep(mode: int, body: bytes, workers: int) -> None:
    if mode == DEEP_EXPAND:
        _expand_and_rebuild(body, workers)
    elif mode == DEEP_REBUILD:
        src = Scratch.file("form", expand.MAGIC + body)
        with contextlib.suppress(DgfsError):  # core: any DgfsError -> EIO
            expand.rebuild_file(
                src,
                Scratch.file("rebuilt"),
                Scratch.path(),
                workers,
                max_size=_REBUILD_MAX,
                seconds=LIMITS.seconds,
            )
    elif mode == DEEP_REFERENCE:
        meta = {fmt.META_EXPANDED_SIZE: str(len(body) * 50)}
        cap = objects.reference_cap(meta, len(body), LIMITS)
        with contextlib.suppress(FormatError, DecodeLimit):
            objects.decompress_reference(
                Scratch.file("ref.zst", body), Scratch.file("ref"), min(cap, _REBUILD_MAX)
            )
    else:
        _unwrap_and_splice(body)


#: The reference a fuzzed deep delta's spans point into.
_SPANS_REFERENCE = bytes(range(256)) * 64


def _unwrap_and_splice(body: bytes) -> None:
    """A deep delta's body read as a reader does; its VCDIFF taken as the cut
    form (xdelta3 is not what is fuzzed) and its spans put back."""
    reference = Scratch.file("reference", _SPANS_REFERENCE)
    cut = Scratch.file("vcdiff")
    with contextlib.suppress(FormatError, DecodeLimit):
        found = objects.unwrap_delta(
            Scratch.file("delta", body), cut, len(_SPANS_REFERENCE), _REBUILD_MAX
        )
        if found:
            spans.write_source(reference, found, Scratch.file("source"))
            with spans.spliced(cut, reference, found, _REBUILD_MAX) as form:
                while form.read(1 << 16):
                    pass


def _expand_and_rebuild(body: bytes, workers: int) -> None:
    src = Scratch.file("file", body)
    out = Scratch.file("expanded")
    try:
        stats = expand.expand_file(src, out, scratch_dir=Scratch.path(), limits=LIMITS)
    except ExpansionLimit:
        return  # the writer stores the file plain
    if stats.expanded_size > LIMITS.allowance(len(body)):
        raise AssertionError(f"expanded form of {stats.expanded_size} bytes passed its allowance")
    leftovers = [p.name for p in Scratch.path().iterdir() if p.suffix in (".nested", ".gnu")]
    if leftovers:
        raise AssertionError(f"expansion left {leftovers} in scratch")
    # The writer proves the form before storing it; a form that does not
    # rebuild to the file is a bug in expand (it would be stored plain).
    sha256, size = expand.rebuild_file(out, Scratch.file("rebuilt"), Scratch.path(), workers)
    if (sha256, size) != (hashlib.sha256(body).hexdigest(), len(body)):
        raise AssertionError("expanded form does not rebuild to the file")


def _zip(entries: list[tuple[str, bytes, int]], *, stream: bool = False, **kw: Any) -> bytes:
    buf = io.BytesIO()
    target: Any = _Unseekable(buf) if stream else buf
    with zipfile.ZipFile(target, "w", **kw) as zf:
        for name, content, method in entries:
            zf.writestr(name, content, compress_type=method)
    return buf.getvalue()


class _Unseekable(io.RawIOBase):
    """A stream zipfile cannot seek back in: it writes data descriptors."""

    def __init__(self, inner: io.BytesIO) -> None:
        self.inner = inner

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self.inner.write(b)

    def flush(self) -> None:
        pass


def _text(n: int, salt: int = 0) -> bytes:
    words = [b"delta", b"glider", b"zip", b"fuse", b"s3", b"release", b"archive", b"\n"]
    state = 1234 + salt
    out = bytearray()
    while len(out) < n:
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        out += words[state % len(words)] + b" "
    return bytes(out[:n])


def _gzip_with_fields() -> bytes:
    """A gzip member with FEXTRA, FNAME, FCOMMENT and FHCRC set."""
    plain = _text(600, 3)
    deflater = DeflateParams(9).compressor()
    body = deflater.compress(plain) + deflater.flush()
    head = b"\x1f\x8b\x08\x1e" + b"\0\0\0\0" + b"\x02\x03"
    head += b"\x04\x00abcd" + b"name.txt\0" + b"a comment\0" + b"\x00\x00"
    return head + body + struct.pack("<II", zlib.crc32(plain), len(plain))


def deep_files() -> list[bytes]:
    D, S = zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED
    text, other = _text(1500), _text(1200, 7)
    gz9 = gzip.compress(text, compresslevel=9, mtime=1_700_000_000)
    inner_zip = _zip([("inner.txt", other, D)])
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        for name, content in (("pkg/a.txt", text[:800]), ("pkg/b.txt", other[:900])):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(content), 1_700_000_000
            tf.addfile(info, io.BytesIO(content))
    return [
        _zip([("a.txt", text, D), ("b.txt", other, D)]),
        _zip([("a.txt", text, D)], compresslevel=9),
        _zip([("a.txt", text, D), ("s.bin", b"stored" * 20, S)], stream=True),
        _zip([("n.gz", gz9, S), ("inner.zip", inner_zip, S), ("c.gz", gz9, D)]),
        _zip([("a.txt", text, D)], allowZip64=True),
        gz9,
        gzip.compress(text, compresslevel=6, mtime=0) + gzip.compress(other, compresslevel=1),
        gzip.compress(tar.getvalue(), compresslevel=9, mtime=1_700_000_000),
        _gzip_with_fields(),
        _zip([("z.bin", bytes(20_000), D)]),  # inflates 20 KB from ~60 bytes
        b"not an archive at all\n" * 10,
    ]


def deep_seeds() -> list[bytes]:
    seeds = []
    with without_zgz():
        for n, file in enumerate(deep_files()):
            seeds.append(bytes((DEEP_EXPAND + 4 * (n % 2),)) + file)
            src, out = Scratch.file("seed"), Scratch.file("seed.dgx")
            src.write_bytes(file)
            expand.expand_file(src, out, scratch_dir=Scratch.path(), limits=LIMITS)
            seeds.append(
                bytes((DEEP_REBUILD + 4 * (n % 2),)) + out.read_bytes()[len(expand.MAGIC) :]
            )
            objects.compress_reference(out, Scratch.file("seed.zst"))
            seeds.append(bytes((DEEP_REFERENCE,)) + Scratch.file("seed.zst").read_bytes())
        seeds.append(bytes((DEEP_DELTA,)) + fmt.DEEP_DELTA_MAGIC + b"\xd6\xc3\xc4\x00")
        table = spans.pack([spans.Span(3, 100, 600), spans.Span(700, 0, 50)])
        seeds.append(bytes((DEEP_DELTA,)) + fmt.DEEP_DELTA_SPANS_MAGIC + table + b"cut" * 300)
        Scratch.clean()
    return seeds


DEEP_DICTIONARY = (
    b"PK\x03\x04",
    b"PK\x01\x02",
    b"PK\x05\x06",
    b"PK\x07\x08",
    b"PK\x06\x06",
    b"\x1f\x8b\x08",
    b"\xff\xff\xff\xff",
    b"\x01\x00\x10\x00",  # zip64 extra field
    b"\x02\x09\x08\x0f\x00",  # a DEFLATE segment, level 9
    b"\x03\x06",  # a GNU segment
    b"\x28\xb5\x2f\xfd",  # zstd frame
)


# --- directory index -----------------------------------------------------------------

_PREFIXES = ("", "app/", "a/b/", "\u00fc/")


def run_dirindex(data: bytes) -> None:
    if len(data) < 2:
        return
    prefix = _PREFIXES[data[1] % len(_PREFIXES)]
    # Even modes: the body as stored; odd: JSON text the target compresses,
    # so that mutations reach the JSON.
    body = data[2:] if data[0] % 2 == 0 else zstandard.ZstdCompressor(level=1).compress(data[2:])
    try:
        rows = dirindex.decode(prefix, body)
    except ValueError:  # the listing HEADs the directory instead
        return
    for key, (version, meta) in rows.items():
        ok = key.startswith(prefix) and "/" not in key[len(prefix) :] and isinstance(version, str)
        if not (ok and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
            raise AssertionError(f"index row {key!r} is not a row of {prefix!r}")


def dirindex_seeds() -> list[bytes]:
    seeds = []
    for n, prefix in enumerate(_PREFIXES):
        rows = {
            f"{prefix}app-1.{i}.zip.delta": (
                f'"etag{i}"@1700000000',
                {"dg-file-size": str(1000 + i), "mtime": "1700000000.5", "mode": "33188"},
            )
            for i in range(3)
        }
        rows[f"{prefix}sub/x"] = ("v", {})
        body = dirindex.encode(prefix, rows)
        seeds.append(bytes((0, n)) + body)
        seeds.append(bytes((1, n)) + zstandard.ZstdDecompressor().decompress(body))
    return seeds


DIRINDEX_DICTIONARY = (
    b'"format"',
    b'"dgfs-dir-index-1"',
    b'"prefix"',
    b'"objects"',
    b"[" * 64,
    b'{"a":' * 12,
    b"1e999",
    b"\\ud800",
    b"null",
)


# --- S3 metadata -----------------------------------------------------------------------

#: Metadata keys an input names with one byte (so mutations reach them).
META_KEYS = tuple(
    dict.fromkeys(
        [alias for aliases in fmt._ALIASES.values() for alias in aliases]
        + list(posixmeta.POSIX_KEYS)
        + [fmt.META_FORMAT, fmt.META_EXPANDED_SIZE, fmt.META_ENCODING]
    )
)
_STORED_KEYS = (
    "app/app-1.0.zip.delta",
    "app/reference.bin",
    "app/reference.deep",
    "app/app-1.0.zip",
    "a.delta",
    ".delta",
    "app/",
    ".deltaglider/x",
)
_LAST_MODIFIED = datetime(2026, 1, 1, tzinfo=UTC)


def encode_metadata(stored_key: str, size: int, meta: dict[str, str]) -> bytes:
    """An input of the metadata target (the inverse of ``decode_metadata``)."""
    fields = [stored_key.encode(), str(size).encode()]
    for key, value in meta.items():
        fields.append(bytes((META_KEYS.index(key),)) if key in META_KEYS else key.encode())
        fields.append(value.encode())
    return b"\0".join(fields)


def decode_metadata(data: bytes) -> tuple[str, int, dict[str, str]]:
    fields = [f.decode("utf-8", "replace") for f in data.split(b"\0")]
    raw_key = data.split(b"\0", 1)[0]
    if len(raw_key) == 1:
        stored_key = _STORED_KEYS[raw_key[0] % len(_STORED_KEYS)]
    else:
        stored_key = fields[0] or "x"
    size_text = fields[1] if len(fields) > 1 else ""
    usable = size_text.isascii() and size_text.isdigit() and len(size_text) <= 20
    size = int(size_text) if usable else 0
    size = min(size, 5 * 2**40)  # S3's largest object
    meta: dict[str, str] = {}
    raw_fields = data.split(b"\0")
    for i in range(2, len(fields) - 1, 2):
        raw = raw_fields[i]
        key = META_KEYS[raw[0] % len(META_KEYS)] if len(raw) == 1 else fields[i]
        meta[key.lower()] = fields[i + 1]  # S3 lower-cases metadata keys
    return stored_key, size, meta


def run_metadata(data: bytes) -> None:
    stored_key, size, meta = decode_metadata(data)
    with contextlib.suppress(FormatError):
        fmt.classify(stored_key, size, meta)
    shown = fmt.classify_shown(stored_key, size, meta)
    if not 0 <= shown.original_size <= fmt.SIZE_MAX:
        raise AssertionError(f"size {shown.original_size} shown")
    _ = shown.ratio
    for name in posixmeta.POSIX_KEYS:
        posixmeta.parse_int_meta(meta, name)
    fmt.user_metadata(meta)
    client = proxymeta.client_metadata(meta)  # the mount's user.s3.* attributes
    if len(client) > proxymeta.CLIENT_METADATA_MAX_ENTRIES:
        raise AssertionError(f"{len(client)} client metadata entries shown")
    for name, value in client.items():
        xattrs.client_value(client, xattrs.CLIENT_PREFIX + name)
        if "/" in name or "\0" in name or len(value.encode("utf-8", "replace")) > 2048:
            raise AssertionError(f"client metadata {name!r} shown")
    proxymeta.content_type_of(meta, meta.get("content-type"))
    fmt.with_original_name(meta, "renamed.zip")
    fmt.with_ref_key(meta, "other/reference.bin")
    with contextlib.suppress(FormatError):
        fmt.DeltaMode.parse(meta.get(fmt.META_FORMAT, ""))
    objects.reference_cap(meta, size, LIMITS)
    # What a listing shows, down to the attributes the kernel is sent.
    head = ObjectHead(stored_key, size, '"etag"', _LAST_MODIFIED, meta)
    entry = Namespace._entry_from_head(cast(Namespace, None), "name", head)
    attrs = pyfuse3.EntryAttributes()
    attrs.st_size = entry.size
    attrs.st_mtime_ns = entry.mtime_ns
    attrs.st_atime_ns = entry.mtime_ns if entry.atime_ns is None else entry.atime_ns
    attrs.st_mode = entry.kind.type_bits | ((entry.mode or 0o644) & 0o7777)
    attrs.st_uid = entry.uid or 0
    attrs.st_gid = entry.gid or 0
    attrs.st_rdev = entry.rdev
    attrs.st_blocks = (entry.size + 511) // 512


def metadata_seeds() -> list[bytes]:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    sha = "ab" * 32
    posix = posixmeta.posix_metadata(
        mtime_ns=1_700_000_000_500_000_000, mode=0o100644, uid=1000, gid=1000
    )
    delta = fmt.delta_metadata(
        original_name="app-1.0.zip",
        file_sha256=sha,
        file_size=123456,
        ref_key="app/reference.bin",
        ref_sha256=sha,
        delta_size=999,
        now=now,
    )
    deep = fmt.deep_delta_metadata(
        original_name="app-1.0.zip",
        file_sha256=sha,
        file_size=123456,
        ref_key="app/reference.deep",
        ref_sha256=sha,
        delta_size=999,
        now=now,
    )
    return [
        encode_metadata("app/app-1.0.zip.delta", 999, delta | posix),
        encode_metadata("app/app-1.0.zip.delta", 999, deep | posix),
        encode_metadata("app/reference.bin", 123456, fmt.reference_metadata("a.zip", sha, now)),
        encode_metadata(
            "app/reference.deep", 4000, fmt.deep_reference_metadata("a.zip", sha, 9999, now)
        ),
        encode_metadata(
            "app/app-1.0.zip",
            10,
            fmt.direct_metadata(original_name="app-1.0.zip", file_sha256=sha, file_size=10, now=now)
            | posix,
        ),
        encode_metadata("link", 5, {"mode": "0120777", "mtime": "-1.5", "uid": "0"}),
        encode_metadata("dev", 0, {"mode": "8592", "rdev": "2049", "atime": "1"}),
        encode_metadata(  # deltaglider_proxy's: a client's own metadata and content type
            "app/notes.txt",
            5,
            {"dg-note": "passthrough", "user-build": "42", "content-type": "text/plain"},
        ),
    ]


METADATA_DICTIONARY = (
    b"18446744073709551616",
    b"9223372036854775807",
    b"9223372036854775808",
    b"4294967295",
    b"0o777",
    b"-0",
    b"1e9",
    b"\xd9\xa3",  # an Arabic-Indic digit
    b"\xef\xbc\x91",  # a fullwidth digit
    b"inf",
)


# --- stock DeltaGlider gzip recovery -------------------------------------------------

DGZIP_SEP = b"\xf0<>\x0f"


def run_dgzip(data: bytes) -> None:
    """Input: a flag byte, then the decompressed file, the reference as stored,
    the file's name and extra bytes, separated by ``DGZIP_SEP``."""
    if not data:
        return
    flags = data[0]
    parts = data[1:].split(DGZIP_SEP, 3)
    decompressed, reference, name, extra = (parts + [b""] * 4)[:4]
    if flags & 0x80:
        # The part is the pax records of a one-member tar, built here: a
        # tar's header checksums stop mutations from reaching its fields.
        decompressed = _pax_tar(decompressed)
    elif flags & 0x40:
        # The part is a tar whose header checksums are set here: mutations
        # reach every field of its headers (sizes, types, numbers).
        decompressed = _checksummed(decompressed)
    if flags & 1:
        # A file Python's gzip made: its SHA-256 is one the search may find.
        target = gzip.compress(
            decompressed,
            compresslevel=1 + flags // 4 % 9,
            mtime=int.from_bytes(extra[:4].ljust(4, b"\0"), "little"),
        )
        expected_size, expected_sha256 = len(target), hashlib.sha256(target).hexdigest()
    else:
        expected_size = int.from_bytes(extra[:3].ljust(3, b"\0"), "little")
        expected_sha256 = hashlib.sha256(extra).hexdigest()
    reference_gzip = Scratch.file("reference.bin", reference) if flags & 2 else None
    out = Scratch.file("recovered")
    with without_zgz():
        dgzip.recover_gzip(
            Scratch.file("decompressed", decompressed),
            out,
            original_name=name.decode("utf-8", "replace"),
            expected_sha256=expected_sha256,
            expected_size=expected_size,
            reference_gzip=reference_gzip,
            scratch_dir=Scratch.path(),
            max_bodies=1,
            max_headers=16,
        )
    out.unlink(missing_ok=True)


def _pax_tar(records: bytes) -> bytes:
    """A pax tar of one member whose extended header holds ``records``
    (``key=value`` lines); an empty tar if tarfile cannot write them."""
    pax = {}
    for line in records.split(b"\n")[:32]:
        key, _, value = line.decode("utf-8", "replace").partition("=")
        if key:
            pax[key] = value
    try:
        return _tar(tarfile.PAX_FORMAT, [("pkg-1.0/a.txt", b"abc", pax)])
    except Exception:  # noqa: BLE001 - what the writer refuses is no input for the reader
        return _tar(tarfile.PAX_FORMAT, [])


def _checksummed(tar: bytes) -> bytes:
    """``tar`` with the checksum of every 512-byte block set as a header's."""
    blocks = bytearray(tar)
    for pos in range(0, len(blocks) - 511, 512):
        blocks[pos + 148 : pos + 156] = b" " * 8
        blocks[pos + 148 : pos + 156] = b"%06o\0 " % sum(blocks[pos : pos + 512])
    return bytes(blocks)


def _tar(fmt_: int, members: list[tuple[str, bytes, dict[str, str]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt_) as tf:
        for name, content, pax in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.pax_headers = len(content), 1_700_000_000, pax
            tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def dgzip_seeds() -> list[bytes]:
    text = _text(1500)
    tars = [
        _tar(tarfile.USTAR_FORMAT, [("pkg-1.0/a.txt", text, {})]),
        _tar(tarfile.GNU_FORMAT, [("pkg-1.0/" + "long" * 30, text[:300], {})]),
        _tar(tarfile.PAX_FORMAT, [("pkg-1.0/b.txt", text[:500], {"mtime": "1700000123.25"})]),
    ]
    seeds = []
    for n, tar in enumerate(tars):
        reference = gzip.compress(tar, compresslevel=9, mtime=1_700_000_000)
        for flags in (1 | 2 | 4 * 8, 2, 1, 0x40 | 1):
            mtime = (1_700_000_000 + n).to_bytes(4, "little")
            name = b"pkg-1.0.tar.gz" if n else b"dist/pkg-1.0.tgz"
            seeds.append(bytes((flags,)) + DGZIP_SEP.join([tar, reference, name, mtime]))
    records = b"mtime=1700000123.25\nuname=builder\npath=pkg-1.0/a.txt\nsize=3"
    seeds.append(bytes((0x80 | 1 | 2,)) + DGZIP_SEP.join([records, b"", b"pkg-1.0.tar.gz"]))
    return seeds


DGZIP_DICTIONARY = (
    b"\x1f\x8b\x08",
    b"ustar\x0000",
    b"ustar  \x00",
    b" mtime=",
    b"inf\n",
    b"nan\n",
    b"1e999\n",
    b"-1\n",
    b"mtime=",
    b"././@LongLink",
    b"\x80\x00\x00\x00",  # a base-256 number field
    DGZIP_SEP,
)


# --- control socket and metrics endpoint --------------------------------------------


class _Stream:
    """What the request readers use of a trio stream, never blocking."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data = data
        self.pos = 0
        self.chunk = chunk
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int) -> bytes:
        piece = self.data[self.pos : self.pos + min(max_bytes, self.chunk)]
        self.pos += len(piece)
        return piece

    async def send_all(self, data: bytes) -> None:
        self.sent += data


def _complete(coro: Any) -> Any:
    """Run a coroutine that never waits (its stream never blocks)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("a request reader waited on a stream that never blocks")


def _status_document() -> dict[str, Any]:
    return {"version": control.DOCUMENT_VERSION, "mount": {"bucket": "b"}}


def run_control(data: bytes) -> None:
    if not data:
        return
    chunk = (1, 7, 100, 4096)[data[0] // 2 % 4]
    stream = _Stream(data[1:], chunk)
    stream_any = cast(Any, stream)
    if data[0] % 2 == 0:
        # The status socket: serve_control's ``answer``.
        request = _complete(control._read_line(stream_any))
        reply = control._answer(request, _status_document)
        _complete(stream.send_all(json.dumps(reply).encode() + b"\n"))
        if not isinstance(reply, dict):
            raise AssertionError("status reply is not a JSON object")
        return
    # The metrics endpoint: serve_metrics' ``read_request`` and ``answer``.
    try:
        method, path = metrics._request_line(_complete(metrics._read_head(stream_any)))
    except ValueError:
        _complete(metrics._respond(stream_any, 400, b"bad request\n", "text/plain", "GET"))
        return
    if method not in ("GET", "HEAD"):
        _complete(metrics._respond(stream_any, 405, b"only GET\n", "text/plain", method))
    elif path.split("?", 1)[0] not in ("/metrics", "/"):
        _complete(metrics._respond(stream_any, 404, b"see /metrics\n", "text/plain", method))
    else:
        _complete(metrics._respond(stream_any, 200, b"x 1\n", "text/plain", method))


def control_seeds() -> list[bytes]:
    return [
        b"\x00" + b'{"request": "status"}\n',
        b"\x02" + b'{"request": "other"}\n',
        b"\x04" + b"\n",
        b"\x01" + b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x03" + b"HEAD / HTTP/1.0\n\n",
        b"\x05" + b"POST /x HTTP/1.1\r\n\r\n",
    ]


CONTROL_DICTIONARY = (
    b'"request"',
    b'"status"',
    b"[" * 64,
    b'{"a":' * 12,
    b"\\u0000",
    b"\r\n\r\n",
    b"GET ",
)


# --- deltaglider_proxy's encryption at rest -----------------------------------------------

_PROXY_KEY = proxycrypt.parse_proxy_key(bytes(range(32)).hex())
_PROXY_SCHEMES = (proxymeta.PROXY_AES_GCM, proxymeta.PROXY_AES_GCM_CHUNKED)


def run_proxycrypt(data: bytes) -> None:
    if not data:
        return
    src, dest = Scratch.file("proxy.ct", data[1:]), Scratch.file("proxy.pt")
    dest.unlink(missing_ok=True)
    scheme = _PROXY_SCHEMES[data[0] % 2]
    try:
        proxycrypt.decrypt_file(src, dest, scheme=scheme, key=_PROXY_KEY, key_id=None, what="fuzz")
    except proxycrypt.ProxyDecryptError:
        if dest.exists():
            raise AssertionError("a body that failed left plaintext behind") from None


def proxycrypt_seeds() -> list[bytes]:
    from testsupport.proxyobjects import encrypt_chunked, encrypt_single

    key = _PROXY_KEY.key
    seeds = []
    for size in (0, 1, 100, 65536, 65536 + 7):
        plain = _text(size)
        seeds.append(b"\0" + encrypt_single(key, plain, iv=bytes(12)))
        seeds.append(b"\1" + encrypt_chunked(key, plain, base_iv=bytes(12)))
    return seeds


PROXYCRYPT_DICTIONARY = (b"DGE1", struct.pack("<I", 65552), struct.pack("<I", 0xFFFFFFFF))


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("deep", run_deep, deep_seeds, DEEP_DICTIONARY, 8192),
        Target("dirindex", run_dirindex, dirindex_seeds, DIRINDEX_DICTIONARY),
        Target("metadata", run_metadata, metadata_seeds, METADATA_DICTIONARY),
        Target(
            "dgzip",
            run_dgzip,
            dgzip_seeds,
            DGZIP_DICTIONARY,
            4096,
            (
                "dgfs.dgzip.candidates.mtime_candidates",
                "dgfs.dgzip.candidates.header_candidates",
                "dgfs.dgzip.search._find_header",
            ),
        ),
        Target("control", run_control, control_seeds, CONTROL_DICTIONARY, 4096),
        Target("proxycrypt", run_proxycrypt, proxycrypt_seeds, PROXYCRYPT_DICTIONARY, 1 << 18),
    )
}


def repeat_token(rng: random.Random, data: bytes, dictionary: tuple[bytes, ...]) -> bytes:
    """``data`` with a dictionary token inserted many times over: nesting and
    repetition bombs, which give a coverage-guided fuzzer nothing to climb
    when the parser recursing is C (``json``)."""
    pos = rng.randrange(len(data) + 1)
    token = rng.choice(dictionary) if dictionary else bytes((rng.randrange(256),))
    return data[:pos] + token * rng.choice((2, 16, 64, 1100)) + data[pos:]


def mutate(rng: random.Random, seeds: list[bytes], dictionary: tuple[bytes, ...]) -> bytes:
    """One seeded mutation of a seed, libFuzzer's way (for the test suite's smoke)."""
    if rng.randrange(50) == 0:
        return repeat_token(rng, rng.choice(seeds), dictionary)[:MAX_LEN]
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[min(pos, len(data) - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            del data[pos : pos + rng.randint(1, 64)]
        elif op == 3 and dictionary:
            data[pos:pos] = rng.choice(dictionary)
        elif op == 4:
            other = rng.choice(seeds)
            cut = rng.randrange(len(other) + 1)
            data[pos:] = other[cut:]
        elif op == 5 and data:
            start = rng.randrange(len(data))
            data[pos:pos] = data[start : start + rng.randint(1, 256)]
        else:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data[:MAX_LEN])


CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fuzz_corpus"


def corpus(name: str) -> list[Path]:
    """The inputs kept for ``name`` (crashes found, and fixed, by fuzzing)."""
    directory = CORPUS / name
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
