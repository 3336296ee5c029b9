"""Admission into one tier, the bottom layer of :class:`~kvstore.store.TieredStore`: the tiers'
slots and the namespace quotas, and putting a chunk into a tier after making room there by
evicting (demoting the victim into the next tier, or dropping it), never a pinned chunk."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.errors import CapacityError, Closed, ConfigError, InvalidArgument, QuotaExceeded, RemoteUnavailable
from kvstore.eviction import make_policy
from kvstore.keys import ChunkKey, Namespace
from kvstore.pins import PinTable
from kvstore.store.settings import TierSettings
from kvstore.store.slots import KeyLocks, Slot
from kvstore.tiers.base import Tier


class Admission:
    """The store's tiers, quotas and pins, and admission into one tier with eviction
    (see the package docstring); :class:`~kvstore.store.writethrough.WriteThrough` builds on it."""

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
            Slot(i, tier, settings, make_policy(settings.eviction))
            for i, (tier, settings) in enumerate(tiers)
        ]
        self._quotas: dict[Namespace, int] = {}
        for ns, limit in (quotas or {}).items():
            self.set_quota(Namespace.parse(ns), limit)
        self._verify = verify_puts
        self.pins = pins if pins is not None else PinTable()
        self._keys = KeyLocks()
        self._busy: set[ChunkKey] = set()  # victims being moved right now
        self._open = False

    def _require_open(self) -> None:
        if not self._open:
            raise Closed("the store is not open")

    @property
    def tiers(self) -> list[Tier]:
        return [s.tier for s in self._slots]

    def tier(self, name: str) -> Tier:
        return self._slot(name).tier

    def _slot(self, name: str) -> Slot:
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

    # -- admission and eviction ----------------------------------------------
    def _first_fitting(self, nbytes: int) -> Slot:
        for slot in self._slots:
            if not slot.tier.managed or nbytes <= self._capacity(slot):
                return slot
        raise CapacityError(
            f"chunk of {nbytes} bytes is larger than every tier "
            f"(capacities: {[(s.tier.name, s.tier.capacity_bytes) for s in self._slots]})"
        )

    async def _admit(
        self, slot: Slot, key: ChunkKey, chunk: Chunk, *, strict: bool, summing: bool = False
    ) -> ChunkMeta | None:
        """Store ``chunk`` in ``slot``'s tier, evicting to make room; the metadata
        stored (with the checksum of the stored bytes when ``summing``).

        ``strict``: raise when it cannot fit; otherwise (write-through,
        demotion, promotion) give up quietly and return None.
        """
        n = chunk.meta.nbytes
        tier = slot.tier
        if not tier.managed:
            return await self._tier_put(tier, key, chunk, summing)
        async with slot.lock:
            try:
                await self._make_room(slot, key, n)
            except CapacityError:
                if strict:
                    raise
                return None
            meta = await self._tier_put(tier, key, chunk, summing)
            slot.track(key, n, meta.checksum)
        return meta

    @staticmethod
    async def _tier_put(tier: Tier, key: ChunkKey, chunk: Chunk, summing: bool) -> ChunkMeta:
        if summing:
            return await tier.put_summing(key, chunk)
        await tier.put(key, chunk)
        return chunk.meta

    async def _make_room(self, slot: Slot, key: ChunkKey | None, n: int, *, keep: Collection[ChunkKey] = ()) -> None:
        """Evict from ``slot`` (but not ``keep``) until ``n`` more bytes fit (within
        ``key``'s namespace quota too; None: a block not yet any key's)."""
        if key is not None:
            await self._make_quota_room(slot, key, n)
        while not self._fits(slot, n):
            victim = slot.policy.victim(lambda k: k == key or k in keep or self._skip(k))
            if victim is None:
                if key is not None and key in slot.sizes:
                    # Replacing a value of a different size: drop the old copy first.
                    await slot.tier.delete(key)
                    slot.untrack(key)
                    continue
                raise CapacityError(
                    f"tier {slot.tier.name!r} cannot fit {n} bytes: "
                    f"{slot.tier.used_bytes} of {self._capacity(slot)} used and the rest is pinned or in use"
                )
            await self._evict(slot, victim)

    async def _make_quota_room(self, slot: Slot, key: ChunkKey, n: int) -> None:
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

    async def _evict(self, slot: Slot, key: ChunkKey, *, demote: bool = True) -> str | None:
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
                            if await self._admit(nxt, key, chunk, strict=False) is not None:
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

    async def _drop(self, slot: Slot, key: ChunkKey) -> None:
        await slot.tier.delete(key)
        slot.untrack(key)

    def _capacity(self, slot: Slot) -> int:
        cap = slot.tier.capacity_bytes
        return cap if slot.limit is None else min(cap, slot.limit)

    def _fits(self, slot: Slot, n: int) -> bool:
        if not slot.tier.fits(n):
            return False
        return slot.limit is None or slot.tier.used_bytes + n <= slot.limit
