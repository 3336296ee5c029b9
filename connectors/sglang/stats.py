"""The HiCache backend's counters (``KVStoreHiCacheStorage.stats``) and the
per-batch figures SGLang's ``get_stats`` takes, kept under one lock: SGLang
calls the backend from its prefetch and backup threads at once."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class HiCacheStats:
    """Counters since the backend started (pages, bytes, calls that failed)."""

    pages_read: int = 0
    pages_missed: int = 0
    pages_written: int = 0
    pages_skipped: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    lookups: int = 0
    errors: int = 0
    # Per batch since the last get_stats(): SGLang's StorageMetrics fields.
    prefetch_pgs: list[int] = field(default_factory=list)
    backup_pgs: list[int] = field(default_factory=list)
    prefetch_bandwidth: list[float] = field(default_factory=list)
    backup_bandwidth: list[float] = field(default_factory=list)


#: The per-batch lists a ``get_stats`` call takes: pages per prefetch batch,
#: per backup batch, and the GB/s of each.
Batches = tuple[list[int], list[int], list[float], list[float]]


class StatsRecorder:
    """Updates a :class:`HiCacheStats` from several threads; with ``per_batch``
    (SGLang's ``enable_storage_metrics``) it keeps the per-batch lists too."""

    def __init__(self, per_batch: bool) -> None:
        self.stats = HiCacheStats()
        self._per_batch = per_batch
        self._lock = threading.Lock()

    def transfer(self, read: bool, pages: int, nbytes: int, seconds: float) -> None:
        """One batch of ``pages`` pages (``nbytes``) read or written in ``seconds``."""
        gbps = nbytes / max(seconds, 1e-9) / 1e9
        with self._lock:
            s = self.stats
            if read:
                s.pages_read += pages
                s.bytes_read += nbytes
                if self._per_batch:
                    s.prefetch_pgs.append(pages)
                    s.prefetch_bandwidth.append(gbps)
            else:
                s.pages_written += pages
                s.bytes_written += nbytes
                if self._per_batch:
                    s.backup_pgs.append(pages)
                    s.backup_bandwidth.append(gbps)

    def add(self, *, missed: int = 0, skipped: int = 0, lookups: int = 0, errors: int = 0) -> None:
        with self._lock:
            s = self.stats
            s.pages_missed += missed
            s.pages_skipped += skipped
            s.lookups += lookups
            s.errors += errors

    def take_batches(self) -> Batches:
        """The per-batch lists since the last call, emptied."""
        with self._lock:
            s = self.stats
            out = (s.prefetch_pgs, s.backup_pgs, s.prefetch_bandwidth, s.backup_bandwidth)
            s.prefetch_pgs, s.backup_pgs, s.prefetch_bandwidth, s.backup_bandwidth = [], [], [], []
        return out
