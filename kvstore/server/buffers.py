"""A pool of receive buffers for puts arriving over the byte stream.

A fresh 32 MiB bytearray costs page faults on first write (copying into
fresh pages runs at about a third of the speed of copying into mapped
ones), and a put's buffer is free again as soon as the store has copied it
into a tier.  Buffers are pooled by power-of-two size class, and the pool
keeps at most ``max_pooled`` bytes idle.
"""

from __future__ import annotations

from collections import defaultdict

MIN_CLASS = 1 << 20


class BufferPool:
    def __init__(self, max_pooled: int = 256 << 20) -> None:
        self._free: dict[int, list[bytearray]] = defaultdict(list)
        self._idle = 0
        self._max = max_pooled

    @staticmethod
    def size_class(n: int) -> int:
        return max(MIN_CLASS, 1 << (n - 1).bit_length()) if n > 0 else MIN_CLASS

    def take(self, n: int) -> bytearray:
        """A buffer of at least ``n`` bytes (contents undefined)."""
        cls = self.size_class(n)
        free = self._free.get(cls)
        if free:
            self._idle -= cls
            return free.pop()
        return bytearray(cls) if n >= MIN_CLASS else bytearray(n)

    def give(self, buf: bytearray) -> None:
        """Return a buffer from :meth:`take`; nobody may use it afterwards."""
        cls = len(buf)
        if cls < MIN_CLASS or cls & (cls - 1) or self._idle + cls > self._max:
            return
        self._free[cls].append(buf)
        self._idle += cls
