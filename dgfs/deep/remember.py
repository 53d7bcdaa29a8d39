"""Verdicts on compressed spans kept across mounts, in the cache directory.

``VERIFIED_SPANS`` remembers, for the SHA-256 of each compressed span an
expansion searched, the recipe that reproduces it (or that none does), so
the next release's identical spans are only inflated. A new process starts
with it empty: the first deep store after a remount searched every stream
again (``benchmarks/deep_cpu.py``: a botocore wheel's first store in a new
process, 3.69 CPU s with nothing remembered, 1.69 with the verdicts of the
versions before). ``keep_in`` names the ``cache_dir`` when a mount or
command starts; the first expansion loads its verdicts (``ensure_loaded``,
so a command that expands nothing reads nothing); ``save_kept`` writes
them back at the end, if anything was proven meanwhile. Processes sharing a ``cache_dir`` share the
file: a save replaces it whole, so the last one to end wins (the verdicts
depend on the bytes only, not on the bucket).

An expansion trusts a verdict as it trusts its own: a span with one is
inflated, not compressed again and compared. So the file is bound to what
made its verdicts: the running zlib's version and the SHA-256 of the zgz
binary (or its absence); a file made under others is not loaded. It holds
only hashes and recipes, and sits in the cache's private directory, as the
journal does (docs/SECURITY.md). Its bytes are parsed under limits: a file
over ``MAX_BYTES``, with a bad header or a bad record is ignored whole,
with one log line; nothing here ever raises to the mount.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import threading
import zlib
from pathlib import Path

from dgfs.deep import gnuzip
from dgfs.deep.deflate import DeflateParams
from dgfs.deep.search import _SPAN_ENTRY_BYTES, _UNREPRODUCIBLE, VERIFIED_SPANS

log = logging.getLogger(__name__)

FILE_NAME = "verified-spans"
MAGIC = b"dgfs-verified-spans-1\n"
#: The file's size at most: ~2.5 MB hold every verdict the memo's budget keeps.
MAX_BYTES = 8 << 20
_DIGEST = 32
_UNREPRODUCIBLE_TAG, _ZLIB_TAG, _GNU_TAG = 0, 1, 2
_TAG_LENGTH = {_UNREPRODUCIBLE_TAG: 0, _ZLIB_TAG: 4, _GNU_TAG: 1}


def binding() -> bytes:
    """What the verdicts of this process depend on: zlib's version, zgz's bytes."""
    zgz = gnuzip.zgz_path()
    if zgz is None:
        made_by = b"none"
    else:
        try:
            made_by = hashlib.sha256(Path(zgz).read_bytes()).hexdigest().encode()
        except OSError:
            made_by = b"unreadable"
    return b"zlib " + zlib.ZLIB_RUNTIME_VERSION.encode() + b"; zgz " + made_by


def _record(digest: bytes, verdict: object) -> bytes | None:
    if len(digest) != _DIGEST:
        return None  # not a span's SHA-256; never written
    if verdict == _UNREPRODUCIBLE:
        return digest + bytes((_UNREPRODUCIBLE_TAG,))
    if isinstance(verdict, DeflateParams):
        return digest + bytes((_ZLIB_TAG,)) + verdict.pack()
    if isinstance(verdict, int) and 1 <= verdict <= 9:
        return digest + bytes((_GNU_TAG, verdict))
    return None  # nothing else is a verdict; never written


#: ``VERIFIED_SPANS.puts`` when the verdicts were last loaded or saved.
_puts_known = 0
#: Where this process keeps its verdicts (``keep_in``), and whether they were loaded.
_kept_in: Path | None = None
_loaded = False
_load_lock = threading.Lock()


def keep_in(directory: Path | None) -> None:
    """Keep this process's verdicts in ``directory`` (None: nowhere); they are
    loaded from it on first need (``ensure_loaded``), not now."""
    global _kept_in, _loaded
    with _load_lock:
        _kept_in, _loaded = directory, False


def ensure_loaded() -> None:
    """Load the verdicts kept where ``keep_in`` said, once (blocking: an
    expansion calls it in its worker thread before it searches anything)."""
    global _loaded
    with _load_lock:
        if _loaded or _kept_in is None:
            return
        _loaded = True
        load(_kept_in)


def save_kept() -> int:
    """``save`` where ``keep_in`` said (0 if nowhere, or nothing new)."""
    return save(_kept_in) if _kept_in is not None else 0


def save(directory: Path) -> int:
    """Write the remembered verdicts to ``directory`` if any was proven since
    they were loaded or saved; returns how many were written.

    Written whole to a temporary file and renamed over the old one, so a
    crash leaves the old file or the new, never half of one."""
    global _puts_known
    if VERIFIED_SPANS.puts == _puts_known:
        return 0
    _puts_known = VERIFIED_SPANS.puts
    ours = VERIFIED_SPANS.snapshot()
    # Another process on this cache_dir may have saved since we loaded:
    # its verdicts are kept too (older than ours), up to the memo's budget.
    mine = {key for key, _ in ours}
    theirs = [(key, v) for key, v in _read(directory / FILE_NAME) or [] if key not in mine]
    kept = (theirs + ours)[-(VERIFIED_SPANS.max_bytes // _SPAN_ENTRY_BYTES) :]
    records = [r for key, value in kept if (r := _record(key, value))]
    tag = binding()
    body = MAGIC + struct.pack(">H", len(tag)) + tag + b"".join(records)
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=FILE_NAME + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(body)
            os.replace(name, directory / FILE_NAME)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("could not keep the verified spans for the next mount: %s", exc)
        return 0
    return len(records)


def load(directory: Path) -> int:
    """Remember the verdicts ``save`` left in ``directory``; returns how many
    (0 if there is no file, or it is not usable: then it is logged why)."""
    verdicts = _read(directory / FILE_NAME, quiet=False)
    if not verdicts:
        return 0
    global _puts_known
    for key, verdict in verdicts:
        VERIFIED_SPANS.put(key, verdict, _SPAN_ENTRY_BYTES)
    _puts_known = VERIFIED_SPANS.puts
    return len(verdicts)


def _read(path: Path, *, quiet: bool = True) -> list[tuple[bytes, object]] | None:
    """The verdicts saved in ``path``; None if there are none usable (why is
    logged unless ``quiet``, or the file is missing)."""
    try:
        with open(path, "rb") as source:
            body = source.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if not quiet:
            log.warning("could not read %s: %s", path, exc)
        return None
    try:
        verdicts = _parse(body)
    except ValueError as exc:
        if not quiet:
            log.warning("%s is not usable (%s); it is not used", path, exc)
        return None
    if verdicts is None and not quiet:
        log.info("%s was made with another zlib or zgz; not used", path)
    return verdicts


def _parse(body: bytes) -> list[tuple[bytes, object]] | None:
    """The records of a saved file, oldest first; None if bound to another
    zlib or zgz; ValueError if malformed (nothing of it is used then)."""
    if len(body) > MAX_BYTES:
        raise ValueError(f"larger than {MAX_BYTES} bytes")
    if not body.startswith(MAGIC) or len(body) < len(MAGIC) + 2:
        raise ValueError("not a verified-spans file")
    at = len(MAGIC)
    (tag_length,) = struct.unpack_from(">H", body, at)
    at += 2
    tag = body[at : at + tag_length]
    if len(tag) != tag_length:
        raise ValueError("ends inside its header")
    if tag != binding():
        return None
    at += tag_length
    verdicts: list[tuple[bytes, object]] = []
    while at < len(body):
        if at + _DIGEST + 1 > len(body):
            raise ValueError("ends inside a record")
        digest, kind = body[at : at + _DIGEST], body[at + _DIGEST]
        at += _DIGEST + 1
        length = _TAG_LENGTH.get(kind)
        if length is None or at + length > len(body):
            raise ValueError("a record of no known kind" if length is None else "ends early")
        raw = body[at : at + length]
        at += length
        verdict: object
        if kind == _UNREPRODUCIBLE_TAG:
            verdict = _UNREPRODUCIBLE
        elif kind == _ZLIB_TAG:
            verdict = DeflateParams.unpack(raw)  # ValueError if out of range
        elif 1 <= raw[0] <= 9:
            verdict = raw[0]
        else:
            raise ValueError(f"GNU gzip level {raw[0]}")
        verdicts.append((digest, verdict))
    return verdicts
