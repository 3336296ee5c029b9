"""TieredStore: chunks across an ordered list of tiers.

Tiers are ordered fastest first (gpu, cpu, disk, remote).  The store

* **puts** into the top tier that can hold the chunk (making room by evicting
  with that tier's policy), then writes through, asynchronously, to every lower
  tier whose settings say ``write_through``; ``durable=True`` waits for those
  writes;
* **gets** by searching tiers top-down, promoting a hit from a lower tier into
  the top tier;
* **evicts** a victim by demoting it into the next tier (unless that tier has
  it already) or dropping it, per the tier's ``on_evict``; pinned chunks (pins
  are leases that expire on their own) are never evicted;
* enforces per-namespace byte **quotas** in every managed tier, by evicting the
  namespace's own chunks first;
* answers batched **prefix lookups**: how many leading keys are present, and
  in which tier.

Concurrency: one asyncio event loop.  Admissions into a tier are serialised
by that tier's lock (evict-then-put must be atomic, or two puts would both
count the same free space); locks are always taken top-down, so demotion
chains cannot deadlock.  Operations on one key (put, delete, a write-through
of it) are serialised by a per-key lock, so a delete cannot be undone by a
write-through that was already under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvstore.chunk import Chunk
from kvstore.errors import (
    CapacityError,
    Closed,
    ConfigError,
    InvalidArgument,
    KVStoreError,
    QuotaExceeded,
    RemoteUnavailable,
)
from kvstore.eviction import EvictionPolicy, make_policy
from kvstore.keys import ChunkKey, Namespace
from kvstore.pins import PinTable
from kvstore.tiers.base import Tier, TierStats

log = logging.getLogger(__name__)

OnEvict = Literal["demote", "drop"]
OnFull = Literal["block", "drop"]


@dataclass(frozen=True, slots=True)
class TierSettings:
    """How the store uses one tier (the tier's own options live in its config)."""

    #: Copy every put into this tier in the background (ignored for the top tier).
    write_through: bool = False
    #: What happens to a chunk evicted from this tier.
    on_evict: OnEvict = "demote"
    eviction: str = "lru"
    #: Bound of the write-through queue, and what a put does when it is full.
    queue_depth: int = 256
    on_full: OnFull = "block"
    workers: int = 2

    def __post_init__(self) -> None:
        if self.on_evict not in ("demote", "drop"):
            raise ConfigError(f"on_evict must be 'demote' or 'drop', got {self.on_evict!r}")
        if self.on_full not in ("block", "drop"):
            raise ConfigError(f"on_full must be 'block' or 'drop', got {self.on_full!r}")
        if not isinstance(self.queue_depth, int) or not 1 <= self.queue_depth <= 1_000_000:
            raise ConfigError(f"queue_depth must be in [1, 1000000], got {self.queue_depth!r}")
        if not isinstance(self.workers, int) or not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be in [1, 64], got {self.workers!r}")


@dataclass(slots=True)
class SlotCounters:
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    write_through: int = 0
    write_through_dropped: int = 0
    write_through_failed: int = 0
    bytes_evicted: int = 0


@dataclass(frozen=True, slots=True)
class NamespaceUsage:
    namespace: str
    tier: str
    bytes: int
    chunks: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    tiers: list[TierStats]
    slots: dict[str, SlotCounters]
    namespaces: list[NamespaceUsage]
    pins: int
    quotas: dict[str, int]


@dataclass(frozen=True, slots=True)
class LookupResult:
    """``count`` leading keys are present; ``tiers[i]`` names where key i is."""

    count: int
    tiers: list[str]


@dataclass(frozen=True, slots=True)
class Evicted:
    """One chunk an admin eviction removed from ``tier`` (``demoted_to``: None = dropped)."""

    key: ChunkKey
    tier: str
    nbytes: int
    demoted_to: str | None = None


MoveOutcome = Literal["moved", "already", "missing", "no_room"]


@dataclass(slots=True)
class NamespaceMoves:
    """Chunks of one namespace evicted from, promoted from and demoted from a tier."""

    evictions: int = 0
    promotions: int = 0
    demotions: int = 0


@dataclass(slots=True)
class _Job:
    key: ChunkKey
    done: asyncio.Future[None] | None


@dataclass(eq=False)
class _Slot:
    index: int
    tier: Tier
    settings: TierSettings
    policy: EvictionPolicy
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sizes: dict[ChunkKey, int] = field(default_factory=dict)
    #: xxh3 of what the tier holds per key (None when unknown, e.g. after a restart).
    sums: dict[ChunkKey, int | None] = field(default_factory=dict)
    ns_bytes: dict[Namespace, int] = field(default_factory=lambda: defaultdict(int))
    ns_chunks: dict[Namespace, int] = field(default_factory=lambda: defaultdict(int))
    counters: SlotCounters = field(default_factory=SlotCounters)
    queue: asyncio.Queue[_Job] | None = None
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    #: Capacity set at run time (admin SetPolicy), at most the tier's own; None = the tier's.
    limit: int | None = None
    ns_moves: dict[Namespace, NamespaceMoves] = field(default_factory=lambda: defaultdict(NamespaceMoves))

    def track(self, key: ChunkKey, nbytes: int, checksum: int | None = None) -> None:
        old = self.sizes.get(key)
        if old is not None:
            self.ns_bytes[key.namespace] -= old
            self.ns_chunks[key.namespace] -= 1
            self.policy.access(key)
        else:
            self.policy.insert(key, nbytes)
        self.sizes[key] = nbytes
        self.sums[key] = checksum
        self.ns_bytes[key.namespace] += nbytes
        self.ns_chunks[key.namespace] += 1

    def holds(self, key: ChunkKey, checksum: int) -> bool:
        """Whether the tier already holds exactly this value (same xxh3)."""
        return self.sums.get(key) == checksum

    def untrack(self, key: ChunkKey) -> None:
        old = self.sizes.pop(key, None)
        if old is None:
            return
        del self.sums[key]
        self.policy.remove(key)
        ns = key.namespace
        self.ns_bytes[ns] -= old
        self.ns_chunks[ns] -= 1
        if self.ns_chunks[ns] == 0:
            del self.ns_bytes[ns], self.ns_chunks[ns]


class _KeyLocks:
    """Per-key asyncio locks, created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._locks: dict[ChunkKey, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: ChunkKey) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock2, users2 = self._locks[key]
            if users2 == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock2, users2 - 1)


class TieredStore:
    """Chunks across tiers; see the module docstring.  Use ``async with`` or open/close."""

    def __init__(
        self,
        tiers: Sequence[tuple[Tier, TierSettings]],
        *,
        quotas: dict[str, int] | None = None,
        verify_puts: bool = True,
        pins: PinTable | None = None,
    ) -> None:
        if not tiers:
            raise ConfigError("tiers: a store needs at least one tier")
        names = [t.name for t, _ in tiers]
        if len(set(names)) != len(names):
            raise ConfigError(f"tiers: names must be unique, got {names}")
        self._slots = [
            _Slot(i, tier, settings, make_policy(settings.eviction))
            for i, (tier, settings) in enumerate(tiers)
        ]
        self._quotas: dict[Namespace, int] = {}
        for ns, limit in (quotas or {}).items():
            self.set_quota(Namespace.parse(ns), limit)
        self._verify = verify_puts
        self.pins = pins if pins is not None else PinTable()
        self._keys = _KeyLocks()
        self._busy: set[ChunkKey] = set()  # victims being moved right now
        self._open = False

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        for slot in self._slots:
            await slot.tier.open()
            if slot.tier.managed:
                for key, nbytes in slot.tier.entries():
                    slot.track(key, nbytes)
            if slot.index > 0 and slot.settings.write_through:
                slot.queue = asyncio.Queue(slot.settings.queue_depth)
                slot.workers = [
                    asyncio.create_task(self._write_through_worker(slot), name=f"wt-{slot.tier.name}-{w}")
                    for w in range(slot.settings.workers)
                ]
        self._open = True

    async def flush(self) -> None:
        """Wait until every queued write-through has been written."""
        for slot in self._slots:
            if slot.queue is not None:
                await slot.queue.join()

    async def close(self) -> None:
        """Flush write-through queues, stop workers, close tiers."""
        if not self._open:
            return
        await self.flush()
        self._open = False
        for slot in self._slots:
            for task in slot.workers:
                task.cancel()
            for task in slot.workers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            slot.workers.clear()
        for slot in self._slots:
            await slot.tier.close()

    async def __aenter__(self) -> TieredStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _require_open(self) -> None:
        if not self._open:
            raise Closed("the store is not open")

    @property
    def tiers(self) -> list[Tier]:
        return [s.tier for s in self._slots]

    def tier(self, name: str) -> Tier:
        return self._slot(name).tier

    def _slot(self, name: str) -> _Slot:
        for slot in self._slots:
            if slot.tier.name == name:
                return slot
        raise InvalidArgument(f"no tier named {name!r}; tiers are {[s.tier.name for s in self._slots]}")

    # -- quotas and pins ---------------------------------------------------
    def set_quota(self, namespace: Namespace, limit: int | None) -> None:
        """Byte quota of ``namespace`` in each managed tier (None removes it)."""
        if limit is None:
            self._quotas.pop(namespace, None)
            return
        if not isinstance(limit, int) or limit <= 0:
            raise InvalidArgument(f"quota for {namespace} must be a positive number of bytes, got {limit!r}")
        self._quotas[namespace] = limit

    def _skip(self, key: ChunkKey) -> bool:
        return key in self._busy or self.pins.is_pinned(key)

    # -- put ---------------------------------------------------------------
    async def put(self, key: ChunkKey, chunk: Chunk, *, durable: bool = False, verified: bool = False) -> str:
        """Store ``chunk``; returns the name of the tier it was admitted to.

        With ``durable`` the call returns only after every write-through tier
        has it too (e.g. fsynced on disk).  ``verified`` says the caller has
        already checked the payload against its checksum.
        """
        self._require_open()
        if self._verify and not verified:
            chunk.verify()
        n = chunk.meta.nbytes
        async with self._keys.hold(key):
            slot = self._first_fitting(n)
            if slot.holds(key, chunk.meta.checksum):
                # Keys name content: the same prefix saved twice is common.
                slot.policy.access(key)
            else:
                await self._admit(slot, key, chunk, strict=True)
            for other in self._slots:
                if other.index != slot.index and key in other.sizes and not other.holds(key, chunk.meta.checksum):
                    # A stale copy elsewhere must not shadow or outlive the new value.
                    await self._drop(other, key)
            jobs = self._enqueue_write_through(slot, key, durable)
        if jobs:
            await asyncio.gather(*jobs)
        return slot.tier.name

    def _first_fitting(self, nbytes: int) -> _Slot:
        for slot in self._slots:
            if not slot.tier.managed or nbytes <= self._capacity(slot):
                return slot
        raise CapacityError(
            f"chunk of {nbytes} bytes is larger than every tier "
            f"(capacities: {[(s.tier.name, s.tier.capacity_bytes) for s in self._slots]})"
        )

    def _enqueue_write_through(self, slot: _Slot, key: ChunkKey, durable: bool) -> list[asyncio.Future[None]]:
        futures: list[asyncio.Future[None]] = []
        for lower in self._slots[slot.index + 1 :]:
            if lower.queue is None:
                continue
            done: asyncio.Future[None] | None = asyncio.get_running_loop().create_future() if durable else None
            job = _Job(key, done)
            if lower.queue.full() and lower.settings.on_full == "drop" and not durable:
                lower.counters.write_through_dropped += 1
                continue
            try:
                lower.queue.put_nowait(job)
            except asyncio.QueueFull:
                futures.append(asyncio.ensure_future(lower.queue.put(job)))
            if done is not None:
                futures.append(done)
        return futures

    async def _write_through_worker(self, slot: _Slot) -> None:
        assert slot.queue is not None
        while True:
            job = await slot.queue.get()
            try:
                await self._write_through_one(slot, job.key)
                if job.done is not None and not job.done.done():
                    job.done.set_result(None)
            except RemoteUnavailable as exc:
                # A remote tier that is down or refusing (circuit open): the
                # write is dropped and counted; the tier logs each state change
                # of its breaker, so no log line per dropped write here.
                slot.counters.write_through_dropped += 1
                log.debug("write-through of %s to %s dropped: %s", job.key, slot.tier.name, exc)
                if job.done is not None and not job.done.done():
                    job.done.set_exception(exc)
            except KVStoreError as exc:
                slot.counters.write_through_failed += 1
                log.warning("write-through of %s to %s failed: %s", job.key, slot.tier.name, exc)
                if job.done is not None and not job.done.done():
                    job.done.set_exception(exc)
            finally:
                slot.queue.task_done()

    async def _write_through_one(self, slot: _Slot, key: ChunkKey) -> None:
        async with self._keys.hold(key):
            chunk = await self._get_above(slot.index, key)
            if chunk is None:
                return  # deleted or evicted meanwhile: nothing to write
            with chunk:
                if slot.holds(key, chunk.meta.checksum):
                    return
                if await self._admit(slot, key, chunk, strict=False):
                    slot.counters.write_through += 1

    async def _get_above(self, index: int, key: ChunkKey) -> Chunk | None:
        for slot in self._slots[:index]:
            if key in slot.sizes:
                chunk = await slot.tier.get(key)
                if chunk is not None:
                    return chunk
        return None

    async def _admit(self, slot: _Slot, key: ChunkKey, chunk: Chunk, *, strict: bool) -> bool:
        """Store ``chunk`` in ``slot``'s tier, evicting to make room.

        ``strict``: raise when it cannot fit; otherwise (write-through,
        demotion, promotion) give up quietly and return False.
        """
        n = chunk.meta.nbytes
        tier = slot.tier
        if not tier.managed:
            await tier.put(key, chunk)
            return True
        async with slot.lock:
            try:
                await self._make_room(slot, key, n)
            except CapacityError:
                if strict:
                    raise
                return False
            await tier.put(key, chunk)
            slot.track(key, n, chunk.meta.checksum)
        return True

    async def _make_room(self, slot: _Slot, key: ChunkKey, n: int) -> None:
        ns = key.namespace
        quota = self._quotas.get(ns)
        if quota is not None:
            if n > quota:
                raise QuotaExceeded(f"chunk of {n} bytes exceeds the quota of {ns} ({quota} bytes)")
            replaced = slot.sizes.get(key, 0)
            while slot.ns_bytes.get(ns, 0) - replaced + n > quota:
                victim = slot.policy.victim(lambda k: k.namespace != ns or k == key or self._skip(k))
                if victim is None:
                    raise QuotaExceeded(
                        f"namespace {ns} is at its quota of {quota} bytes in tier {slot.tier.name!r} "
                        "and everything it holds there is pinned"
                    )
                await self._evict(slot, victim)
        while not self._fits(slot, n):
            victim = slot.policy.victim(lambda k: k == key or self._skip(k))
            if victim is None:
                if key in slot.sizes:
                    # Replacing a value of a different size: drop the old copy first.
                    await slot.tier.delete(key)
                    slot.untrack(key)
                    continue
                raise CapacityError(
                    f"tier {slot.tier.name!r} cannot fit {n} bytes: "
                    f"{slot.tier.used_bytes} of {self._capacity(slot)} used and the rest is pinned or in use"
                )
            await self._evict(slot, victim)

    async def _evict(self, slot: _Slot, key: ChunkKey, *, demote: bool = True) -> str | None:
        """Move ``key`` out of ``slot``: demote to the next tier or drop.

        Returns the name of the tier it was demoted to (None: dropped).
        ``demote=False`` drops it whatever the tier's ``on_evict`` says.
        """
        self._busy.add(key)
        dest: str | None = None
        try:
            nxt = self._slots[slot.index + 1] if slot.index + 1 < len(self._slots) else None
            if demote and slot.settings.on_evict == "demote" and nxt is not None and key not in nxt.sizes:
                chunk = await slot.tier.get(key)
                if chunk is not None:
                    with chunk:
                        try:
                            if await self._admit(nxt, key, chunk, strict=False):
                                slot.counters.demotions += 1
                                slot.ns_moves[key.namespace].demotions += 1
                                dest = nxt.tier.name
                        except RemoteUnavailable:
                            # Remote tier down: drop rather than fail the put
                            # that is making room (the tier counted the error).
                            pass
            elif demote and slot.settings.on_evict == "demote" and nxt is not None and key in nxt.sizes:
                dest = nxt.tier.name  # written through already: the copy below stays
            freed = slot.sizes.get(key, 0)
            await slot.tier.delete(key)
            slot.untrack(key)
            slot.counters.evictions += 1
            slot.counters.bytes_evicted += freed
            slot.ns_moves[key.namespace].evictions += 1
        finally:
            self._busy.discard(key)
        return dest

    async def _drop(self, slot: _Slot, key: ChunkKey) -> None:
        await slot.tier.delete(key)
        slot.untrack(key)

    # -- get / lookup / delete ---------------------------------------------
    async def get(self, key: ChunkKey, *, promote: bool = True) -> Chunk | None:
        """The chunk, or None.  Release it (``with chunk:``) when done: it may be a view."""
        self._require_open()
        for slot in self._slots:
            if slot.tier.managed and key not in slot.sizes:
                continue
            chunk = await slot.tier.get(key)
            if chunk is None:
                if slot.tier.managed:
                    slot.untrack(key)  # dropped as corrupt by the tier
                continue
            if slot.tier.managed:
                slot.policy.access(key)
            if promote and slot.index > 0:
                await self._promote(key, chunk, slot)
            return chunk
        return None

    async def _promote(self, key: ChunkKey, chunk: Chunk, source: _Slot) -> None:
        top = self._slots[0]
        if key in top.sizes or chunk.meta.nbytes > self._capacity(top):
            return
        if await self._admit(top, key, chunk, strict=False):
            source.counters.promotions += 1
            source.ns_moves[key.namespace].promotions += 1

    async def contains(self, key: ChunkKey) -> bool:
        return (await self.exists_many([key]))[0]

    async def exists_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Presence of each key in any tier (one round trip per networked tier)."""
        self._require_open()
        managed = [s for s in self._slots if s.tier.managed]
        out = [any(k in s.sizes for s in managed) for k in keys]
        for slot in self._slots:
            if slot.tier.managed:
                continue
            missing = [i for i, p in enumerate(out) if not p]
            if not missing:
                break
            present = await slot.tier.contains_many([keys[i] for i in missing])
            for i, p in zip(missing, present, strict=True):
                out[i] = p
        return out

    async def lookup(self, keys: Sequence[ChunkKey]) -> LookupResult:
        """How many leading ``keys`` are present (in any tier), and where."""
        self._require_open()
        managed = [s for s in self._slots if s.tier.managed]
        where: list[str] = []
        for key in keys:
            for slot in managed:
                if key in slot.sizes:
                    where.append(slot.tier.name)
                    break
            else:
                break
        rest = list(keys[len(where) :])
        for slot in self._slots:
            if not rest or slot.tier.managed:
                continue
            present = await slot.tier.contains_many(rest)
            run = 0
            for p in present:
                if not p:
                    break
                run += 1
            where.extend([slot.tier.name] * run)
            rest = rest[run:]
            if run == 0 or rest:
                break
        return LookupResult(len(where), where)

    async def delete(self, key: ChunkKey) -> bool:
        """Remove ``key`` from every tier; True if it was anywhere."""
        self._require_open()
        found = False
        async with self._keys.hold(key):
            for slot in self._slots:
                freed = await slot.tier.delete(key)
                if freed or key in slot.sizes:
                    found = True
                slot.untrack(key)
        self.pins.unpin(key)
        return found

    # -- admin helpers -----------------------------------------------------
    def keys(self, tier: str | None = None) -> Iterable[ChunkKey]:
        slots = self._slots if tier is None else [self._slot(tier)]
        seen: set[ChunkKey] = set()
        for slot in slots:
            for key in slot.sizes:
                if key not in seen:
                    seen.add(key)
                    yield key

    def pin(self, key: ChunkKey, ttl_s: float) -> float:
        """Pin ``key`` (a lease of ``ttl_s`` seconds); returns the expiry (monotonic)."""
        lease = self.pins.pin(key, ttl_s)
        return float(lease.expires_at)

    def stats(self) -> StoreStats:
        usage = [
            NamespaceUsage(str(ns), slot.tier.name, b, slot.ns_chunks[ns])
            for slot in self._slots
            for ns, b in sorted(slot.ns_bytes.items(), key=lambda kv: str(kv[0]))
        ]
        return StoreStats(
            tiers=[s.tier.stats() for s in self._slots],
            slots={s.tier.name: SlotCounters(**{f: getattr(s.counters, f) for f in SlotCounters.__slots__}) for s in self._slots},
            namespaces=usage,
            pins=len(self.pins),
            quotas={str(ns): q for ns, q in self._quotas.items()},
        )

    # -- run-time control (the Admin service) -------------------------------------
    # Locks are taken in the store's order: a key's lock, then tier locks top-down.
    def _capacity(self, slot: _Slot) -> int:
        cap = slot.tier.capacity_bytes
        return cap if slot.limit is None else min(cap, slot.limit)

    def _fits(self, slot: _Slot, n: int) -> bool:
        if not slot.tier.fits(n):
            return False
        return slot.limit is None or slot.tier.used_bytes + n <= slot.limit

    def capacity(self, tier: str) -> int:
        """Effective capacity of ``tier``: the one set by :meth:`set_capacity`, else the tier's own."""
        return self._capacity(self._slot(tier))

    def settings(self, tier: str) -> TierSettings:
        """How the store uses ``tier`` now (``eviction`` follows :meth:`set_policy`)."""
        return self._slot(tier).settings

    def holders(self, key: ChunkKey) -> list[tuple[str, int]]:
        """(tier, payload bytes) of every managed tier holding ``key``, fastest first."""
        return [(s.tier.name, s.sizes[key]) for s in self._slots if key in s.sizes]

    def locate(self, key: ChunkKey) -> str | None:
        """The managed tier a get of ``key`` would read now, or None."""
        for slot in self._slots:
            if key in slot.sizes:
                return slot.tier.name
        return None

    def quota(self, namespace: Namespace) -> int | None:
        return self._quotas.get(namespace)

    def namespace_moves(self) -> dict[str, NamespaceMoves]:
        """Evictions, promotions and demotions per namespace, summed over tiers."""
        out: dict[str, NamespaceMoves] = defaultdict(NamespaceMoves)
        for slot in self._slots:
            for ns, m in slot.ns_moves.items():
                total = out[str(ns)]
                total.evictions += m.evictions
                total.promotions += m.promotions
                total.demotions += m.demotions
        return dict(out)

    async def evict(self, key: ChunkKey, tier: str | None = None, *, demote: bool = True) -> list[Evicted]:
        """Evict ``key`` from ``tier`` (demoted per its ``on_evict`` unless not
        ``demote``), or from every tier when ``tier`` is None.  Pins are the
        caller's to check.  Returns what left which tier."""
        self._require_open()
        slots = self._slots if tier is None else [self._slot(tier)]
        out: list[Evicted] = []
        async with self._keys.hold(key):
            for slot in slots:
                if slot.tier.managed:
                    if key not in slot.sizes:
                        continue
                    n = slot.sizes[key]
                    async with slot.lock:
                        dest = await self._evict(slot, key, demote=demote and tier is not None)
                    out.append(Evicted(key, slot.tier.name, n, dest))
                else:
                    n = await slot.tier.delete(key)
                    if n:
                        out.append(Evicted(key, slot.tier.name, n))
        return out

    async def evict_to(
        self,
        tier: str,
        watermark: int,
        *,
        namespace: Namespace | None = None,
        force: bool = False,
        demote: bool = True,
    ) -> tuple[list[Evicted], bool]:
        """Evict from ``tier`` by its policy until it uses at most ``watermark``
        bytes (with ``namespace``: until that namespace holds at most that many
        there, evicting only its chunks).  Pinned chunks are skipped unless
        ``force``.  Returns what was evicted and whether the watermark was reached.

        A memory tier frees a chunk that readers still hold only once they
        release it, so its usage can lag behind what was evicted."""
        self._require_open()
        slot = self._slot(tier)
        if not slot.tier.managed:
            raise InvalidArgument(f"tier {tier!r} evicts on its own (its server does); it has no watermark here")
        if watermark < 0:
            raise InvalidArgument(f"watermark must be >= 0 bytes, got {watermark}")

        def used() -> int:
            return slot.ns_bytes.get(namespace, 0) if namespace is not None else slot.tier.used_bytes

        def skip(k: ChunkKey) -> bool:
            if namespace is not None and k.namespace != namespace:
                return True
            return k in self._busy or (not force and self.pins.is_pinned(k))

        out: list[Evicted] = []
        async with slot.lock:
            while used() > watermark:
                victim = slot.policy.victim(skip)
                if victim is None:
                    return out, False
                n = slot.sizes.get(victim, 0)
                dest = await self._evict(slot, victim, demote=demote)
                out.append(Evicted(victim, tier, n, dest))
        return out, True

    async def move(self, key: ChunkKey, to_tier: str, from_tier: str | None = None) -> MoveOutcome:
        """Copy ``key`` from ``from_tier`` (default: its fastest tier) into
        ``to_tier``, evicting there to make room; a move down (a demotion) then
        removes it from ``from_tier``, a move up (a promotion) keeps the
        slower copy, as a promoting get does."""
        self._require_open()
        dst = self._slot(to_tier)
        async with self._keys.hold(key):
            name = from_tier if from_tier else self.locate(key)
            if name is None:
                return "missing"
            src = self._slot(name)
            if src is dst:
                return "already" if key in src.sizes else "missing"
            if key not in src.sizes:
                return "missing"
            chunk = await src.tier.get(key)
            if chunk is None:
                src.untrack(key)  # dropped as corrupt by the tier
                return "missing"
            with chunk:
                outcome: MoveOutcome = "already" if dst.holds(key, chunk.meta.checksum) else "moved"
                if outcome == "moved" and not await self._admit(dst, key, chunk, strict=False):
                    return "no_room"
            if dst.index > src.index:
                await self._drop(src, key)
                src.counters.demotions += 1
                src.ns_moves[key.namespace].demotions += 1
            elif outcome == "moved":
                src.counters.promotions += 1
                src.ns_moves[key.namespace].promotions += 1
        return outcome

    async def set_policy(self, tier: str, name: str) -> None:
        """Replace ``tier``'s eviction policy; the new one takes the chunks over
        in the old one's eviction order (the first victim stays first).  What
        the old policy learned beyond that order (counts, ghosts) is dropped."""
        slot = self._slot(tier)
        new = make_policy(name)
        async with slot.lock:
            old = slot.policy
            order: list[ChunkKey] = []
            while (k := old.victim()) is not None:
                order.append(k)
                old.remove(k)
            for k in order:
                new.insert(k, slot.sizes.get(k, 0))
            slot.policy = new
            slot.settings = dataclasses.replace(slot.settings, eviction=name)

    async def set_capacity(self, tier: str, capacity: int | None) -> list[Evicted]:
        """Set ``tier``'s capacity (None: back to the tier's own).  It may not
        exceed what the tier was built with: a memory tier's arena is allocated
        at start, a disk tier's capacity is fixed in its config.  Shrinking
        evicts by the policy (with demotion, skipping pins) down to it."""
        self._require_open()
        slot = self._slot(tier)
        if not slot.tier.managed:
            raise InvalidArgument(f"tier {tier!r} is sized by its own server; its capacity cannot be set here")
        most = slot.tier.capacity_bytes
        if capacity is not None and not 0 < capacity <= most:
            raise InvalidArgument(
                f"capacity of tier {tier!r} must be in (0, {most}] bytes (what it was started with), got {capacity}"
            )
        slot.limit = None if capacity is None or capacity == most else capacity
        if slot.limit is None:
            return []
        evicted, _ = await self.evict_to(tier, slot.limit)
        return evicted

    async def enforce_quota(self, namespace: Namespace) -> list[Evicted]:
        """Evict ``namespace``'s chunks down to its quota in every managed tier now
        (puts enforce it anyway; this is for a quota just lowered)."""
        limit = self._quotas.get(namespace)
        out: list[Evicted] = []
        if limit is None:
            return out
        for slot in self._slots:
            if slot.tier.managed:
                evicted, _ = await self.evict_to(slot.tier.name, limit, namespace=namespace)
                out.extend(evicted)
        return out

    async def read_from(self, key: ChunkKey, tier: str) -> Chunk | None:
        """``key`` as ``tier`` holds it: no promotion, no other tier.  Release it when done."""
        self._require_open()
        slot = self._slot(tier)
        if slot.tier.managed and key not in slot.sizes:
            return None
        return await slot.tier.get(key)

    async def replace_in(self, key: ChunkKey, tier: str, chunk: Chunk, *, expect: int | None) -> bool:
        """Store ``chunk`` as ``key``'s value in ``tier`` only (a new encoding of
        the same value), if that tier still holds the value whose checksum was
        ``expect``; False when it changed or left meanwhile."""
        self._require_open()
        slot = self._slot(tier)
        async with self._keys.hold(key):
            if key not in slot.sizes or slot.sums.get(key) != expect:
                return False
            return await self._admit(slot, key, chunk, strict=False)

    async def clear(self, tier: str | None = None, namespace: Namespace | None = None) -> tuple[int, int]:
        """Drop every chunk (of ``namespace``, in ``tier``) without demotion;
        pins of chunks no longer held anywhere end.  Returns (distinct keys, bytes)."""
        self._require_open()
        slots = [s for s in (self._slots if tier is None else [self._slot(tier)]) if s.tier.managed]
        keys: set[ChunkKey] = set()
        freed = 0
        for slot in slots:
            for key in [k for k in slot.sizes if namespace is None or k.namespace == namespace]:
                async with self._keys.hold(key):
                    n = slot.sizes.get(key)
                    if n is None:
                        continue
                    await self._drop(slot, key)
                    keys.add(key)
                    freed += n
        for key in keys:
            if self.locate(key) is None:
                self.pins.unpin(key)
        return len(keys), freed
