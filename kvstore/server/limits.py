"""Limits and backpressure of the daemon: what it refuses, and when.

A daemon shared by many clients must answer overload with a clear error the
client can act on (RESOURCE_EXHAUSTED, retry later), never with unbounded
queues or an out-of-memory kill.  :class:`Limits` holds the daemon-wide
state; the service calls it at the entry of its handlers:

* :meth:`Limits.stream` when a Put or Get stream starts: at most
  ``max_streams_per_client`` streams per client connection (refused at once
  past it: one client must not starve the others), and at most
  ``max_concurrent_streams`` in all (a new stream waits up to
  ``stream_wait_s`` for a slot, then is refused);
* :meth:`Limits.check_memory` before a put's receive buffer is taken: the
  bytes being received plus the new chunk must stay under
  ``max_inflight_bytes``, and the process's resident memory plus what is
  still to arrive must stay under ``max_memory_bytes``;
* :meth:`Limits.make_room_for_tenant` before a chunk is admitted: a tenant
  with a quota evicts its own chunks (all its models together) to make room,
  and is refused only when what is left is pinned.

Resident memory is the kernel's count of the process's own pages, anonymous
and file-backed (``RssAnon + RssFile`` in ``/proc/self/status``).
Shared-memory segments that clients create and the daemon maps are left
out: they belong to the client (the kernel charges a shared page to the
cgroup that first touched it, the client, which writes it first).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections import Counter
from typing import Any
import psutil

from kvstore.config import LimitsConfig
from kvstore.errors import CapacityError, QuotaExceeded
from kvstore.keys import ChunkKey, Namespace
from kvstore.store import TieredStore

#: Resident memory is read at most this often (reading /proc costs ~20 us).
RSS_REFRESH_S = 0.005
#: Per-stream read-ahead of the gRPC transport when a memory bound is set.  A
#: client pushes a put's frames before the daemon has read its header, so each
#: open stream may hold this much in the transport whatever the daemon decides;
#: the bound counts it for every stream open.
TRANSPORT_WINDOW = 4 << 20


def server_options(options: list[tuple[str, Any]], config: LimitsConfig) -> list[tuple[str, Any]]:
    """The daemon's gRPC options, with the transport's read-ahead capped when
    ``config`` bounds memory (the default 64 MiB per stream would let a few
    hundred streams take gigabytes before any handler runs)."""
    if not config.max_memory_bytes:
        return options
    kept = [(k, v) for k, v in options if k not in ("grpc.http2.lookahead_bytes", "grpc.http2.bdp_probe")]
    return [*kept, ("grpc.http2.lookahead_bytes", TRANSPORT_WINDOW), ("grpc.http2.bdp_probe", 0)]


def resident_bytes(pid: int | None = None) -> int:
    """Resident memory (RssAnon + RssFile), in bytes, of this process or of ``pid``."""
    try:
        with open(f"/proc/{'self' if pid is None else pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return int(psutil.Process(pid).memory_info().rss)
    total = 0
    for line in text.splitlines():
        if line.startswith((b"RssAnon:", b"RssFile:")):
            total += int(line.split()[1]) * 1024
    return total


def _malloc_trim() -> None:
    """Hand freed heap memory back to the kernel (glibc keeps it otherwise)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


class Limits:
    """Daemon-wide limit state; see the module docstring."""

    def __init__(self, config: LimitsConfig, store: TieredStore, *, max_concurrent_streams: int = 256) -> None:
        self.config = config
        self._store = store
        self._max_streams = max_concurrent_streams
        self._slots = asyncio.Semaphore(max_concurrent_streams)
        self._per_client: Counter[str] = Counter()
        self._quotas = dict(config.tenant_quotas)
        self._rss = 0
        self._rss_at = -1.0
        self._trimmed_at = -1.0
        #: Refusals by reason, for tests and operators.
        self.refused: Counter[str] = Counter()

    # -- streams ---------------------------------------------------------------
    @property
    def streams(self) -> int:
        """Streams open now."""
        return sum(self._per_client.values())

    async def stream(self, client: str) -> _StreamSlot:
        """A slot for one stream of ``client`` (its connection); release it with ``with``."""
        cfg = self.config
        if self._per_client[client] >= cfg.max_streams_per_client:
            self.refused["client_streams"] += 1
            raise CapacityError(
                f"this client has {self._per_client[client]} streams open already; at most "
                f"{cfg.max_streams_per_client} per client (server.limits.max_streams_per_client): "
                "wait for one to finish"
            )
        # Counted before waiting, so a client cannot queue more than its share.
        self._per_client[client] += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), cfg.stream_wait_s)
        except TimeoutError:
            self._release_client(client)
            self.refused["streams"] += 1
            raise CapacityError(
                f"the daemon serves {self._max_streams} streams at once "
                f"(server.max_concurrent_streams) and none freed up in {cfg.stream_wait_s:g} s; retry later"
            ) from None
        except BaseException:
            self._release_client(client)
            raise
        return _StreamSlot(self, client)

    def _release_client(self, client: str) -> None:
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]

    def _release(self, client: str) -> None:
        self._slots.release()
        self._release_client(client)

    # -- memory ------------------------------------------------------------------
    def resident(self) -> int:
        now = time.monotonic()
        if now - self._rss_at > RSS_REFRESH_S:
            self._rss, self._rss_at = resident_bytes(), now
        return self._rss

    def check_memory(self, n: int, inflight: int) -> None:
        """Refuse a put of ``n`` bytes when ``inflight`` bytes are being received already
        and either bound would be passed.  Counts ``inflight`` as not yet resident,
        which may refuse early under load but never lets the bound be passed."""
        cfg = self.config
        if inflight + n > cfg.max_inflight_bytes:
            self.refused["inflight"] += 1
            raise CapacityError(
                f"the daemon is receiving {inflight} bytes already and may buffer at most "
                f"{cfg.max_inflight_bytes} (server.limits.max_inflight); retry later or use smaller chunks"
            )
        bound = cfg.max_memory_bytes
        if not bound:
            return
        transport = self.streams * TRANSPORT_WINDOW
        if self.resident() + inflight + n + transport > bound:
            now = time.monotonic()
            if now - self._trimmed_at > 1.0:
                # Freed buffers may still be counted: give them back, measure again.
                self._trimmed_at = now
                _malloc_trim()
                self._rss, self._rss_at = resident_bytes(), now
            rss = self._rss
            if rss + inflight + n + transport > bound:
                self.refused["memory"] += 1
                raise CapacityError(
                    f"a put of {n} bytes would take the daemon past its memory bound "
                    f"(server.limits.max_memory {bound}: {rss} resident, {inflight} being received, "
                    f"{self.streams} streams open); retry later"
                )

    # -- tenant quotas ---------------------------------------------------------------
    def tenant_quota(self, tenant: str) -> int | None:
        return self._quotas.get(tenant)

    def tenant_usage(self, tenant: str) -> dict[str, dict[Namespace, int]]:
        """tier -> namespace -> bytes, for ``tenant``'s namespaces in managed tiers."""
        out: dict[str, dict[Namespace, int]] = {}
        for u in self._store.stats().namespaces:
            ns = Namespace.parse(u.namespace)
            if ns.tenant == tenant:
                out.setdefault(u.tier, {})[ns] = u.bytes
        return out

    async def make_room_for_tenant(self, key: ChunkKey, n: int) -> None:
        """Evict ``key``'s tenant's own chunks until ``n`` more bytes fit under its
        quota in every managed tier (top-down, so demotions are counted below);
        QuotaExceeded when what is left is pinned or the chunk alone is too big."""
        tenant = key.namespace.tenant
        quota = self._quotas.get(tenant)
        if quota is None:
            return
        if n > quota:
            self.refused["tenant_quota"] += 1
            raise QuotaExceeded(
                f"chunk of {n} bytes exceeds tenant {tenant!r}'s quota of {quota} bytes "
                "(server.limits.tenant_quotas)"
            )
        for tier in self._store.tiers:
            if not tier.managed:
                continue
            usage = self.tenant_usage(tenant).get(tier.name, {})
            excess = sum(usage.values()) + n - quota
            # Largest namespace first: it has the most to give.
            for ns, held in sorted(usage.items(), key=lambda kv: -kv[1]):
                if excess <= 0:
                    break
                freed, _ = await self._store.evict_to(tier.name, max(0, held - excess), namespace=ns)
                excess -= sum(e.nbytes for e in freed)
            if excess > 0:
                self.refused["tenant_quota"] += 1
                raise QuotaExceeded(
                    f"tenant {tenant!r} is at its quota of {quota} bytes in tier {tier.name!r} "
                    "and the rest of what it holds there is pinned or being read"
                )


class _StreamSlot:
    """One open stream's slot; released on exit (of ``with``) exactly once."""

    __slots__ = ("_limits", "_client", "_open")

    def __init__(self, limits: Limits, client: str) -> None:
        self._limits, self._client, self._open = limits, client, True

    def __enter__(self) -> _StreamSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open:
            self._open = False
            self._limits._release(self._client)
