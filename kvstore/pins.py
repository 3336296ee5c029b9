"""Pins: leases that keep chunks from eviction and expire on their own.

A leaked pin (a client that pinned and died) must not hold memory forever,
so every pin is a lease with a TTL.  Expiry uses the monotonic clock: a
wall-clock jump (NTP step, a changed time zone, a VM resumed from a
snapshot) neither ends a lease early nor extends it.

Expired leases count as unpinned at once and are purged lazily: when looked
at, and in bulk from a heap of expiry times whenever the table is listed or
counted, so that dead leases cost O(log n) each and never a full scan.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from kvstore.errors import InvalidArgument

#: The longest lease: long enough for any job, short enough that a leak ends.
MAX_TTL_S = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Lease:
    """A live pin: ``key`` is kept until ``expires_at`` on the table's monotonic clock."""

    key: Hashable
    expires_at: float


class PinTable:
    """Pinned keys and when their leases end.

    Keys are normally :class:`~kvstore.keys.ChunkKey`; any hashable works.
    One lease per key: pins by several clients of the same key share it, so a
    re-pin only ever extends it and ``unpin`` ends it for all.  Not thread
    safe: the store calls it from its event loop.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_ttl_s: float = MAX_TTL_S) -> None:
        if not (isinstance(max_ttl_s, int | float) and math.isfinite(max_ttl_s) and max_ttl_s > 0):
            raise InvalidArgument(f"max_ttl_s must be a positive finite number of seconds, got {max_ttl_s!r}")
        self._clock = clock
        self._max_ttl_s = float(max_ttl_s)
        self._until: dict[Hashable, float] = {}
        # (expiry, tie-breaker, key), possibly stale after a re-pin or unpin;
        # the counter keeps keys, which need not be orderable, out of comparisons.
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()

    def pin(self, key: Hashable, ttl_s: float) -> Lease:
        """Pin ``key`` for ``ttl_s`` seconds from now.

        A key already pinned keeps the later of its current expiry and the new
        one: a short re-pin by one client must not cut another's lease short.
        Raises :class:`InvalidArgument` unless ``ttl_s`` is a finite number of
        seconds in (0, max_ttl_s].
        """
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not math.isfinite(ttl_s):
            raise InvalidArgument(f"ttl_s must be a finite number of seconds, got {ttl_s!r}")
        if not 0 < ttl_s <= self._max_ttl_s:
            raise InvalidArgument(f"ttl_s must be in (0, {self._max_ttl_s:g}] seconds, got {ttl_s!r}")
        now = self._clock()
        until = now + float(ttl_s)
        current = self._until.get(key)
        if current is not None and current > until:
            return Lease(key, current)
        self._until[key] = until
        heapq.heappush(self._heap, (until, next(self._seq), key))
        self._compact()
        return Lease(key, until)

    def unpin(self, key: Hashable) -> bool:
        """End ``key``'s lease now; True if it had a live one."""
        until = self._until.pop(key, None)
        self._compact()
        return until is not None and until > self._clock()

    def is_pinned(self, key: Hashable) -> bool:
        """Whether ``key`` has a live lease (an expired one is dropped here)."""
        until = self._until.get(key)
        if until is None:
            return False
        if until > self._clock():
            return True
        del self._until[key]
        return False

    def remaining(self, key: Hashable) -> float:
        """Seconds left on ``key``'s lease (0 when not pinned)."""
        until = self._until.get(key)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left > 0:
            return left
        del self._until[key]
        return 0.0

    def pinned(self) -> list[tuple[Hashable, float]]:
        """Every live lease as (key, remaining seconds)."""
        self.purge()
        now = self._clock()
        return [(k, until - now) for k, until in self._until.items() if until > now]

    def purge(self) -> int:
        """Drop every expired lease now; returns how many were dropped."""
        now = self._clock()
        heap = self._heap
        dropped = 0
        while heap and heap[0][0] <= now:
            until, _, key = heapq.heappop(heap)
            # Stale entries (re-pinned later, unpinned, already dropped) do not match.
            if self._until.get(key) == until:
                del self._until[key]
                dropped += 1
        return dropped

    def __len__(self) -> int:
        """The number of live leases."""
        self.purge()
        return len(self._until)

    def _compact(self) -> None:
        # Re-pins and unpins leave stale heap entries behind; rebuild once they
        # outnumber the live ones, which keeps the heap O(live) at O(1) amortized.
        if len(self._heap) > 2 * len(self._until) + 64:
            self._heap = [(until, next(self._seq), k) for k, until in self._until.items()]
            heapq.heapify(self._heap)

