"""What the gRPC-stream get costs on each side: grpcio's reader against the
client's own HTTP/2 reader, on a daemon with glibc's default malloc settings
and with the ones ``kvstore serve`` applies (kvstore/server/malloc.py).

Run:  flock /tmp/kvstore-bench.lock python benchmarks/bench_get_paths.py [--sizes 0.0001,1,4,16] [--rounds 30]

Two daemons (one 1 GiB CPU tier each) on free loopback ports, one started
with the malloc settings turned off.  For each size, rounds interleave the
four combinations (so machine load hits them alike); each round is one
``Client.get_into`` of a stored value, checked byte for byte at the end.
Prints the median latency and GB/s of each, and the CPU time per get of the
client and of the daemon (from /proc, so it includes the kernel's share).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from kvstore.client import Client
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace

MiB = 1 << 20
#: Starts ``kvstore serve`` with the malloc settings replaced by a no-op (the untuned daemon).
UNTUNED = (
    "import sys, kvstore.server.malloc as m; m.tune_for_streaming = lambda: False; "
    "from kvstore.cli import main; sys.exit(main(sys.argv[1:]))"
)


@contextmanager
def daemon(tuned: bool) -> Iterator[tuple[str, psutil.Process]]:
    with tempfile.TemporaryDirectory(prefix="kvstore-getpaths-") as tmp:
        cfg, port_file = Path(tmp) / "c.yaml", Path(tmp) / "port"
        cfg.write_text(
            "server: {host: 127.0.0.1, port: 0}\n"
            "tiers:\n  - {name: cpu, kind: cpu, capacity: 1GiB, eviction: lru, on_evict: drop}\n"
        )
        entry = ["-m", "kvstore.cli"] if tuned else ["-c", UNTUNED]
        args = [sys.executable, *entry, "serve", "--config", str(cfg), "--port-file", str(port_file)]
        env = {**os.environ}
        env.setdefault("OMP_NUM_THREADS", "1")  # as kvstore bench runs its daemon
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("daemon did not start")
                time.sleep(0.05)
            yield f"127.0.0.1:{port_file.read_text().strip()}", psutil.Process(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.0001,1,4,16", help="value sizes in MiB")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds at 4 MiB (scaled by size)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    me = psutil.Process()
    kb = KeyBuilder(Namespace("bench", "bench"), LayoutFingerprint("uint8", 1, 1, 1, chunk_size=1))
    with daemon(True) as (tuned_addr, tuned_proc), daemon(False) as (plain_addr, plain_proc):
        combos = {}
        for dname, addr, proc in (("malloc tuned", tuned_addr, tuned_proc), ("malloc default", plain_addr, plain_proc)):
            for reader, h2 in (("HTTP/2 reader", True), ("grpcio", False)):
                combos[(dname, reader)] = (Client(addr, shm=False, http2_get=h2), proc)
        print(f"{'size':>9} {'daemon':<15} {'client reader':<14} {'p50 ms':>8} {'GB/s':>6} {'client cpu ms':>14} {'daemon cpu ms':>14}")
        for size_mib in (float(x) for x in args.sizes.split(",")):
            size = max(1, int(size_mib * MiB))
            key = kb.segment_key([size, 0])
            src = torch.empty(size, dtype=torch.uint8).random_(0, 255)
            for c, _ in combos.values():
                c.put(key, src)
            rounds = max(8, int(args.rounds * 4 * MiB / max(size, MiB)))
            times: dict[tuple[str, str], list[float]] = {k: [] for k in combos}
            cpu: dict[tuple[str, str], list[float]] = {k: [0.0, 0.0] for k in combos}
            dst = torch.empty(size, dtype=torch.uint8)
            for r in range(rounds + 2):
                for k, (c, proc) in combos.items():
                    c0, d0, t0 = cpu_s(me), cpu_s(proc), time.perf_counter()
                    c.get_into(key, dst)
                    t = time.perf_counter() - t0
                    if r >= 2:  # warm-up
                        times[k].append(t)
                        cpu[k][0] += cpu_s(me) - c0
                        cpu[k][1] += cpu_s(proc) - d0
                    if not torch.equal(dst, src):
                        raise RuntimeError(f"wrong bytes from {k}")
            for k, ts in times.items():
                p50 = statistics.median(ts)
                print(f"{size:>9} {k[0]:<15} {k[1]:<14} {p50 * 1e3:>8.2f} {size / p50 / 1e9:>6.2f} "
                      f"{cpu[k][0] / len(ts) * 1e3:>14.2f} {cpu[k][1] / len(ts) * 1e3:>14.2f}", flush=True)
        for c, _ in combos.values():
            c.close()


if __name__ == "__main__":
    main()
