"""StatsRecorder (connectors/sglang/stats.py): counters from several threads, per-batch figures taken once."""

from __future__ import annotations

import threading

from kvstore.connectors.sglang.stats import StatsRecorder


def test_counts_from_many_threads_add_up() -> None:
    rec = StatsRecorder(per_batch=True)

    def work() -> None:
        for _ in range(1000):
            rec.transfer(True, 2, 200, 1e-6)
            rec.transfer(False, 1, 100, 1e-6)
            rec.add(missed=1, skipped=2, lookups=3, errors=4)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = rec.stats
    assert (s.pages_read, s.bytes_read, s.pages_written, s.bytes_written) == (8000, 800_000, 4000, 400_000)
    assert (s.pages_missed, s.pages_skipped, s.lookups, s.errors) == (4000, 8000, 12000, 16000)
    assert len(s.prefetch_pgs) == len(s.prefetch_bandwidth) == 4000 and len(s.backup_pgs) == 4000


def test_per_batch_figures_are_taken_once_and_kept_only_when_asked() -> None:
    rec = StatsRecorder(per_batch=True)
    rec.transfer(True, 3, 3_000_000, 0.001)
    prefetch, backup, prefetch_gbps, backup_gbps = rec.take_batches()
    assert prefetch == [3] and backup == [] and prefetch_gbps == [3.0] and backup_gbps == []
    assert rec.take_batches() == ([], [], [], [])
    assert rec.stats.pages_read == 3  # the totals stay
    off = StatsRecorder(per_batch=False)
    off.transfer(False, 1, 10, 0.0)
    assert off.take_batches() == ([], [], [], []) and off.stats.bytes_written == 10
