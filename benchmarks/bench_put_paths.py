"""Puts over the byte stream: the sync client's own HTTP/2 put against grpcio's.

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_put_paths.py [--sizes 1,4,16,32] [--rounds 40]

One daemon (one 2 GiB CPU tier) on a free loopback port; two sync clients
without shared memory (what a client on another host uses), one sending its
puts over its own HTTP/2 connection to the daemon's listener
(``http2_put=True``, the default: kvstore/client/h2put.py,
kvstore/server/h2put.py), one through grpcio (``http2_put=False``).  Both get
over HTTP/2.  Rounds alternate the two clients (so machine load hits them
alike); each round puts a new value of one of 8 keys, then gets it into a
preallocated tensor and checks it byte for byte, as ``kvstore bench`` does, so
the get column shows what each kind of put leaves behind for the get after
it.  Reference in the same run: Redis (redis-server + redis-py, SET then GET,
``kvstore bench``'s peer) when redis-server is installed.  Prints p50 put and
get latencies and the ratio of each put to grpcio's and to Redis's SET.
"""

from __future__ import annotations

import statistics
import time

from kvstore.bench.paths import MiB, Rounds, parse_run
from kvstore.bench.runner import spawn_daemon
from kvstore.client import Client
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace


def main() -> None:
    run = parse_run(__doc__.split("\n\n")[0])
    ref = run.redis
    kb = KeyBuilder(Namespace("bench", "puts"), LayoutFingerprint("uint8", 1, 1, 1, chunk_size=1))
    print(f"{'size':>6} {'path':<22} {'put p50 ms':>10} {'get p50 ms':>10} {'put GB/s':>9} {'vs grpcio':>9} {'vs Redis':>9}")
    with spawn_daemon("2GiB") as addr:
        with Client(addr, shm=False) as h2, Client(addr, shm=False, http2_put=False) as grpcio:
            paths = {"HTTP/2 (http2_put)": h2, "grpcio": grpcio}
            for size in run.sizes:
                times = _measure(paths, kb, size, run.rounds[size])
                grpc_put = statistics.median(times["grpcio"][0])
                for name, (puts, gets) in times.items():
                    put = statistics.median(puts)
                    r = ref.get(size)
                    vs_redis = f"{r.put_p50_ms / (put * 1e3):>8.2f}x" if r is not None else f"{'n/a':>9}"
                    print(f"{size // MiB:>4}Mi {name:<22} {put * 1e3:>10.3f} {statistics.median(gets) * 1e3:>10.3f} "
                          f"{size / put / 1e9:>9.2f} {grpc_put / put:>8.2f}x {vs_redis}")
                if size in ref:
                    r = ref[size]
                    print(f"{size // MiB:>4}Mi {'redis (reference)':<22} {r.put_p50_ms:>10.3f} {r.get_p50_ms:>10.3f} "
                          f"{r.put_gbps:>9.2f}")
            print(f"puts over HTTP/2: {h2.http2_puts} (client with http2_put=False: {grpcio.http2_puts})")
    if run.redis_missing:
        print(f"redis: not run ({run.redis_missing})")
    print("(ratios: how many times faster than the other put, p50 against p50; one client, one request at a time)")


def _measure(paths: dict[str, Client], kb: KeyBuilder, size: int, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    r = Rounds(paths, kb, size, rounds)
    for i, name, key in r.steps():
        t0 = time.perf_counter()
        paths[name].put(key, r.src)
        t1 = time.perf_counter()
        paths[name].get_into(key, r.dst)
        r.record(i, name, t0, t1, time.perf_counter())
    return r.times


if __name__ == "__main__":
    main()
