"""The fastest an acknowledged shared-memory put can be here, whatever the daemon does.

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_ack_floor.py [--sizes 1,4,16,32] [--rounds 60]

A direct write (kvstore/client/arena_writes.py) cannot take less than the
client's copy of the value into the daemon's memory, with its checksum, plus
one message to the daemon and its reply: the put is acknowledged only once the
daemon has stored it.  This measures that floor with a daemon that does
nothing at all: a second process that answers each one-byte message at once.

Per size, in one run:

* ``memcpy-distinct``: the reference of ``kvstore bench``'s goal (torch
  ``copy_`` between distinct buffers over 256 MiB, the faster of 1 and 2
  threads; ``kvstore.bench.runner.bench_memcpy_distinct``);
* ``copy+checksum``: what the client does (``copy_summed_at``, the copy
  direct writes make) into distinct blocks of a shared memfd;
* ``floor (blocking)``: that copy, then one byte to the peer process and its
  one-byte reply, both sides blocking in ``recv`` as a daemon's event loop and
  a client do.  The peer has been idle for the length of the copy, as the
  daemon is while the client copies;
* ``floor (spinning)``: the same with both sides polling their socket instead
  of sleeping in the kernel (two cores kept busy);
* ``kvstore put``: ``Client.put`` of the same sources into a real daemon
  (direct writes; one 2 GiB CPU tier), what ``kvstore bench`` times.

Rounds alternate the blocking variants (so machine load hits them alike); the
spinning one runs after them, alone (its peer would take a core from the
others).  Prints the median of each and, as the goal states it (put at least
0.5x memory-copy bandwidth, i.e. at most twice its time), the best ratio the
floor allows and the one kvstore reaches.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from kvstore.bench.runner import DISTINCT_BYTES, MiB, bench_memcpy_distinct, spawn_daemon
from kvstore.client import Client
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace
from kvstore.tiers.copier import SPLIT_SUMMED, copy_summed_at

GOAL = 0.5

#: The peer: answers each message with its bytes, blocking in recv or polling.
PEER = """
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
spin = sys.argv[2] == "spin"
s.setblocking(not spin)
while True:
    while True:
        try:
            m = s.recv(64)
            break
        except BlockingIOError:
            pass
    if not m:
        break
    s.sendall(m)
"""


@contextmanager
def peer(mode: str) -> Iterator[socket.socket]:
    """One end of a socket pair whose other end a peer process answers."""
    mine, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", PEER, str(theirs.fileno()), mode], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        mine.setblocking(mode != "spin")
        yield mine
    finally:
        mine.close()  # the peer reads end of stream and exits
        proc.wait(timeout=10)


def round_trip(sock: socket.socket) -> None:
    sock.sendall(b"S")
    while True:
        try:
            if sock.recv(64):
                return
            raise ConnectionError("the peer process ended")
        except BlockingIOError:
            pass


class Blocks:
    """Distinct sources (torch) and destinations (a populated shared memfd), DISTINCT_BYTES each."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.count = max(4, DISTINCT_BYTES // size)
        self.src = torch.empty(self.count, size, dtype=torch.uint8).random_(0, 255)
        fd = os.memfd_create("bench-ack-floor", os.MFD_CLOEXEC)
        os.ftruncate(fd, self.count * size)
        self.map = mmap.mmap(fd, self.count * size)
        os.close(fd)
        self.view = memoryview(self.map)
        self.dst = torch.frombuffer(self.map, dtype=torch.uint8)
        self.dst.fill_(1)  # every page mapped before timing
        self.pool = ThreadPoolExecutor(1)  # the client's one helper thread (ArenaReader.helper)
        self._i = 0

    def copy_summed(self) -> None:
        i, self._i = self._i, self._i + 1
        s, d = self.src[i % self.count], ((i * 7 + 3) % self.count) * self.size
        copy_summed_at(self.dst.data_ptr() + d, self.view[d : d + self.size], s.data_ptr(), self.size,
                       self.pool if self.size >= SPLIT_SUMMED else None)

    def source(self, i: int) -> torch.Tensor:
        return self.src[i % self.count]

    def close(self) -> None:
        self.pool.shutdown()
        del self.dst
        self.view.release()
        self.map.close()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(size: int, rounds: int, client: Client, kb: KeyBuilder) -> dict[str, float]:
    blocks = Blocks(size)
    times: dict[str, list[float]] = {"copy+checksum": [], "floor (blocking)": [], "kvstore put": [], "floor (spinning)": []}
    try:
        before = client.direct_writes
        with peer("block") as sock:
            def floor() -> None:
                blocks.copy_summed()
                round_trip(sock)

            def put(r: int) -> None:
                src = blocks.source(r)
                src[:8].view(torch.int64)[0] = r  # a new value each put
                client.put(kb.segment_key([size, r % 8]), src)

            for r in range(rounds + 2):  # two untimed rounds first
                got = {"copy+checksum": timed(blocks.copy_summed), "floor (blocking)": timed(floor),
                       "kvstore put": timed(lambda: put(r))}
                if r >= 2:
                    for name, t in got.items():
                        times[name].append(t)
        if client.direct_writes - before != rounds + 2:
            raise SystemExit(f"only {client.direct_writes - before} of {rounds + 2} puts were direct writes")
        with peer("spin") as spinning:
            def floor_spinning() -> None:
                blocks.copy_summed()
                round_trip(spinning)

            for r in range(rounds + 2):
                t = timed(floor_spinning)
                if r >= 2:
                    times["floor (spinning)"].append(t)
    finally:
        blocks.close()
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16,32", help="value sizes in MiB")
    ap.add_argument("--rounds", type=int, default=60, help="timed rounds per size")
    ap.add_argument("--json", action="store_true", help="print the medians as JSON instead of a table")
    a = ap.parse_args()
    if a.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    try:
        sizes = [int(float(s) * MiB) for s in a.sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes: comma-separated MiB, got {a.sizes!r}") from None
    if not sizes or min(sizes) < 4096:
        raise SystemExit("--sizes: each size must be at least 4 KiB (0.00390625)")
    torch.set_num_threads(1)  # like the clients of kvstore bench
    kb = KeyBuilder(Namespace("bench", "ack-floor"), LayoutFingerprint("uint8", 1, 1, 1, chunk_size=1))
    rows = []
    with spawn_daemon("2GiB") as addr, Client(addr, shm_bytes=64 << 20) as client:
        client.put(kb.segment_key([0]), b"registers the segment")
        for size in sizes:
            ref = bench_memcpy_distinct(size, max(20, a.rounds))
            row = {"size_bytes": size, "memcpy-distinct": (ref.get_p50_ms or 0.0) / 1e3}
            row.update(measure(size, a.rounds, client, kb))
            rows.append(row)
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    names = ["memcpy-distinct", "copy+checksum", "floor (blocking)", "floor (spinning)", "kvstore put"]
    print(f"{'size':>6} " + " ".join(f"{n:>17}" for n in names) + "   (p50, ms)")
    for row in rows:
        print(f"{row['size_bytes'] // MiB:>4}Mi " + " ".join(f"{row[n] * 1e3:>17.3f}" for n in names))
    print(f"\nput >= {GOAL}x memcpy-distinct, as ratios of the medians (memcpy time / put time):")
    print(f"{'size':>6} {'floor (blocking)':>17} {'floor (spinning)':>17} {'kvstore put':>17}")
    for row in rows:
        ratios = [row["memcpy-distinct"] / row[n] for n in ("floor (blocking)", "floor (spinning)", "kvstore put")]
        print(f"{row['size_bytes'] // MiB:>4}Mi " + " ".join(f"{r:>13.2f} {'ok' if r >= GOAL else 'NO':>3}" for r in ratios))


if __name__ == "__main__":
    main()
