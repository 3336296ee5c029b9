"""What the daemon did and holds: one source for the Admin service and Prometheus.

Two kinds of figures, never double-counted:

* **Traffic**, recorded by the KVStore service as requests complete: chunk
  reads (hit in a tier, or miss), client writes (admitted to a tier), prefix
  lookups, each with its payload bytes and its *busy time* (from the
  request's first byte of that chunk to its last);
* **State**, read from the store when asked: bytes, chunks and capacity per
  tier and namespace, pins, quotas, evictions, promotions, demotions,
  write-throughs and the tiers' own error counters.

Internal traffic (write-through, demotion, promotion, recoding) reads tiers
too, but is not a client read: it is not counted as a hit nor as read bytes.
Bandwidth is bytes / busy seconds: the speed of the tier while it serves,
which stays right whatever the load (rate() over the byte counters gives
the throughput).  Per-tier misses follow the store's search order: a read
that reaches tier *i* and does not find the chunk there is a miss of tier *i*.

RPC latency and error codes are recorded by a gRPC server interceptor
(:meth:`Metrics.interceptor`).  :meth:`Metrics.serve` exports everything in
the Prometheus text format over HTTP, from the daemon's own event loop, so
a scrape sees a consistent snapshot without locks.
"""

from kvstore.metrics.core import (
    HEALTH_WINDOW_S,
    IOCounter,
    Metrics,
    NamespaceSnapshot,
    Snapshot,
    TierSnapshot,
)
from kvstore.metrics.http import MetricsServer

__all__ = [
    "HEALTH_WINDOW_S",
    "IOCounter",
    "Metrics",
    "MetricsServer",
    "NamespaceSnapshot",
    "Snapshot",
    "TierSnapshot",
]
