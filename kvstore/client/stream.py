"""Put and Get over the gRPC byte stream: the way every client has, whatever
the host.  Payloads travel in data frames of ``frame_bytes`` with the fast
data-frame codec (kvstore/server/frames.py: the same bytes on the wire as
the generated messages), and each chunk fetched is checked against its
checksum.  Deadlines and retries are the caller's
(:meth:`~kvstore.client.aio.AsyncClient._call`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import torch

from kvstore.chunk import ChunkMeta
from kvstore.client.payload import Fetched, fetched
from kvstore.errors import InvalidArgument, RemoteUnavailable
from kvstore.server import frames
from kvstore.server.messages import meta_from_pb, meta_to_pb
from kvstore.tiers.memory import tensor_view
from kvstore.v1 import kvstore_pb2 as pb


class StreamCalls:
    """The Put and Get calls of one channel."""

    def __init__(self, channel: grpc.aio.Channel, frame_bytes: int, metadata: tuple[tuple[str, str], ...]) -> None:
        self._frame = frame_bytes
        self._metadata = metadata
        self._put_call = channel.stream_unary(
            "/kvstore.v1.KVStore/Put", request_serializer=frames.encode, response_deserializer=pb.PutReply.FromString
        )
        self._get_call = channel.unary_stream(
            "/kvstore.v1.KVStore/Get",
            request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=frames.decoder(pb.GetFrame),
        )

    async def put(self, prepared: list[tuple[str, ChunkMeta, memoryview]], durable: bool, timeout: float) -> list[str]:
        """Store (key text, metadata, payload) each, in one call; the tier of each, in order."""
        frame = self._frame

        async def stream() -> AsyncIterator[pb.PutFrame | memoryview]:
            for key, meta, data in prepared:
                yield pb.PutFrame(header=pb.PutHeader(key=key, meta=meta_to_pb(meta), durable=durable))
                for off in range(0, meta.nbytes, frame):
                    yield data[off : off + frame]

        reply = await self._put_call(stream(), metadata=self._metadata, timeout=timeout)
        return [r.tier for r in reply.results]

    async def get(self, texts: list[str], timeout: float, *, into: torch.Tensor | None = None) -> list[Fetched | None]:
        """The chunks under the key texts (None where absent), in one call; with
        ``into`` (one key) the frames land straight in it."""
        dest = None if into is None else tensor_view(into)
        out: list[Fetched | None] = [None] * len(texts)
        call = self._get_call(
            pb.GetRequest(keys=texts, frame_bytes=self._frame, inline_data=True),
            metadata=self._metadata,
            timeout=timeout,
        )
        buf: memoryview | None = None
        meta: ChunkMeta | None = None
        index = -1
        filled = 0
        async for frame in call:
            if isinstance(frame, pb.GetFrame) and frame.WhichOneof("part") == "header":
                h = frame.header
                index = h.index
                if not h.found:
                    continue
                meta = meta_from_pb(h.meta)
                if dest is not None:
                    if meta.nbytes > dest.nbytes:
                        call.cancel()
                        raise InvalidArgument(f"output has room for {dest.nbytes} bytes, the chunk has {meta.nbytes}")
                    buf = dest[: meta.nbytes]
                else:
                    buf = memoryview(bytearray(meta.nbytes))
                filled = len(h.data)  # the first frame, inline (GetRequest.inline_data)
                if filled > meta.nbytes:
                    raise RemoteUnavailable("daemon sent more bytes than the chunk has")
                buf[:filled] = h.data
            else:
                if buf is None or meta is None:
                    raise RemoteUnavailable("daemon sent data without a header")
                data = frame if isinstance(frame, memoryview) else memoryview(frame.data)
                if filled + len(data) > meta.nbytes:
                    raise RemoteUnavailable("daemon sent more bytes than the chunk has")
                buf[filled : filled + len(data)] = data
                filled += len(data)
            if buf is not None and meta is not None and filled == meta.nbytes:
                out[index] = fetched(meta, buf, texts[index])
                meta = buf = None
        if meta is not None:
            raise RemoteUnavailable(f"stream ended inside chunk {texts[index]}")
        return out
