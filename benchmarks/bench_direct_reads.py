"""Shared-memory gets with and without direct reads of the daemon's CPU arena.

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_direct_reads.py [--sizes 1,4,16,32] [--rounds 40]

One daemon (one 2 GiB CPU tier) on a free loopback port; two sync clients
with shared memory, one reading chunks straight from the daemon's shared
arena (``direct_reads=True``, the default: kvstore/tiers/shared_arena.py),
one asking the daemon over the control channel (``direct_reads=False``: the
daemon copies into the client's segment).  For each size, 8 values are
stored; rounds alternate the two clients (so machine load hits them alike),
each round ``get_into`` a segment buffer of the next value, checked byte for
byte.  The direct client first waits until its page tables cover the
arena (``Client.direct_reads_ready``), as a long-lived client's would.
Reference in the same run: torch ``copy_`` between distinct buffers
over 256 MiB (the memory copy a get cannot beat).  Prints median latency and
GB/s of each and the ratio to the copy.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16,32", help="value sizes in MiB")
    ap.add_argument("--rounds", type=int, default=40, help="gets per client and size")
    a = ap.parse_args()
    torch.set_num_threads(1)  # like the clients of kvstore bench
    kb = KeyBuilder(Namespace("bench", "direct"), LayoutFingerprint("uint8", 1, 1, 1, chunk_size=1))
    sizes = [int(float(s) * MiB) for s in a.sizes.split(",")]
    print(f"{'size':>6} {'path':<28} {'get p50 ms':>10} {'GB/s':>7} {'vs copy':>8}")
    with spawn_daemon("2GiB") as addr:
        with Client(addr, shm_bytes=3 * max(sizes) + (8 << 20)) as direct, Client(
            addr, shm_bytes=3 * max(sizes) + (8 << 20), direct_reads=False
        ) as asking:
            if not direct.direct_reads_ready():  # attached, and the arena's pages mapped here
                raise SystemExit("the daemon does not offer direct reads here")
            for size in sizes:
                keys = [kb.segment_key([size, i]) for i in range(8)]
                src = direct.buffer(size)
                if src is None:
                    raise SystemExit("shared memory is unavailable here")
                values = []
                for i, k in enumerate(keys):
                    src.random_(0, 255)
                    direct.put(k, src)
                    values.append(src.clone())
                direct.free_buffer(src)
                outs = {c: c.buffer(size) for c in (direct, asking)}
                times: dict[str, list[float]] = {"direct read": [], "control channel (daemon copies)": []}
                for r in range(a.rounds):
                    for name, c in (("direct read", direct), ("control channel (daemon copies)", asking))[:: 1 if r % 2 else -1]:
                        out = outs[c]
                        assert out is not None
                        t0 = time.perf_counter()
                        meta = c.get_into(keys[r % 8], out)
                        times[name].append(time.perf_counter() - t0)
                        if meta is None or not torch.equal(out, values[r % 8]):
                            raise SystemExit(f"{name}: wrong bytes for a {size}-byte value")
                for c, out in outs.items():
                    if out is not None:
                        c.free_buffer(out)
                ref = bench_memcpy_distinct(size, max(20, a.rounds))
                copy_s = (ref.get_p50_ms or 0.0) / 1e3
                print(f"{size // MiB:>4}Mi {'memcpy-distinct (reference)':<28} {copy_s * 1e3:>10.3f} {size / copy_s / 1e9:>7.2f} {'100%':>8}")
                for name, ts in times.items():
                    p50 = statistics.median(ts)
                    print(f"{size // MiB:>4}Mi {name:<28} {p50 * 1e3:>10.3f} {size / p50 / 1e9:>7.2f} {copy_s / p50:>8.0%}")
            print(f"direct reads served: {direct.direct_reads}; by the other client: {asking.direct_reads}")


if __name__ == "__main__":
    main()
