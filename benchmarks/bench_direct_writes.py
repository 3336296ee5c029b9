"""Shared-memory puts with and without direct writes into the daemon's CPU arena.

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_direct_writes.py [--sizes 1,4,16,32] [--rounds 40]

One daemon (one 2 GiB CPU tier) on a free loopback port; two sync clients
with shared memory, one writing puts straight into blocks of the daemon's
arena (``direct_writes=True``, the default: kvstore/server/direct_writes.py),
one asking the daemon to copy them from its segment (``direct_writes=False``:
a ``ShmPut`` on the control channel; the daemon copies and checksums).  Two
sources per size: a tensor already in the client's segment
(``Client.buffer``: what ``kvstore bench`` puts), and a plain tensor (what an
engine puts: the segment path then copies it into the segment first, one
copy more), and batches of 8 plain tensors (``put_many``, what the vLLM
connector puts: one request per group of chunks; the time shown is the
call's over 8).  Rounds alternate the two clients (so machine load hits
them alike), each put a new value of one of 8 keys, read back and checked
byte for byte after timing.  Reference in the same run: torch ``copy_``
between distinct buffers over 256 MiB.  Prints median put latency per
value, GB/s and the ratio to the copy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvstore.bench.runner import bench_memcpy_distinct, spawn_daemon
from kvstore.client import Client
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace

MiB = 1 << 20
BATCH = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16,32", help="value sizes in MiB")
    ap.add_argument("--rounds", type=int, default=40, help="puts per client, source and size")
    a = ap.parse_args()
    torch.set_num_threads(1)  # like the clients of kvstore bench
    kb = KeyBuilder(Namespace("bench", "writes"), LayoutFingerprint("uint8", 1, 1, 1, chunk_size=1))
    sizes = [int(float(s) * MiB) for s in a.sizes.split(",")]
    seg = (BATCH + 2) * max(sizes) + (8 << 20)  # a batch fits in the segment
    print(f"{'size':>6} {'source':<8} {'path':<30} {'put p50 ms':>10} {'GB/s':>7} {'vs copy':>8}")
    with spawn_daemon("2GiB") as addr:
        with Client(addr, shm_bytes=seg) as direct, Client(addr, shm_bytes=seg, direct_writes=False) as asking:
            paths = {"direct write": direct, "ShmPut (daemon copies)": asking}
            for c in paths.values():
                c.put(kb.segment_key([0]), b"registers the segment")
            for size in sizes:
                ref = bench_memcpy_distinct(size, max(20, a.rounds))
                copy_s = (ref.get_p50_ms or 0.0) / 1e3
                print(f"{size // MiB:>4}Mi {'':<8} {'memcpy-distinct (reference)':<30} {copy_s * 1e3:>10.3f} "
                      f"{size / copy_s / 1e9:>7.2f} {'100%':>8}")
                for source in ("segment", "tensor", "x8"):
                    times = _measure(paths, kb, size, source, a.rounds)
                    for name, ts in times.items():
                        p50 = statistics.median(ts)
                        print(f"{size // MiB:>4}Mi {source:<8} {name:<30} {p50 * 1e3:>10.3f} "
                              f"{size / p50 / 1e9:>7.2f} {copy_s / p50:>8.0%}")
            print(f"direct writes made: {direct.direct_writes}; by the other client: {asking.direct_writes}")


def _measure(paths: dict[str, Client], kb: KeyBuilder, size: int, source: str, rounds: int) -> dict[str, list[float]]:
    keys = [kb.segment_key([size, i]) for i in range(BATCH)]
    srcs: dict[Client, list[torch.Tensor]] = {}
    for c in paths.values():
        n = BATCH if source == "x8" else 1
        made = [c.buffer(size) if source == "segment" else torch.empty(size, dtype=torch.uint8) for _ in range(n)]
        if any(t is None for t in made):
            raise SystemExit("shared memory is unavailable here")
        srcs[c] = [t.random_(0, 255) for t in made if t is not None]
    check = torch.empty(size, dtype=torch.uint8)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds + 2):  # two untimed rounds first
        for name, c in list(paths.items())[:: 1 if r % 2 else -1]:
            items = [(keys[(r + i) % BATCH], src) for i, src in enumerate(srcs[c])]
            for _, src in items:
                src[:8].view(torch.int64)[0] = r  # a new value each put
            t0 = time.perf_counter()
            if len(items) == 1:
                c.put(*items[0])
            else:
                c.put_many(items)
            elapsed = (time.perf_counter() - t0) / len(items)
            if r >= 2:
                times[name].append(elapsed)
            for k, src in items:
                if c.get_into(k, check) is None or not torch.equal(check, src):
                    raise SystemExit(f"{name}: wrong bytes for a {size}-byte value")
    if source == "segment":
        for c, bufs in srcs.items():
            for t in bufs:
                c.free_buffer(t)
    return times


if __name__ == "__main__":
    main()
