"""Batched prefix lookup rate, key hashing included.

Run:  python benchmarks/bench_lookup.py [--tokens 65536] [--rounds 20]

Each round hashes a prompt of ``--tokens`` tokens into 256-token chunk keys
(chained blake3) and asks the store how many leading chunks it holds (all of
them: the worst case, every key is checked).  Reference printed alongside:
the bare sha256 chain rate over the same bytes (the hash keys use), measured in the same run.
Goal: at least 200,000 chunk keys per second.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import hashlib

import numpy as np

from kvstore.chunk import Chunk
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace
from kvstore.store import TieredStore, TierSettings
from kvstore.tiers.cpu import CpuTier, CpuTierConfig


async def run(n_tokens: int, rounds: int) -> None:
    kb = KeyBuilder(Namespace("bench", "m"), LayoutFingerprint("bfloat16", 30, 3, 64))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49152, n_tokens, dtype=np.int64)
    keys = kb.prefix_keys(tokens)
    store = TieredStore([(CpuTier("cpu", CpuTierConfig(capacity_bytes=64 << 20)), TierSettings())])
    await store.open()
    tiny = Chunk.from_bytes(b"x")
    for k in keys:
        await store.put(k, tiny)

    raw = tokens.astype("<u4").tobytes()
    t0 = time.perf_counter()
    for _ in range(rounds):
        h = bytes(32)
        for i in range(len(keys)):
            h = hashlib.sha256(h + raw[i * 1024 : (i + 1) * 1024]).digest()
    t_hash = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(rounds):
        res = await store.lookup(kb.prefix_keys(tokens))
        assert res.count == len(keys)
    t_all = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(rounds):
        await store.lookup(keys)
    t_lookup = time.perf_counter() - t0
    await store.close()
    n = len(keys) * rounds
    print(f"{len(keys)} chunk keys per prompt x {rounds} rounds")
    print(f"{'what':<34} {'keys/s':>12}")
    print(f"{'bare sha256 chain (reference)':<34} {n / t_hash:>12,.0f}")
    print(f"{'hash + lookup (the goal)':<34} {n / t_all:>12,.0f}")
    print(f"{'lookup only (keys prebuilt)':<34} {n / t_lookup:>12,.0f}")
    print("goal: hash + lookup >= 200,000 keys/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    asyncio.run(run(args.tokens, args.rounds))


if __name__ == "__main__":
    main()
