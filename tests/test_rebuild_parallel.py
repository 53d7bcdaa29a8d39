"""Rebuilding side by side: a zip's members are re-deflated by every worker at once."""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgfs.deep import expand, recompress
from dgfs.deep.deflate import DeflateParams
from dgfs.deep.expand import expand_file, rebuild_file
from dgfs.deep.segments import MAGIC

ROOT = Path(__file__).resolve().parents[1]

#: How long a test waits for two tasks to run at once before it fails (a
#: bound, not a timing: they meet in microseconds when they run side by side).
MEET = 10.0


@pytest.fixture(autouse=True)
def _fresh_memos() -> Iterator[None]:
    expand.VERIFIED_SPANS.clear()
    expand.REBUILT_SUBTREES.clear()
    yield
    expand.REBUILT_SUBTREES.clear()


def _zip(members: int) -> bytes:
    """A zip of deflated members, each behind its RAW local header in the form."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in range(members):
            body = b"".join(b"member %d line %d\n" % (n, i) for i in range(2000))
            info = zipfile.ZipInfo(f"pkg/m{n}.py", (2024, 1, 2, 3, 4, 6))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, body)
    return buf.getvalue()


def test_zip_members_are_rebuilt_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers re-deflate two members at once: the RAW header between them
    does not make the rebuild wait for the first. Before, every RAW segment
    drained the queue, so a wheel's members were rebuilt one at a time (a
    botocore wheel's rebuild took 2.25 s with two workers, 2.15 s with one;
    1.21 s now). Here the first two members each wait until the other runs:
    one at a time, they never meet and the rebuild fails."""
    data = _zip(6)
    src = tmp_path / "a.whl"
    src.write_bytes(data)
    form = tmp_path / "a.dgx"
    expand_file(src, form, scratch_dir=tmp_path)
    meet = threading.Barrier(2, timeout=MEET)
    calls = 0
    rebuild_subtree = recompress._rebuild_subtree

    def meeting(subtree: bytes, *args: object, **kwargs: bool) -> list[bytes]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            meet.wait()
        return rebuild_subtree(subtree, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(recompress, "_rebuild_subtree", meeting)
    digest, size = rebuild_file(form, tmp_path / "out", tmp_path, 2)
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert calls == 6


def _hard_for_level_9(size: int) -> bytes:
    """Random bytes over {a, b}: every match is short and every hash chain long,
    so zlib's level 9 takes ~3 s per MiB (measured: 4 MB in 12 s)."""
    rnd = random.Random(1)
    return bytes(rnd.choice(b"ab") for _ in range(size))


def _raw(data: bytes) -> bytes:
    assert len(data) < 0x80
    return b"\x01" + bytes((len(data),)) + data


def test_raw_segments_behind_a_slow_subtree_stay_within_the_in_flight_bound(
    tmp_path: Path,
) -> None:
    """segments_in_parallel promises at most _IN_FLIGHT (16 MiB) of the form
    waiting in memory. A hostile form: one small DEFLATE level-9 subtree that
    is slow to compress (256 KiB of random a/b: ~0.8 s), then 400,000 RAW
    segments of one byte (1.2 MB of form). Each RAW byte now becomes a
    Future of ~1.7 KB held behind the pending subtree, counted as 1 byte: the
    process grows by hundreds of MB for a 1.5 MB form. (5d16281 drained the
    queue at each RAW segment: nothing held.) With a 4 MiB subtree (12 s) and
    a form of millions of such segments it is GBs, still under the count."""
    head = b"\x02" + DeflateParams(9).pack()
    payload = _hard_for_level_9(256 << 10)
    for at in range(0, len(payload), 0x7F):
        head += _raw(payload[at : at + 0x7F])
    head += b"\x00"
    form = MAGIC + head + _raw(b"x") * 400_000 + b"\x00"
    (tmp_path / "f.dgx").write_bytes(form)
    script = textwrap.dedent(
        """
        import resource, sys
        from dgfs.deep import recompress
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        recompress.rebuild_digest(sys.argv[1], None, 2)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "f.dgx")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    grown = int(done.stdout.split()[-1])
    assert grown < recompress._IN_FLIGHT + (8 << 20), (
        f"rebuilding a {len(form) >> 10} KiB form grew the process by {grown >> 20} MiB"
    )


def test_tiny_raw_segments_cost_about_the_same_side_by_side(tmp_path: Path) -> None:
    """A form of 1,000,000 one-byte RAW segments (3 MB): one worker
    rebuilds it in ~1.0 s, two workers (what every read uses) took ~1.25 s
    at 5d16281 and now ~4.6 s: a Future (a Condition, a lock, a list) per
    RAW chunk. A hostile form gets ~4x the CPU per byte it did."""
    form = MAGIC + _raw(b"x") * 1_000_000 + b"\x00"

    def timed(workers: int) -> float:
        started = time.process_time()
        size = sum(map(len, recompress.rebuild_chunks(io.BytesIO(form), None, workers)))
        assert size == 1_000_000
        return time.process_time() - started

    one, two = timed(1), timed(2)
    assert two < 2 * one, f"1 worker {one:.2f} s CPU, 2 workers {two:.2f} s CPU"
