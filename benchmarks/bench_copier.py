"""What the daemon's host copies cost: one thread against the split copier, and
a CPU-tier put that checksums the caller's buffer first against one that
checksums its own copy as it goes (Tier.put_summing, shared-memory puts); and
the copy a direct write makes (copy_summed: copy and checksum, between two
shared-memory mappings as from a client's segment into the daemon's arena),
by the calling thread alone and with the checksum's 1 MiB leaves shared with a
helper thread.

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_copier.py [--sizes 1,4,16,32] [--rounds 30]

In one process, no daemon: a 2 GiB CPU tier (its arena prefaulted, as
``kvstore serve`` does) and, for the copy rows, 256 MiB of distinct source and
destination buffers per side (outside the caches, as the tier's slots are).
The direct-write rows copy between two 256 MiB memfd mappings (prefaulted) and
have their own reference, the split copier between them (``copier 2 threads,
shared``).  The variants alternate round by round, so machine load hits them alike.
Prints the median time and GB/s of each, and the reference in the same run:
a one-thread ``torch`` copy between distinct buffers (``memcpy-1t``).
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from kvstore.chunk import Chunk, ChunkMeta, checksum
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers.copier import Copier, copy_summed, finish
from kvstore.tiers.cpu import CpuTier, CpuTierConfig
from kvstore.tiers.memory import tensor_view

MiB = 1 << 20


def key(i: int) -> ChunkKey:
    return ChunkKey(Namespace("bench", "copier"), "0" * 16, "s" + f"{i:064x}")


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


def shared_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of a memfd mapping (as a segment or the daemon's arena), every page touched."""
    fd = os.memfd_create("bench-copier", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        mapped = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    out = torch.frombuffer(mapped, dtype=torch.uint8)
    out.fill_(1)
    return out


async def run(sizes: list[int], rounds: int) -> None:
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(2)
    helper = ThreadPoolExecutor(1)  # as a client's (ArenaReader.helper)
    shared_src, shared_dst = shared_buffer(256 * MiB), shared_buffer(256 * MiB)
    shared_src.random_(0, 255)
    one, split = Copier(pool, 1), Copier(pool, 2)
    tier = CpuTier("cpu", CpuTierConfig(capacity_bytes=2048 * MiB))
    await tier.open()
    print(f"{'size':>6} {'variant':<37} {'p50 ms':>8} {'GB/s':>7}")
    try:
        for size in sizes:
            n = size * MiB
            k = max(4, 256 // size)
            srcs = torch.randint(0, 256, (k * n,), dtype=torch.uint8)
            dsts = torch.empty(k * n, dtype=torch.uint8).fill_(1)
            source = torch.randint(0, 256, (n,), dtype=torch.uint8)
            view = tensor_view(source)
            times: dict[str, list[float]] = {}

            async def hash_then_put(r: int) -> None:
                got = checksum(view) if n < 8 * MiB else await asyncio.to_thread(checksum, view)
                await tier.put(key(r % 4), Chunk(ChunkMeta(nbytes=n, checksum=got), view))

            async def put_summing(r: int) -> None:
                meta = await tier.put_summing(key(4 + r % 4), Chunk(ChunkMeta(nbytes=n, checksum=0), view))
                assert meta.checksum == checksum(view)

            slot = 0

            def pair() -> tuple[torch.Tensor, torch.Tensor]:
                """The next source and destination, never the ones just used (out of the caches)."""
                nonlocal slot
                i, slot = slot % k, slot + 1
                return dsts[i * n : (i + 1) * n], srcs[i * n : (i + 1) * n]

            shared_slot = 0

            def shared_pair() -> tuple[torch.Tensor, torch.Tensor]:
                nonlocal shared_slot
                i, shared_slot = (shared_slot * 7) % (256 // size), shared_slot + 1
                j = (i + 128 // size + 1) % (256 // size)
                return shared_dst[j * n : (j + 1) * n], shared_src[i * n : (i + 1) * n]

            async def summed(with_helper: bool) -> None:
                d, s = shared_pair()
                copy_summed(d, s, helper if with_helper else None)

            async def shared_copy() -> None:
                # Pool threads, not torch's: OpenMP's threads spin for a while after a
                # parallel op, and would take a core from the helper of the rows after it.
                d, s = shared_pair()
                await finish(split.start(d, s))

            async def copy_with(copier: Copier | None) -> None:
                d, s = pair()
                if copier is None:
                    d.copy_(s)
                else:
                    await finish(copier.start(d, s))

            for r in range(rounds):
                source[:8].view(torch.int64)[0] = r  # new content every round
                variants: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                    ("memcpy-1t (reference)", lambda: copy_with(None)),
                    ("copier, 1 thread", lambda: copy_with(one)),
                    ("copier, split over 2 threads", lambda: copy_with(split)),
                    ("tier put: checksum source, copy", lambda: hash_then_put(r)),
                    ("tier put_summing: copy, sum copy", lambda: put_summing(r)),
                    ("copier 2 threads, shared (reference)", shared_copy),
                    ("direct write: copy_summed, 1 thread", lambda: summed(False)),
                    ("direct write: copy_summed + helper", lambda: summed(True)),
                ]
                if r % 2:
                    variants.reverse()
                for name, fn in variants:
                    times.setdefault(name, []).append(await timed(fn))
            for name, ts in times.items():
                med = statistics.median(ts[2:])
                print(f"{size:>4}Mi {name:<37} {med * 1e3:8.3f} {n / med / 1e9:7.2f}")
    finally:
        await tier.close()
        pool.shutdown()
        helper.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16,32", help="sizes in MiB (default 1,4,16,32)")
    ap.add_argument("--rounds", type=int, default=30, help="rounds per size (default 30)")
    args = ap.parse_args()
    asyncio.run(run([int(x) for x in args.sizes.split(",")], args.rounds))


if __name__ == "__main__":
    main()
