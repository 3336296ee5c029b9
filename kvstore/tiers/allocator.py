"""Best-fit free-list allocator over one fixed byte range.

Pure bookkeeping (offsets and sizes, no memory): the memory tiers use it to
place chunks inside one arena allocated up front, so a put never allocates and
the tier never grows past its capacity.  Free blocks are kept sorted by offset
and coalesced with their neighbours on free, so fragmentation stays bounded by
the live allocations' layout; when no free block is large enough the store
evicts and retries.
"""

from __future__ import annotations

import bisect

from kvstore.errors import InvalidArgument


class FreeListAllocator:
    """Allocates aligned ``[offset, offset + size)`` ranges within ``[0, capacity)``."""

    def __init__(self, capacity: int, align: int = 256) -> None:
        if align <= 0 or align & (align - 1):
            raise InvalidArgument(f"align must be a power of two, got {align}")
        if capacity < 0:
            raise InvalidArgument(f"capacity must be >= 0, got {capacity}")
        self.align = align
        self.capacity = capacity - capacity % align
        # Parallel sorted lists: start offsets and sizes of free blocks.
        self._starts: list[int] = [0] if self.capacity else []
        self._sizes: list[int] = [self.capacity] if self.capacity else []
        self._live: dict[int, int] = {}
        self.used = 0

    def round(self, size: int) -> int:
        return max(self.align, (size + self.align - 1) & ~(self.align - 1))

    @property
    def largest_free(self) -> int:
        return max(self._sizes, default=0)

    @property
    def free_blocks(self) -> int:
        return len(self._starts)

    def fits(self, size: int) -> bool:
        return self.round(size) <= self.largest_free

    def alloc(self, size: int) -> int | None:
        """Offset of a new block of at least ``size`` bytes, or None if none fits."""
        need = self.round(size)
        best = -1
        best_size = 0
        for i, s in enumerate(self._sizes):
            if s >= need and (best < 0 or s < best_size):
                best, best_size = i, s
                if s == need:
                    break
        if best < 0:
            return None
        off = self._starts[best]
        if best_size == need:
            del self._starts[best]
            del self._sizes[best]
        else:
            self._starts[best] = off + need
            self._sizes[best] = best_size - need
        self._live[off] = need
        self.used += need
        return off

    def free(self, off: int) -> int:
        """Return the block at ``off`` to the free list; returns its size."""
        size = freed = self._live.pop(off)
        self.used -= size
        i = bisect.bisect_left(self._starts, off)
        # Coalesce with the following block, then with the preceding one.
        if i < len(self._starts) and off + size == self._starts[i]:
            size += self._sizes[i]
            del self._starts[i]
            del self._sizes[i]
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == off:
            self._sizes[i - 1] += size
        else:
            self._starts.insert(i, off)
            self._sizes.insert(i, size)
        return freed

    def size_of(self, off: int) -> int:
        return self._live[off]
