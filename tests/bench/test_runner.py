"""Tests of kvstore.bench.runner: a real (small) run against a daemon it starts,
and the table rendered from its report."""

from __future__ import annotations

from kvstore.bench.report import render_table
from kvstore.bench.runner import BATCH, MiB, run


def test_a_small_run_measures_every_target_and_both_copy_references() -> None:
    report = run([0.25, 1], iters=4, warmup=1, address=None, peers=[], peer_python=None, progress=False)
    rows = {(r["target"], r["size_bytes"]): r for r in report["results"]}  # type: ignore[index, union-attr]
    for size in (MiB // 4, MiB):
        for target in ("memcpy", "memcpy-distinct", "kvstore-grpc", "kvstore-shm"):
            r = rows[(target, size)]
            assert r["put_gbps"] > 0 and r["get_gbps"] > 0, r
        # Every gRPC put and get of the run went over the client's HTTP/2 connection (run() checked the bytes).
        assert rows[("kvstore-grpc", size)]["note"].startswith("5 puts and 5 gets of 5 over HTTP/2")
        assert "x 2 buffers" in rows[("memcpy-distinct", size)]["note"]
        # Batches: put only; every value of every batch (warm-up included) written directly.
        batch = rows[("kvstore-shm-x8", size)]
        assert batch["put_gbps"] > 0 and batch["get_gbps"] is None, batch
        assert f"{(3 + 1) * BATCH} puts written directly" in batch["note"]  # 3 timed calls, 1 warm-up
    table = render_table(report)
    assert "memcpy-distinct" in table and "/distinct" in table
