"""The search for the gzip settings that rebuild a file: :func:`recover_gzip`.

For each deflate body (:mod:`dgfs.dgzip.bodies`) whose length fits the
recorded size, the headers of the length left (:mod:`dgfs.dgzip.candidates`)
are hashed with the body and the trailer until one gives the recorded
SHA-256, within the search's limits (:mod:`dgfs.dgzip.limits`). The file
found is written beside its destination, checked again and renamed into
place.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dgfs.deep import ExpansionLimits
from dgfs.dgzip.bodies import Body, body_plans, write_body
from dgfs.dgzip.candidates import header_candidates, mtime_candidates, name_candidates
from dgfs.dgzip.limits import CHUNK, MAX_BODIES, MAX_HEADERS, Budget, hash_budget
from dgfs.dgzip.member import (
    HEADER_SIZE,
    TRAILER_SIZE,
    GzipHeader,
    gzip_trailer,
    read_gzip_header,
)
from dgfs.dgzip.tarscan import tar_facts

log = logging.getLogger(__name__)


def recover_gzip(
    decompressed: Path,
    out: Path,
    *,
    original_name: str,
    expected_sha256: str,
    expected_size: int,
    reference_gzip: Path | None,
    scratch_dir: Path,
    max_bodies: int = MAX_BODIES,
    max_headers: int = MAX_HEADERS,
    seconds: float = ExpansionLimits.seconds,
) -> bool:
    """Gzip ``decompressed`` back into the exact file with ``expected_sha256``.

    ``original_name`` is the file's name (its ``dg-original-name``; a path
    is fine), ``expected_size``/``expected_sha256`` its recorded size and
    SHA-256, ``reference_gzip`` the deltaspace's reference as stored (a
    gzip file made by the same tool, usually; None if there is none or it
    is not gzip). Tries at most ``max_bodies`` deflate bodies (each costs a
    full compression of ``decompressed``) and ``max_headers`` headers per
    body of the right length (each costs one SHA-256 of the file).

    Returns True when found: ``out`` then holds exactly those bytes
    (written beside it and renamed into place). Returns False, with ``out``
    untouched, when no candidate matches. Raises ``DecodeLimit`` when the
    search takes longer than ``seconds`` or would hash more than
    :func:`hash_budget` of ``expected_size`` bytes in all (both chosen by
    whoever wrote the object). Scratch files go to ``scratch_dir`` and are
    removed. Blocking (CPU and disk): run it in a worker thread. Raises
    OSError if a file cannot be read or written.
    """
    started = time.monotonic()
    budget = Budget(seconds, hash_budget(expected_size))
    wanted = _Wanted(original_name, expected_sha256, expected_size)
    clues = _gather_clues(decompressed, original_name, reference_gzip, budget)
    plans = body_plans(reference_gzip, clues.ref_header, scratch_dir, budget)[:max_bodies]
    trailer = gzip_trailer(decompressed, budget)
    hashed = 0
    with _scratch_body(scratch_dir) as body_path:
        for body in plans:
            header, tried = _try_body(
                body, decompressed, body_path, trailer, wanted, clues, max_headers, budget
            )
            hashed += tried
            if header is not None:
                _write_result(header, body_path, trailer, out, expected_sha256)
                _log_found(original_name, body, header, plans.index(body) + 1, hashed, started)
                return True
    _log_not_found(original_name, len(plans), hashed, started)
    return False


@dataclass(frozen=True)
class _Wanted:
    """The file the search rebuilds, as its metadata records it."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class _Clues:
    """What the headers are guessed from: the reference's header, and the
    names and MTIMEs (most likely, the rest) the file's name and tar suggest."""

    ref_header: GzipHeader | None
    names: list[bytes]
    mtimes: tuple[list[int], list[int]]


def _gather_clues(
    decompressed: Path, original_name: str, reference_gzip: Path | None, budget: Budget
) -> _Clues:
    """The reference's header (None without a gzip reference) and the tar's facts,
    turned into name and MTIME candidates; DecodeLimit past the search's deadline
    while the tar is read."""
    ref_header = read_gzip_header(reference_gzip) if reference_gzip is not None else None
    tar = tar_facts(decompressed, budget)
    names = name_candidates(original_name, tar, ref_header)
    mtimes = mtime_candidates(tar, ref_header)
    return _Clues(ref_header, names, mtimes)


def _try_body(
    body: Body,
    decompressed: Path,
    body_path: Path,
    trailer: bytes,
    wanted: _Wanted,
    clues: _Clues,
    max_headers: int,
    budget: Budget,
) -> tuple[bytes | None, int]:
    """Write ``body`` of ``decompressed`` to ``body_path`` and, if it leaves room
    for a header, hash up to ``max_headers`` of those that fit with it: the
    header that gives ``wanted``'s SHA-256 (None if none does), and how many
    were hashed."""
    max_length = wanted.size - HEADER_SIZE - TRAILER_SIZE
    body_length = write_body(body, decompressed, body_path, max_length, budget)
    if body_length is None:
        log.debug("%s: %s is longer than the file", wanted.name, body)
        return None, 0
    header_length = wanted.size - TRAILER_SIZE - body_length
    candidates = header_candidates(body, header_length, clues.names, clues.mtimes, clues.ref_header)
    header, tried = _find_header(body_path, trailer, candidates, wanted.sha256, max_headers, budget)
    if header is None:
        log.debug("%s: %s fits the size, no header among %d", wanted.name, body, tried)
    return header, tried


@contextlib.contextmanager
def _scratch_body(scratch_dir: Path) -> Iterator[Path]:
    """A scratch file for the candidate deflate bodies, removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="dgzip-", suffix=".deflate", dir=scratch_dir)
    os.close(fd)
    body_path = Path(name)
    try:
        yield body_path
    finally:
        body_path.unlink(missing_ok=True)


def _log_found(
    original_name: str, body: Body, header: bytes, bodies: int, hashed: int, started: float
) -> None:
    """Log the settings ``recover_gzip`` found, and what the search cost."""
    mtime, xfl, os_byte = struct.unpack("<IBB", header[4:10])
    log.info(
        "%s: recovered its original gzip bytes (%s, MTIME %d, XFL %d, OS %d, name %r;"
        " %d bodies, %d hashes, %.1fs)",
        original_name,
        body,
        mtime,
        xfl,
        os_byte,
        header[HEADER_SIZE:-1].decode("latin-1") if len(header) > HEADER_SIZE else None,
        bodies,
        hashed,
        time.monotonic() - started,
    )


def _log_not_found(original_name: str, bodies: int, hashed: int, started: float) -> None:
    log.info(
        "%s: no gzip settings among %d bodies and %d hashes give its SHA-256 (%.1fs)",
        original_name,
        bodies,
        hashed,
        time.monotonic() - started,
    )


def _find_header(
    body_path: Path,
    trailer: bytes,
    candidates: Iterator[bytes],
    expected_sha256: str,
    max_headers: int,
    budget: Budget,
) -> tuple[bytes | None, int]:
    """The first of ``candidates`` completing the body to ``expected_sha256``, and how
    many were hashed."""
    want = bytes.fromhex(expected_sha256)
    tried = 0
    with open(body_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as body:
        for header in candidates:
            if tried >= max_headers:
                break
            budget.charge_hash(len(header) + len(body) + len(trailer))
            tried += 1
            # The header comes first, so no hash state can be shared between
            # candidates: each is a full SHA-256 (hashlib drops the GIL for it).
            digest = hashlib.sha256(header)
            digest.update(body)
            digest.update(trailer)
            if digest.digest() == want:
                return header, tried
    return None, tried


def _write_result(
    header: bytes, body_path: Path, trailer: bytes, out: Path, expected_sha256: str
) -> None:
    """Write header + body + trailer beside ``out``, check it and rename it into place."""
    tmp = out.with_name(f".{out.name}.dgzip-{os.getpid()}")
    try:
        digest = hashlib.sha256()
        with open(tmp, "wb") as dst, open(body_path, "rb") as src:
            for piece in _pieces(header, src, trailer):
                digest.update(piece)
                dst.write(piece)
        if digest.hexdigest() != expected_sha256.lower():
            raise OSError(f"{tmp} changed while it was written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _pieces(header: bytes, body: BinaryIO, trailer: bytes) -> Iterator[bytes]:
    yield header
    while chunk := body.read(CHUNK):
        yield chunk
    yield trailer
