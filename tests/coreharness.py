"""A ``Core`` for tests, over any store, and what they do to stored objects."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dgfs.cache import ContentCache
from dgfs.core import Core
from dgfs.deep import ExpansionLimits
from dgfs.delta import DeltaEngine
from dgfs.format import DeltaMode
from dgfs.policy import Policy
from dgfs.store.base import ObjectStore
from dgfs.store.memory import MemoryStore


def make_core(
    store: ObjectStore, root: Path, deltas: DeltaMode = DeltaMode.DG, **policy: object
) -> tuple[Core, ContentCache]:
    """A core over ``store``, new deltaspaces in mode ``deltas``, files from
    1 KiB stored as deltas; its cache and scratch under ``root``, one pair
    per mode (a DG and a deep core may share a root)."""
    cache = ContentCache(root / f"cache-{deltas.value}", 1 << 30)
    pol = Policy(min_delta_size=1024, **policy)  # type: ignore[arg-type]
    scratch = root / f"scratch-{deltas.value}"
    return Core(store, cache, DeltaEngine(), pol, scratch_dir=scratch, deltas=deltas), cache


def deep_core(
    store: ObjectStore, root: Path, *, deltas: DeltaMode = DeltaMode.DEEP, **limits: object
) -> tuple[Core, ContentCache]:
    """A core making new directories deep (or in mode ``deltas``), under the
    expansion ``limits`` given (the rest by default), files from 1 KiB
    stored as deltas; its cache and scratch under ``root``."""
    cache = ContentCache(root / "cache", 1 << 30)
    core = Core(
        store,
        cache,
        DeltaEngine(),
        Policy(min_delta_size=1024),
        scratch_dir=root / "scratch",
        deltas=deltas,
        limits=ExpansionLimits(**limits),  # type: ignore[arg-type]
    )
    return core, cache


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def flip_byte(store: MemoryStore, key: str, where: Callable[[bytes], int]) -> None:
    """Corrupt one byte of a stored object behind the store's back."""
    obj = store.objects[key]
    body = bytearray(obj.body)
    body[where(obj.body)] ^= 0xFF
    store.objects[key] = dataclasses.replace(obj, body=bytes(body))


class Clock:
    """A store clock that moves only when told (``MemoryStore(clock=...)``):
    objects written between two ticks share their Last-Modified second."""

    def __init__(self) -> None:
        self.now = datetime(2024, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float = 5) -> None:
        self.now += timedelta(seconds=seconds)
