"""Members spliced from a search ahead (dgfs.deep.ahead): the limits the walk
keeps, and what it learns from them."""

from __future__ import annotations

import io
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dgfs.deep
from dgfs.deep import ahead as ahead_module
from dgfs.deep.limits import Budget, ExpansionLimits
from dgfs.deep.search import VERIFIED_SPANS
from dgfs.errors import ExpansionLimit
from tests.aheadharness import DoneFirst, Lender, count_splices


@pytest.fixture(autouse=True)
def no_verdicts(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr("dgfs.deep.expand.MIN_SIZE", 0)  # the tests' zips are small
    VERIFIED_SPANS.clear()
    yield
    VERIFIED_SPANS.clear()


def _words(rng: random.Random, count: int) -> bytes:
    return b" ".join(b"w%d" % rng.randint(0, 99999) for _ in range(count))


def zip_of_zips(path: Path, outer: int, inner: int, seed: int = 5) -> Path:
    """A zip of ``outer`` deflated members, each a zip of ``inner`` stored entries."""
    rng = random.Random(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for number in range(outer):
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as nested:
                for entry in range(inner):
                    nested.writestr(f"e{entry}.txt", _words(rng, 20))
            archive.writestr(f"m{number}.zip", buf.getvalue())
    return path


def test_expand_members_limit_holds_when_members_are_spliced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``expand_members`` counts "zip entries and gzip members walked, at every
    depth". 10 members, each a zip of 20 entries: the walk alone walks 210
    entries and stops at ``members=120`` (ExpansionLimit: stored unexpanded).
    With a search ahead that got to the back five members first (it lists
    the 10 headers, then 21 entries per member), the walk splices them and
    counts only their 5 top-level headers: 10 + 5 x 20 = 110 entries, and
    the file is expanded past its limit: whether a file passes a security
    limit now depends on which thread got where first."""
    src = zip_of_zips(tmp_path / "zz.zip", outer=10, inner=20)
    limits = ExpansionLimits(members=120)
    with pytest.raises(ExpansionLimit):
        dgfs.deep.expand_file(src, tmp_path / "alone.form", scratch_dir=tmp_path, limits=limits)
    VERIFIED_SPANS.clear()
    spliced: list[str] = []
    real_splice = ahead_module.BackSearch.splice

    def counted(self: ahead_module.BackSearch, *args: Any) -> bool:
        try:
            done = real_splice(self, *args)
        except ExpansionLimit:
            spliced.append("over the limit")
            raise
        spliced.append("spliced" if done else "not ready")
        return done

    monkeypatch.setattr("dgfs.deep.expand.SearchAhead", DoneFirst)
    monkeypatch.setattr(ahead_module.BackSearch, "splice", counted)
    outcome = "expanded"
    try:
        dgfs.deep.expand_file(
            src, tmp_path / "ahead.form", scratch_dir=tmp_path, limits=limits, spare_core=Lender()
        )
    except ExpansionLimit:
        outcome = "ExpansionLimit"
    # Members 0-4 walked (105 entries), member 5 ready: its 21 pass the limit.
    assert spliced == ["not ready"] * 5 + ["over the limit"]
    assert outcome == "ExpansionLimit", "a file past expand_members was expanded"


def _text(rng: random.Random, words: int) -> bytes:
    names = [b"service", b"operation", b"shape", b"member", b"documentation", b"input"]
    return b" ".join(rng.choice(names) + b"%d" % rng.randint(0, 99999) for _ in range(words))


def test_the_walk_never_expands_less_for_members_spliced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dgfs.deep.ahead: "The walk never expands less for it". Members 0-2 and
    5-7 were deflated at level 6, members 3 and 4 at level 9; member 3's
    verdict is known (an earlier release held it).

    The walk alone: 0-2 make its level-6 hint trusted, member 3's verdict
    turns the hint to level 9 (``_stream`` records a remembered recipe),
    member 4 is found at level 9, 5-7 at level 6: 8 streams.

    With a search ahead that did members 7..3 before it stopped (at its
    member budget here; the walk catching up, or its time, are as legal):
    7-5 make ITS hint trusted at level 6, so it keeps member 4 (no verdict
    told: a miss ahead is not told), splices 3 from the known verdict, and
    7-5. The walk: 0-2 trust level 6; member 3 is spliced, which does not
    feed the walk's hint (before c9d6018 the walk wrote it from the verdict
    and recorded level 9); member 4 is met with the trusted level-6 hint,
    tried at level 6 only and kept as it is: 7 streams."""
    monkeypatch.setattr("dgfs.deep.gnuzip.zgz_path", lambda: None)  # deterministic: no GNU gzip
    rng = random.Random(11)
    texts = [_text(rng, 6000) for _ in range(8)]
    levels = [6, 6, 6, 9, 9, 6, 6, 6]
    src = tmp_path / "mixed.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as archive:
        for number, (text, level) in enumerate(zip(texts, levels, strict=True)):
            archive.writestr(f"m{number}.txt", text, compresslevel=level)
    earlier = tmp_path / "earlier.zip"
    with zipfile.ZipFile(earlier, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m3.txt", texts[3], compresslevel=9)

    def known_from_earlier() -> None:
        VERIFIED_SPANS.clear()
        dgfs.deep.expand_file(earlier, tmp_path / "earlier.form", scratch_dir=tmp_path)

    # The search ahead lists 8 + 1 local headers, then walks members 7..3: 14.
    limits = ExpansionLimits(members=14)
    known_from_earlier()
    alone = dgfs.deep.expand_file(src, tmp_path / "alone.form", scratch_dir=tmp_path, limits=limits)
    assert alone.streams_inflated == 8 and alone.streams_kept == 0

    known_from_earlier()
    spliced = count_splices(monkeypatch)
    form = tmp_path / "ahead.form"
    stats = dgfs.deep.expand_file(
        src, form, scratch_dir=tmp_path, limits=limits, spare_core=Lender()
    )
    assert spliced == [False, False, False, True, False, True, True, True]
    assert dgfs.deep.prove_form(form, src, stats.proven, stats.leaves)  # still a right form
    assert stats.streams_inflated >= alone.streams_inflated, (
        f"{stats.streams_inflated} streams expanded with the search ahead,"
        f" {alone.streams_inflated} by the walk alone"
    )


def test_what_a_search_ahead_spent_is_charged_with_the_walks_limits() -> None:
    budget = Budget(ExpansionLimits(members=10, ratio=2.0), 1 << 20)  # 2 MiB allowance
    budget.charge(10, 1 << 20)
    with pytest.raises(ExpansionLimit, match="expand_members"):
        budget.charge(1, 0)
    budget = Budget(ExpansionLimits(ratio=2.0), 1 << 20)
    budget.charge(0, 8 << 20)  # INFLATE_FACTOR (4) × the allowance, not more
    with pytest.raises(ExpansionLimit, match="inflated more than"):
        budget.charge(0, 1)
