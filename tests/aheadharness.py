"""What the tests of the search ahead (``dgfs.deep.ahead``) share: a
``spare_core`` that always lends, and a search ahead done before the walk."""

from __future__ import annotations

from typing import Any

import pytest

from dgfs.deep import ahead
from dgfs.deep.ahead import SearchAhead


class Loaned:
    """A core lent (``dgfs.deep.ahead.Loan``) that nothing else wants; says
    in ``log`` when it came back."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def wanted(self) -> bool:
        return False

    def give_back(self) -> None:
        self.log.append("back")


class Lender:
    """A ``spare_core`` that always lends, and says when its cores came back."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def __call__(self) -> Loaned:
        self.log.append("lent")
        return Loaned(self.log)


class DoneFirst(SearchAhead):
    """The search ahead runs to its end before the walk reads its first local
    header: a legal interleaving, forced so that a test is deterministic."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        assert self.finished.wait(60)


def count_splices(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """A search ahead done before the walk, and what each ``BackSearch.splice``
    the walk then asks for returns, in order."""
    spliced: list[bool] = []
    real_splice = ahead.BackSearch.splice

    def counted(self: ahead.BackSearch, *args: Any) -> bool:
        spliced.append(real_splice(self, *args))
        return spliced[-1]

    monkeypatch.setattr("dgfs.deep.expand.SearchAhead", DoneFirst)
    monkeypatch.setattr(ahead.BackSearch, "splice", counted)
    return spliced
