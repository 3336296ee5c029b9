"""S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023).

Scan-resistant eviction with three FIFO queues, sized in bytes:

* new chunks enter the *small* queue (about 10% of the resident bytes);
* when the small queue is over its share, its oldest chunk is examined: if it
  was accessed while there it moves to the *main* queue (its count cleared),
  otherwise it is the victim, and once removed its key is remembered in the
  *ghost* queue (keys only, about as many bytes as main);
* a chunk inserted while its key is a ghost goes straight to main: it was
  evicted too early once;
* main is a FIFO with lazy promotion: its oldest chunk, if accessed since it
  was last examined, goes back to the tail with its count (capped at 3)
  decremented, instead of being evicted.

A one-off long document passes through the small queue and out, without
displacing the reused prefixes that sit in main; under LRU it flushes them.

``victim`` moves chunks between and within queues while it searches (that is
the algorithm), but never removes a live one: the store calls ``remove``,
and only then does the key become a ghost.  A skipped (pinned, other
namespace's) chunk keeps its place and its count: it was not used, so it
earns nothing.  Each search is bounded: every pass over main either finds a
victim or decrements every count, and counts are capped.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from kvstore.errors import InvalidArgument
from kvstore.eviction.base import EvictionPolicy, Skip, never
from kvstore.keys import ChunkKey

_MAX_FREQ = 3  # two bits per chunk in the paper


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO over resident bytes; ``small_ratio`` and ``ghost_ratio`` as in the paper."""

    name = "s3fifo"

    def __init__(self, small_ratio: float = 0.1, ghost_ratio: float = 0.9) -> None:
        if not (isinstance(small_ratio, float | int) and 0 < small_ratio < 1):
            raise InvalidArgument(f"small_ratio must be in (0, 1), got {small_ratio!r}")
        if not (isinstance(ghost_ratio, float | int) and 0 <= ghost_ratio and math.isfinite(ghost_ratio)):
            raise InvalidArgument(f"ghost_ratio must be a finite number >= 0, got {ghost_ratio!r}")
        self._small_ratio = float(small_ratio)
        self._ghost_ratio = float(ghost_ratio)
        # key -> nbytes, oldest first
        self._small: OrderedDict[ChunkKey, int] = OrderedDict()
        self._main: OrderedDict[ChunkKey, int] = OrderedDict()
        self._ghost: OrderedDict[ChunkKey, int] = OrderedDict()
        self._freq: dict[ChunkKey, int] = {}  # resident keys only
        self._small_bytes = 0
        self._main_bytes = 0
        self._ghost_bytes = 0

    # -- the store's calls ----------------------------------------------------
    def insert(self, key: ChunkKey, nbytes: int) -> None:
        """Admit ``key`` to small, or to main if it is a ghost; an existing key is accessed."""
        if key in self._freq:
            self.access(key)
            return
        self._freq[key] = 0
        ghost = self._ghost.pop(key, None)
        if ghost is not None:
            self._ghost_bytes -= ghost
            self._main[key] = nbytes
            self._main_bytes += nbytes
        else:
            self._small[key] = nbytes
            self._small_bytes += nbytes

    def access(self, key: ChunkKey) -> None:
        """Count a hit (capped); no queue moves, which is what makes hits cheap."""
        f = self._freq.get(key)
        if f is not None and f < _MAX_FREQ:
            self._freq[key] = f + 1

    def remove(self, key: ChunkKey) -> None:
        """Forget ``key``; one that leaves from small is remembered as a ghost."""
        if self._freq.pop(key, None) is None:
            return
        n = self._small.pop(key, None)
        if n is not None:
            self._small_bytes -= n
            self._remember_ghost(key, n)
        else:
            self._main_bytes -= self._main.pop(key)

    def victim(self, skip: Skip = never) -> ChunkKey | None:
        """The next key S3-FIFO would evict among those not skipped, or None."""
        resident = self._small_bytes + self._main_bytes
        if self._small and self._small_bytes >= self._small_ratio * resident:
            found = self._victim_in_small(skip)
            return found if found is not None else self._victim_in_main(skip)
        found = self._victim_in_main(skip)
        return found if found is not None else self._victim_in_small(skip)

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    # -- internals --------------------------------------------------------------
    def _remember_ghost(self, key: ChunkKey, nbytes: int) -> None:
        self._ghost[key] = nbytes
        self._ghost_bytes += nbytes
        limit = self._ghost_ratio * (self._small_bytes + self._main_bytes)
        while self._ghost_bytes > limit and self._ghost:
            self._ghost_bytes -= self._ghost.popitem(last=False)[1]

    def _victim_in_small(self, skip: Skip) -> ChunkKey | None:
        found: ChunkKey | None = None
        promoted: list[ChunkKey] = []
        # The queue cannot change while it is iterated: collect, then move.
        for key in self._small:
            if skip(key):
                continue
            if self._freq[key] > 0:
                promoted.append(key)  # reused while in small: it earns a place in main
                continue
            found = key
            break
        for key in promoted:
            n = self._small.pop(key)
            self._small_bytes -= n
            self._main[key] = n
            self._main_bytes += n
            self._freq[key] = 0
        return found

    def _victim_in_main(self, skip: Skip) -> ChunkKey | None:
        for _ in range(_MAX_FREQ + 1):
            found: ChunkKey | None = None
            reinserted: list[ChunkKey] = []
            for key in self._main:
                if skip(key):
                    continue
                f = self._freq[key]
                if f == 0:
                    found = key
                    break
                self._freq[key] = f - 1
                reinserted.append(key)
            for key in reinserted:
                self._main.move_to_end(key)
            if found is not None or not reinserted:
                return found
        # Unreachable: after _MAX_FREQ + 1 passes every unskipped count is 0.
        return None
