"""Tests of kvstore.bench.report: the goal rows judged from a report."""

from __future__ import annotations

from kvstore.bench.report import MiB, goal_rows


def test_goal_rows_judge_shared_memory_against_both_copy_references() -> None:
    def row(target: str, put: float, get: float) -> dict[str, object]:
        return {"target": target, "size_bytes": MiB, "put_gbps": put, "get_gbps": get}

    report: dict[str, object] = {
        "machine": "test",
        "results": [
            row("memcpy", 40.0, 40.0),
            row("memcpy-distinct", 8.0, 8.0),
            row("kvstore-shm", 4.0, 5.0),
            row("kvstore-grpc", 0.5, 1.0),
            row("redis", 1.0, 2.0),
        ],
    }
    got = {r["goal"]: (r["ratio"], r["met"]) for r in goal_rows(report)}
    assert got["shm get >= 0.5x memcpy-distinct"] == (5.0 / 8.0, True)
    assert got["shm put >= 0.5x memcpy-distinct"] == (0.5, True)
    assert got["(shm get >= 0.5x memcpy, cache-resident)"] == (5.0 / 40.0, False)
    assert got["gRPC get > Redis get"] == (0.5, False)
    assert got["gRPC get >= 0.5x LMCache raw-TCP get"] == (None, None)  # not measured: no verdict
