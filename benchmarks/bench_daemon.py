"""Daemon put/get throughput and latency, with memcpy and the peers — the same run as ``kvstore bench``.

Run:  python benchmarks/bench_daemon.py [--sizes 1,4,16,32] [--peers redis,lmcache-tcp,lmcache-mp] [--json] [--plot out.png]

Starts its own daemon (one 4 GiB CPU tier) on a free loopback port.  Peers
need `bash benchmarks/peers/install.sh` (LMCache in its own virtualenv) and a
`redis-server` binary; missing ones are reported as n/a.  Goals (issue 3):
gRPC get faster than Redis and at least half of LMCache's raw-TCP get;
shared-memory get and put each at least 2x LMCache's shared-memory server and
at least 50% of the memory copy measured in the same run, judged against
``memcpy-distinct`` (a copy between buffers that change every iteration over
256 MiB, as the daemon's CPU tier sees it; the cache-resident ``memcpy`` is
printed too).  It prints the ratio of each goal at each size under the table.  Run it under
`flock /tmp/kvstore-bench.lock` on a shared machine; the latest tables are in
docs/benchmarks/daemon.md.
"""

from __future__ import annotations

import sys

from kvstore.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
