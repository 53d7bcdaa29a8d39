"""``Closing``: the one way a dgfs object that has ``close()`` is a context manager."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with obj:`` yields ``obj`` and calls ``obj.close()`` on the way out,
    whether or not the block raised. Subclasses define ``close``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
