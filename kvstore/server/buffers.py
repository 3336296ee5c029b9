"""Receive buffers for puts arriving over the byte stream, and their memory.

A put's bytes are gathered in one buffer, checksummed, then copied into a
tier; the buffer is free again as soon as the store has its copy.  Buffers
of at least :data:`MIN_CLASS` are private anonymous memory maps:

* their pages are zero and not resident until written, so a buffer makes
  resident only the bytes actually received (rounded up to a page), and
  closing it hands its pages straight back to the kernel (``munmap``),
  whatever the C allocator's thresholds and arenas would have kept;
* they are pooled by size class for reuse (copying into pages already
  mapped runs about three times as fast as into fresh ones).  Classes step
  by a sixteenth of a power of two, so a buffer is at most 12.5% larger
  than the put it holds (24 MiB puts take 24 MiB buffers, not 32 MiB ones).

Smaller puts get a plain ``bytearray`` of their exact size, never pooled.

Each buffer knows how many of its bytes may be resident (``touched``: the
most ever written into it), so the daemon's memory accounting
(kvstore/server/limits.py) charges a put for what its buffer may still add
(:attr:`RecvBuffer.growth`), and gives idle buffers back to the kernel
(:meth:`BufferPool.trim`) before refusing a put.

A buffer's bytes are read only through :meth:`RecvBuffer.payload`, a
memoryview that holds the map open: while any such view (or a tensor made
from it) lives, the map is neither unmapped nor handed to another put.
"""

from __future__ import annotations

import mmap
import sys
from collections import defaultdict

#: Puts of at least this many bytes get pooled, memory-mapped buffers.
MIN_CLASS = 1 << 20
_PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


def _pages(n: int) -> int:
    """``n`` rounded up to whole pages: what writing ``n`` bytes may make resident."""
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


class RecvBuffer:
    """One put's receive buffer: :meth:`write` into it, read it through
    :meth:`payload`, then :meth:`BufferPool.give` it back."""

    __slots__ = ("size", "touched", "growth", "_mem")

    def __init__(self, size: int, mapped: bool) -> None:
        self.size = size
        # Private, not mmap's default shared mapping: the pages are this process's own
        # (RssAnon, which the memory bound counts; shared ones would be RssShmem).
        self._mem: mmap.mmap | bytearray | None = mmap.mmap(-1, size, flags=_PRIVATE) if mapped else bytearray(size)
        #: Bytes from the start that may be resident (the most ever written, in whole pages).
        self.touched = 0 if mapped else size
        #: Bytes this buffer may still add to resident memory while in use (set by take).
        self.growth = size

    @property
    def mapped(self) -> bool:
        return isinstance(self._mem, mmap.mmap)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        assert self._mem is not None, "buffer used after it was given back"
        self._mem[offset : offset + len(data)] = data

    def payload(self, n: int) -> memoryview:
        """The first ``n`` bytes; the map stays open while this view (or anything made from it) lives."""
        assert self._mem is not None, "buffer used after it was given back"
        return memoryview(self._mem)[:n]

    def advance(self, end: int) -> int:
        """Bytes ``[0, end)`` have been written: returns how much of :attr:`growth`
        that made resident (and takes it off ``growth``)."""
        reach = min(self.size, _pages(end))
        if reach <= self.touched:
            return 0
        used = min(reach - self.touched, self.growth)
        self.touched = reach
        self.growth -= used
        return used

    def in_use(self) -> bool:
        """Whether a view from :meth:`payload` is still held somewhere (a reader
        cancelled mid-copy, a traceback): each one holds a reference to the map."""
        return self._mem is not None and sys.getrefcount(self._mem) > 2  # ours, and the call's

    def close(self) -> None:
        """Hand the pages back to the kernel now, or, while a view is still held
        somewhere, when the last one goes (the map is freed with it)."""
        mem, self._mem = self._mem, None
        if isinstance(mem, mmap.mmap):
            try:
                mem.close()
            except BufferError:
                pass  # exported to a reader still running: unmapped when it lets go


class BufferPool:
    def __init__(self, max_pooled: int = 256 << 20) -> None:
        self._free: dict[int, list[RecvBuffer]] = defaultdict(list)
        self._idle = 0
        self._idle_resident = 0
        self._max = max_pooled

    @staticmethod
    def size_class(n: int) -> int:
        """Bytes of the buffer a put of ``n`` bytes takes."""
        if n < MIN_CLASS:
            return max(n, 0)
        step = 1 << max(12, (n - 1).bit_length() - 4)
        return -(-n // step) * step

    @property
    def idle(self) -> int:
        """Bytes mapped by idle pooled buffers."""
        return self._idle

    @property
    def idle_resident(self) -> int:
        """Of those, bytes that may be resident (written at some time)."""
        return self._idle_resident

    def take(self, n: int) -> RecvBuffer:
        """A buffer of at least ``n`` bytes (contents undefined); its ``growth`` says
        how many bytes it may still make resident when ``n`` bytes are written."""
        cls = self.size_class(n)
        free = self._free.get(cls)
        if free:
            buf = free.pop()
            self._idle -= cls
            self._idle_resident -= buf.touched
        else:
            buf = RecvBuffer(cls, mapped=n >= MIN_CLASS)
        buf.growth = max(0, min(cls, _pages(n)) - buf.touched) if buf.mapped else cls
        return buf

    def give(self, buf: RecvBuffer) -> None:
        """Return a buffer from :meth:`take` (its writes recorded with
        :meth:`RecvBuffer.advance`); the caller may not use it afterwards."""
        buf.growth = 0
        if not buf.mapped or self._idle + buf.size > self._max or buf.in_use():
            buf.close()  # a buffer still read elsewhere is never handed to another put
            return
        self._free[buf.size].append(buf)
        self._idle += buf.size
        self._idle_resident += buf.touched

    def trim(self, keep: int = 0) -> int:
        """Close idle buffers, largest first, until at most ``keep`` bytes stay idle;
        returns the bytes that may have been resident among those closed."""
        freed = 0
        for cls in sorted(self._free, reverse=True):
            free = self._free[cls]
            while free and self._idle > keep:
                buf = free.pop()
                self._idle -= cls
                self._idle_resident -= buf.touched
                freed += buf.touched
                buf.close()
        return freed
