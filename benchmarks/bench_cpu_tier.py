"""CPU tier put/get bandwidth against a plain memory copy, in the same run.

Run:  python benchmarks/bench_cpu_tier.py [--sizes 4,32] [--iters 50]

Reference: torch ``copy_`` of the same bytes into a preallocated buffer,
rotating over as many destination slots as the tier uses (so that both move
the same bytes through main memory rather than one cache-hot pair).
Put = copy of a caller's bytes into the tier's arena (allocation included).
Get = ``tier.get`` + copy of the returned view into a caller's preallocated
buffer + release (what a consumer of the bytes does).  Goal: both at least
50% of the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from kvstore.chunk import Chunk
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers.cpu import CpuTier, CpuTierConfig
from kvstore.tiers.memory import as_uint8_tensor

MiB = 1 << 20


def key(i: int) -> ChunkKey:
    return ChunkKey(Namespace("bench", "m"), "0" * 16, "s" + f"{i:064x}")


def best_of(ts: list[float]) -> float:
    return statistics.median(ts)


async def run(size: int, iters: int, slots: int) -> dict[str, float]:
    # The reference and the tier are timed in the same loop, one after the
    # other, so that both see the same background noise.
    src = torch.empty(size, dtype=torch.uint8).random_(0, 255)
    ring = torch.empty(slots, size, dtype=torch.uint8)
    ring.copy_(src.expand(slots, size))  # commit the pages
    dst = torch.empty(size, dtype=torch.uint8)
    dst.zero_()
    tier = CpuTier("cpu", CpuTierConfig(capacity_bytes=size * (slots + 2)))
    await tier.open()
    chunk = Chunk.from_bytes(memoryview(src.numpy()))  # type: ignore[arg-type]
    ref, puts, gets = [], [], []
    for i in range(iters + 2):
        k = key(i % slots)
        if tier.contains(k):
            await tier.delete(k)
        t0 = time.perf_counter()
        ring[i % slots].copy_(src)
        t1 = time.perf_counter()
        await tier.put(k, chunk)
        t2 = time.perf_counter()
        got = await tier.get(k)
        assert got is not None
        dst.copy_(as_uint8_tensor(got.payload))
        got.release()
        t3 = time.perf_counter()
        if i >= 2:
            ref.append(t1 - t0)
            puts.append(t2 - t1)
            gets.append(t3 - t2)
    assert torch.equal(dst, src)
    await tier.close()
    return {
        "memcpy": size / best_of(ref) / 1e9,
        "put": size / best_of(puts) / 1e9,
        "get": size / best_of(gets) / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,32", help="chunk sizes in MiB (default 4,32)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--slots", type=int, default=8, help="distinct keys cycled through")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.iters} iterations")
    print(f"{'size':>6} {'memcpy GB/s':>12} {'put GB/s':>9} {'put/memcpy':>10} {'get GB/s':>9} {'get/memcpy':>10}")
    for s in args.sizes.split(","):
        size = int(float(s) * MiB)
        r = asyncio.run(run(size, args.iters, args.slots))
        print(
            f"{s:>4}Mi {r['memcpy']:>12.2f} {r['put']:>9.2f} {r['put'] / r['memcpy']:>10.0%} "
            f"{r['get']:>9.2f} {r['get'] / r['memcpy']:>10.0%}"
        )
    print("goal: put and get each >= 50% of memcpy")


if __name__ == "__main__":
    main()
