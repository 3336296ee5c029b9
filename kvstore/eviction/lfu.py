"""Least frequently used, ties broken by recency (the least recent goes first).

The classic O(1) LFU layout (Shah, Mitra & Matani, 2010): a doubly linked
list of frequency buckets in increasing order of frequency, each holding its
keys in the order they reached that frequency.  An access moves a key to the
next bucket, creating it if needed, so insert, access and remove are O(1)
and the victim is the first key of the first bucket, with no sort and no
heap.  Skipped keys only lengthen the walk: ``victim`` is O(1 + skipped keys
ahead of the victim).

Counts are not aged: a chunk that was hot long ago outlives a newer one that
is warm now.  That is LFU's known weakness under shifting popularity, and
why LRU is the default and S3-FIFO the scan-resistant choice.
"""

from __future__ import annotations

from collections import OrderedDict

from kvstore.eviction.base import EvictionPolicy, Skip, never
from kvstore.keys import ChunkKey


class _Bucket:
    """The keys accessed exactly ``freq`` times, least recently promoted first."""

    __slots__ = ("freq", "keys", "prev", "next")

    def __init__(self, freq: int) -> None:
        self.freq = freq
        # OrderedDict, not dict: removing from the front of a plain dict leaves
        # dummies that make finding the first key O(n) until the next resize.
        self.keys: OrderedDict[ChunkKey, None] = OrderedDict()
        self.prev: _Bucket = self
        self.next: _Bucket = self


class LFUPolicy(EvictionPolicy):
    """Evict the least frequently accessed chunk; O(1) per operation."""

    name = "lfu"

    def __init__(self) -> None:
        # The head is a sentinel (frequency 0) of the circular list of buckets.
        self._head = _Bucket(0)
        self._where: dict[ChunkKey, _Bucket] = {}

    def _bucket_after(self, bucket: _Bucket, freq: int) -> _Bucket:
        nxt = bucket.next
        if nxt is not self._head and nxt.freq == freq:
            return nxt
        new = _Bucket(freq)
        new.prev, new.next = bucket, nxt
        bucket.next = nxt.prev = new
        return new

    def _take(self, key: ChunkKey, bucket: _Bucket) -> None:
        del bucket.keys[key]
        if not bucket.keys:
            bucket.prev.next, bucket.next.prev = bucket.next, bucket.prev

    def insert(self, key: ChunkKey, nbytes: int) -> None:
        """Add ``key`` with frequency 1 (an existing key is just accessed)."""
        if key in self._where:
            self.access(key)
            return
        bucket = self._bucket_after(self._head, 1)
        bucket.keys[key] = None
        self._where[key] = bucket

    def access(self, key: ChunkKey) -> None:
        """Count one more use of ``key``; unknown keys are ignored."""
        bucket = self._where.get(key)
        if bucket is None:
            return
        # Find or create the next bucket before ``bucket`` may be unlinked.
        nxt = self._bucket_after(bucket, bucket.freq + 1)
        self._take(key, bucket)
        nxt.keys[key] = None
        self._where[key] = nxt

    def remove(self, key: ChunkKey) -> None:
        """Forget ``key``; unknown keys are ignored."""
        bucket = self._where.pop(key, None)
        if bucket is not None:
            self._take(key, bucket)

    def victim(self, skip: Skip = never) -> ChunkKey | None:
        """The least frequent key not skipped (least recent among equals), or None."""
        bucket = self._head.next
        while bucket is not self._head:
            for key in bucket.keys:
                if not skip(key):
                    return key
            bucket = bucket.next
        return None

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where
