"""The whole-bucket stats cache's files: where they are, and their bytes.

``dgfs stats`` (dgfs/stats.py) keeps its results at
``.deltaglider/stats_{mode}.json`` in DeltaGlider's layout, so that
``deltaglider stats`` reads them, with a ``dgfs`` section holding the full
breakdown and the ``Fingerprint`` of the listing it was computed from.
Pure: no I/O; reading and writing them is ``dgfs.stats``'s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from dgfs import format as fmt
from dgfs.store.base import ObjectInfo

#: How thorough a ``dgfs stats`` run is; each mode has its cache file.
Mode = Literal["quick", "sampled", "detailed"]


class BucketStats(Protocol):
    """What the cache keeps of one run's results (``dgfs.stats_results.BucketStats``)."""

    @property
    def mode(self) -> Mode: ...

    @property
    def computed_at(self) -> str: ...

    def deltaglider_stats(self) -> dict[str, Any]: ...

    def to_json(self) -> dict[str, Any]: ...


# DeltaGlider's stats cache layout (deltaglider 6.x, client_operations/stats.py).
DG_CACHE_VERSION = "1.0"
DGFS_CACHE_FORMAT = 2  # 2: deltas by mode (deep deltaspaces)


def cache_key(mode: Mode) -> str:
    """Where the stats of ``mode`` are cached in the bucket."""
    return f"{fmt.INTERNAL_PREFIX}stats_{mode}.json"


@dataclass(frozen=True)
class Fingerprint:
    """What a LIST says about the bucket's content (internal objects excluded)."""

    object_count: int
    total_bytes: int
    digest: str

    @classmethod
    def of(cls, objects: Iterable[ObjectInfo]) -> Fingerprint:
        sha = hashlib.sha256()
        count = total = 0
        for obj in sorted(objects, key=lambda o: o.key):
            sha.update(f"{obj.key}\0{obj.size}\0{obj.etag.strip(chr(34))}\n".encode())
            count += 1
            total += obj.size
        return cls(count, total, sha.hexdigest())


def _cache_document(
    stats: BucketStats, fingerprint: Fingerprint, dg_count: int, dg_size: int
) -> dict[str, Any]:
    return {
        "version": DG_CACHE_VERSION,
        "mode": stats.mode,
        "computed_at": stats.computed_at,
        "validation": {"object_count": dg_count, "compressed_size": dg_size},
        "stats": stats.deltaglider_stats(),
        "dgfs": {
            "format": DGFS_CACHE_FORMAT,
            "validation": asdict(fingerprint),
            "stats": stats.to_json(),
        },
    }


def encode_caches(
    entries: Mapping[Mode, BucketStats], fingerprint: Fingerprint, listing: Iterable[ObjectInfo]
) -> dict[Mode, bytes]:
    """The cache files for ``entries`` (one per mode), valid for DeltaGlider too.

    DeltaGlider validates a cache by the count and total size of *every*
    object a LIST shows, cache files included; so each file states the
    sizes of all the files written together with it, its own included.
    Each JSON body is padded with trailing spaces to the size the others
    claim for it (a fixed point; JSON ignores trailing whitespace).
    ``listing`` is the bucket's LIST before the write.
    """
    keys = {cache_key(mode) for mode in entries}
    others = [o for o in listing if o.key not in keys]
    count = len(others) + len(entries)
    base = sum(o.size for o in others)
    claimed = dict.fromkeys(entries, 0)
    for _ in range(20):
        total = base + sum(claimed.values())
        bodies = {
            mode: json.dumps(_cache_document(stats, fingerprint, count, total), indent=2).encode()
            for mode, stats in entries.items()
        }
        if all(len(bodies[mode]) <= claimed[mode] for mode in entries):
            return {mode: body.ljust(claimed[mode]) for mode, body in bodies.items()}
        claimed = {mode: max(claimed[mode], len(bodies[mode])) for mode in entries}
    raise AssertionError("stats cache sizes did not settle")
