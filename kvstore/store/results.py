"""What the store reports: counters, statistics, lookup and eviction results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvstore.keys import ChunkKey
from kvstore.tiers.base import TierStats

@dataclass(slots=True)
class SlotCounters:
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    write_through: int = 0
    write_through_dropped: int = 0
    write_through_failed: int = 0
    bytes_evicted: int = 0


@dataclass(frozen=True, slots=True)
class NamespaceUsage:
    namespace: str
    tier: str
    bytes: int
    chunks: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    tiers: list[TierStats]
    slots: dict[str, SlotCounters]
    namespaces: list[NamespaceUsage]
    pins: int
    quotas: dict[str, int]


@dataclass(frozen=True, slots=True)
class LookupResult:
    """``count`` leading keys are present; ``tiers[i]`` names where key i is."""

    count: int
    tiers: list[str]


@dataclass(frozen=True, slots=True)
class Evicted:
    """One chunk an admin eviction removed from ``tier`` (``demoted_to``: None = dropped)."""

    key: ChunkKey
    tier: str
    nbytes: int
    demoted_to: str | None = None


MoveOutcome = Literal["moved", "already", "missing", "no_room"]


@dataclass(slots=True)
class NamespaceMoves:
    """Chunks of one namespace evicted from, promoted from and demoted from a tier."""

    evictions: int = 0
    promotions: int = 0
    demotions: int = 0
