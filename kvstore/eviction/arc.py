"""ARC (Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST 2003).

Two LRU lists of resident chunks, *T1* (seen once recently) and *T2* (seen
at least twice), and two ghost lists of keys only, *B1* and *B2*, holding
what was recently evicted from each.  A target ``p`` for T1's share adapts
on every ghost hit: a key coming back from B1 says T1 was too small (``p``
grows), one coming back from B2 says T2 was (``p`` shrinks).  ``victim``
takes T1's least recent chunk while T1 is over ``p``, else T2's.

Adapted to the store's protocol and to chunks of different sizes:

* everything is counted in bytes, and ``p`` moves by the returning chunk's
  size scaled by the ghost-list ratio;
* the cache size ``c`` (ARC's bound for ``p`` and the ghosts) is the largest
  resident total seen, since a policy is not told the tier's capacity;
* a key becomes a ghost when the store calls ``remove`` (ARC's REPLACE moves
  it at once), so a chunk deleted or demoted is remembered too, and ARC's
  tie rule, which needs the incoming key, is not used: ``victim`` does not
  know what will be inserted.

Skipped keys keep their place; ``victim`` is O(1 + skipped keys ahead).
"""

from __future__ import annotations

from collections import OrderedDict

from kvstore.eviction.base import EvictionPolicy, Skip, never
from kvstore.keys import ChunkKey


class ARCPolicy(EvictionPolicy):
    """Adaptive replacement between recency (T1) and frequency (T2), in bytes."""

    name = "arc"

    def __init__(self) -> None:
        # key -> nbytes, least recent first
        self._t1: OrderedDict[ChunkKey, int] = OrderedDict()
        self._t2: OrderedDict[ChunkKey, int] = OrderedDict()
        self._b1: OrderedDict[ChunkKey, int] = OrderedDict()
        self._b2: OrderedDict[ChunkKey, int] = OrderedDict()
        self._t1_bytes = self._t2_bytes = self._b1_bytes = self._b2_bytes = 0
        self._p = 0.0  # target bytes of T1
        self._c = 0  # the largest resident total seen

    # -- the store's calls ----------------------------------------------------
    def insert(self, key: ChunkKey, nbytes: int) -> None:
        """Admit ``key`` to T1, or to T2 on a ghost hit (adapting ``p``); an existing key is accessed."""
        if key in self._t1 or key in self._t2:
            self.access(key)
            return
        if key in self._b1:
            ratio = max(self._b2_bytes / self._b1_bytes, 1.0) if self._b1_bytes else 1.0
            self._p = min(float(self._c), self._p + nbytes * ratio)
            self._b1_bytes -= self._b1.pop(key)
            self._t2[key] = nbytes
            self._t2_bytes += nbytes
        elif key in self._b2:
            ratio = max(self._b1_bytes / self._b2_bytes, 1.0) if self._b2_bytes else 1.0
            self._p = max(0.0, self._p - nbytes * ratio)
            self._b2_bytes -= self._b2.pop(key)
            self._t2[key] = nbytes
            self._t2_bytes += nbytes
        else:
            self._t1[key] = nbytes
            self._t1_bytes += nbytes
        self._c = max(self._c, self._t1_bytes + self._t2_bytes)
        self._trim_ghosts()

    def access(self, key: ChunkKey) -> None:
        """A hit: the key becomes the most recent of T2; unknown keys are ignored."""
        n = self._t1.pop(key, None)
        if n is not None:
            self._t1_bytes -= n
            self._t2[key] = n
            self._t2_bytes += n
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: ChunkKey) -> None:
        """Forget ``key``, remembering it in the ghost list of the list it left."""
        n = self._t1.pop(key, None)
        if n is not None:
            self._t1_bytes -= n
            self._b1[key] = n
            self._b1_bytes += n
        else:
            n = self._t2.pop(key, None)
            if n is None:
                return
            self._t2_bytes -= n
            self._b2[key] = n
            self._b2_bytes += n
        self._trim_ghosts()

    def victim(self, skip: Skip = never) -> ChunkKey | None:
        """T1's least recent unskipped key while T1 is over target, else T2's; None if all skipped."""
        first, second = (self._t1, self._t2) if self._t1 and self._t1_bytes > self._p else (self._t2, self._t1)
        for queue in (first, second):
            for key in queue:
                if not skip(key):
                    return key
        return None

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    # -- internals --------------------------------------------------------------
    def _trim_ghosts(self) -> None:
        # ARC's bounds: |T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c.
        c = self._c
        while self._b1 and self._t1_bytes + self._b1_bytes > c:
            self._b1_bytes -= self._b1.popitem(last=False)[1]
        total = self._t1_bytes + self._t2_bytes + self._b1_bytes
        while self._b2 and total + self._b2_bytes > 2 * c:
            self._b2_bytes -= self._b2.popitem(last=False)[1]
