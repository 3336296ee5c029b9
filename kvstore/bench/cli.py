"""Arguments of ``kvstore bench``."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvstore.bench.peers import PEERS


def _sizes(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated MiB such as 1,4,16,32, got {text!r}") from None
    if not out or any(x <= 0 or x > 4096 for x in out):
        raise argparse.ArgumentTypeError("sizes must be in (0, 4096] MiB")
    return out


def _peers(text: str) -> list[str]:
    if text in ("", "none"):
        return []
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {bad}; choose from {list(PEERS)} or 'none'")
    return names


def add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="measure put/get throughput and latency against references and peers",
        description=(
            "Measure put and get throughput (GB/s) and p50/p99 latency of a kvstore daemon over the gRPC "
            "stream and the shared-memory path (single puts, and puts of 8 values at a time with put_many: "
            "kvstore-shm-x8), next to two memory copies (the same buffers again and again, "
            "cache-resident at 1-4 MiB; and distinct buffers over 256 MiB, as the daemon sees them) and, when "
            "installed, the peers "
            "a user would pick instead: Redis (redis-server + redis-py) and LMCache's raw-TCP and "
            "shared-memory servers (install with benchmarks/peers/install.sh).  Without --address it starts "
            "its own daemon (one 4 GiB CPU tier) on a free loopback port and stops it at the end."
        ),
    )
    p.add_argument("--address", help="benchmark this running daemon instead of starting one (host:port)")
    p.add_argument("--sizes", type=_sizes, default=[1.0, 4.0, 16.0, 32.0], help="value sizes in MiB (default 1,4,16,32)")
    p.add_argument("--iters", type=int, default=40, help="timed iterations at 4 MiB (scaled by size; default 40)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    p.add_argument(
        "--peers",
        type=_peers,
        default=list(PEERS),
        help="comma-separated peers to run: redis, lmcache-tcp, lmcache-mp, or none (default all)",
    )
    p.add_argument("--peer-python", help="python of the LMCache virtualenv (default .venv-peers/bin/python)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--plot", type=Path, help="also write a PNG plot of throughput to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from kvstore.bench.report import dump_json, plot, render_table
    from kvstore.bench.runner import run

    if args.iters < 1 or args.warmup < 0:
        raise SystemExit("kvstore bench: --iters must be >= 1 and --warmup >= 0")
    report = run(
        args.sizes,
        args.iters,
        args.warmup,
        address=args.address,
        peers=args.peers,
        peer_python=args.peer_python,
        progress=not args.no_progress,
    )
    print(dump_json(report) if args.json else render_table(report))
    if args.plot:
        plot(report, args.plot)
    return 0
