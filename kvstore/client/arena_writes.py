"""The client's side of direct writes (kvstore/server/direct_writes.py).

When the daemon maps its CPU tier's arena writable into this client, a put of
CPU tensors is: copy each into a block the daemon reserved for this
connection, checksumming each piece as it is copied
(:func:`kvstore.tiers.copier.copy_summed_at`), then one ``W`` request that hands
the blocks over and reserves the next ones, of the same sizes.  A daemon that
offers it (``ArenaReader.sums_follow``) gets the ``W`` first and the
checksums after the copies, in an ``S`` message: it checks the request and
reserves the next blocks while the client copies.  A batch
(``put_many``) goes in groups of at most :data:`MAX_HELD` chunks and
:data:`GROUP_BYTES` bytes, one request each.  A group that the blocks held
do not fit first reserves what it needs (one more round trip), giving back
the oldest blocks held where they and the group's would be over those
bounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.client.payload import Value, dtype_name, to_payload
from kvstore.errors import CapacityError, InvalidArgument
from kvstore.server.direct_writes import MAX_HELD, SUMS
from kvstore.server.messages import meta_to_pb
from kvstore.tiers.copier import SPLIT_SUMMED, copy_summed_at
from kvstore.tiers.memory import as_uint8_tensor
from kvstore.tiers.arena_reader import ArenaReader
from kvstore.v1 import kvstore_pb2 as pb

MAX_MICROS = (1 << 32) - 1

#: A group's bytes at most (unless it is one chunk): what a client holds
#: reserved between puts, and the copies before one request.  Past a few MiB
#: the round trip is a small share of the copies.
GROUP_BYTES = 64 << 20

#: The copies of a request sent with ``checksums_follow``: the body of the
#: message that follows it (:data:`~kvstore.server.direct_writes.SUMS` per item).
Then = Callable[[], bytes]


class Call(Protocol):
    """Sends an ``ArenaPutRequest`` on the control channel (then, with ``then``, the
    checksums it returns); the reply, or raises the daemon's error."""

    def __call__(self, request: pb.ArenaPutRequest, then: Then | None = None, /) -> pb.ArenaPutReply: ...

#: A chunk to put: key text, metadata (without a checksum yet), payload (a
#: contiguous CPU tensor of ``meta.nbytes`` bytes).
Item = tuple[str, ChunkMeta, torch.Tensor]


class ArenaWrites:
    """One control connection's direct writes: the blocks it holds, and the copies into them.
    Not thread-safe: the caller holds the connection's lock."""

    def __init__(self, arena: ArenaReader) -> None:
        if not arena.writable:
            raise InvalidArgument("the daemon's arena is mapped read-only here")
        self._arena = arena
        #: Blocks reserved for the next puts: (offset, bytes).
        self._blocks: list[tuple[int, int]] = []
        #: Blocks a failed put may or may not have consumed: given back with the next request.
        self._doubtful: list[int] = []
        #: Puts written into the arena.
        self.count = 0

    def put_many(self, call: Call, items: Sequence[Item], durable: bool) -> list[str | None]:
        """Put each item (``meta.nbytes`` > 0); for each, the tier it went to, or
        None when the daemon could not reserve a block for it (larger than its
        top tier, which is full of pinned or busy chunks): a put through the
        daemon then stores it elsewhere or says why not."""
        out: list[str | None] = []
        for group in _groups(items):
            out.extend(self._put_group(call, group, durable))
        return out

    def _put_group(self, call: Call, group: Sequence[Item], durable: bool) -> list[str | None]:
        sizes = [meta.nbytes for _, meta, _ in group]
        blocks = self._claim(call, sizes)
        todo = [(i, item, off) for i, (item, off) in enumerate(zip(group, blocks, strict=True)) if off is not None]
        out: list[str | None] = [None] * len(group)
        if not todo:
            return out
        for _, (_, meta, _), off in todo:
            if off + meta.nbytes > self._arena.arena_bytes:
                self._blocks.extend((off, n) for off, n in zip(blocks, sizes, strict=True) if off is not None)
                raise InvalidArgument(f"the daemon reserved a block at {off} past the end of its arena")
        reserve = [n for n in sizes if n <= self._arena.arena_bytes]
        if self._arena.sums_follow:
            # The request first, the copies meanwhile, their checksums after.
            request = pb.ArenaPutRequest(
                items=[pb.ArenaPutItem(key=text, meta=meta_to_pb(meta), offset=off) for _, (text, meta, _), off in todo],
                durable=durable, release=self._take_doubtful(), reserve=reserve, checksums_follow=True,
            )

            def copies() -> bytes:
                return b"".join(SUMS.pack(*self._copy(off, payload, meta.nbytes)) for _, (_, meta, payload), off in todo)

            reply = self._send(call, request, copies)
        else:
            items = []
            try:
                for _, (text, meta, payload), off in todo:
                    summed, micros = self._copy(off, payload, meta.nbytes)
                    item = pb.ArenaPutItem(key=text, meta=meta_to_pb(meta), offset=off, micros=micros)
                    item.meta.checksum = summed
                    items.append(item)
            except BaseException:
                self._blocks.extend((off, n) for off, n in zip(blocks, sizes, strict=True) if off is not None)
                raise
            request = pb.ArenaPutRequest(items=items, durable=durable, release=self._take_doubtful(), reserve=reserve)
            reply = self._send(call, request, None)
        self._blocks.extend(zip(reply.reserved, request.reserve, strict=False))
        self.count += len(todo)
        for (i, _, _), result in zip(todo, reply.results, strict=True):
            out[i] = result.tier
        return out

    def _send(self, call: Call, request: pb.ArenaPutRequest, then: Then | None) -> pb.ArenaPutReply:
        try:
            return call(request, then)
        except BaseException:
            self._doubtful.extend(item.offset for item in request.items)
            raise

    def _copy(self, off: int, payload: torch.Tensor, n: int) -> tuple[int, int]:
        """Copy ``payload`` (``n`` bytes) into the block at ``off``: its checksum, and
        the microseconds the copy took."""
        started = time.perf_counter()
        summed = copy_summed_at(self._arena.base + off, self._arena.view[off : off + n], payload.data_ptr(), n, self._helper(n))
        return summed, min(int((time.perf_counter() - started) * 1e6), MAX_MICROS)

    def _claim(self, call: Call, sizes: list[int]) -> list[int | None]:
        """A block held for each size, taken out of :attr:`_blocks`; the sizes
        none matches are reserved first, in one request that gives back the
        oldest blocks held of other sizes as far as needed to stay within
        :data:`MAX_HELD` blocks and :data:`GROUP_BYTES` bytes with this group's
        (reserved again ahead of the next put).  None for each when the daemon
        could not reserve them."""
        out: list[int | None] = []
        missing: list[int] = []
        for i, n in enumerate(sizes):
            j = next((k for k, (_, size) in enumerate(self._blocks) if size == n), None)
            if j is None:
                out.append(None)
                if n <= self._arena.arena_bytes:  # else it never fits: not asked
                    missing.append(i)
            else:
                out.append(self._blocks.pop(j)[0])
        if not missing:
            return out
        release = self._take_doubtful()
        group_bytes = sum(sizes)
        while self._blocks and (
            len(self._blocks) + len(sizes) > MAX_HELD
            or sum(n for _, n in self._blocks) + group_bytes > GROUP_BYTES
        ):
            release.append(self._blocks.pop(0)[0])
        try:
            reply = call(pb.ArenaPutRequest(reserve=[sizes[i] for i in missing], release=release))
        except CapacityError:
            self._doubtful.extend(release)
            return out
        except BaseException:
            # The blocks taken for this group too: still held, unless the connection is gone.
            self._doubtful.extend(release + [off for off in out if off is not None])
            raise
        if len(reply.reserved) != len(missing):
            self._doubtful.extend([*reply.reserved, *(off for off in out if off is not None)])
            raise InvalidArgument(f"the daemon reserved {len(reply.reserved)} blocks for direct writes, not {len(missing)}")
        for i, off in zip(missing, reply.reserved, strict=True):
            out[i] = off
        return out

    def _take_doubtful(self) -> list[int]:
        out, self._doubtful = self._doubtful, []
        return out

    def _helper(self, n: int) -> ThreadPoolExecutor | None:
        return self._arena.helper() if n >= SPLIT_SUMMED else None

    def give_back(self, call: Call) -> None:
        """Give back the blocks held (the daemon would take them back when the
        connection closes, but not before this returns)."""
        release = self._take_doubtful() + [off for off, _ in self._blocks]
        self._blocks.clear()
        if release:
            call(pb.ArenaPutRequest(release=release))


def _groups(items: Sequence[Item]) -> list[Sequence[Item]]:
    """``items`` in order, in groups of at most :data:`MAX_HELD` chunks and
    :data:`GROUP_BYTES` bytes (a larger chunk alone)."""
    groups: list[Sequence[Item]] = []
    start, total = 0, 0
    for i, (_, meta, _) in enumerate(items):
        if i > start and (i - start == MAX_HELD or total + meta.nbytes > GROUP_BYTES):
            groups.append(items[start:i])
            start, total = i, 0
        total += meta.nbytes
    if start < len(items):
        groups.append(items[start:])
    return groups


def direct_items(texts: Sequence[str], values: Sequence[Value]) -> list[Item] | None:
    """The values to put under the keys ``texts`` as :meth:`ArenaWrites.put_many`
    takes them; None when they must all go another way: a value that is a
    ``Chunk`` (its metadata is kept as is), on a device, or empty, or a key
    named twice (the two ways would not keep the order)."""
    if not texts or len(set(texts)) != len(texts):
        return None
    out: list[Item] = []
    for text, value in zip(texts, values, strict=True):
        if isinstance(value, Chunk):
            return None
        if isinstance(value, torch.Tensor):
            # As to_payload, without its byte view: a few torch calls fewer, which
            # counts where each costs tens of microseconds from a cold cache.
            if value.device.type != "cpu":
                return None
            t = value.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            meta = ChunkMeta(t.numel() * t.element_size(), 0, dtype=dtype_name(t.dtype), shape=tuple(t.shape))
        else:
            meta, view = to_payload(value, with_checksum=False)
            t = as_uint8_tensor(view)
        if not meta.nbytes:
            return None
        out.append((text, meta, t))
    return out


def not_written(out: Sequence[str | None]) -> list[int]:
    """Where :meth:`ArenaWrites.put_many` put nothing: to put another way."""
    return [i for i, tier in enumerate(out) if tier is None]


def filled(out: Sequence[str | None], rest: Sequence[int], tiers: Sequence[str]) -> list[str]:
    """``out`` with the tiers of the items at ``rest`` (put another way) filled in."""
    done = list(out)
    for i, tier in zip(rest, tiers, strict=True):
        done[i] = tier
    complete = [tier for tier in done if tier is not None]
    if len(complete) != len(done):
        raise AssertionError("an item was put neither directly nor another way")
    return complete
