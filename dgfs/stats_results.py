"""What a ``dgfs stats`` run reports: the result records and their JSON form.

``SpaceStats`` (one directory), ``ModeStats`` (the deltas of one delta mode),
``Orphan`` and ``BucketStats`` (the totals, with the others), their derived
figures (savings, ratios, orphaned references), and their JSON form: the
``--json`` output, the cache's ``dgfs`` section (``to_json``/``from_json``)
and DeltaGlider's ``BucketStats`` fields (``deltaglider_stats``). No I/O and
no counting: how the numbers are computed, and the counting rules they
follow, are ``dgfs.stats``'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dgfs import format as fmt
from dgfs import gc
from dgfs.format import DeltaMode
from dgfs.stats_cache import Mode

MODES: tuple[Mode, ...] = ("quick", "sampled", "detailed")


class _Savings:
    """``saved_bytes`` and ``ratio`` of anything with original and stored bytes."""

    if TYPE_CHECKING:

        @property
        def original_bytes(self) -> int: ...

        @property
        def stored_bytes(self) -> int: ...

    @property
    def saved_bytes(self) -> int:
        return self.original_bytes - self.stored_bytes

    @property
    def ratio(self) -> float:
        """stored / original (1.0 when nothing is stored)."""
        return self.stored_bytes / self.original_bytes if self.original_bytes else 1.0


@dataclass
class SpaceStats(_Savings):
    """One directory (deltaspace) of the bucket."""

    prefix: str
    delta_count: int = 0
    direct_count: int | None = 0
    foreign_count: int | None = 0
    plain_count: int = 0  # direct + foreign
    original_bytes: int = 0
    stored_bytes: int = 0  # includes the references
    reference_bytes: int = 0  # both references when both are there
    has_reference: bool = False  # either reference
    estimated: bool = False
    dg_reference: bool = False  # reference.bin is there
    deep_reference: bool = False  # reference.deep is there
    deep_reference_bytes: int = 0
    delta_bytes: int = 0  # stored bytes of the deltas (either mode)
    delta_original_bytes: int = 0
    deep_delta_count: int = 0
    deep_delta_bytes: int = 0
    deep_original_bytes: int = 0
    hidden_forms: int = 0  # older forms of files shown in their other form
    hidden_bytes: int = 0  # their stored bytes (in stored_bytes)
    hidden_dg_deltas: int = 0  # hidden forms that are deltas, by mode (they need
    hidden_deep_deltas: int = 0  # their reference: no orphan while they are there)

    @property
    def file_count(self) -> int:
        return self.delta_count + self.plain_count

    @property
    def mode(self) -> str | None:
        """``dg``, ``deep``, ``dg+deep`` (both references), or None (no reference)."""
        modes = [DeltaMode.DG.value] if self.dg_reference else []
        modes += [DeltaMode.DEEP.value] if self.deep_reference else []
        return "+".join(modes) or None

    def orphaned_references(self) -> list[str]:
        """Names of the references here that no delta needs."""
        references = {DeltaMode.DG} if self.dg_reference else set()
        references |= {DeltaMode.DEEP} if self.deep_reference else set()
        dg_deltas = self.delta_count - self.deep_delta_count + self.hidden_dg_deltas
        modes = {DeltaMode.DG} if dg_deltas else set()
        modes |= {DeltaMode.DEEP} if self.deep_delta_count + self.hidden_deep_deltas else set()
        unneeded = gc.unneeded_references(references, modes)
        return [name for name in fmt.REFERENCE_NAMES if fmt.reference_mode(name) in unneeded]

    @property
    def orphaned(self) -> bool:
        return bool(self.orphaned_references())


@dataclass(frozen=True)
class Orphan:
    key: str
    size: int


@dataclass
class ModeStats(_Savings):
    """The delta-compressed part of a bucket in one mode (DeltaGlider v6 or deep)."""

    spaces: int = 0  # directories holding this mode's reference
    reference_bytes: int = 0
    delta_count: int = 0
    delta_bytes: int = 0  # the deltas' stored bytes
    original_bytes: int = 0  # the deltas' original bytes (estimated unless detailed)

    @property
    def stored_bytes(self) -> int:
        return self.reference_bytes + self.delta_bytes

    def add_space(self, space: SpaceStats, deep: bool) -> None:
        there = space.deep_reference if deep else space.dg_reference
        self.spaces += int(there)
        if deep:
            self.reference_bytes += space.deep_reference_bytes
            self.delta_count += space.deep_delta_count
            self.delta_bytes += space.deep_delta_bytes
            self.original_bytes += space.deep_original_bytes
        else:
            self.reference_bytes += space.reference_bytes - space.deep_reference_bytes
            self.delta_count += space.delta_count - space.deep_delta_count
            self.delta_bytes += space.delta_bytes - space.deep_delta_bytes
            self.original_bytes += space.delta_original_bytes - space.deep_original_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "stored_bytes": self.stored_bytes,
            "saved_bytes": self.saved_bytes,
            "ratio": round(self.ratio, 6),
        }


@dataclass
class BucketStats(_Savings):
    """Totals for ``bucket``/``prefix`` in one mode; counted as ``dgfs.stats`` says."""

    bucket: str
    prefix: str
    mode: Mode
    file_count: int = 0
    delta_count: int = 0
    direct_count: int | None = 0  # None: not told apart from foreign (quick, sampled)
    foreign_count: int | None = 0
    plain_count: int = 0
    original_bytes: int = 0
    stored_bytes: int = 0
    reference_count: int = 0
    reference_bytes: int = 0
    hidden_forms: int = 0  # see SpaceStats
    hidden_bytes: int = 0
    estimated: bool = False
    spaces: list[SpaceStats] = field(default_factory=list)
    delta_modes: dict[str, ModeStats] = field(default_factory=dict)  # "dg", "deep"
    mixed_spaces: int = 0  # directories holding both references
    orphans: list[Orphan] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # objects with broken metadata
    computed_at: str = ""
    from_cache: bool = False

    @property
    def saved_fraction(self) -> float:
        """Share of the original bytes saved, clamped to [0, 1] (DeltaGlider's "ratio")."""
        if not self.original_bytes:
            return 0.0
        return min(1.0, max(0.0, self.saved_bytes / self.original_bytes))

    @property
    def orphan_bytes(self) -> int:
        return sum(orphan.size for orphan in self.orphans)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``--json`` output and the cache's ``dgfs.stats``)."""
        data = asdict(self)
        data["saved_bytes"] = self.saved_bytes
        data["ratio"] = round(self.ratio, 6)
        data["saved_fraction"] = round(self.saved_fraction, 6)
        for space, raw in zip(self.spaces, data["spaces"], strict=True):
            raw["file_count"] = space.file_count
            raw["saved_bytes"] = space.saved_bytes
            raw["ratio"] = round(space.ratio, 6)
            raw["orphaned"] = space.orphaned
            raw["mode"] = space.mode
        data["delta_modes"] = {name: m.to_json() for name, m in self.delta_modes.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BucketStats:
        own = {name for name in cls.__dataclass_fields__}
        space_fields = set(SpaceStats.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in own}
        values["spaces"] = [
            SpaceStats(**{k: v for k, v in raw.items() if k in space_fields})
            for raw in data.get("spaces", [])
        ]
        mode_fields = set(ModeStats.__dataclass_fields__)
        values["delta_modes"] = {
            name: ModeStats(**{k: v for k, v in raw.items() if k in mode_fields})
            for name, raw in data.get("delta_modes", {}).items()
        }
        values["orphans"] = [Orphan(o["key"], o["size"]) for o in data.get("orphans", [])]
        if values.get("mode") not in MODES:
            raise ValueError(f"bad mode {values.get('mode')!r}")
        return cls(**values)

    def deltaglider_stats(self) -> dict[str, Any]:
        """These totals as DeltaGlider's ``BucketStats`` fields.

        DeltaGlider has no "foreign": every non-delta file is "direct".
        """
        return {
            "bucket": self.bucket,
            "object_count": self.file_count,
            "total_size": self.original_bytes,
            "compressed_size": self.stored_bytes,
            "space_saved": max(0, self.saved_bytes),
            "average_compression_ratio": self.saved_fraction,
            "delta_objects": self.delta_count,
            "direct_objects": self.plain_count,
            "object_limit_reached": False,
        }
