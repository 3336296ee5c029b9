"""The AsyncClient over the byte stream: its own HTTP/2 connection against grpcio.

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_async_paths.py [--sizes 1,4,16,32] [--rounds 40]

One daemon (one 2 GiB CPU tier) on a free loopback port; two AsyncClients
without shared memory (what the SGLang backend and the ``peer`` tier use
towards a daemon on another host), one with its gets and puts over its own
HTTP/2 connection to the daemon's listener in a worker thread (the default:
kvstore/client/h2calls.py), one through grpcio (``http2_get=False,
http2_put=False``).  Rounds alternate the two clients (so machine load hits
them alike); each round puts a new value of one of 8 keys, then gets it into
a preallocated tensor and checks it byte for byte.  Reference in the same
run: Redis (redis-server + redis-py, SET then GET, ``kvstore bench``'s peer)
when redis-server is installed.  Prints p50 put and get latencies and the
ratios of the HTTP/2 client's to grpcio's and to Redis's.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from kvstore.bench.paths import MiB, Rounds, parse_run
from kvstore.bench.peers import PeerResult
from kvstore.bench.runner import spawn_daemon
from kvstore.client import AsyncClient
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace


def main() -> None:
    run = parse_run(__doc__.split("\n\n")[0])
    with spawn_daemon("2GiB") as addr:
        asyncio.run(_run(addr, run.sizes, run.rounds, run.redis))
    if run.redis_missing:
        print(f"redis: not run ({run.redis_missing})")
    print("(ratios: how many times faster than the reference, p50 against p50; one request at a time)")


async def _run(addr: str, sizes: list[int], rounds: dict[int, int], ref: dict[int, PeerResult]) -> None:
    kb = KeyBuilder(Namespace("bench", "async"), LayoutFingerprint("uint8", 1, 1, 1, chunk_size=1))
    print(f"{'size':>6} {'path':<16} {'put p50 ms':>10} {'get p50 ms':>10} {'put vs grpcio':>13} {'get vs grpcio':>13} "
          f"{'get vs Redis':>12}")
    async with AsyncClient(addr, shm=False) as h2, AsyncClient(addr, shm=False, http2_get=False, http2_put=False) as grpcio:
        paths = {"HTTP/2": h2, "grpcio": grpcio}
        for size in sizes:
            times = await _measure(paths, kb, size, rounds[size])
            base_put, base_get = (statistics.median(x) for x in times["grpcio"])
            for name, (puts, gets) in times.items():
                put, get = statistics.median(puts), statistics.median(gets)
                r = ref.get(size)
                vs_redis = f"{r.get_p50_ms / (get * 1e3):>11.2f}x" if r is not None else f"{'n/a':>12}"
                print(f"{size // MiB:>4}Mi {name:<16} {put * 1e3:>10.3f} {get * 1e3:>10.3f} {base_put / put:>12.2f}x "
                      f"{base_get / get:>12.2f}x {vs_redis}")
            if size in ref:
                r = ref[size]
                print(f"{size // MiB:>4}Mi {'redis (ref)':<16} {r.put_p50_ms:>10.3f} {r.get_p50_ms:>10.3f}")
        print(f"calls over HTTP/2: {h2.http2_puts} puts, {h2.http2_gets} gets "
              f"(the grpcio client: {grpcio.http2_puts}, {grpcio.http2_gets})")


async def _measure(
    paths: dict[str, AsyncClient], kb: KeyBuilder, size: int, rounds: int
) -> dict[str, tuple[list[float], list[float]]]:
    r = Rounds(paths, kb, size, rounds)
    for i, name, key in r.steps():
        t0 = time.perf_counter()
        await paths[name].put(key, r.src)
        t1 = time.perf_counter()
        await paths[name].get_into(key, r.dst)
        r.record(i, name, t0, t1, time.perf_counter())
    return r.times


if __name__ == "__main__":
    main()
