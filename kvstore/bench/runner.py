"""``kvstore bench``: put/get throughput and latency of a daemon, with references.

For each value size it times, in one run on one machine:

* ``memcpy``: torch ``copy_`` of the same bytes into a preallocated buffer,
  again and again: at 1-4 MiB both buffers stay in the CPU caches;
* ``memcpy-distinct``: torch ``copy_`` between preallocated buffers that
  change every iteration, over a working set of :data:`DISTINCT_BYTES` (far
  larger than the last-level cache), as the daemon sees it: each put lands in
  another slot of its CPU tier, each get reads from wherever the chunk lives;
* ``kvstore-grpc``: the daemon through the gRPC byte stream (``shm=False``):
  puts and gets through the sync client's own HTTP/2 connection
  (kvstore/client/h2put.py, h2get.py) to the daemon's own listener
  (kvstore/server/h2get.py; the note says how many calls took it, and where);
* ``kvstore-shm``: the daemon through the shared-memory path (values placed
  in, and read into, buffers of the client's segment; gets read straight
  from the daemon's shared CPU arena, see kvstore/tiers/shared_arena.py);
* ``kvstore-shm-x8``: puts of :data:`BATCH` plain tensors at a time
  (``put_many``, what the vLLM connector does), written into the daemon's
  shared CPU arena in one request per group (kvstore/client/arena_writes.py);
  put only, latencies per call;
* the peers a user would pick instead (Redis through redis-py, LMCache's two
  servers through LMCache's own clients), when installed.

Throughput is bytes moved / wall time of the timed iterations (one client,
one request at a time); latencies are per request.

:func:`run` returns the report, a dict ready for JSON; ``report.py`` renders
it (the table, the goals, the plot, the JSON).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvstore.client import Client
from kvstore.keys import KeyBuilder, LayoutFingerprint, Namespace

MiB = 1 << 20
#: Working set of the ``memcpy-distinct`` reference, per side (sources, destinations).
DISTINCT_BYTES = 256 * MiB
#: Values per ``put_many`` of ``kvstore-shm-x8``.
BATCH = 8


@dataclass(frozen=True, slots=True)
class Result:
    target: str
    size_bytes: int
    put_gbps: float | None
    get_gbps: float | None
    put_p50_ms: float | None = None
    put_p99_ms: float | None = None
    get_p50_ms: float | None = None
    get_p99_ms: float | None = None
    note: str = ""


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize(target: str, size: int, put_s: list[float], get_s: list[float]) -> Result:
    def gbps(ts: list[float]) -> float | None:
        return size * len(ts) / sum(ts) / 1e9 if ts else None

    return Result(
        target,
        size,
        gbps(put_s),
        gbps(get_s),
        percentile(put_s, 50) * 1e3 if put_s else None,
        percentile(put_s, 99) * 1e3 if put_s else None,
        percentile(get_s, 50) * 1e3 if get_s else None,
        percentile(get_s, 99) * 1e3 if get_s else None,
    )


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch (OpenMP) threads, restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_memcpy(size: int, iters: int) -> Result:
    """torch ``copy_`` into a preallocated buffer, with torch's default thread
    count and with one thread; the faster is the reference (on a loaded
    machine idle OpenMP workers stall the parallel copy, on an idle one it
    is the faster)."""
    src = torch.empty(size, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty(size, dtype=torch.uint8)
    dst.copy_(src)
    default = torch.get_num_threads()
    best: Result | None = None
    for threads in dict.fromkeys((default, 1)):
        with torch_threads(threads):
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                dst.copy_(src)
                ts.append(time.perf_counter() - t0)
        r = dataclasses.replace(summarize("memcpy", size, ts, ts), note=f"torch copy_, {threads} thread(s)")
        if best is None or (r.get_gbps or 0) > (best.get_gbps or 0):
            best = r
    assert best is not None
    return best


def bench_memcpy_distinct(size: int, iters: int) -> Result:
    """torch ``copy_`` from one of many source buffers into one of many
    destinations, another pair each iteration, over :data:`DISTINCT_BYTES` per
    side; the faster of torch's default thread count and one thread."""
    count = max(4, DISTINCT_BYTES // max(size, 1))
    src = torch.empty(count, size, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty(count, size, dtype=torch.uint8)
    dst.copy_(src)  # touch every page before timing
    default = torch.get_num_threads()
    best: Result | None = None
    i = 0
    for threads in dict.fromkeys((default, 1)):
        with torch_threads(threads):
            ts = []
            for _ in range(iters):
                a, b = src[i % count], dst[(i * 7 + 3) % count]
                i += 1
                t0 = time.perf_counter()
                b.copy_(a)
                ts.append(time.perf_counter() - t0)
        r = summarize("memcpy-distinct", size, ts, ts)
        r = dataclasses.replace(r, note=f"torch copy_, {threads} thread(s), {count} x 2 buffers")
        if best is None or (r.get_gbps or 0) > (best.get_gbps or 0):
            best = r
    assert best is not None
    return best


@contextmanager
def spawn_daemon(capacity: str = "4GiB", server: str = "") -> Iterator[str]:
    """A daemon with one CPU tier on a free loopback port, stopped (SIGTERM) at exit;
    ``server``: more server settings in YAML flow style (``"http2_get: false"``)."""
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-") as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(
            f"server: {{host: 127.0.0.1, port: 0{', ' + server if server else ''}}}\n"
            f"tiers:\n  - {{name: cpu, kind: cpu, capacity: {capacity}, eviction: lru, on_evict: drop}}\n"
        )
        port_file = Path(tmp) / "port"
        # One OpenMP thread, as the LMCache peers get (peer_lmcache.py): client and
        # daemon share the cores, and idle OpenMP workers spin on them.
        env = {**os.environ}
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore.cli", "serve", "--config", str(cfg), "--port-file", str(port_file)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text():
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited at start: {proc.stderr.read() if proc.stderr else ''}")
                if time.monotonic() > deadline:
                    raise RuntimeError("daemon did not start within 60 s")
                time.sleep(0.05)
            yield f"127.0.0.1:{port_file.read_text().strip()}"
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def bench_kvstore(address: str, size: int, iters: int, warmup: int, *, shm: bool, slots: int = 8) -> Result:
    """Put then get ``iters`` values of ``size`` bytes (distinct content each time).

    The client runs with one torch thread, like the peers' clients."""
    with torch_threads(1):
        return _bench_kvstore(address, size, iters, warmup, shm=shm, slots=slots)


def _bench_kvstore(address: str, size: int, iters: int, warmup: int, *, shm: bool, slots: int) -> Result:
    kb = KeyBuilder(Namespace("bench", "bench"), LayoutFingerprint("uint8", 1, 1, 1, chunk_size=1))
    keys = [kb.segment_key([size, i]) for i in range(slots)]
    with Client(address, shm=shm, shm_bytes=max(64 * MiB, 3 * size + 8 * MiB)) as c:
        if shm:
            src = c.buffer(size)
            dst = c.buffer(size)
            if src is None or dst is None:
                return Result("kvstore-shm", size, None, None, note="shared memory unavailable")
            # As a long-lived client would be: every page of the daemon's shared arena mapped
            # here (0.15-0.25 s per 4 GiB), so no get pays a first-touch page fault.
            c.direct_reads_ready()
        else:
            src = torch.empty(size, dtype=torch.uint8)
            dst = torch.empty(size, dtype=torch.uint8)
        src.random_(0, 255)
        dst.zero_()
        stamp = src[:8].view(torch.int64)
        put_s: list[float] = []
        get_s: list[float] = []
        for i in range(warmup + iters):
            key = keys[i % slots]
            stamp[0] = i  # new content: the daemon must really store it
            t0 = time.perf_counter()
            c.put(key, src)
            t1 = time.perf_counter()
            meta = c.get_into(key, dst)
            t2 = time.perf_counter()
            if meta is None or not torch.equal(src, dst):
                raise RuntimeError(f"kvstore returned wrong bytes for {size}-byte value {i}")
            if i >= warmup:
                put_s.append(t1 - t0)
                get_s.append(t2 - t1)
        c.delete(keys)
        if shm:
            note = (
                f"{c.direct_writes} of {warmup + iters} puts written into the daemon's shared arena, "
                f"{c.direct_reads} gets read from it"
            )
        else:
            where = "the daemon's Get listener" if c.http2_get_port != int(address.rsplit(":", 1)[1]) else "its gRPC port"
            note = (
                f"{c.http2_puts} puts and {c.http2_gets} gets of {warmup + iters} over HTTP/2, now to {where}"
            )
    r = summarize("kvstore-shm" if shm else "kvstore-grpc", size, put_s, get_s)
    return dataclasses.replace(r, note=note)


def bench_kvstore_batch(address: str, size: int, calls: int, warmup: int) -> Result:
    """``calls`` puts of :data:`BATCH` plain tensors of ``size`` bytes each (new
    content every time) with ``put_many``, one torch thread; each value is
    then read back and compared."""
    kb = KeyBuilder(Namespace("bench", "batch"), LayoutFingerprint("uint8", 1, 1, 1, chunk_size=1))
    keys = [kb.segment_key([size, i]) for i in range(2 * BATCH)]
    with torch_threads(1), Client(address) as c:
        values = [torch.empty(size, dtype=torch.uint8).random_(0, 255) for _ in range(2 * BATCH)]
        stamps = [v[:8].view(torch.int64) for v in values]
        out = torch.empty(size, dtype=torch.uint8)
        c.direct_reads_ready()  # registers the segment; every page of the arena mapped here, as for kvstore-shm
        put_s: list[float] = []
        for i in range(warmup + calls):
            half = (i % 2) * BATCH  # alternate between two sets of sources and keys
            for stamp in stamps[half : half + BATCH]:
                stamp[0] = i
            items = list(zip(keys[half : half + BATCH], values[half : half + BATCH], strict=True))
            t0 = time.perf_counter()
            c.put_many(items)
            t1 = time.perf_counter()
            for k, v in items:
                if c.get_into(k, out) is None or not torch.equal(out, v):
                    raise RuntimeError(f"kvstore returned wrong bytes for a {size}-byte value of batch {i}")
            if i >= warmup:
                put_s.append(t1 - t0)
        c.delete(keys)
        note = f"put_many of {BATCH} tensors per call (p50/p99 per call); {c.direct_writes} puts written directly"
    # Bytes per call: BATCH values; the row is the value size's.
    return dataclasses.replace(summarize("kvstore-shm-x8", BATCH * size, put_s, []), size_bytes=size, note=note)


def run(
    sizes_mib: list[float],
    iters: int,
    warmup: int,
    *,
    address: str | None,
    peers: list[str],
    peer_python: str | None,
    progress: bool,
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    from tqdm import tqdm

    sizes = [int(s * MiB) for s in sizes_mib]
    steps = len(sizes) * (4 + len(peers))
    bar = tqdm(total=steps, disable=not progress, desc="kvstore bench", unit="step", file=sys.stderr)
    results: list[Result] = []
    findings: list[dict[str, object]] = []
    with spawn_daemon() if address is None else _given(address) as addr:
        for size in sizes:
            n = max(3, min(iters, int(iters * 4 * MiB / max(size, 1)) or 3))
            results.append(bench_memcpy(size, n))
            results.append(bench_memcpy_distinct(size, max(n, 20)))
            bar.update()
            for shm in (False, True):
                results.append(bench_kvstore(addr, size, n, warmup, shm=shm))
                bar.update()
            results.append(bench_kvstore_batch(addr, size, max(3, n // 4), warmup))
            bar.update()
    if peers:
        from kvstore.bench import peers as peer_mod

        for name in peers:
            try:
                for pr in peer_mod.run_peer(name, sizes, iters, warmup, peer_python=peer_python):
                    results.append(
                        Result(
                            pr.peer,
                            pr.size_bytes,
                            pr.put_gbps,
                            pr.get_gbps,
                            pr.put_p50_ms,
                            pr.put_p99_ms,
                            pr.get_p50_ms,
                            pr.get_p99_ms,
                            pr.note,
                        )
                    )
            except peer_mod.PeerUnavailable as exc:
                results.append(Result(name, 0, None, None, note=f"n/a: {exc}"))
            bar.update(len(sizes))
        if "lmcache-mp" in peers or "lmcache-tcp" in peers:
            try:
                findings.extend(asdict(f) for f in peer_mod.run_findings(peer_python=peer_python))
            except peer_mod.PeerUnavailable as exc:
                findings.append({"finding": "peer findings", "observed": None, "details": f"n/a: {exc}"})
    bar.close()
    return {
        "machine": machine(),
        "results": [asdict(r) for r in results],
        "findings": findings,
    }


@contextmanager
def _given(address: str) -> Iterator[str]:
    yield address


def machine() -> str:
    import platform

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}, torch {torch.__version__}"
