"""The store's data path: lifecycle, puts (direct writes included), gets, promotion, lookups, deletes.

Admission and eviction are in :mod:`kvstore.store.admission`, write-through in
:mod:`kvstore.store.writethrough`; this class builds on both."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Sequence
from typing import Self

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.errors import CapacityError, InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.store.results import LookupResult
from kvstore.store.slots import Slot
from kvstore.store.writethrough import WriteThrough
from kvstore.tiers.memory import MemoryTier


class StoreCore(WriteThrough):
    """The data path of :class:`~kvstore.store.TieredStore` (see the package docstring): lifecycle,
    put, get, lookup, delete and promotion."""

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
