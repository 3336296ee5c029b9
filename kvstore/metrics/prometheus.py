"""Prometheus metric families from a :class:`~kvstore.metrics.core.Snapshot`, built at each scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.metrics.core import HEALTH_WINDOW_S, NamespaceSnapshot, Snapshot, TierSnapshot

if TYPE_CHECKING:
    from kvstore.metrics.core import Metrics


class SnapshotCollector(Collector):
    """Turns a :class:`Snapshot` into metric families at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self._metrics.snapshot()
        yield from _global_families(snap)
        yield from _tier_families(snap.tiers)
        yield from _namespace_families(snap.namespaces)


_Kind = type[CounterMetricFamily] | type[GaugeMetricFamily]


def _family(kind: _Kind, name: str, doc: str, labels: list[str], rows: list[tuple[list[str], float]]) -> Metric:
    fam = kind(name, doc, labels=labels)
    for values, v in rows:
        fam.add_metric(values, v)
    return fam


def _global_families(s: Snapshot) -> Iterator[Metric]:
    C, G = CounterMetricFamily, GaugeMetricFamily
    yield _family(C, "kvstore_gets", "Chunk reads asked for by clients.", [], [([], s.gets)])
    yield _family(C, "kvstore_misses", "Chunk reads that found the chunk in no tier.", [], [([], s.misses)])
    yield _family(G, "kvstore_hit_ratio", "Hits / gets since the daemon started.", [], [([], s.hit_ratio)])
    yield _family(C, "kvstore_lookup_keys", "Keys asked about by prefix lookups.", [], [([], s.lookup_keys)])
    yield _family(C, "kvstore_lookup_hits", "Keys that prefix lookups found.", [], [([], s.lookup_hits)])
    yield _family(
        C, "kvstore_shared_reads", "Chunk reads clients served from the shared CPU arena (counted in gets too).",
        [], [([], s.shared_reads)],
    )
    yield _family(
        C, "kvstore_direct_writes", "Chunk puts clients wrote into the shared CPU arena themselves (counted in writes too).",
        [], [([], s.direct_writes)],
    )
    yield _family(
        G, "kvstore_direct_write_reserved_bytes",
        "Bytes of the shared CPU arena reserved for clients' next direct writes (all connections; counted as used).",
        [], [([], s.direct_write_reserved_bytes)],
    )
    yield _family(
        C, "kvstore_shared_unpublished",
        "Puts into the CPU tier not published for direct reads (their index bucket was full): gets of those chunks use a request.",
        [], [([], s.shared_unpublished)],
    )
    yield _family(G, "kvstore_pins", "Live pin leases.", [], [([], s.pins)])
    yield _family(G, "kvstore_uptime_seconds", "Seconds since the daemon started.", [], [([], s.uptime_s)])
    yield _family(
        C, "kvstore_rpc_errors", "RPCs that ended with a status other than OK.", ["method", "code"],
        [([m, c], n) for (m, c), n in sorted(s.rpc_errors.items())],
    )


def _tier_families(tiers: list[TierSnapshot]) -> Iterator[Metric]:
    C, G = CounterMetricFamily, GaugeMetricFamily
    rows: list[tuple[_Kind, str, str, Callable[[TierSnapshot], float]]] = [
        (C, "kvstore_hits", "Client reads served by this tier.", lambda t: t.hits),
        (C, "kvstore_tier_misses", "Client reads that reached this tier and missed.", lambda t: t.misses),
        (C, "kvstore_read_bytes", "Payload bytes of client reads served by this tier.", lambda t: t.reads.bytes),
        (C, "kvstore_read_seconds", "Busy seconds of client reads served by this tier.", lambda t: t.reads.seconds),
        (C, "kvstore_writes", "Client writes admitted to this tier.", lambda t: t.writes.ops),
        (C, "kvstore_write_bytes", "Payload bytes of client writes admitted to this tier.", lambda t: t.writes.bytes),
        (C, "kvstore_write_seconds", "Busy seconds of client writes to this tier.", lambda t: t.writes.seconds),
        (G, "kvstore_read_bandwidth_bytes_per_second", "Read bytes / read busy seconds.", lambda t: t.reads.bandwidth),
        (G, "kvstore_write_bandwidth_bytes_per_second", "Write bytes / busy seconds.", lambda t: t.writes.bandwidth),
        (C, "kvstore_evictions", "Chunks evicted from this tier.", lambda t: t.evictions),
        (C, "kvstore_evicted_bytes", "Payload bytes evicted from this tier.", lambda t: t.evicted_bytes),
        (C, "kvstore_promotions", "Chunks promoted from this tier to the top tier.", lambda t: t.promotions),
        (C, "kvstore_demotions", "Chunks demoted from this tier to the next.", lambda t: t.demotions),
        (C, "kvstore_write_through", "Chunks copied into this tier by write-through.", lambda t: t.write_through),
        (C, "kvstore_write_through_dropped", "Write-throughs dropped (queue full).", lambda t: t.write_through_dropped),
        (C, "kvstore_tier_errors", "I/O errors, corrupt chunks and failed write-throughs.", lambda t: t.errors),
        (C, "kvstore_corrupt_chunks", "Chunks dropped for failing their checksum.", lambda t: t.corrupt),
        (G, "kvstore_tier_capacity_bytes", "Effective capacity.", lambda t: t.capacity_bytes),
        (G, "kvstore_tier_max_capacity_bytes", "Capacity the tier was started with.", lambda t: t.max_capacity_bytes),
        (G, "kvstore_tier_used_bytes", "Bytes used, as the tier counts them.", lambda t: t.used_bytes),
        (G, "kvstore_tier_chunks", "Chunks held.", lambda t: t.chunks),
        (G, "kvstore_tier_pinned_chunks", "Pinned chunks held.", lambda t: t.pinned_chunks),
        (G, "kvstore_tier_pinned_bytes", "Payload bytes of pinned chunks held.", lambda t: t.pinned_bytes),
    ]
    for kind, name, doc, get in rows:
        yield _family(kind, name, doc, ["tier"], [([t.name], get(t)) for t in tiers])
    yield _family(
        G, "kvstore_tier_up", f"1 unless the tier's error count grew in the last {HEALTH_WINDOW_S:g} s.",
        ["tier", "kind"], [([t.name, t.kind], 1.0 if t.healthy else 0.0) for t in tiers],
    )


def _namespace_families(nss: list[NamespaceSnapshot]) -> Iterator[Metric]:
    C, G = CounterMetricFamily, GaugeMetricFamily
    yield _family(
        G, "kvstore_namespace_bytes", "Payload bytes of a namespace in a tier.", ["namespace", "tier"],
        [([n.namespace, t], b) for n in nss for t, b, _ in n.tiers],
    )
    yield _family(
        G, "kvstore_namespace_chunks", "Chunks of a namespace in a tier.", ["namespace", "tier"],
        [([n.namespace, t], c) for n in nss for t, _, c in n.tiers],
    )
    rows: list[tuple[_Kind, str, str, Callable[[NamespaceSnapshot], float]]] = [
        (G, "kvstore_namespace_quota_bytes", "Quota per managed tier (0 = none).", lambda n: n.quota_bytes),
        (C, "kvstore_namespace_hits", "Client reads of the namespace that hit.", lambda n: n.hits),
        (C, "kvstore_namespace_misses", "Client reads of the namespace that missed.", lambda n: n.misses),
        (C, "kvstore_namespace_evictions", "Chunks of the namespace evicted, all tiers.", lambda n: n.evictions),
        (C, "kvstore_namespace_promotions", "Chunks of the namespace promoted, all tiers.", lambda n: n.promotions),
        (C, "kvstore_namespace_demotions", "Chunks of the namespace demoted, all tiers.", lambda n: n.demotions),
        (C, "kvstore_namespace_read_bytes", "Payload bytes of the namespace read.", lambda n: n.reads.bytes),
        (C, "kvstore_namespace_write_bytes", "Payload bytes of the namespace written.", lambda n: n.writes.bytes),
    ]
    for kind, name, doc, get in rows:
        yield _family(kind, name, doc, ["namespace"], [([n.namespace], get(n)) for n in nss])
