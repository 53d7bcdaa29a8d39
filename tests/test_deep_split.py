"""SPLIT segments: one large deflate stream rebuilt in pieces, side by side, bit for bit.

A ``.tar.gz`` is one deflate stream; its expanded form records checkpoints
(byte-aligned block boundaries) from which independent compressors, primed
with the window before them, rebuild the stream's pieces in parallel. The
writer compares every piece with the original before it writes one.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from dgfs.deep import deflate, expand, search, segments
from dgfs.deep.deflate import (
    Checkpoint,
    DeflateParams,
    Payload,
    deflate_pieces,
    inflate_blocks,
)
from dgfs.deep.expand import (
    MAGIC,
    TAG_END,
    ExpansionLimits,
    expand_file,
    prove_form,
    rebuild_file,
)
from dgfs.deep.segments import MIN_PIECE
from dgfs.errors import DecodeLimit, FormatError
from tests.test_expand import (
    gnu_gzip,
    needs_zgz,
    raw_zeros,
    round_trip,
    segment_tags,
    text,
    traced_peak,
)

#: Real release series (benchmarks/series.py downloads them; absent: skipped).
BENCH_CACHE = Path.home() / ".cache" / "dgfs-bench" / "pypi"


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 256 KiB, so that test inputs of a few MB are split."""
    monkeypatch.setattr(expand, "SPLIT_MIN", 64 << 10)
    monkeypatch.setattr(search, "SPLIT_PIECE", 256 << 10)


def tarball_like(size: int, seed: int = 1) -> bytes:
    """Text with stretches of random bytes (zlib stores those in stored blocks,
    whose padding depends on where in a byte the compressor stands)."""
    rng = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < size:
        parts.append(text(rng.randint(100_000, 400_000), seed=rng.randint(0, 1 << 30)))
        if rng.random() < 0.5:
            parts.append(rng.randbytes(rng.randint(20_000, 90_000)))
    return b"".join(parts)[:size]


def python_gzip(payload: bytes, level: int) -> bytes:
    return gzip.compress(payload, compresslevel=level, mtime=1_700_000_000)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("level", [9, 6])
def test_a_large_gzip_stream_is_rebuilt_in_pieces_bit_for_bit(tmp_path: Path, level: int) -> None:
    data = python_gzip(tarball_like(3 << 20), level)
    stats, form = round_trip(tmp_path, data, "app-1.0.tar.gz")  # rebuilt with 1 and 3 workers
    assert stats.streams_split == 1
    assert [tag for tag, _ in segment_tags(form)] == [expand.TAG_SPLIT]
    (recipe,) = [r for _, r in stats.proven]
    assert isinstance(recipe, expand.SplitRecipe)
    assert recipe.params == DeflateParams(level)
    assert len(recipe.checkpoints) >= 3


@needs_zgz
@pytest.mark.usefixtures("small_pieces")
def test_a_large_gnu_gzip_stream_is_not_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GNU gzip -9 writes the same XFL as Python's gzip: zlib fails on the
    stream's first block, before the stream is inflated whole for pieces,
    and the ordinary search (zgz) takes over."""
    inflated_for_pieces: list[int] = []
    real_inflate_blocks = search.inflate_blocks

    def counted(*args: Any, **kwargs: Any) -> Any:
        inflated_for_pieces.append(1)
        return real_inflate_blocks(*args, **kwargs)

    monkeypatch.setattr(search, "inflate_blocks", counted)
    data = gnu_gzip(tarball_like(1 << 20), 9)
    stats, form = round_trip(tmp_path, data, "app-1.0.tar.gz")
    assert inflated_for_pieces == []
    assert stats.streams_split == 0
    assert [tag for tag, _ in segment_tags(form)] == [expand.TAG_GNU]


@pytest.mark.usefixtures("small_pieces")
def test_every_large_member_of_a_gzip_file_is_split(tmp_path: Path) -> None:
    data = python_gzip(tarball_like(2 << 20, seed=2), 9) + python_gzip(tarball_like(2 << 20), 6)
    stats, form = round_trip(tmp_path, data, "two-members.gz")
    assert stats.streams_split == 2
    assert [tag for tag, _ in segment_tags(form)] == [expand.TAG_SPLIT, expand.TAG_SPLIT]


@pytest.mark.usefixtures("small_pieces")
def test_a_stream_proven_before_is_only_inflated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gzip body up to GZIP_GUESS_MAX that an earlier expansion proved (the
    same data file in the next release) is inflated, not deflated in pieces."""
    data = python_gzip(tarball_like(1 << 20), 9)
    expand.VERIFIED_SPANS.clear()
    stats, _ = round_trip(tmp_path, data, "data.gz")  # split: not remembered
    assert stats.streams_split == 1
    stats, _ = round_trip(tmp_path, data, "again.gz")
    assert stats.streams_split == 1  # a split stream is not remembered either
    monkeypatch.setattr(expand, "SPLIT_MIN", 1 << 30)
    stats, _ = round_trip(tmp_path, data, "whole.gz")  # the ordinary way: remembered
    monkeypatch.undo()
    monkeypatch.setattr(expand, "SPLIT_MIN", 64 << 10)
    monkeypatch.setattr(search, "SPLIT_PIECE", 256 << 10)
    stats, form = round_trip(tmp_path, data, "third.gz")
    assert stats.streams_split == 0 and stats.streams_remembered == 1
    assert [tag for tag, _ in segment_tags(form)] == [expand.TAG_DEFLATE]


def test_small_gzip_streams_stay_whole(tmp_path: Path) -> None:
    stats, form = round_trip(tmp_path, python_gzip(text(300_000), 9), "small.gz")
    assert stats.streams_split == 0
    assert [tag for tag, _ in segment_tags(form)] == [expand.TAG_DEFLATE]


@pytest.mark.skipif(
    not sorted(BENCH_CACHE.glob("Django-4.2.*.tar.gz")),
    reason="no Django sdists in ~/.cache/dgfs-bench (benchmarks/series.py fetches them)",
)
def test_real_sdists_are_rebuilt_in_pieces_bit_for_bit(tmp_path: Path) -> None:
    """Two real Django sdists (Python's gzip, level 9, 59 MB of tar each): split
    with every piece compared on write, rebuilt side by side, every byte checked."""
    for src in sorted(BENCH_CACHE.glob("Django-4.2.*.tar.gz"))[:2]:
        expanded = tmp_path / "form.dgx"
        stats = expand_file(src, expanded, scratch_dir=tmp_path)
        assert stats.streams_split == 1
        assert prove_form(expanded, src, stats.proven)
        want = hashlib.sha256(src.read_bytes()).hexdigest()
        for workers in (1, 2):
            digest, size = rebuild_file(expanded, tmp_path / "out", tmp_path, workers)
            assert (digest, size) == (want, src.stat().st_size)


def _expanded(tmp_path: Path) -> tuple[Path, Path, expand.ExpandStats]:
    src = tmp_path / "app.tar.gz"
    src.write_bytes(python_gzip(tarball_like(2 << 20), 9))
    expanded = tmp_path / "app.dgx"
    return src, expanded, expand_file(src, expanded, scratch_dir=tmp_path)


def _with_checkpoints(form: bytes, recipe: expand.SplitRecipe, points: list[Checkpoint]) -> bytes:
    old = segments.header(recipe)
    assert form.count(old) == 1
    return form.replace(old, segments.header(expand.SplitRecipe(recipe.params, tuple(points))))


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(
    "damage", ["not increasing", "past the end", "inside a block", "fewer", "tiny pieces"]
)
def test_forms_with_wrong_checkpoints_are_refused(tmp_path: Path, damage: str) -> None:
    """Checkpoints come from the bucket: malformed ones fail the rebuild, wrong
    ones rebuild other bytes (the SHA-256 check refuses them) and never pass
    the writer's proof, which knows the checkpoints its search compared."""
    src, expanded, stats = _expanded(tmp_path)
    (recipe,) = [r for _, r in stats.proven]
    assert isinstance(recipe, expand.SplitRecipe)
    points = list(recipe.checkpoints)
    if damage == "not increasing":
        points[1] = points[0]
    elif damage == "past the end":
        points[-1] = Checkpoint(points[-1].compressed, 1 << 40)
    elif damage == "tiny pieces":
        # 1,000 pieces of 1 byte: each would cost a window and a look-ahead.
        base = points[0]
        points = [Checkpoint(base.compressed + i, base.uncompressed + i) for i in range(1000)]
    elif damage == "inside a block":
        points[2] = Checkpoint(points[2].compressed, points[2].uncompressed + 1000)
    else:
        del points[3]
    bad = tmp_path / "bad.dgx"
    bad.write_bytes(_with_checkpoints(expanded.read_bytes(), recipe, points))
    assert not prove_form(bad, src, stats.proven)
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    try:
        digest, _ = rebuild_file(bad, tmp_path / "out", tmp_path, 2)
    except FormatError:
        assert damage != "fewer"  # fewer checkpoints are valid, and rebuild the same bytes
        return
    assert damage in ("inside a block", "fewer")
    assert (digest == want) == (damage == "fewer")


@pytest.mark.parametrize("workers", [1, 3])
def test_a_split_piece_is_streamed_not_held_whole(tmp_path: Path, workers: int) -> None:
    """A hostile SPLIT segment (level 0) whose one checkpoint leaves all but
    the first 64 KiB of its 24 MiB to the last piece, in a file that claims
    1 MiB (a reader lets its expanded form hold 100 MiB). Each piece used to
    be joined whole in memory before ``rebuild_file`` saw a byte of it: the
    dg-file-size check came after ~2 x 24 MiB was held, and a 4 GiB form
    would hold 8 GiB. Pieces now stream (those waiting for earlier ones hold
    at most ``PIECE_HELD``), the check stops the rebuild within a few
    chunks, and the threads that compressed ahead end."""
    file_size = 1 << 20
    u_size = 24 << 20
    recipe = expand.SplitRecipe(DeflateParams(0), (Checkpoint(MIN_PIECE, MIN_PIECE),))
    form = MAGIC + segments.header(recipe) + raw_zeros(u_size) + bytes((TAG_END, TAG_END))
    assert len(form) < ExpansionLimits().expanded_cap(file_size)
    (tmp_path / "f.dgx").write_bytes(form)
    result, peak = traced_peak(
        lambda: rebuild_file(
            tmp_path / "f.dgx", tmp_path / "out", tmp_path, workers, max_size=file_size
        )
    )
    assert isinstance(result, DecodeLimit) and "dg-file-size" in str(result), result
    # A DEFLATE segment of the same bytes is stopped within ~2 RAW_CHUNKs.
    assert peak < 8 << 20, f"a {file_size}-byte file's rebuild peaked at {peak >> 20} MiB"
    assert not [t for t in threading.enumerate() if t.name.startswith("dgfs-piece")]


@pytest.mark.usefixtures("small_pieces")
def test_pieces_waiting_for_the_reader_are_rebuilt_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no room for what a piece compresses ahead, every thread waits for
    the reader at each chunk: the bytes and their order stay the same."""
    monkeypatch.setattr(deflate, "PIECE_HELD", 1)
    data = python_gzip(tarball_like(3 << 20, seed=3), 9)
    stats, _ = round_trip(tmp_path, data, "app-1.0.tar.gz")  # rebuilt with 1 and 3 workers
    assert stats.streams_split == 1


def test_inflate_blocks_finds_byte_aligned_boundaries() -> None:
    payload = tarball_like(1 << 20)
    stream = gzip.compress(payload, 9)[10:-8]
    with tempfile.TemporaryFile() as src:
        src.write(stream)
        out: list[bytes] = []
        found = inflate_blocks(src, 0, len(stream), out.append)
    assert found is not None
    assert (found.compressed_length, found.uncompressed_length) == (len(stream), len(payload))
    assert b"".join(out) == payload
    assert found.checkpoints and all(0 < p.compressed < len(stream) for p in found.checkpoints)
    with tempfile.TemporaryFile() as src:
        src.write(stream[:-1000])
        cut = inflate_blocks(src, 0, len(stream), lambda _: None)
    assert cut is not None and cut.compressed_length == 0  # not a whole stream
    # The pieces between all of them, compressed side by side, are the stream.
    pieces = deflate_pieces(
        DeflateParams(9), Payload.of_bytes(payload), found.checkpoints, workers=2
    )
    assert b"".join(pieces) == stream
