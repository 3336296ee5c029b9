"""Direct writes: a local client writes chunks into the daemon's CPU tier memory itself.

A shared-memory put through the daemon costs two copies and a round trip:
the client copies its tensor into its segment, the daemon copies it from
there into the tier and checksums the copy while the client waits.  When the
top tier shares its arena with local clients (kvstore/tiers/shared_arena.py:
what direct reads map read-only), the daemon may instead hand a client a
writable mapping of it and *reserve* blocks in it for the client: the client
copies its tensor straight into a reserved block, checksums the block as it
goes (piece by piece, while each piece is still in its cache), and hands the
block over with an ``ArenaPutRequest`` on the control channel
(kvstore/server/shm_channel.py, kind ``W``).  The daemon makes the block the
key's chunk as a put would (eviction order, quotas, replacing an older value,
write-through to lower tiers, the direct-read index) without reading it.  One
request hands over up to :data:`MAX_HELD` blocks (a batch: ``put_many``), and
reserves the blocks for the client's next put, so a client putting batches of
one shape pays one round trip a batch.  Those reservations evict as the next
put would (one put early) but never a chunk the same request stored: when
only that would make room, the reply reserves fewer (a prefix of what was
asked, maybe none) and the next put reserves the rest first (a second round
trip), as in a tier that holds one chunk.

A client may also send the request *before* it writes the blocks
(``checksums_follow``, when the attach reply carries ``SUMS_FOLLOW``) and
their checksums after, in an ``S`` message (:data:`SUMS` per item): the
daemon checks the request, makes room for tenant quotas and reserves the
next blocks during the client's copies, and stores the chunks when the
checksums come (kvstore/server/shm_channel.py has the wire format).

What the daemon trusts: the checksum is the client's, computed over the
block after writing it; the daemon does not read the block again.  That is
the trust direct reads already place in local clients (the arena holds every
tenant's chunks), so direct writes too are offered only without a token file
(and only with ``server.shm_direct_writes``).  A client that wrote into a
block after handing it over would corrupt its own chunk: kvstore's clients
never do.

Reserved blocks belong to the connection that reserved them (at most
:data:`MAX_HELD` at a time, each at most ``max_chunk_bytes``); they count as
used in the tier, and go back to it when given back (``release``) or when the
connection ends.  All connections together hold at most a share of the
tier's capacity (``server.shm_reserved_share``): reserved blocks hold no
chunk, and without that bound many clients, each holding blocks for its next
put, would evict the cache they are there to fill.  A reservation past it is
refused as one that cannot be made (RESOURCE_EXHAUSTED alone, fewer blocks
with items): those values then go through the daemon.  The tier counts its
reserved blocks (``MemoryTier.reserved_bytes``).  A request is checked whole
before anything in it is done: a bad item, or a block the connection does
not hold, stores nothing and keeps the connection's blocks as they were.  ``release`` ignores offsets the
connection does not hold, so a client that is not sure whether a failed put
consumed its block (it does once the chunk is stored, also if a durable
write-through then fails) names it there in its next request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import struct
import time
from collections.abc import Awaitable, Callable, Sequence

from kvstore.chunk import ChunkMeta
from kvstore.errors import CapacityError, Closed, InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.metrics import Metrics
from kvstore.server.auth import Principal
from kvstore.server.limits import Limits
from kvstore.server.messages import meta_from_pb, parse_key
from kvstore.server.shm import FailedPrecondition
from kvstore.store import TieredStore
from kvstore.v1 import kvstore_pb2 as pb

#: Blocks one connection may hold reserved at a time (also the most chunks a
#: client writes with one request, kvstore/client/arena_writes.py).
MAX_HELD = 8

#: A connection's reserved blocks: offset -> bytes.
Held = dict[int, int]

#: An item to store: key, metadata, the offset of its block.
Item = tuple[ChunkKey, ChunkMeta, int]

#: A direct write's checksum and the microseconds its copy took, per item, in
#: the message after an ``ArenaPutRequest`` with ``checksums_follow``.
SUMS = struct.Struct("<QI")

#: Reads those checksums (the next message's body).
Sums = Callable[[], Awaitable[bytes]]


def _with_sums(items: list[Item], body: bytes) -> tuple[list[Item], float]:
    """The items with their checksums from ``body``; the seconds the copies took."""
    if len(body) != SUMS.size * len(items):
        raise InvalidArgument(
            f"checksums: {len(body)} bytes for {len(items)} items; expected {SUMS.size} per item "
            "(u64 checksum, u32 microseconds)"
        )
    out: list[Item] = []
    micros = 0
    for i, (key, meta, off) in enumerate(items):
        summed, took = SUMS.unpack_from(body, i * SUMS.size)
        out.append((key, dataclasses.replace(meta, checksum=summed), off))
        micros += took
    return out, micros / 1e6


class DirectWrites:
    """The daemon's side of direct writes (see the module docstring)."""

    def __init__(
        self,
        store: TieredStore,
        limits: Limits,
        metrics: Metrics,
        *,
        max_chunk_bytes: int,
        max_batch: int,
        reserved_share: float = 0.5,
        why_not: Callable[[], str | None],
    ) -> None:
        self._store = store
        self._limits = limits
        self._metrics = metrics
        self._max_chunk = max_chunk_bytes
        self._max_batch = max_batch
        #: The share of the tier's capacity all connections may hold reserved together.
        self._reserved_share = reserved_share
        #: Why direct writes are not offered now (None: they are).
        self._why_not = why_not

    def offered(self) -> bool:
        return self._why_not() is None

    def refuse(self) -> None:
        """Raise FailedPrecondition saying why direct writes are not offered (if they are not)."""
        why = self._why_not()
        if why is not None:
            raise FailedPrecondition(f"direct writes are off: {why}")

    async def put(
        self, request: pb.ArenaPutRequest, principal: Principal, held: Held, sums: Sums | None = None
    ) -> pb.ArenaPutReply:
        """Give back ``request.release``, store ``request.items`` (blocks in ``held``),
        then reserve blocks of ``request.reserve`` bytes; ``held`` follows.

        With ``request.checksums_follow``, ``sums`` reads the items' checksums
        (:data:`SUMS` each), which the client sends once it has written the
        blocks: meanwhile this checks the request, makes room for the tenants'
        quotas and reserves the next blocks, and stores nothing before they
        come.  A refusal may come before they are read: the channel that
        carries them reads them then (kvstore/server/shm_channel.py)."""
        if request.checksums_follow and sums is None:
            raise InvalidArgument("checksums_follow: this channel cannot carry the checksums")
        sums = sums if request.checksums_follow else None
        self.refuse()
        items = self._check(request, principal, held)
        for off in request.release:
            if held.pop(off, None) is not None:
                self._store.release(off)
        reply = pb.ArenaPutReply()
        keys = [key for key, _, _ in items]
        if sums is None:
            copying = sum(i.micros for i in request.items) / 1e6  # the clients' copies, told
            reply.results.extend(await self._store_items(items, request.durable, held, copying, quotas=True))
            await self._reserve_into(reply, request.reserve, held, keys)
            return reply
        try:
            for key, meta, _ in items:
                await self._limits.quotas.make_room_for_tenant(key, meta.nbytes)
            # Reserved ahead of the items' adoption: their blocks do not count against the share.
            adopting = sum(meta.nbytes for _, meta, _ in items)
            await self._reserve_into(reply, request.reserve, held, keys, adopting)
            items, copying = _with_sums(items, await sums())
        except BaseException:
            self._give_back(reply, held)  # the client never learns of them
            raise
        reply.results.extend(await self._store_items(items, request.durable, held, copying, quotas=False))
        return reply

    async def _store_items(
        self, items: list[Item], durable: bool, held: Held, copying: float, *, quotas: bool
    ) -> list[pb.PutResult]:
        """Make each item's block its key's chunk; ``copying``: the seconds the client's copies took."""
        started = time.perf_counter()
        results = []
        written: list[tuple[ChunkKey, str, int]] = []
        for key, meta, off in items:
            if quotas:
                await self._limits.quotas.make_room_for_tenant(key, meta.nbytes)
            tier = await self._store.put_reserved(
                key, off, meta, durable=durable,
                adopted=functools.partial(held.pop, off),  # the chunk's block from then on
            )
            results.append(pb.PutResult(key=str(key), tier=tier))
            written.append((key, tier, meta.nbytes))
        if written:
            self._metrics.record_writes(written, copying + time.perf_counter() - started)
            self._metrics.direct_writes += len(written)
        return results

    async def _reserve_into(
        self, reply: pb.ArenaPutReply, sizes: Sequence[int], held: Held, keep: list[ChunkKey], adopting: int = 0
    ) -> None:
        """Reserve a block of each size into ``reply.reserved`` and ``held``.  Ahead
        of a put (``keep``: its keys), only what evicts none of them (a prefix);
        alone, all or none (and the error).  ``adopting``: bytes of blocks still
        reserved that are about to hold chunks."""
        for nbytes in sizes:
            try:
                off = await self._reserve(nbytes, keep, adopting)
            except CapacityError:
                if keep:
                    break
                self._give_back(reply, held)
                raise
            held[off] = nbytes
            reply.reserved.append(off)

    def _give_back(self, reply: pb.ArenaPutReply, held: Held) -> None:
        """Give back the blocks reserved into ``reply``."""
        for given in reply.reserved:
            del held[given]
            with contextlib.suppress(Closed):  # the store closed first: nothing to give back to
                self._store.release(given)
        del reply.reserved[:]

    async def _reserve(self, nbytes: int, stored: list[ChunkKey], adopting: int = 0) -> int:
        tier = self._store.writable_tier()
        if tier is not None and nbytes <= tier.capacity_bytes:  # else the store says it cannot fit
            bound = int(tier.capacity_bytes * self._reserved_share)
            if tier.reserved_bytes - adopting + nbytes > bound:
                raise CapacityError(
                    f"reserve: {nbytes} more bytes would put the blocks reserved by all clients over "
                    f"{self._reserved_share:g} of the tier's capacity ({bound} bytes, server.shm_reserved_share); "
                    "put through the daemon"
                )
        return await self._store.reserve(nbytes, keep=stored)

    def _check(self, request: pb.ArenaPutRequest, principal: Principal, held: Held) -> list[Item]:
        if len(request.items) > self._max_batch:
            raise InvalidArgument(f"{len(request.items)} items in one request; at most {self._max_batch}")
        released = {off for off in request.release if off in held}
        items = []
        used = set()
        for i, item in enumerate(request.items):
            where = f"items[{i}]"
            key = parse_key(item.key, f"{where}.key")
            principal.check_key(key, write=True)
            meta = meta_from_pb(item.meta, f"{where}.meta")
            size = held.get(item.offset)
            if size is None or item.offset in released or item.offset in used:
                raise InvalidArgument(
                    f"{where}: this connection holds no block at offset {item.offset} "
                    "(reserve one first; each block carries one chunk)"
                )
            if meta.nbytes != size:
                raise InvalidArgument(f"{where}: meta.nbytes {meta.nbytes} differs from the block's {size} bytes")
            used.add(item.offset)
            items.append((key, meta, item.offset))
        for i, nbytes in enumerate(request.reserve):
            if nbytes == 0:
                raise InvalidArgument(f"reserve[{i}]: a block of 0 bytes (sizes must be > 0)")
            if nbytes > self._max_chunk:
                raise CapacityError(
                    f"reserve[{i}]: {nbytes} bytes exceeds the daemon's max_chunk_bytes ({self._max_chunk})"
                )
        keeps = len(held) - len(released) - len(used)
        if keeps + len(request.reserve) > MAX_HELD:
            raise CapacityError(
                f"reserve: this connection would hold {keeps + len(request.reserve)} blocks, at most {MAX_HELD}; "
                "put or release some first"
            )
        return items

    def release_all(self, held: Held) -> None:
        """Give back every block a connection still holds (it ended)."""
        for off in list(held):
            del held[off]
            with contextlib.suppress(Closed):  # the store closed first: nothing to give back to
                self._store.release(off)
