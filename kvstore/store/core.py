"""The store's data path: puts, gets, lookups, admission, eviction, promotion, write-through."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Sequence
from typing import Self

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.errors import CapacityError, Closed, ConfigError, InvalidArgument, KVStoreError, QuotaExceeded, RemoteUnavailable
from kvstore.eviction import make_policy
from kvstore.keys import ChunkKey, Namespace
from kvstore.pins import PinTable
from kvstore.store.results import LookupResult
from kvstore.store.settings import TierSettings
from kvstore.store.slots import Job, KeyLocks, Slot
from kvstore.tiers.base import Tier
from kvstore.tiers.memory import MemoryTier

log = logging.getLogger("kvstore.store")


class StoreCore:
    """The data path of :class:`~kvstore.store.TieredStore` (see the package docstring): lifecycle,
    put, get, lookup, delete, admission, eviction, promotion and write-through."""

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

    async def __aenter__(self) -> Self:
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

    # -- put ---------------------------------------------------------------
    async def put(
        self, key: ChunkKey, chunk: Chunk, *, durable: bool = False, verified: bool = False, summing: bool = False
    ) -> str:
        """Store ``chunk``; returns the name of the tier it was admitted to.

        With ``durable`` the call returns only after every write-through tier
        has it too (e.g. fsynced on disk).  ``verified`` says the caller has
        already checked the payload against its checksum.  ``summing`` says
        the payload has no checksum yet (``chunk.meta.checksum`` is ignored):
        the tier computes it over its own copy (Tier.put_summing), so that it
        describes the bytes stored even if the payload's owner rewrites them
        meanwhile.
        """
        self._require_open()
        if self._verify and not verified and not summing:
            chunk.verify()
        n = chunk.meta.nbytes
        async with self._keys.hold(key):
            slot = self._first_fitting(n)
            if not summing and slot.holds(key, chunk.meta.checksum):
                # Keys name content: the same prefix saved twice is common.
                slot.policy.access(key)
                meta = chunk.meta
            else:
                stored = await self._admit(slot, key, chunk, strict=True, summing=summing)
                assert stored is not None  # strict: it raised otherwise
                meta = stored
            for other in self._slots:
                if other.index != slot.index and key in other.sizes and not other.holds(key, meta.checksum):
                    # A stale copy elsewhere must not shadow or outlive the new value.
                    await self._drop(other, key)
            jobs = self._enqueue_write_through(slot, key, durable)
        if jobs:
            await asyncio.gather(*jobs)
        return slot.tier.name

    # -- direct writes: a local client writes into the top tier's memory --------
    def writable_tier(self) -> MemoryTier | None:
        """The top tier when local clients may write chunks into its memory
        themselves (a host arena shared with them), else None."""
        tier = self._slots[0].tier
        return tier if isinstance(tier, MemoryTier) and tier.shared is not None else None

    def _writable(self) -> tuple[Slot, MemoryTier]:
        self._require_open()
        tier = self.writable_tier()
        if tier is None:
            raise InvalidArgument(f"the top tier {self._slots[0].tier.name!r} does not share its memory")
        return self._slots[0], tier

    async def reserve(self, nbytes: int, *, keep: Collection[ChunkKey] = ()) -> int:
        """Reserve a block of ``nbytes`` in :meth:`writable_tier` for a client to
        write a chunk into, evicting to make room (but not ``keep``); its offset.
        The block counts as used until :meth:`put_reserved` or :meth:`release`."""
        slot, tier = self._writable()
        if nbytes > self._capacity(slot):
            raise CapacityError(f"chunk of {nbytes} bytes is larger than tier {tier.name!r} ({self._capacity(slot)} bytes)")
        async with slot.lock:
            await self._make_room(slot, None, nbytes, keep=keep)
            return tier.reserve_block(nbytes)

    def release(self, offset: int) -> None:
        """Give back a block from :meth:`reserve` that was not put."""
        _, tier = self._writable()
        tier.release_block(offset)

    async def put_reserved(
        self, key: ChunkKey, offset: int, meta: ChunkMeta, *, durable: bool = False,
        adopted: Callable[[], object] | None = None,
    ) -> str:
        """Store the chunk a client wrote into the block at ``offset`` (from
        :meth:`reserve`, ``meta.nbytes`` long, ``meta.checksum`` computed by the
        client over the block) as ``key``'s value: :meth:`put` without a copy.
        The block is the chunk's once stored, also when this then raises (a
        durable write-through that failed): ``adopted`` is called at that point."""
        slot, tier = self._writable()
        async with self._keys.hold(key):
            async with slot.lock:
                await self._make_quota_room(slot, key, meta.nbytes)
                tier.adopt(key, offset, meta)
                if adopted is not None:
                    adopted()
                slot.track(key, meta.nbytes, meta.checksum)
            for other in self._slots[1:]:
                if key in other.sizes and not other.holds(key, meta.checksum):
                    await self._drop(other, key)
            jobs = self._enqueue_write_through(slot, key, durable)
        if jobs:
            await asyncio.gather(*jobs)
        return tier.name

    def _first_fitting(self, nbytes: int) -> Slot:
        for slot in self._slots:
            if not slot.tier.managed or nbytes <= self._capacity(slot):
                return slot
        raise CapacityError(
            f"chunk of {nbytes} bytes is larger than every tier "
            f"(capacities: {[(s.tier.name, s.tier.capacity_bytes) for s in self._slots]})"
        )

    def _enqueue_write_through(self, slot: Slot, key: ChunkKey, durable: bool) -> list[asyncio.Future[None]]:
        futures: list[asyncio.Future[None]] = []
        for lower in self._slots[slot.index + 1 :]:
            if lower.queue is None:
                continue
            done: asyncio.Future[None] | None = asyncio.get_running_loop().create_future() if durable else None
            job = Job(key, done)
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

    async def _write_through_worker(self, slot: Slot) -> None:
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

    async def _write_through_one(self, slot: Slot, key: ChunkKey) -> None:
        async with self._keys.hold(key):
            chunk = await self._get_above(slot.index, key)
            if chunk is None:
                return  # deleted or evicted meanwhile: nothing to write
            with chunk:
                if slot.holds(key, chunk.meta.checksum):
                    return
                if await self._admit(slot, key, chunk, strict=False) is not None:
                    slot.counters.write_through += 1

    async def _get_above(self, index: int, key: ChunkKey) -> Chunk | None:
        for slot in self._slots[:index]:
            if key in slot.sizes:
                chunk = await slot.tier.get(key)
                if chunk is not None:
                    return chunk
        return None

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

    def get_resident(self, key: ChunkKey) -> Chunk | None:
        """The chunk at once if the top tier holds it in host memory (a view, as
        :meth:`get` returns it, counted as a hit and an access), else None:
        use :meth:`get`.  Release it when done."""
        self._require_open()
        if not self._slots or key not in self._slots[0].sizes:
            return None
        slot = self._slots[0]
        tier = slot.tier
        chunk = tier.get_view(key) if isinstance(tier, MemoryTier) else None
        if chunk is not None:
            slot.policy.access(key)
        return chunk

    def top_tier_name(self) -> str | None:
        return self._slots[0].tier.name if self._slots else None

    def shared_tier(self) -> MemoryTier | None:
        """The first tier whose arena local clients may read (kvstore/tiers/shared_arena.py)."""
        for slot in self._slots:
            if isinstance(slot.tier, MemoryTier) and slot.tier.shared is not None:
                return slot.tier
        return None

    def note_shared_read(self, key: ChunkKey) -> tuple[str, int] | None:
        """A read of ``key`` a client made from :meth:`shared_tier`'s arena: count
        it and refresh the key's place in that tier's eviction order as a get
        would.  The tier's name and the chunk's size, or None if the tier no
        longer holds it."""
        tier = self.shared_tier()
        n = None if tier is None else tier.note_shared_read(key)
        if tier is None or n is None:
            return None
        slot = self._slot(tier.name)
        if key in slot.sizes:
            slot.policy.access(key)
        return tier.name, n

    async def _promote(self, key: ChunkKey, chunk: Chunk, source: Slot) -> None:
        top = self._slots[0]
        if key in top.sizes or chunk.meta.nbytes > self._capacity(top):
            return
        if await self._admit(top, key, chunk, strict=False) is not None:
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

    def _capacity(self, slot: Slot) -> int:
        cap = slot.tier.capacity_bytes
        return cap if slot.limit is None else min(cap, slot.limit)

    def _fits(self, slot: Slot, n: int) -> bool:
        if not slot.tier.fits(n):
            return False
        return slot.limit is None or slot.tier.used_bytes + n <= slot.limit
