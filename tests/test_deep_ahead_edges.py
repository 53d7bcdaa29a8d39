"""The search ahead (dgfs.deep.ahead) at its edges: zips of mixed levels, a thread
that cannot start, hostile member counts, zips of few members."""

from __future__ import annotations

import random
import threading
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import dgfs.deep
from dgfs.deep import ahead as ahead_module
from dgfs.deep import gnuzip
from dgfs.deep.ahead import BackSearch
from dgfs.deep.expand import _Expander
from dgfs.deep.limits import Budget, ExpansionLimits
from dgfs.deep.search import VERIFIED_SPANS
from tests.aheadharness import DoneFirst, Lender

WORDS = [b"service", b"operation", b"shape", b"member", b"documentation", b"input", b"output"]


def _text(rng: random.Random, words: int) -> bytes:
    return b" ".join(rng.choice(WORDS) + str(rng.randint(0, 99999)).encode() for _ in range(words))


def levels_zip(path: Path, levels: list[int], seed: int = 3) -> Path:
    """A zip whose members were deflated by zlib at ``levels`` (in order), each
    ~80 KB of text that deflates to far more than NEAR_MISS bytes."""
    rng = random.Random(seed)
    with zipfile.ZipFile(path, "w") as archive:
        for number, level in enumerate(levels):
            archive.writestr(
                f"pkg/m{number}.py",
                _text(rng, 6000),
                compress_type=zipfile.ZIP_DEFLATED,
                compresslevel=level,
            )
    return path


@pytest.fixture(autouse=True)
def no_verdicts() -> Iterator[None]:
    VERIFIED_SPANS.clear()
    yield
    VERIFIED_SPANS.clear()


@pytest.fixture
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dgfs.deep.expand.MIN_SIZE", 0)


@pytest.fixture(params=["zgz", "no-zgz"])
def zgz(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """With zgz (GNU gzip) installed, or without (a machine that has none)."""
    if request.param == "no-zgz":
        monkeypatch.setattr("dgfs.deep.gnuzip.zgz_path", lambda: None)
    elif gnuzip.zgz_path() is None:
        pytest.skip("zgz not installed")
    return str(request.param)


def expand(src: Path, tmp_path: Path, name: str, spare_core: object = None) -> tuple[bytes, object]:
    out = tmp_path / name
    stats = dgfs.deep.expand_file(src, out, scratch_dir=tmp_path, spare_core=spare_core)  # type: ignore[arg-type]
    return out.read_bytes(), stats


# --- 1. an ahead verdict made 'unreproducible' by the ahead's own trusted hint -----------


def test_the_form_with_a_search_ahead_is_the_form_the_walk_writes_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, any_size: None, zgz: str
) -> None:
    """``expand_file``: "The form is the same either way." Members 0-3 were
    deflated by zlib at levels 1/9 alternately, 4-7 at level 6. The walk
    alone writes eight DEFLATE segments (its hint never reaches TRUSTED_HINT
    on a wrong level). The search ahead starts at the back: four level-6
    successes make its hint trusted, so members 3..0 are tried at level 6
    only, then offered to GNU gzip. With zgz, GNU levels 1/9 happen to
    reproduce them: the verdicts are GNU levels and the walk writes GNU
    segments (a zgz process per stream at every rebuild, unreadable where
    zgz is missing) instead of DEFLATE. Without zgz they are recorded
    UNREPRODUCIBLE: the walk keeps members 0-3, and after those four misses
    in a row stops searching and copies the level-6 members too: nothing
    at all is expanded.

    Schedule: the ahead thread runs to its end before the walk reads the
    first local header (a legal interleaving, forced here so the test is
    deterministic)."""
    src = levels_zip(tmp_path / "mixed.zip", [1, 9, 1, 9, 6, 6, 6, 6])
    alone, alone_stats = expand(src, tmp_path, "alone.form")
    assert alone_stats.streams_inflated == 8  # type: ignore[attr-defined]
    VERIFIED_SPANS.clear()

    monkeypatch.setattr("dgfs.deep.expand.SearchAhead", DoneFirst)
    lender = Lender()
    with_ahead, stats = expand(src, tmp_path, "ahead.form", lender)
    assert lender.log == ["lent", "back"]
    assert stats.streams_inflated == 8, f"{stats.streams_inflated} of 8 streams expanded"  # type: ignore[attr-defined]
    assert with_ahead == alone


def test_the_walk_waiting_meanwhile_writes_the_form_it_writes_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, any_size: None, zgz: str
) -> None:
    """The same through ``meanwhile`` (no core lent: every later release):
    the walk waits at member 0 for a verdict another expansion is finding;
    meanwhile its BackSearch gives members 3..0 verdicts from its own
    trusted level-6 hint (GNU levels, or UNREPRODUCIBLE without zgz). The
    other expansion then ends without a verdict (it hit a limit, say): the
    walk searches member 0 itself, but takes members 1-3 from those verdicts."""
    src = levels_zip(tmp_path / "mixed.zip", [1, 9, 1, 9, 6, 6, 6, 6])
    alone, _ = expand(src, tmp_path, "alone.form")
    VERIFIED_SPANS.clear()

    from dgfs.deep.ahead import deflated_members
    from dgfs.deep.search import _span_digest

    with open(src, "rb") as f:
        first = deflated_members(f, 0, src.stat().st_size, Budget(ExpansionLimits(), 0))[0]
        key = _span_digest(f, first.start, first.size)

    claimed, release = threading.Event(), threading.Event()

    def peer() -> None:  # another expansion finding member 0's verdict
        with VERIFIED_SPANS.computing(key) as known:
            assert known is None
            claimed.set()
            release.wait(120)

    real_step = BackSearch.step

    def step(self: BackSearch) -> bool:
        more = real_step(self)
        if not more:
            release.set()  # the peer ends once the walk has nothing left to do meanwhile
        return more

    monkeypatch.setattr(BackSearch, "step", step)
    thread = threading.Thread(target=peer)
    thread.start()
    assert claimed.wait(10)
    try:
        got, stats = expand(src, tmp_path, "meanwhile.form", lambda: None)
    finally:
        release.set()
        thread.join()
    assert stats.streams_inflated == 8, f"{stats.streams_inflated} of 8 streams expanded"  # type: ignore[attr-defined]
    assert got == alone


# --- 2. a search ahead that cannot start fails the store ---------------------------------


def test_a_search_ahead_whose_thread_cannot_start_does_not_fail_the_expansion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, any_size: None
) -> None:
    """ "no exception escapes from the search ahead into the store": when
    the thread cannot start (RuntimeError: can't start new thread), the core
    is given back, but SearchAhead.__init__ re-raises and expand.zip lets it
    through; FileWriter._expand catches only ExpansionLimit, so the put fails."""
    src = levels_zip(tmp_path / "z.zip", [6] * 6)
    alone, _ = expand(src, tmp_path, "alone.form")
    VERIFIED_SPANS.clear()

    class NoThread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    fake = types.SimpleNamespace(Event=threading.Event, Thread=NoThread)
    monkeypatch.setattr(ahead_module, "threading", fake)
    lender = Lender()
    got, _ = expand(src, tmp_path, "ahead.form", lender)
    assert lender.log == ["lent", "back"]
    assert got == alone


# --- 3. the member list of a BackSearch ignores every limit -----------------------------


def tiny_members_zip(path: Path, count: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for number in range(count):
            archive.writestr(f"e{number}", b"", compress_type=zipfile.ZIP_STORED)
        rng = random.Random(5)
        for number in range(4):  # enough deflated members for a search (none is needed)
            archive.writestr(f"d{number}", _text(rng, 400), compress_type=zipfile.ZIP_DEFLATED)
    return path


def test_a_back_search_reads_no_more_local_headers_than_the_member_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``deflated_members`` (BackSearch._start) walks every local header of
    the zip with no Budget.member()/check_time: a zip of millions of empty
    entries is listed whole (time, and a Member per deflated entry of 512+
    bytes in memory), past expand_members and expand_time. In meanwhile mode
    this runs in the walk's own thread, inside Memo._wait."""
    src = tiny_members_zip(tmp_path / "many.zip", 3000)
    limits = ExpansionLimits(members=100)
    reads: list[int] = []
    real = ahead_module.read_local_header

    def counted(*args: object) -> object:
        reads.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(ahead_module, "read_local_header", counted)
    size = src.stat().st_size
    back = BackSearch(src, (0, size), _Expander, tmp_path, Budget(limits, size))
    try:
        back.step()
    finally:
        back.close()
    assert len(reads) <= limits.members + 1, f"{len(reads)} local headers read"


# --- 4. a zip with fewer than MIN_MEMBERS deflated members: a 'bug' warning -------------


def test_a_zip_with_few_deflated_members_ends_the_back_search_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """BackSearch._start leaves ``_search`` None when the zip has fewer than
    MIN_MEMBERS deflated members; step() then trips its own ``assert
    self._search is not None``, and the catch-all for bugs logs a WARNING
    "search ahead failed" with a traceback: for every zip of 1 MiB+ with
    few deflated members (a jar of stored entries, a zip of 3 big files),
    in every store. (Under ``python -O`` the assert is gone and it is quiet.)"""
    src = levels_zip(tmp_path / "few.zip", [6, 6])
    size = src.stat().st_size
    back = BackSearch(src, (0, size), _Expander, tmp_path, Budget(ExpansionLimits(), size))
    with caplog.at_level("DEBUG", logger="dgfs.deep.ahead"):
        try:
            assert back.step() is False
        finally:
            back.close()
    warnings = [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert warnings == [], [r.getMessage() for r in warnings]
