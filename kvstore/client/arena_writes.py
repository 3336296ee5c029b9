"""The client's side of direct writes (kvstore/server/direct_writes.py).

When the daemon maps its CPU tier's arena writable into this client, a put of
CPU tensors is: copy each into a block the daemon reserved for this
connection, checksumming each piece as it is copied
(:func:`kvstore.tiers.copier.copy_summed`), then a ``W`` request that hands
the blocks over and reserves the next ones, of the same sizes.

A batch (``put_many``) goes in groups of at most :data:`MAX_HELD` chunks and
:data:`GROUP_BYTES` bytes: the blocks a client holds at most.  A group that
the blocks held do not fit first reserves what it needs (one more round
trip), giving back the oldest blocks held where they and the group's would be
over those bounds.  Within a group the requests are pipelined: each carries
about :data:`REQUEST_BYTES` of chunks and goes out as soon as they are
copied, and the client copies the next ones while the daemon stores those;
it reads the replies (in order) when it needs the blocks they reserve, and at
the end.  So a batch costs the copies, plus the daemon's work on the last
request only.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.client.payload import Value, to_payload
from kvstore.errors import CapacityError, InvalidArgument
from kvstore.server.direct_writes import MAX_HELD
from kvstore.server.messages import meta_to_pb
from kvstore.tiers.copier import SPLIT_SUMMED, copy_summed
from kvstore.tiers.memory import as_uint8_tensor
from kvstore.tiers.shared_arena import ArenaReader
from kvstore.v1 import kvstore_pb2 as pb

MAX_MICROS = (1 << 32) - 1

#: A group's bytes at most (unless it is one chunk): what a client holds
#: reserved between puts, and the copies before one request.  Past a few MiB
#: the round trip is a small share of the copies.
GROUP_BYTES = 64 << 20

#: A request of a group is sent once it carries this many bytes (or the group
#: ends): the copies of the next request then take longer than the daemon's
#: work on this one (30-90 us a chunk, 70 a request, on the 2-core VM), and
#: a request's own cost (20-30 us here) stays small next to its copies.
REQUEST_BYTES = 2 << 20


class Link(Protocol):
    """The control connection as direct writes use it: requests go out in
    order, and their replies come back in the same order."""

    def send(self, request: pb.ArenaPutRequest) -> None:
        """Send ``request`` (raises OSError when the connection is lost)."""

    def receive(self) -> pb.ArenaPutReply:
        """The reply to the oldest request not yet answered; raises the daemon's
        error for it (the connection goes on), OSError or TimeoutError."""


def call(link: Link, request: pb.ArenaPutRequest) -> pb.ArenaPutReply:
    """Send ``request`` and wait for its reply (nothing else in flight)."""
    link.send(request)
    return link.receive()


#: A chunk to put: key text, metadata (without a checksum yet), payload (flat uint8 on the CPU).
Item = tuple[str, ChunkMeta, torch.Tensor]


@dataclasses.dataclass
class _Sent:
    """A ``W`` request in flight."""

    #: The batch's items it carries (their indexes), and the blocks they were written into.
    at: list[int]
    offsets: list[int]
    #: The sizes it reserves for the next puts.
    reserve: list[int]


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

    def put_many(self, link: Link, items: Sequence[Item], durable: bool) -> list[str | None]:
        """Put each item (``meta.nbytes`` > 0); for each, the tier it went to, or
        None when the daemon could not reserve a block for it (larger than its
        top tier, which is full of pinned or busy chunks): a put through the
        daemon then stores it elsewhere or says why not.

        When this raises, any of the items may have been stored (as when puts
        one at a time stop at an error): the requests in flight were sent."""
        out: list[str | None] = [None] * len(items)
        inflight: deque[_Sent] = deque()
        blocks: list[int | None] = []
        sizes: list[int] = []
        try:
            at = 0
            for group in _groups(items):
                blocks, sizes = [], []  # _claim keeps track of the blocks it takes until it returns
                group_sizes = [meta.nbytes for _, meta, _ in group]
                blocks, sizes = self._claim(link, group_sizes, inflight, out), group_sizes
                for start, stop in _requests(sizes):
                    self._send(link, group, sizes, blocks, at, start, stop, durable, inflight)
                at += len(group)
            while inflight:
                self._settle(link, inflight, out)
        except BaseException:
            # The group's blocks not handed over are still this connection's.
            self._blocks.extend((off, n) for off, n in zip(blocks, sizes, strict=True) if off is not None)
            self._drain_after_error(link, inflight)
            raise
        return out

    def _send(
        self, link: Link, group: Sequence[Item], sizes: list[int], blocks: list[int | None],
        at: int, start: int, stop: int, durable: bool, inflight: deque[_Sent],
    ) -> None:
        """Copy the group's items ``start:stop`` into their blocks and send the
        request that hands them over (none when no item of them has a block);
        the blocks handed over become None in ``blocks``."""
        sent = _Sent([], [], [n for n in sizes[start:stop] if n <= self._arena.arena_bytes])
        written = [
            self._write(*group[i], off) for i in range(start, stop) if (off := blocks[i]) is not None
        ]
        if not written:
            return
        for i in range(start, stop):
            if (off := blocks[i]) is not None:
                sent.at.append(at + i)
                sent.offsets.append(off)
                blocks[i] = None
        request = pb.ArenaPutRequest(items=written, durable=durable, release=self._take_doubtful(), reserve=sent.reserve)
        try:
            link.send(request)
        except BaseException:
            self._doubtful.extend(sent.offsets)  # maybe sent in part: maybe consumed
            raise
        inflight.append(sent)

    def _settle(self, link: Link, inflight: deque[_Sent], out: list[str | None] | None) -> None:
        """Read the reply to the oldest request in flight: its items' tiers into
        ``out`` (unless None), the blocks it reserved into those held."""
        sent = inflight.popleft()
        try:
            reply = link.receive()
        except BaseException:
            self._doubtful.extend(sent.offsets)
            raise
        self._blocks.extend(zip(reply.reserved, sent.reserve, strict=False))
        if len(reply.results) != len(sent.at):
            raise InvalidArgument(f"the daemon answered {len(reply.results)} direct writes of {len(sent.at)}")
        self.count += len(sent.at)
        if out is not None:
            for i, result in zip(sent.at, reply.results, strict=True):
                out[i] = result.tier

    def _drain_after_error(self, link: Link, inflight: deque[_Sent]) -> None:
        """Read the replies still due (the connection stays in step); once the
        connection fails, the blocks of those left go to doubtful (the first
        error is the one raised)."""
        while inflight:
            try:
                self._settle(link, inflight, None)
            except OSError:  # TimeoutError too: the channel is closed
                for sent in inflight:
                    self._doubtful.extend(sent.offsets)
                inflight.clear()
            except Exception:  # noqa: BLE001, S112 - that request's own error: the next reply is still due
                continue

    def _write(self, key_text: str, meta: ChunkMeta, payload: torch.Tensor, off: int) -> pb.ArenaPutItem:
        """Copy ``payload`` into the block at ``off``; the item that hands it over."""
        n = meta.nbytes
        if off + n > self._arena.arena_bytes:
            raise InvalidArgument(f"the daemon reserved a block at {off} past the end of its arena")
        started = time.perf_counter()
        summed = copy_summed(self._arena.arena[off : off + n], payload, self._helper(n))
        micros = min(int((time.perf_counter() - started) * 1e6), MAX_MICROS)
        item = pb.ArenaPutItem(key=key_text, meta=meta_to_pb(meta), offset=off, micros=micros)
        item.meta.checksum = summed
        return item

    def _claim(self, link: Link, sizes: list[int], inflight: deque[_Sent], out: list[str | None]) -> list[int | None]:
        """A block held for each size, taken out of :attr:`_blocks`, after reading
        the replies in flight as far as they reserve what is missing; the sizes
        none matches then are reserved first, in one request that gives back the
        oldest blocks held of other sizes as far as needed to stay within
        :data:`MAX_HELD` blocks and :data:`GROUP_BYTES` bytes with this group's
        (reserved again ahead of the next put).  None for each when the daemon
        could not reserve them."""
        taken, missing = self._take(sizes)
        while missing and inflight:
            self._blocks.extend((off, n) for off, n in zip(taken, sizes, strict=True) if off is not None)
            self._settle(link, inflight, out)
            taken, missing = self._take(sizes)
        if not missing:
            return taken
        release = self._take_doubtful()
        group_bytes = sum(sizes)
        while self._blocks and (
            len(self._blocks) + len(sizes) > MAX_HELD
            or sum(n for _, n in self._blocks) + group_bytes > GROUP_BYTES
        ):
            release.append(self._blocks.pop(0)[0])
        try:
            reply = call(link, pb.ArenaPutRequest(reserve=[sizes[i] for i in missing], release=release))
        except CapacityError:
            self._doubtful.extend(release)
            return taken
        except BaseException:
            # The blocks taken for this group too: still held, unless the connection is gone.
            self._doubtful.extend(release + [off for off in taken if off is not None])
            raise
        if len(reply.reserved) != len(missing):
            self._doubtful.extend([*reply.reserved, *(off for off in taken if off is not None)])
            raise InvalidArgument(f"the daemon reserved {len(reply.reserved)} blocks for direct writes, not {len(missing)}")
        for i, off in zip(missing, reply.reserved, strict=True):
            taken[i] = off
        return taken

    def _take(self, sizes: list[int]) -> tuple[list[int | None], list[int]]:
        """A held block of each size (taken out of :attr:`_blocks`), or None;
        and where none was held of a size that fits in the arena."""
        taken: list[int | None] = []
        missing: list[int] = []
        for i, n in enumerate(sizes):
            j = next((k for k, (_, size) in enumerate(self._blocks) if size == n), None)
            if j is None:
                taken.append(None)
                if n <= self._arena.arena_bytes:  # else it never fits: not asked
                    missing.append(i)
            else:
                taken.append(self._blocks.pop(j)[0])
        return taken, missing

    def _take_doubtful(self) -> list[int]:
        out, self._doubtful = self._doubtful, []
        return out

    def _helper(self, n: int) -> ThreadPoolExecutor | None:
        return self._arena.helper() if n >= SPLIT_SUMMED else None

    def give_back(self, link: Link) -> None:
        """Give back the blocks held (the daemon would take them back when the
        connection closes, but not before this returns)."""
        release = self._take_doubtful() + [off for off, _ in self._blocks]
        self._blocks.clear()
        if release:
            call(link, pb.ArenaPutRequest(release=release))


def _requests(sizes: list[int]) -> list[tuple[int, int]]:
    """A group's requests: ``(start, stop)`` of each, :data:`REQUEST_BYTES` or more
    (the last one may be less)."""
    out: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, n in enumerate(sizes):
        total += n
        if total >= REQUEST_BYTES:
            out.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


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
        if isinstance(value, Chunk) or (isinstance(value, torch.Tensor) and value.device.type != "cpu"):
            return None
        meta, view = to_payload(value, with_checksum=False)
        if not meta.nbytes:
            return None
        out.append((text, meta, as_uint8_tensor(view)))
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
