"""Client side of the LMCache peer benchmark; runs in the peer virtualenv.

Run with the python of the virtualenv made by ``benchmarks/peers/install.sh``
against an LMCache server that is already running (``kvstore.bench.peers``
starts and stops the servers)::

    .venv-peers/bin/python kvstore/bench/lmcache_worker.py bench \\
        --mode tcp --host 127.0.0.1 --port 6555 --sizes-mib 1,4,16,32 \\
        --iterations 10 --warmup 2
    .venv-peers/bin/python kvstore/bench/lmcache_worker.py finding \\
        --name mp-wedged-but-healthy --host 127.0.0.1 --port 6556 --http-port 6557

Every result is one JSON object on its own line of stdout: one per value size
for ``bench``, one per scenario for ``finding``; a failure prints
``{"error": ...}`` and exits 1. Everything else (LMCache's logging) goes to
stderr. This script and its sibling modules must not import kvstore: the peer
virtualenv does not have it, and LMCache's numpy pin must stay out of
kvstore's environment.

Workloads, one client, one value per operation, every key fresh:

* ``--mode tcp``: LMCache's legacy raw-TCP server (``lmcache_server``)
  through its client class ``LMCServerConnector``. Its PUT has no reply, so
  a put is timed as PUT followed by EXIST (the first moment the client knows
  the value is stored). A get is one GET.
* ``--mode mp``: LMCache's multiprocess server (``lmcache server``) through
  the classes behind ``lmcache bench server``: an ``EngineDrivenTransferContext``
  registered over ZMQ with a paged KV cache whose chunk (256 tokens) is
  exactly one value; the bytes go through the server's shared-memory pool
  when it was started with ``--shm-name``. A put is one STORE; a get is a
  LOOKUP (plus waiting for its prefetch) followed by a RETRIEVE, which is what
  an engine does to read a chunk back.

Every get is checked byte for byte against what was put. The client classes
and the JSON channel are in ``lmcache_clients.py``, the failure scenarios
(``finding``) in ``lmcache_findings.py``, next to this file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

# kvstore runs this file with ``python -I``, which leaves the script's
# directory off sys.path: add it, last, so that the siblings below are found
# and nothing else in it (cli.py, report.py, ...) shadows an installed module.
sys.path.append(os.path.dirname(os.path.realpath(__file__)))

# Plain module names: run by path, these files are in no package. mypy checks
# them as modules of kvstore.bench, so it reads them under those names.
if TYPE_CHECKING:
    from kvstore.bench.lmcache_clients import MIB, SOURCE_SLOTS, MPClient, TCPClient, emit, flush
    from kvstore.bench.lmcache_findings import FINDINGS
else:
    from lmcache_clients import MIB, SOURCE_SLOTS, MPClient, TCPClient, emit, flush
    from lmcache_findings import FINDINGS


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    xs = sorted(samples)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(
    peer: str,
    size: int,
    put_s: list[float],
    get_s: list[float],
    mismatches: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "peer": peer,
        "size_bytes": size,
        "iterations": len(put_s),
        "put_gbps": size * len(put_s) / sum(put_s) / 1e9,
        "get_gbps": size * len(get_s) / sum(get_s) / 1e9,
        "put_p50_ms": percentile(put_s, 50) * 1e3,
        "put_p99_ms": percentile(put_s, 99) * 1e3,
        "get_p50_ms": percentile(get_s, 50) * 1e3,
        "get_p99_ms": percentile(get_s, 99) * 1e3,
        "validated": mismatches == 0,
        "mismatches": mismatches,
        **extra,
    }


def bench_tcp(args: argparse.Namespace) -> None:
    import torch

    largest = max(args.sizes_mib) * MIB
    client = TCPClient(args.host, args.port, (SOURCE_SLOTS + 2) * largest)
    counter = 0
    try:
        for size_mib in args.sizes_mib:
            size = size_mib * MIB
            sources = [client.value(size) for _ in range(SOURCE_SLOTS)]
            put_s: list[float] = []
            get_s: list[float] = []
            mismatches = 0
            for i in range(args.warmup + args.iterations):
                counter += 1
                key = client.key(counter)
                src = sources[i % SOURCE_SLOTS]
                t0 = time.perf_counter()
                client.put(key, src)
                stored = client.exists(key)
                t1 = time.perf_counter()
                got = client.get(key)
                t2 = time.perf_counter()
                if not stored or got is None or not torch.equal(got.tensor, src.tensor):
                    mismatches += 1
                if got is not None:
                    got.ref_count_down()
                if i >= args.warmup:
                    put_s.append(t1 - t0)
                    get_s.append(t2 - t1)
            for src in sources:
                src.ref_count_down()
            emit(
                summarize(
                    "lmcache-tcp",
                    size,
                    put_s,
                    get_s,
                    mismatches,
                    {"put_timed_as": "PUT+EXIST"},
                )
            )
    finally:
        client.close()


def bench_mp(args: argparse.Namespace) -> None:
    import torch

    scratch = SOURCE_SLOTS
    for size_mib in args.sizes_mib:
        size = size_mib * MIB
        client = MPClient(args.host, args.port, size, SOURCE_SLOTS + 1)
        try:
            put_s: list[float] = []
            get_s: list[float] = []
            mismatches = 0
            for i in range(args.warmup + args.iterations):
                slot = i % SOURCE_SLOTS
                t0 = time.perf_counter()
                stored = client.store(i, slot)
                t1 = time.perf_counter()
                client.zero_slot(scratch)
                t2 = time.perf_counter()
                hit, rid = client.lookup(i)
                got = hit == 1 and client.retrieve(i, scratch, rid)
                t3 = time.perf_counter()
                client.end_session(rid)
                if not (
                    stored
                    and got
                    and torch.equal(client.slot_bytes(scratch), client.slot_bytes(slot))
                ):
                    mismatches += 1
                if i >= args.warmup:
                    put_s.append(t1 - t0)
                    get_s.append(t3 - t2)
            emit(
                summarize(
                    "lmcache-mp",
                    size,
                    put_s,
                    get_s,
                    mismatches,
                    {"transfer": client.transfer, "get_timed_as": "LOOKUP+RETRIEVE"},
                )
            )
        finally:
            client.close()


def _sizes(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",") if x.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive integers (MiB)")
    return sizes


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="timed put/get workload")
    b.add_argument("--mode", choices=("tcp", "mp"), required=True)
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--sizes-mib", type=_sizes, default=[1, 4, 16, 32])
    b.add_argument("--iterations", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    f = sub.add_parser("finding", help="one failure scenario")
    f.add_argument("--name", choices=sorted(FINDINGS), required=True)
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--http-port", type=int, default=0)
    f.add_argument("--l1-size-gb", type=float, default=0.25)
    f.add_argument("--value-mib", type=int, default=32)
    f.add_argument("--budget-gb", type=float, default=1.0)
    f.add_argument("--server-pid", type=int, default=None)
    args = p.parse_args(argv)
    if args.command == "bench" and (args.iterations < 1 or args.warmup < 0):
        p.error("--iterations must be >= 1 and --warmup >= 0")
    return args


@contextmanager
def _reported_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        import traceback

        traceback.print_exc()
        emit({"error": f"{type(exc).__name__}: {exc}"})
        # Same as below: leftover client threads must not keep us alive.
        os._exit(1)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with _reported_errors():
        if args.command == "bench":
            (bench_tcp if args.mode == "tcp" else bench_mp)(args)
        else:
            FINDINGS[args.name](args)
    # zmq/LMCache leave non-daemon threads behind; the results are out.
    flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
