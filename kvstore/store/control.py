"""Run-time control of the store (what the Admin service calls): statistics, listing, pins,
eviction by key or watermark, moves between tiers, policies, capacities, quotas, recode, clear."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable

from kvstore.chunk import Chunk
from kvstore.errors import InvalidArgument
from kvstore.eviction import make_policy
from kvstore.keys import ChunkKey, Namespace
from kvstore.store.core import StoreCore
from kvstore.store.results import Evicted, MoveOutcome, NamespaceMoves, NamespaceUsage, SlotCounters, StoreStats
from kvstore.store.settings import TierSettings


class TieredStore(StoreCore):
    """Chunks across tiers; see the package docstring.  Use ``async with`` or open/close."""

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

    def read_copy_bytes(self, key: ChunkKey) -> int | None:
        """What a get of ``key`` would hold in memory outside the tiers while it is
        served: 0 for a view of a host memory tier (or a miss), the chunk's size
        for a copy (disk, device memory), None when unknown until read (a tier
        the store does not manage, such as Redis, may have it)."""
        for slot in self._slots:
            if not slot.tier.managed:
                return None
            n = slot.sizes.get(key)
            if n is not None:
                return 0 if slot.tier.serves_views else n
        return 0

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
                if outcome == "moved" and await self._admit(dst, key, chunk, strict=False) is None:
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
            return await self._admit(slot, key, chunk, strict=False) is not None

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
