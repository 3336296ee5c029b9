"""Fuzzing the disk tier's recovery: random truncation, bit flips and junk in its files.

A pristine directory of chunks is written once.  Each round copies it,
damages a few files at random (before the tier opens, or behind its back
while it is open), opens the tier and reads every key: each read must be the
exact bytes that were put, or a miss, never other bytes; files that were not
touched must all still be served.  ``KVSTORE_FUZZ_LONG=1`` runs 20x the rounds.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from kvstore.chunk import Chunk
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.disk_config import DiskTierConfig
from tests.reliability import fuzz_count

NS = Namespace("fuzz", "disk/model")
N_CHUNKS = 24


def key_of(i: int) -> ChunkKey:
    return ChunkKey(NS, "00000000feedface", "p" + f"{i:064x}")


def payload_of(i: int) -> bytes:
    return random.Random(i).randbytes([0, 1, 511, 4096, 40_000][i % 5] + i)


def config(root: Path) -> DiskTierConfig:
    return DiskTierConfig(path=root, capacity_bytes=1 << 30, fsync=False)


def damage(rng: random.Random, path: Path, pristine: dict[Path, bytes]) -> None:
    data = bytearray(path.read_bytes())
    op = rng.randrange(7)
    if op == 0 and data:  # truncate anywhere, headers included
        data = data[: rng.randrange(len(data))]
    elif op == 1 and data:  # flip 1-8 bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif op == 2:  # append junk
        data += rng.randbytes(rng.randint(1, 100))
    elif op == 3:  # replace with random bytes of the same size
        data = bytearray(rng.randbytes(len(data)))
    elif op == 4 and len(data) > 64:  # flip bits in the header only
        i = rng.randrange(64)
        data[i] ^= 1 << rng.randrange(8)
    elif op == 5:
        data = bytearray()
    else:  # another chunk's file under this name ("renamed from elsewhere")
        data = bytearray(pristine[rng.choice([p for p in pristine if p != path])])
    path.write_bytes(bytes(data))


async def build(root: Path) -> None:
    async with DiskTier("disk", config(root)) as tier:
        for i in range(N_CHUNKS):
            await tier.put(key_of(i), Chunk.from_bytes(payload_of(i)))


async def one_round(rng: random.Random, pristine: dict[Path, bytes], root: Path, behind_back: bool) -> tuple[int, int]:
    """Damage, open, read everything, repair; (files damaged, chunks still served)."""
    files = sorted(pristine)
    victims = rng.sample(files, rng.randint(1, 4))
    if rng.random() < 0.2:  # a leftover temp file of a put that never committed
        (files[0].parent / f".{files[0].stem}.{rng.randrange(1 << 32):x}.tmp").write_bytes(rng.randbytes(99))
    if not behind_back:
        for v in victims:
            damage(rng, v, pristine)
    served = 0
    async with DiskTier("disk", config(root)) as tier:
        if behind_back:
            for v in victims:
                damage(rng, v, pristine)
        for i in range(N_CHUNKS):
            chunk = await tier.get(key_of(i))
            if chunk is None:
                continue
            with chunk:
                assert bytes(chunk.payload) == payload_of(i), f"chunk {i} served with other bytes"
            served += 1
        assert not list(files[0].parent.glob("*.tmp")), "open() leaves no temp files"
    for v in victims:  # back to pristine for the next round
        v.write_bytes(pristine[v])
    return len(victims), served


def test_random_damage_never_serves_wrong_bytes(tmp_path: Path) -> None:
    rng = random.Random(20)
    root = tmp_path / "disk"
    asyncio.run(build(root))
    pristine = {p: p.read_bytes() for p in root.rglob("*.kvc")}
    assert len(pristine) == N_CHUNKS
    damaged = served = 0
    rounds = fuzz_count(200)

    async def run_all() -> None:
        nonlocal damaged, served
        for r in range(rounds):
            d, s = await one_round(rng, pristine, root, behind_back=r % 2 == 1)
            damaged += d
            served += s
            # Untouched files are all served: damage is confined to the damaged files.
            assert s >= N_CHUNKS - d

    asyncio.run(run_all())
    print(f"{rounds} rounds, {damaged} files damaged, {served} chunks served, all byte-exact")
    assert damaged >= rounds
