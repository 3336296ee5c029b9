"""Least recently used: evict the chunk whose last access is oldest."""

from __future__ import annotations

from collections import OrderedDict

from kvstore.eviction.base import EvictionPolicy, Skip, never
from kvstore.keys import ChunkKey


class LRUPolicy(EvictionPolicy):
    """Recency order in one ``OrderedDict``: every operation is O(1).

    ``victim`` walks from the oldest entry and costs O(1 + skipped keys ahead
    of the victim).  Skipped keys keep their place: a chunk skipped because it
    is pinned, or because another namespace is over quota, was not used, so
    it must not look recent.
    """

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ChunkKey, None] = OrderedDict()  # oldest first

    def insert(self, key: ChunkKey, nbytes: int) -> None:
        """Add ``key`` as the most recent (an existing key is just accessed)."""
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: ChunkKey) -> None:
        """Make ``key`` the most recent; unknown keys are ignored."""
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: ChunkKey) -> None:
        """Forget ``key``; unknown keys are ignored."""
        self._order.pop(key, None)

    def victim(self, skip: Skip = never) -> ChunkKey | None:
        """The least recent key not skipped, or None if all are skipped."""
        for key in self._order:
            if not skip(key):
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order
