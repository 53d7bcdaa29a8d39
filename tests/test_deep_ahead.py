"""A zip's members searched ahead of the walk on a spare core (``dgfs.deep.ahead``):
the verdicts it leaves, the form the walk then writes, its core and its limits."""

from __future__ import annotations

import gzip
import hashlib
import random
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

import dgfs.deep
from dgfs.deep import ahead as ahead_module
from dgfs.deep.ahead import Loan, SearchAhead, _StoppableBudget, deflated_members
from dgfs.deep.deflate import DeflateMatch
from dgfs.deep.expand import _Expander
from dgfs.deep.limits import Budget, ExpansionLimits
from dgfs.deep.memo import Memo
from dgfs.deep.search import VERIFIED_SPANS, remembered
from dgfs.deep.segments import TAG_SPLIT
from dgfs.errors import ExpansionLimit
from dgfs.store.memory import MemoryStore
from dgfs.workbench import Workbench
from tests.aheadharness import Lender, Loaned, count_splices
from tests.coreharness import deep_core

WORDS = [b"service", b"operation", b"shape", b"member", b"documentation", b"input", b"output"]


def _text(rng: random.Random, size: int) -> bytes:
    return b" ".join(rng.choice(WORDS) for _ in range(size // 7))[:size]


def wheel_like(path: Path, members: int = 16, seed: int = 1, big_gz: int = 0) -> Path:
    """A zip like a botocore wheel: text members and ``.json.gz`` members (a
    gzip file deflated again), deflated at zipfile's level; with ``big_gz``
    bytes of text in one more ``.gz`` member (large enough to be a SPLIT)."""
    rng = random.Random(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for number in range(members):
            text = _text(rng, 6000 + 500 * number)
            if number % 3 == 0:
                archive.writestr(f"data/m{number}.json.gz", gzip.compress(text, 9, mtime=number))
            else:
                archive.writestr(f"pkg/m{number}.py", text)
        if big_gz:
            archive.writestr("data/big.gz", gzip.compress(_text(rng, big_gz), 9, mtime=7))
    return path


@pytest.fixture(autouse=True)
def no_verdicts() -> Iterator[None]:
    VERIFIED_SPANS.clear()
    yield
    VERIFIED_SPANS.clear()


def form_of(
    src: Path, tmp_path: Path, spare_core: Callable[[], Callable[[], None] | None] | None = None
) -> bytes:
    out = tmp_path / f"{src.name}.form"
    dgfs.deep.expand_file(src, out, scratch_dir=tmp_path, spare_core=spare_core)
    return out.read_bytes()


def unknown(src: Path) -> list[int]:
    """Where the deflated members of the zip ``src`` with no verdict yet start."""
    with open(src, "rb") as f:
        members = deflated_members(f, 0, src.stat().st_size, Budget(ExpansionLimits(), 0))
        return [m.start for m in members if not remembered(f, m.start, m.size)]


def searched_ahead(src: Path, scratch: Path, limits: ExpansionLimits | None = None) -> list[int]:
    """Run a search ahead of ``src`` alone (no walk) to its end; returns how
    often it gave its core back."""
    assert len(unknown(src)) >= ahead_module.MIN_MEMBERS
    given: list[str] = []
    budget = (limits or ExpansionLimits(), src.stat().st_size)
    span = (0, src.stat().st_size)
    search = SearchAhead(src, span, _Expander, scratch, budget, Loaned(given))
    assert search.finished.wait(60)
    search.stop()
    return given


@pytest.fixture
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small zips searched ahead too (the tests' zips are small)."""
    monkeypatch.setattr("dgfs.deep.expand.MIN_SIZE", 0)


def test_verdicts_searched_ahead_are_what_the_walk_writes_from(tmp_path: Path) -> None:
    src = wheel_like(tmp_path / "w.whl")
    alone = form_of(src, tmp_path)
    VERIFIED_SPANS.clear()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert searched_ahead(src, scratch) == ["back"]
    assert list(scratch.iterdir()) == []  # its throwaway form is gone
    assert unknown(src) == []  # every member has its verdict
    stats_form = tmp_path / "again.form"
    stats = dgfs.deep.expand_file(src, stats_form, scratch_dir=tmp_path)
    assert stats_form.read_bytes() == alone
    assert stats.streams_remembered >= 16  # the walk searched nothing itself


def test_a_large_nested_gzip_is_left_to_the_walk(tmp_path: Path) -> None:
    """A gzip stream large enough for a SPLIT segment is proven by writing it:
    a search ahead leaves it without a verdict, so the walk still splits it."""
    src = wheel_like(tmp_path / "w.whl", members=6, big_gz=10 << 20)
    alone = form_of(src, tmp_path)
    assert bytes((TAG_SPLIT,)) in alone
    VERIFIED_SPANS.clear()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert searched_ahead(src, scratch) == ["back"]
    assert form_of(src, tmp_path) == alone


def test_walk_and_search_ahead_together_write_the_same_form(tmp_path: Path, any_size: None) -> None:
    src = wheel_like(tmp_path / "w.whl", members=40)
    alone = form_of(src, tmp_path)
    for _ in range(3):  # whoever gets to a member first
        VERIFIED_SPANS.clear()
        lender = Lender()
        assert form_of(src, tmp_path, lender) == alone
        assert lender.log == ["lent", "back"]
    digest, _ = dgfs.deep.rebuild_file(tmp_path / "w.whl.form", tmp_path / "out", tmp_path, 2)
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()


@pytest.mark.parametrize("lends", [False, True], ids=["no-core", "small-zip"])
def test_no_search_ahead_without_a_core_or_for_a_small_zip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lends: bool
) -> None:
    src = wheel_like(tmp_path / "w.whl")
    assert src.stat().st_size < ahead_module.MIN_SIZE
    alone = form_of(src, tmp_path)
    VERIFIED_SPANS.clear()
    if not lends:
        monkeypatch.setattr("dgfs.deep.expand.MIN_SIZE", 0)

    def refused(*_args: object) -> None:
        raise AssertionError("searched ahead")

    monkeypatch.setattr("dgfs.deep.expand.SearchAhead", refused)
    lender = Lender()
    assert form_of(src, tmp_path, lender if lends else lambda: None) == alone
    assert lender.log == []  # a small zip does not even ask for a core


def test_a_search_ahead_past_its_limits_stops_and_gives_its_core_back(tmp_path: Path) -> None:
    src = wheel_like(tmp_path / "w.whl")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # 16 local headers listed, then 3 members searched: the rest is the walk's.
    assert searched_ahead(src, scratch, ExpansionLimits(members=19)) == ["back"]
    assert list(scratch.iterdir()) == []
    assert 0 < len(unknown(src)) < 16  # three members searched, the rest left to the walk


def test_the_search_ahead_ends_where_the_walk_is(tmp_path: Path) -> None:
    src = wheel_like(tmp_path / "w.whl", members=12)
    with open(src, "rb") as f:
        members = deflated_members(f, 0, src.stat().st_size, Budget(ExpansionLimits(), 0))
    ready = threading.Event()
    searched: list[int] = []
    holder: list[SearchAhead] = []

    class Walked:
        """An expander whose first search finds the walk caught up with it."""

        ahead = False

        def __init__(self, *_args: object) -> None:
            pass

        def deflate(self, _src: object, start: int, *_args: object) -> tuple[DeflateMatch, bool]:
            ready.wait(10)
            searched.append(start)
            holder[0].search.walked = members[-2].index  # the walk is at the member before
            return DeflateMatch(members[-1].size, 1, None), True

    given: list[str] = []
    budget = (ExpansionLimits(), src.stat().st_size)
    span = (0, src.stat().st_size)
    holder.append(SearchAhead(src, span, Walked, tmp_path, budget, Loaned(given)))
    ready.set()
    assert holder[0].finished.wait(10)
    holder[0].stop()
    assert searched == [members[-1].start] and given == ["back"]


def expand_into(forms: dict[str, bytes], src: Path, out: Path) -> None:
    """``src``'s form, made with no core to lend, in ``forms`` under ``out``'s name."""
    dgfs.deep.expand_file(src, out, scratch_dir=out.parent, spare_core=lambda: None)
    forms[out.name] = out.read_bytes()


def test_two_releases_expanded_at_once_search_from_both_ends(
    tmp_path: Path, any_size: None
) -> None:
    """With no core to lend, an expansion waiting for a verdict the other
    one is finding searches its own zip from the back meanwhile: both forms
    are still the ones each expansion writes alone."""
    first = wheel_like(tmp_path / "a.whl", members=60)
    second = wheel_like(tmp_path / "b.whl", members=60)  # the same members, the same streams
    alone = {f"{src.name}.f": form_of(src, tmp_path) for src in (first, second)}
    for _ in range(3):
        VERIFIED_SPANS.clear()
        forms: dict[str, bytes] = {}
        threads = [
            threading.Thread(target=expand_into, args=(forms, src, tmp_path / f"{src.name}.f"))
            for src in (first, second)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert forms == alone


def test_a_stopped_search_ahead_runs_out_of_budget() -> None:
    stopped = threading.Event()
    budget = _StoppableBudget(ExpansionLimits(), 1000, stopped)
    budget.check_time()
    stopped.set()
    with pytest.raises(ExpansionLimit, match="walk left the zip"):
        budget.member()
    with pytest.raises(ExpansionLimit, match="walk left the zip"):
        budget.stream()(10)


# --- the core a search ahead borrows ------------------------------------------------------


def bench(tmp_path: Path, tokens: int) -> Workbench:
    core, cache = deep_core(MemoryStore(), tmp_path)
    cache.close()
    return Workbench(
        MemoryStore(),
        scratch_dir=tmp_path / "bench",
        cache=cache,
        engine=core.bench.engine,
        limits=ExpansionLimits(),
        cpu_limiter=trio.CapacityLimiter(tokens),
    )


def test_a_spare_core_is_a_cpu_token_given_back_from_any_thread(tmp_path: Path) -> None:
    workbench = bench(tmp_path, 2)

    def borrow() -> tuple[Loan | None, int]:
        loan = workbench.spare_core()
        return loan, trio.from_thread.run_sync(lambda: workbench.cpu_limiter.borrowed_tokens)

    async def main() -> None:
        loan, borrowed = await workbench.cpu(borrow)
        assert loan is not None and borrowed == 2  # the job's token and the lent one
        assert workbench.cpu_limiter.borrowed_tokens == 1
        thread = threading.Thread(target=loan.give_back)
        await trio.to_thread.run_sync(lambda: (thread.start(), thread.join()))
        assert workbench.cpu_limiter.borrowed_tokens == 0
        assert workbench.spare_core() is None  # not from a worker thread

    trio.run(main)


def test_a_lent_core_is_wanted_once_a_job_waits_for_one(tmp_path: Path) -> None:
    """The search ahead yields its core to the next job that asks for one
    (the next release's expansion, stored beside the first)."""
    workbench = bench(tmp_path, 2)

    async def main() -> None:
        lent = trio.Event()
        wanted: list[bool] = []
        release = threading.Event()

        def lender_job() -> None:
            loan = workbench.spare_core()
            assert loan is not None
            wanted.append(loan.wanted())  # the lender's own job and the loan: no one waits
            trio.from_thread.run_sync(lent.set)
            release.wait(10)
            wanted.append(loan.wanted())
            loan.give_back()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(workbench.cpu, lender_job)
            await lent.wait()
            nursery.start_soon(workbench.cpu, lambda: None)  # waits: both tokens are taken
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert wanted == [False, True]
        assert workbench.cpu_limiter.borrowed_tokens == 0 and workbench.cores_lent == 0

    trio.run(main)


def test_no_core_is_lent_while_every_token_is_taken_or_awaited(tmp_path: Path) -> None:
    workbench = bench(tmp_path, 2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            held = trio.Event()
            release = threading.Event()

            def hold() -> None:
                trio.from_thread.run_sync(held.set)
                release.wait()

            nursery.start_soon(workbench.cpu, hold)
            await held.wait()
            assert await workbench.cpu(workbench.spare_core) is None  # 2 taken: the holder's, ours
            release.set()

    trio.run(main)


async def test_a_deep_store_searches_ahead_and_returns_every_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, any_size: None
) -> None:
    src = wheel_like(tmp_path / "w.whl", members=40)
    started: list[SearchAhead] = []
    real = ahead_module.SearchAhead

    def counted(*args: object) -> SearchAhead:
        started.append(real(*args))  # type: ignore[arg-type]
        return started[-1]

    monkeypatch.setattr("dgfs.deep.expand.SearchAhead", counted)
    store = MemoryStore()
    core, cache = deep_core(store, tmp_path / "a")
    later = wheel_like(tmp_path / "w2.whl", members=40, seed=2)
    try:
        await core.put(src, "rel/w.whl")
        assert core.bench.cpu_limiter.borrowed_tokens == 0
        assert len(started) == 1
        await core.put(later, "rel/w2.whl")  # a later release: no core lent
        assert len(started) == 1
    finally:
        await core.aclose()
        cache.close()
    reader, cache = deep_core(store, tmp_path / "b")
    try:
        for path in (src, later):
            await reader.get(f"rel/{path.name}", tmp_path / "got")
            assert (tmp_path / "got").read_bytes() == path.read_bytes()
    finally:
        await reader.aclose()
        cache.close()


# --- what a waiting thread does meanwhile (Memo.computing) --------------------------------


def owned_entry(memo: Memo) -> tuple[threading.Thread, threading.Event]:
    """A thread computing ``memo``'s entry ``b"k"`` (claimed once this returns),
    which puts ``"value"`` once the event returned is set."""
    claimed, release = threading.Event(), threading.Event()

    def owner() -> None:
        with memo.computing(b"k") as known:
            assert known is None
            claimed.set()
            release.wait(10)
            memo.put(b"k", "value", 10)

    thread = threading.Thread(target=owner)
    thread.start()
    assert claimed.wait(10)
    return thread, release


def test_a_thread_waiting_for_a_memo_entry_works_meanwhile() -> None:
    memo = Memo(1 << 20)
    thread, release = owned_entry(memo)
    calls: list[int] = []

    def meanwhile() -> bool:
        calls.append(1)
        if len(calls) == 3:
            release.set()  # the owner may finish now
        return len(calls) < 5

    with memo.computing(b"k", 10, meanwhile) as known:
        assert known == "value"
    thread.join()
    assert 3 <= len(calls) <= 5


def test_a_thread_with_nothing_to_do_meanwhile_just_waits() -> None:
    memo = Memo(1 << 20)
    thread, release = owned_entry(memo)
    calls: list[int] = []

    def meanwhile() -> bool:
        calls.append(1)
        release.set()
        return False

    with memo.computing(b"k", 10, meanwhile) as known:
        assert known == "value"
    thread.join()
    assert calls == [1]


def test_members_expanded_ahead_are_spliced_into_the_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, any_size: None
) -> None:
    """A search ahead that is done before the walk starts leaves every member's
    segment ready: the walk copies them all, and writes the same form."""
    src = wheel_like(tmp_path / "w.whl", members=40)
    alone = form_of(src, tmp_path)
    VERIFIED_SPANS.clear()

    spliced = count_splices(monkeypatch)
    form = tmp_path / "spliced.form"
    stats = dgfs.deep.expand_file(src, form, scratch_dir=tmp_path, spare_core=Lender())
    assert form.read_bytes() == alone
    assert spliced == [True] * 40  # every deflated member, none expanded again
    assert stats.streams_inflated == 40 + 14  # the members and the 14 gzip files in them
    assert dgfs.deep.prove_form(form, src, stats.proven, stats.leaves)
    digest, _ = dgfs.deep.rebuild_file(form, tmp_path / "out", tmp_path, 2)
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
