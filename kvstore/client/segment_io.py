"""The async client's puts and gets through its shared-memory segment
(kvstore/client/shm.py): the payload is copied into or out of the segment, and
a ShmPut or ShmGet request, over the control channel or gRPC, has the daemon
copy it between the segment and its tiers.  The path between the daemon's
shared arena (no daemon copy) and the byte stream (no shared memory)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import torch

from kvstore.chunk import ChunkMeta
from kvstore.client.payload import Fetched, Value
from kvstore.client.shm import ClientSegment, get_item, put_item
from kvstore.errors import InvalidArgument
from kvstore.server.messages import meta_from_pb
from kvstore.v1 import kvstore_pb2 as pb

#: Sends a ShmPut (over the control channel when it is free, else gRPC).
PutCall = Callable[[pb.ShmPutRequest], Awaitable[pb.PutReply]]
#: Sends a ShmGet (over the control channel when it is free, else gRPC).
GetCall = Callable[[pb.ShmGetRequest], Awaitable[pb.ShmGetReply]]
#: A put: key text, metadata, payload bytes, the value they came from.
Prepared = tuple[str, ChunkMeta, memoryview, Value]

#: Room first asked for a get of unknown size (a larger chunk costs one more request).
FIRST_GET_BYTES = 16 << 20


async def put(seg: ClientSegment, prepared: Sequence[Prepared], durable: bool, call: PutCall) -> list[str] | None:
    """Put each item through ``seg``: a value that lives in the segment as it is,
    others copied into it first.  The tier of each, or None when they do not fit
    in the segment (put them over the stream)."""
    items: list[pb.ShmPutItem] = []
    owned: list[int] = []
    try:
        for key, meta, data, value in prepared:
            off = seg.offset_of(value) if isinstance(value, torch.Tensor) else None
            if off is None:
                off = seg.alloc(meta.nbytes)
                if off is None:
                    return None
                owned.append(off)
                if meta.nbytes:
                    seg.view(off, meta.nbytes).copy_(torch.frombuffer(data, dtype=torch.uint8))
            items.append(put_item(seg, key, meta, off))
        reply = await call(pb.ShmPutRequest(items=items, durable=durable))
        return [r.tier for r in reply.results]
    finally:
        for off in owned:
            seg.free(off)


async def get(seg: ClientSegment, key: str, out: torch.Tensor | None, call: GetCall) -> tuple[bool, Fetched | None]:
    """Get ``key`` through ``seg``: into ``out`` if it lives there, else into a
    slice of it then copied out (into ``out``, or new bytes).  (True, the chunk
    or None when the daemon has none), or (False, None) when the segment has
    no room for it: get it over the stream.  Raises InvalidArgument when
    ``out`` is too small."""
    room = 0 if out is None else out.numel() * out.element_size()
    direct = None if out is None else seg.offset_of(out)
    size_hint = room or FIRST_GET_BYTES
    for _ in range(2):
        off = direct if direct is not None else seg.alloc(size_hint)
        if off is None:
            return False, None
        try:
            reply = await call(pb.ShmGetRequest(items=[get_item(seg, key, off, size_hint)]))
            res = reply.results[0]
            if not res.found:
                return True, None
            meta = meta_from_pb(res.meta)
            if not res.written:
                if out is not None:
                    raise InvalidArgument(f"output has room for {room} bytes, the chunk has {meta.nbytes}")
                size_hint = meta.nbytes  # ask again with room for it
                continue
            src = seg.view(off, meta.nbytes)
            if out is not None:
                if direct is None:
                    out.reshape(-1).view(torch.uint8)[: meta.nbytes].copy_(src)
                return True, Fetched(meta, memoryview(b""))
            data = bytearray(meta.nbytes)
            if meta.nbytes:
                torch.frombuffer(data, dtype=torch.uint8).copy_(src)
            return True, Fetched(meta, memoryview(data))
        finally:
            if direct is None:
                seg.free(off)
    return False, None
