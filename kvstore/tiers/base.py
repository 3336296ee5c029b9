"""The tier interface.

A *tier* stores chunks: GPU memory, CPU memory, local disk, a remote store.
It does **not** decide what to evict; the :class:`~kvstore.store.TieredStore`
does that with the tier's eviction policy, asking the tier whether a chunk
:meth:`Tier.fits` and deleting victims until it does.  Networked tiers whose
server evicts on its own (Redis with ``maxmemory``, another daemon) derive
from :class:`UnmanagedTier` (``managed = False``).

Primitives and when they are called:

* :meth:`open` once, before any other call (the disk tier rebuilds its index
  here, without reading payloads); :meth:`close` once at the end.
* :meth:`put` stores a chunk under a key, replacing any previous value.  The
  store calls it only after :meth:`fits` said yes (for managed tiers), but a
  tier must still raise :class:`~kvstore.errors.CapacityError` rather than
  exceed its capacity.  A put that fails or is cancelled leaves nothing visible.
* :meth:`get` returns the chunk or ``None``.  A chunk whose bytes fail their
  checksum is dropped, counted in ``corrupt`` and reported as a miss: it is
  never served.
* :meth:`contains_many` answers presence for a batch of keys (one round trip
  for networked tiers); :meth:`delete` removes a key and returns bytes freed.
* :meth:`entries` lists (key, nbytes) of what a managed tier holds, so the
  store can seed its eviction policy after :meth:`open`.

All methods are coroutines so that slow, fallible, networked tiers fit the
same interface; in-memory tiers simply never suspend in the fast path.
"""

from __future__ import annotations

import asyncio
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from kvstore.chunk import Chunk, ChunkMeta, checksum
from kvstore.keys import ChunkKey


@dataclass(slots=True)
class TierCounters:
    """Monotonic counters a tier keeps about itself (the store adds its own)."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    deletes: int = 0
    corrupt: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass(frozen=True, slots=True)
class TierStats:
    name: str
    kind: str
    capacity_bytes: int
    used_bytes: int
    chunks: int
    counters: TierCounters = field(default_factory=TierCounters)


#: Payloads at least this large are checksummed off the event loop (~0.3 ms per 8 MiB).
SUM_THREAD_MIN = 8 << 20


class Tier(ABC):
    """A place that stores chunks; see the module docstring for the contract."""

    kind: ClassVar[str]
    #: True when the store runs eviction for this tier (it knows everything held).
    managed: ClassVar[bool] = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.counters = TierCounters()

    @property
    def serves_views(self) -> bool:
        """Whether :meth:`get` hands out views of memory the tier holds anyway (a
        host memory tier), rather than copies made for the reader."""
        return False

    async def open(self) -> None:
        """Prepare the tier (allocate, scan, connect).  Default: nothing."""

    async def close(self) -> None:
        """Release everything the tier holds open.  Default: nothing."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def fits(self, nbytes: int) -> bool:
        """Whether a put of ``nbytes`` would succeed now, without eviction."""

    @abstractmethod
    async def put(self, key: ChunkKey, chunk: Chunk) -> None: ...

    async def put_summing(self, key: ChunkKey, chunk: Chunk) -> ChunkMeta:
        """Store ``chunk``, whose ``meta.checksum`` is not set yet; the metadata
        stored, with the checksum of the bytes stored.  Default: checksum the
        payload (in a thread when large), then :meth:`put`.  Memory tiers
        checksum their own copy instead."""
        data = chunk.payload
        got = await asyncio.to_thread(checksum, data) if data.nbytes >= SUM_THREAD_MIN else checksum(data)
        meta = dataclasses.replace(chunk.meta, checksum=got)
        await self.put(key, Chunk(meta, data))
        return meta

    @abstractmethod
    async def get(self, key: ChunkKey) -> Chunk | None: ...

    @abstractmethod
    def contains(self, key: ChunkKey) -> bool:
        """Presence from the tier's local index (may be stale for networked tiers)."""

    async def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [self.contains(k) for k in keys]

    @abstractmethod
    async def delete(self, key: ChunkKey) -> int: ...

    @abstractmethod
    def entries(self) -> Iterable[tuple[ChunkKey, int]]: ...

    def stats(self) -> TierStats:
        return TierStats(
            name=self.name,
            kind=self.kind,
            capacity_bytes=self.capacity_bytes,
            used_bytes=self.used_bytes,
            chunks=len(self),
            counters=TierCounters(**{f: getattr(self.counters, f) for f in TierCounters.__slots__}),
        )


class UnmanagedTier(Tier):
    """A tier whose server evicts on its own (``managed = False``): it keeps no
    local index and does not know its sizes, so the store never evicts from
    it and asks it for presence in batches (:meth:`contains_many`)."""

    managed: ClassVar[bool] = False

    @property
    def capacity_bytes(self) -> int:
        """0: unknown here; the server's own limits bound it."""
        return 0

    @property
    def used_bytes(self) -> int:
        return 0

    def __len__(self) -> int:
        return 0

    def fits(self, nbytes: int) -> bool:
        return True

    def contains(self, key: ChunkKey) -> bool:
        """Always False: no local index; use :meth:`contains_many`."""
        return False

    def entries(self) -> Iterable[tuple[ChunkKey, int]]:
        return ()

