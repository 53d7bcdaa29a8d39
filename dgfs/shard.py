"""Splitting bulk work (``migrate``, ``verify --all``) across workers by directory.

What a caller may rely on:

- ``Shard(k, n)`` owns the deltaspaces (directories: ``format.split_key(key)[0]``)
  whose name's SHA-256, its first 8 bytes read as a big-endian integer,
  is ``k - 1`` modulo ``n``. The rule depends on nothing but the
  directory's full key in the bucket and ``n``, so every machine and every
  dgfs version puts a directory in the same shard: the ``n`` shards
  together cover every file exactly once, and all the files of a
  directory (and its reference) fall in one shard.
- A directory is the unit: a bucket with one big directory is not split.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from dgfs import format as fmt
from dgfs.errors import ConfigError

_SHARD_RE = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*", re.ASCII)


def space_hash(space: str) -> int:
    """The stable number a directory is sharded by (first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(space.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class Shard:
    """Worker ``index`` of ``count`` (1-based, as ``--shard K/N`` spells it)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"bad --shard {self}: N (the number of workers) must be at least 1")
        if not 1 <= self.index <= self.count:
            raise ConfigError(
                f"bad --shard {self}: K must be between 1 and N "
                f"(the {self.count} workers are 1/{self.count} ... {self.count}/{self.count})"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"2/3"`` -> ``Shard(2, 3)``; ``ConfigError`` with a one-line reason otherwise."""
        match = _SHARD_RE.fullmatch(text)
        if match is None:
            raise ConfigError(
                f"bad --shard {text!r}: give K/N, this worker's number K of N workers, "
                "e.g. --shard 1/4"
            )
        return cls(int(match[1]), int(match[2]))

    def owns_space(self, space: str) -> bool:
        """Whether the directory ``space`` (a deltaspace prefix, "" = bucket root) is ours."""
        return space_hash(space) % self.count == self.index - 1

    def owns(self, key: str) -> bool:
        """Whether the object or visible file ``key`` is ours (by its directory)."""
        return self.owns_space(fmt.split_key(key)[0])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def owned(shard: Shard | None, key: str) -> bool:
    """``shard.owns(key)``, and True for every key when there is no shard (one worker)."""
    return shard is None or shard.owns(key)


def label(shard: Shard | None) -> str | None:
    """``"K/N"`` for JSON output; None for an unsharded run."""
    return None if shard is None else str(shard)


def suffix(shard: Shard | None) -> str:
    """``" (shard K/N)"`` to append to a heading or progress label; "" for one worker."""
    return "" if shard is None else f" (shard {shard})"
