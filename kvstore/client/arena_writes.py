"""The client's side of direct writes (kvstore/server/direct_writes.py).

When the daemon maps its CPU tier's arena writable into this client, a put of
a CPU tensor is: copy it into a block the daemon reserved for this
connection, checksumming each piece as it is copied
(:func:`kvstore.tiers.copier.copy_summed`), then one ``W`` request that hands
the block over and reserves the next one of the same size.  A put of another
size first gives back the block held and reserves one of the new size (one
more round trip).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from kvstore.chunk import ChunkMeta
from kvstore.errors import CapacityError, InvalidArgument
from kvstore.server.messages import meta_to_pb
from kvstore.tiers.copier import SPLIT_SUMMED, copy_summed
from kvstore.tiers.shared_arena import ArenaReader
from kvstore.v1 import kvstore_pb2 as pb

MAX_MICROS = (1 << 32) - 1

#: Sends an ``ArenaPutRequest`` on the control channel; the reply, or raises the daemon's error.
Call = Callable[[pb.ArenaPutRequest], pb.ArenaPutReply]


class ArenaWrites:
    """One control connection's direct writes: the block it holds, and the copy into it.
    Not thread-safe: the caller holds the connection's lock."""

    def __init__(self, arena: ArenaReader) -> None:
        if not arena.writable:
            raise InvalidArgument("the daemon's arena is mapped read-only here")
        self._arena = arena
        #: The block reserved for the next put: (offset, bytes).
        self._block: tuple[int, int] | None = None
        #: A block a failed put may or may not have consumed: given back with the next request.
        self._doubtful: list[int] = []
        #: Puts written into the arena.
        self.count = 0

    def put(self, call: Call, key_text: str, meta: ChunkMeta, payload: torch.Tensor, durable: bool) -> str | None:
        """Put ``payload`` (flat uint8, on the CPU; ``meta`` without a checksum yet)
        as ``key_text``; the tier it went to, or None when the daemon could not
        reserve a block for it (larger than its top tier, which is full of pinned
        or busy chunks): a put through the daemon then stores it elsewhere or
        says why not."""
        n = meta.nbytes
        if self._block is None or self._block[1] != n:
            try:
                self._reserve(call, n)
            except CapacityError:
                return None
        assert self._block is not None
        off = self._block[0]
        if off + n > self._arena.arena_bytes:
            raise InvalidArgument(f"the daemon reserved a block at {off} past the end of its arena")
        started = time.perf_counter()
        summed = copy_summed(self._arena.arena[off : off + n], payload, self._helper(n))
        micros = min(int((time.perf_counter() - started) * 1e6), MAX_MICROS)
        item = pb.ArenaPutItem(
            key=key_text, meta=meta_to_pb(dataclasses.replace(meta, checksum=summed)), offset=off, micros=micros
        )
        self._block = None
        try:
            reply = call(pb.ArenaPutRequest(items=[item], durable=durable, reserve=n, release=self._take_doubtful()))
        except BaseException:
            self._doubtful.append(off)
            raise
        if reply.HasField("reserved"):
            self._block = (reply.reserved, n)
        self.count += 1
        return reply.results[0].tier

    def _reserve(self, call: Call, n: int) -> None:
        release = self._take_doubtful()
        if self._block is not None:
            release.append(self._block[0])
            self._block = None
        try:
            reply = call(pb.ArenaPutRequest(reserve=n, release=release))
        except BaseException:
            self._doubtful.extend(release)
            raise
        if not reply.HasField("reserved"):
            raise InvalidArgument("the daemon reserved no block for a direct write")
        self._block = (reply.reserved, n)

    def _take_doubtful(self) -> list[int]:
        out, self._doubtful = self._doubtful, []
        return out

    def _helper(self, n: int) -> ThreadPoolExecutor | None:
        return self._arena.helper() if n >= SPLIT_SUMMED else None

    def give_back(self, call: Call) -> None:
        """Give back the block held (the daemon would take it back when the
        connection closes, but not before this returns)."""
        release = self._take_doubtful() + ([self._block[0]] if self._block is not None else [])
        self._block = None
        if release:
            call(pb.ArenaPutRequest(release=release))
