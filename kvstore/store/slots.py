"""The store's bookkeeping of one tier (:class:`Slot`), write-through jobs and per-key locks."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvstore.eviction import EvictionPolicy
from kvstore.keys import ChunkKey, Namespace
from kvstore.store.results import NamespaceMoves, SlotCounters
from kvstore.store.settings import TierSettings
from kvstore.tiers.base import Tier

@dataclass(slots=True)
class Job:
    key: ChunkKey
    done: asyncio.Future[None] | None


@dataclass(eq=False)
class Slot:
    index: int
    tier: Tier
    settings: TierSettings
    policy: EvictionPolicy
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sizes: dict[ChunkKey, int] = field(default_factory=dict)
    #: checksum of what the tier holds per key (None when unknown, e.g. after a restart).
    sums: dict[ChunkKey, int | None] = field(default_factory=dict)
    ns_bytes: dict[Namespace, int] = field(default_factory=lambda: defaultdict(int))
    ns_chunks: dict[Namespace, int] = field(default_factory=lambda: defaultdict(int))
    counters: SlotCounters = field(default_factory=SlotCounters)
    queue: asyncio.Queue[Job] | None = None
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    #: Capacity set at run time (admin SetPolicy), at most the tier's own; None = the tier's.
    limit: int | None = None
    ns_moves: dict[Namespace, NamespaceMoves] = field(default_factory=lambda: defaultdict(NamespaceMoves))

    def track(self, key: ChunkKey, nbytes: int, checksum: int | None = None) -> None:
        old = self.sizes.get(key)
        if old is not None:
            self.ns_bytes[key.namespace] -= old
            self.ns_chunks[key.namespace] -= 1
            self.policy.access(key)
        else:
            self.policy.insert(key, nbytes)
        self.sizes[key] = nbytes
        self.sums[key] = checksum
        self.ns_bytes[key.namespace] += nbytes
        self.ns_chunks[key.namespace] += 1

    def holds(self, key: ChunkKey, checksum: int) -> bool:
        """Whether the tier already holds exactly this value (same checksum)."""
        return self.sums.get(key) == checksum

    def untrack(self, key: ChunkKey) -> None:
        old = self.sizes.pop(key, None)
        if old is None:
            return
        del self.sums[key]
        self.policy.remove(key)
        ns = key.namespace
        self.ns_bytes[ns] -= old
        self.ns_chunks[ns] -= 1
        if self.ns_chunks[ns] == 0:
            del self.ns_bytes[ns], self.ns_chunks[ns]


class KeyLocks:
    """Per-key asyncio locks, created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._locks: dict[ChunkKey, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: ChunkKey) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock2, users2 = self._locks[key]
            if users2 == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock2, users2 - 1)
