"""Crash test of the disk tier: SIGKILL a writer mid-stream, then reopen.

The writer is this file run as a script (``python test_disk_crash.py ROOT
START``): it puts chunks with deterministic payloads, a few in flight at a
time, and prints each chunk's index, flushed, right after its put returns.
Every index printed is an acknowledged put and must survive the kill.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3

from kvstore.chunk import Chunk
from kvstore.keys import ChunkKey, Namespace
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.disk_config import DiskTierConfig

IN_FLIGHT = 4
ROUNDS = 4


def key_of(i: int) -> ChunkKey:
    return ChunkKey(Namespace("crash", "test/model"), "00000000deadbeef", "p" + f"{i:064x}")


def index_of(key: ChunkKey) -> int:
    return int(key.digest[1:], 16)


def payload_of(i: int) -> bytes:
    # 4 KiB .. ~1 MiB, so that a kill often lands inside a write.
    n = 4096 + (i * 7919) % (1 << 20)
    return blake3.blake3(f"chunk {i}".encode()).digest(length=n)


def config(root: Path) -> DiskTierConfig:
    return DiskTierConfig(path=root, capacity_bytes=1 << 34, fsync=True, io_threads=IN_FLIGHT)


async def write_forever(root: Path, start: int) -> None:
    async with DiskTier("crash", config(root)) as tier:
        next_i = start
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int) -> None:
            try:
                await tier.put(key_of(i), Chunk.from_bytes(payload_of(i)))
                # Acknowledge only after put returned.
                sys.stdout.write(f"{i}\n")
                sys.stdout.flush()
            finally:
                sem.release()

        tasks: set[asyncio.Task[None]] = set()
        while next_i < start + 100_000:
            await sem.acquire()
            task = asyncio.create_task(one(next_i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_i += 1


def run_round(root: Path, start: int, kill_after: int) -> tuple[set[int], int]:
    """Start a writer, SIGKILL it after ``kill_after`` acks; (acked, temp files left)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, str(root), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: set[int] = set()
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while len(acked) < kill_after:
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"writer exited early ({proc.wait()}): {err}")
            acked.add(int(line))
            assert time.monotonic() < deadline, "writer too slow"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        # Lines flushed before the kill are acknowledged puts too.
        acked.update(int(line) for line in proc.stdout.read().split())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == -signal.SIGKILL
    return acked, len(list(root.rglob("*.tmp")))


async def check_after_crash(root: Path, all_acked: set[int]) -> None:
    async with DiskTier("crash", config(root)) as tier:
        assert list(root.rglob("*.tmp")) == [], "open() must remove leftover temp files"
        # Nothing was torn: a kill can only lose puts in flight, never half-write one.
        assert tier.counters.corrupt == 0
        present = {index_of(k) for k, _ in tier.entries()}
        assert all_acked <= present, f"acknowledged puts lost: {sorted(all_acked - present)[:10]}"
        # Acknowledged and unacknowledged alike: whatever is there is whole and right.
        for i in sorted(present):
            chunk = await tier.get(key_of(i))
            assert chunk is not None, f"chunk {i} is indexed but unreadable"
            assert bytes(chunk.payload) == payload_of(i), f"chunk {i} differs"
        assert tier.counters.corrupt == 0 and tier.counters.hits == len(present)


def test_acknowledged_puts_survive_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    all_acked: set[int] = set()
    temps_seen = 0
    for r in range(ROUNDS):
        # Each round kills a fresh writer at a different point, on top of the
        # previous rounds' files, so that open() also recovers after a crash.
        acked, temps = run_round(root, start=r * 1_000_000, kill_after=15 + 11 * r)
        all_acked |= acked
        temps_seen += temps
        print(f"round {r}: {len(acked)} acknowledged, {temps} temp files left by the kill")
        asyncio.run(check_after_crash(root, all_acked))
    # The kills landed mid-put (temp files were there to clean up), so the
    # checks above were not run on a quiescent directory only.
    assert temps_seen > 0


if __name__ == "__main__":
    asyncio.run(write_forever(Path(sys.argv[1]), int(sys.argv[2])))
