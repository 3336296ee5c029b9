"""Traffic counters and the consistent snapshot the Admin service and Prometheus share."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from kvstore.keys import ChunkKey, Namespace
from kvstore.store import NamespaceMoves, TieredStore

if TYPE_CHECKING:
    from kvstore.metrics.http import MetricsServer
    from kvstore.server.auth import TokenTable
    import grpc

#: Seconds a tier stays unhealthy after its error count last grew.
HEALTH_WINDOW_S = 60.0
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


@dataclass(slots=True)
class IOCounter:
    """Operations, payload bytes and busy seconds of one kind of traffic."""

    ops: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        self.ops += 1
        self.bytes += nbytes
        self.seconds += max(0.0, seconds)

    @property
    def bandwidth(self) -> float:
        """Bytes per busy second (0 before any traffic)."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def copy(self) -> IOCounter:
        return IOCounter(self.ops, self.bytes, self.seconds)


@dataclass(slots=True)
class _NsTraffic:
    hits: int = 0
    misses: int = 0
    reads: IOCounter = field(default_factory=IOCounter)
    writes: IOCounter = field(default_factory=IOCounter)


@dataclass(frozen=True, slots=True)
class TierSnapshot:
    name: str
    kind: str
    eviction_policy: str
    capacity_bytes: int
    max_capacity_bytes: int
    used_bytes: int
    chunks: int
    pinned_chunks: int
    pinned_bytes: int
    hits: int
    misses: int
    evictions: int
    evicted_bytes: int
    promotions: int
    demotions: int
    write_through: int
    write_through_dropped: int
    errors: int
    corrupt: int
    reads: IOCounter
    writes: IOCounter
    healthy: bool


@dataclass(frozen=True, slots=True)
class NamespaceSnapshot:
    namespace: str
    bytes: int
    chunks: int
    quota_bytes: int
    #: (tier, bytes, chunks) for each tier holding some of it
    tiers: tuple[tuple[str, int, int], ...]
    pinned_chunks: int
    hits: int
    misses: int
    evictions: int
    promotions: int
    demotions: int
    reads: IOCounter
    writes: IOCounter


@dataclass(frozen=True, slots=True)
class Snapshot:
    tiers: list[TierSnapshot]
    namespaces: list[NamespaceSnapshot]
    gets: int
    hits: int
    misses: int
    lookup_keys: int
    lookup_hits: int
    #: Hits clients served themselves from the shared arena (told afterwards; in ``gets`` too).
    shared_reads: int
    #: Puts clients wrote into the shared arena themselves (direct writes; in the tier's writes too).
    direct_writes: int
    #: Bytes of the shared arena held reserved for clients' next direct writes.
    direct_write_reserved_bytes: int
    #: Chunks the shared tier could not publish for direct reads (an index bucket was full).
    shared_unpublished: int
    pins: int
    uptime_s: float
    rpc_errors: dict[tuple[str, str], int]

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.gets if self.gets else 0.0


class Metrics:
    """Traffic counters of one daemon, and the views of them; see the module docstring.

    Not thread safe: call it from the daemon's event loop.
    """

    def __init__(self, store: TieredStore, *, health_window_s: float = HEALTH_WINDOW_S) -> None:
        self._store = store
        self._health_window = health_window_s
        self._started = time.monotonic()
        self.gets = 0
        self.misses = 0
        self.lookup_keys = 0
        self.lookup_hits = 0
        self.shared_reads = 0
        self.direct_writes = 0
        self._reads: dict[str, IOCounter] = defaultdict(IOCounter)
        self._writes: dict[str, IOCounter] = defaultdict(IOCounter)
        self._ns: dict[Namespace, _NsTraffic] = defaultdict(_NsTraffic)
        self._rpc_errors: dict[tuple[str, str], int] = defaultdict(int)
        self._errors_seen: dict[str, int] = {}
        self._error_at: dict[str, float] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self._latency = Histogram(
            "kvstore_rpc_duration_seconds",
            "Duration of RPCs, from the request's arrival to the last reply byte, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        from kvstore.metrics.prometheus import SnapshotCollector

        self.registry.register(SnapshotCollector(self))

    # -- recording (the KVStore service) ---------------------------------------
    def record_read(self, key: ChunkKey, tier: str | None, nbytes: int, seconds: float) -> None:
        """A client read of ``key`` served from ``tier`` (None: a tier the store
        does not index, i.e. a networked one)."""
        self.gets += 1
        self._reads[tier or self._unindexed_tier()].add(nbytes, seconds)
        ns = self._ns[key.namespace]
        ns.hits += 1
        ns.reads.add(nbytes, seconds)

    def record_miss(self, key: ChunkKey) -> None:
        self.gets += 1
        self.misses += 1
        self._ns[key.namespace].misses += 1

    def record_write(self, key: ChunkKey, tier: str, nbytes: int, seconds: float) -> None:
        """A client write of ``key`` admitted to ``tier``."""
        self._writes[tier].add(nbytes, seconds)
        self._ns[key.namespace].writes.add(nbytes, seconds)

    def record_writes(self, items: list[tuple[ChunkKey, str, int]], seconds: float) -> None:
        """Client writes (key, tier, bytes) that shared ``seconds`` of busy time
        (one batched request), split in proportion to their bytes."""
        total = sum(n for _, _, n in items)
        for key, tier, n in items:
            share = n / total if total else 1 / len(items)
            self.record_write(key, tier, n, seconds * share)

    def _reserved_bytes(self) -> int:
        tier = self._store.writable_tier()
        return 0 if tier is None else tier.reserved_bytes

    def _shared_unpublished(self) -> int:
        tier = self._store.shared_tier()
        return 0 if tier is None or tier.shared is None else tier.shared.overflows

    def record_lookup(self, keys: int, found: int) -> None:
        self.lookup_keys += keys
        self.lookup_hits += found

    def _unindexed_tier(self) -> str:
        for tier in self._store.tiers:
            if not tier.managed:
                return tier.name
        return "unknown"

    # -- RPCs (the interceptor) --------------------------------------------------
    def observe_rpc(self, method: str, seconds: float, code: str) -> None:
        self._latency.labels(method).observe(seconds)
        if code != "OK":
            self._rpc_errors[(method, code)] += 1

    @property
    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """A server interceptor that times every RPC and counts its status codes."""
        from kvstore.metrics.interceptor import RpcInterceptor

        return RpcInterceptor(self)

    # -- views -----------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Every figure, consistent at one instant."""
        store = self._store
        stats = store.stats()
        pinned: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        ns_pinned: dict[str, int] = defaultdict(int)
        for key, _left in store.pins.pinned():
            if not isinstance(key, ChunkKey):
                continue
            held = store.holders(key)
            if held:
                ns_pinned[str(key.namespace)] += 1
            for tier, nbytes in held:
                pinned[tier][0] += 1
                pinned[tier][1] += nbytes
        tiers: list[TierSnapshot] = []
        reached = self.gets
        for ts in stats.tiers:
            slot = stats.slots[ts.name]
            reads = self._reads[ts.name].copy() if ts.name in self._reads else IOCounter()
            errors = ts.counters.errors + ts.counters.corrupt + slot.write_through_failed
            tiers.append(
                TierSnapshot(
                    name=ts.name,
                    kind=ts.kind,
                    eviction_policy=store.settings(ts.name).eviction,
                    capacity_bytes=store.capacity(ts.name),
                    max_capacity_bytes=ts.capacity_bytes,
                    used_bytes=ts.used_bytes,
                    chunks=ts.chunks,
                    pinned_chunks=pinned[ts.name][0] if ts.name in pinned else 0,
                    pinned_bytes=pinned[ts.name][1] if ts.name in pinned else 0,
                    hits=reads.ops,
                    misses=max(0, reached - reads.ops),
                    evictions=slot.evictions,
                    evicted_bytes=slot.bytes_evicted,
                    promotions=slot.promotions,
                    demotions=slot.demotions,
                    write_through=slot.write_through,
                    write_through_dropped=slot.write_through_dropped,
                    errors=errors,
                    corrupt=ts.counters.corrupt,
                    reads=reads,
                    writes=self._writes[ts.name].copy() if ts.name in self._writes else IOCounter(),
                    healthy=self._healthy(ts.name, errors),
                )
            )
            reached -= reads.ops
        return Snapshot(
            tiers=tiers,
            namespaces=self._namespaces(stats.namespaces, stats.quotas, ns_pinned),
            gets=self.gets,
            hits=self.gets - self.misses,
            misses=self.misses,
            lookup_keys=self.lookup_keys,
            lookup_hits=self.lookup_hits,
            shared_reads=self.shared_reads,
            direct_writes=self.direct_writes,
            direct_write_reserved_bytes=self._reserved_bytes(),
            shared_unpublished=self._shared_unpublished(),
            pins=stats.pins,
            uptime_s=time.monotonic() - self._started,
            rpc_errors=dict(self._rpc_errors),
        )

    def _namespaces(
        self, usage: list[Any], quotas: dict[str, int], pinned: dict[str, int]
    ) -> list[NamespaceSnapshot]:
        per_tier: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        for u in usage:
            per_tier[u.namespace].append((u.tier, u.bytes, u.chunks))
        traffic = {str(ns): t for ns, t in self._ns.items()}
        moves = self._store.namespace_moves()
        names = sorted(set(per_tier) | set(quotas) | set(traffic) | set(moves))
        out = []
        for name in names:
            t = traffic.get(name, _NsTraffic())
            m = moves.get(name, NamespaceMoves())
            tiers = tuple(per_tier.get(name, ()))
            out.append(
                NamespaceSnapshot(
                    namespace=name,
                    bytes=sum(b for _, b, _ in tiers),
                    chunks=sum(c for _, _, c in tiers),
                    quota_bytes=quotas.get(name, 0),
                    tiers=tiers,
                    pinned_chunks=pinned.get(name, 0),
                    hits=t.hits,
                    misses=t.misses,
                    evictions=m.evictions,
                    promotions=m.promotions,
                    demotions=m.demotions,
                    reads=t.reads.copy(),
                    writes=t.writes.copy(),
                )
            )
        return out

    def _healthy(self, tier: str, errors: int) -> bool:
        """Unhealthy for ``health_window_s`` after the tier's error count last grew."""
        now = time.monotonic()
        if errors > self._errors_seen.get(tier, 0):
            self._error_at[tier] = now
        self._errors_seen[tier] = errors
        at = self._error_at.get(tier)
        return at is None or now - at >= self._health_window

    def render(self) -> bytes:
        """Everything in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int, tokens: TokenTable | None = None) -> MetricsServer:
        """Serve ``GET /metrics`` over HTTP on ``host:port`` (0 = any free port);
        with ``tokens``, to metrics and admin tokens only."""
        from kvstore.metrics.http import MetricsServer

        server = MetricsServer(self, tokens)
        await server.start(host, port)
        return server
