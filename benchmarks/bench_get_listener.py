"""Gets over the gRPC byte stream: the daemon's own HTTP/2 Get listener against
its grpcio server, with Redis as the reference.

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_get_listener.py [--sizes 1,4,16,32] [--rounds 60]

Two daemons (one 2 GiB CPU tier each) on free loopback ports, one with the
HTTP/2 Get listener (``server.http2_get: true``, the default:
kvstore/server/h2get.py) and one without (its gets are served by grpcio), and
a ``redis-server`` (no persistence).  One sync client per daemon without
shared memory (``shm=False``, as a client on another host), so both read
over their own HTTP/2 connection (kvstore/client/h2get.py) and only the
server side differs; redis-py for Redis.  For each size, 8 values are
stored in each; rounds rotate the order of the three (so machine load hits
them alike), each round one get of the next value (``get_into`` a
preallocated tensor for kvstore, ``GET`` for Redis), checked byte for byte
after its timing.  Prints the
median latency and GB/s of each and the ratio of Redis's median to it
(above 1: faster than Redis).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import redis
import torch

from kvstore.bench.peer_redis import RedisPeer
from kvstore.bench.runner import spawn_daemon
from kvstore.client import Client
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16,32", help="value sizes in MiB")
    ap.add_argument("--rounds", type=int, default=60, help="gets per path and size")
    a = ap.parse_args()
    torch.set_num_threads(1)  # like the clients of kvstore bench
    kb = KeyBuilder(Namespace("bench", "listener"), LayoutFingerprint("uint8", 1, 1, 1, chunk_size=1))
    sizes = [int(float(s) * MiB) for s in a.sizes.split(",")]
    listener_name, grpcio_name = "kvstore, HTTP/2 Get listener", "kvstore, grpcio server"
    print(f"{'size':>6} {'path':<30} {'get p50 ms':>10} {'GB/s':>7} {'Redis/it':>9}")
    with spawn_daemon("2GiB") as fast_addr, spawn_daemon("2GiB", "http2_get: false") as plain_addr, RedisPeer() as peer:
        r = redis.Redis(host="127.0.0.1", port=peer.port, socket_timeout=60)
        with Client(fast_addr, shm=False) as fast, Client(plain_addr, shm=False) as plain:
            for size in sizes:
                keys = [kb.segment_key([size, i]) for i in range(8)]
                values = [torch.randint(0, 255, (size,), dtype=torch.uint8) for _ in range(8)]
                blobs = [v.numpy().tobytes() for v in values]
                for k, v in zip(keys, values, strict=True):
                    fast.put(k, v)
                    plain.put(k, v)
                    r.set(str(k), v.numpy().tobytes())
                out = torch.empty(size, dtype=torch.uint8)

                def kv_get(c: Client) -> Callable[[int], Callable[[], bool]]:
                    def get(i: int) -> Callable[[], bool]:
                        found = c.get_into(keys[i], out) is not None
                        return lambda: found and torch.equal(out, values[i])
                    return get

                def redis_get(i: int) -> Callable[[], bool]:
                    got = r.get(str(keys[i]))
                    return lambda: got == blobs[i]

                paths = [(listener_name, kv_get(fast)), (grpcio_name, kv_get(plain)), ("redis (reference)", redis_get)]
                for _, get in paths:  # warm-up: connections, the listener's port learned
                    for i in range(3):
                        get(i)
                times: dict[str, list[float]] = {name: [] for name, _ in paths}
                for n in range(a.rounds):
                    for name, get in paths[n % 3 :] + paths[: n % 3]:
                        t0 = time.perf_counter()
                        check = get(n % 8)
                        times[name].append(time.perf_counter() - t0)
                        if not check():  # outside the timing
                            raise SystemExit(f"{name}: wrong bytes for a {size}-byte value")
                ref = statistics.median(times["redis (reference)"])
                for name, ts in times.items():
                    p50 = statistics.median(ts)
                    print(f"{size // MiB:>4}Mi {name:<30} {p50 * 1e3:>10.3f} {size / p50 / 1e9:>7.2f} {ref / p50:>9.2f}")
                r.flushall()
                fast.delete(keys)
                plain.delete(keys)
            print(
                f"gets over HTTP/2: {fast.http2_gets} (listener daemon; connection on port "
                f"{fast.http2_get_port}), {plain.http2_gets} (grpcio daemon; port {plain.http2_get_port})"
            )
        r.close()


if __name__ == "__main__":
    main()
