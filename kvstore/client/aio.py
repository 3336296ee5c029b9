"""AsyncClient: the asyncio client of the kvstore daemon.

One channel, reused for every call.  Each call has a deadline; calls that
fail with UNAVAILABLE are retried with exponential backoff (nothing else is:
other errors are the caller's or the data's, and retrying cannot help).  Every
error reaches the caller as a typed :class:`~kvstore.errors.KVStoreError`
(kvstore/client/channel.py).

Payloads move through a shared-memory segment when the daemon is on this
host (it proves so by reading back a nonce), otherwise through the byte
stream: over the client's own HTTP/2 connection to the daemon's Get and Put
listener (kvstore/client/h2calls.py; the same gRPC calls without grpcio, 2-3x
faster at 1 MiB; one call at a time, in a worker thread; ``http2_get`` and
``http2_put`` turn it off), else through grpcio in frames of
``frame_bytes`` (kvstore/client/stream.py).  ``shm="auto"`` (default) tries
shared memory once and falls back silently; ``shm=False`` never tries.  The
shared-memory requests travel over the daemon's Unix-socket control channel
when it offers one (kvstore/server/shm_channel.py), else over gRPC.  Gets of
chunks in the daemon's CPU tier need no request at all when the daemon
shares that tier's memory (no token file; kvstore/tiers/shared_arena.py):
the client copies them out itself, on the event loop's thread (a memory
copy: up to 0.1 ms per MiB); ``direct_reads=False`` turns that off.  Puts of
CPU tensors and bytes are then written into that memory by the client too
(direct writes, kvstore/client/arena_writes.py: one copy and one request
per group of up to 8 chunks), in a worker thread, so the event loop is not
held for the copies and the round trip; ``direct_writes=False`` turns that
off.  The segment, the control channel and the shared arena are one
client's :class:`~kvstore.client.shm_session.ShmSession`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import grpc
import torch

from kvstore.chunk import ChunkMeta
from kvstore.client import h2calls, segment_io
from kvstore.client.arena_writes import filled, not_written
from kvstore.client.channel import ClientTLS, Retries, open_channel
from kvstore.client.payload import Fetched, KeyLike, Value, copy_into, key_text, to_payload
from kvstore.client.shm import ClientSegment
from kvstore.client.shm_session import ShmSession
from kvstore.client.stream import StreamCalls
from kvstore.tiers.memory import tensor_view
from kvstore.errors import InvalidArgument, KVStoreError, NotFound
from kvstore.server.shm_channel import KIND_GET, KIND_PUT
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

T = TypeVar("T")
DEFAULT_ADDRESS = "127.0.0.1:51061"
#: Data frames of 1 MiB: measured interleaved on the 2-core machine, 32 MiB
#: values moved 2-4x faster over the stream in 1 MiB frames than in 4 MiB ones
#: (each frame is copied 3-4 times on its way; 1 MiB copies stay in cache).
DEFAULT_FRAME_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class LookupResult:
    count: int
    tiers: list[str]


class AsyncClient:
    """See the module docstring.  Use ``async with AsyncClient(...) as c:``."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        tls: ClientTLS | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        frame_bytes: int = DEFAULT_FRAME_BYTES,
        shm: bool | Literal["auto"] = "auto",
        shm_bytes: int = 256 << 20,
        direct_reads: bool = True,
        direct_writes: bool = True,
        http2_get: bool = True,
        http2_put: bool = True,
    ) -> None:
        if not 4096 <= frame_bytes <= 64 << 20:
            raise InvalidArgument(f"frame_bytes must be in [4 KiB, 64 MiB], got {frame_bytes}")
        if timeout_s <= 0:
            raise InvalidArgument(f"timeout_s must be positive, got {timeout_s}")
        if retries < 0:
            raise InvalidArgument(f"retries must be >= 0, got {retries}")
        flags = (("direct_reads", direct_reads), ("direct_writes", direct_writes), ("http2_get", http2_get),
                 ("http2_put", http2_put))
        for name, flag in flags:
            if not isinstance(flag, bool):
                raise InvalidArgument(f"{name} must be True or False, got {flag!r}")
        self.address = address
        self._retries = Retries(timeout_s, retries, backoff_s)
        self._frame = frame_bytes
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = open_channel(address, tls, frame_bytes)
        self._stub = pb_grpc.KVStoreStub(self._channel)
        #: Put and Get over the gRPC byte stream (kvstore/client/stream.py).
        self._stream = StreamCalls(self._channel, frame_bytes, self._metadata)
        self._http2_get, self._http2_put = http2_get, http2_put
        #: The same calls over the client's own HTTP/2 connection; None: both off, or a
        #: target it cannot parse (dns:///, unix:, ...).
        self.h2 = h2calls.open_channel(address, tls, timeout_s) if http2_get or http2_put else None
        #: The segment, the control channel and the daemon's shared arena (kvstore/client/shm_session.py).
        self._local = ShmSession(
            shm, shm_bytes, timeout_s=timeout_s, direct_reads=direct_reads, direct_writes=direct_writes,
            register=self._register_segment,
        )

    # -- lifecycle -----------------------------------------------------------
    async def close(self) -> None:
        seg = self._local.close()
        if seg is not None:
            with contextlib.suppress(KVStoreError, grpc.aio.AioRpcError):
                await self._stub.ReleaseSegment(
                    pb.ReleaseSegmentRequest(segment_id=seg.segment_id), metadata=self._metadata, timeout=2.0
                )
            seg.close()
        if self.h2 is not None:
            await asyncio.to_thread(self.h2.close)
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing --------------------------------------------------------------
    async def _call(self, fn: Callable[[float], Awaitable[T]]) -> T:
        """Run ``fn(timeout)`` with retries on UNAVAILABLE (kvstore/client/channel.py)."""
        return await self._retries.call(fn)

    # -- shared memory (kvstore/client/shm_session.py) ---------------------------------
    async def _register_segment(self, seg: ClientSegment) -> pb.RegisterSegmentReply:
        return await self._call(
            lambda t: self._stub.RegisterSegment(
                pb.RegisterSegmentRequest(name=seg.name, size=seg.size, nonce=seg.nonce),
                metadata=self._metadata,
                timeout=t,
            )
        )

    @property
    def direct_reads(self) -> int:
        """Gets served from the daemon's shared arena (no request) since the segment was registered."""
        return self._local.direct_reads

    @property
    def direct_writes(self) -> int:
        """Puts written into the daemon's shared arena since the segment was registered."""
        return self._local.direct_writes

    async def direct_reads_ready(self) -> bool:
        """Register the segment (mapping the daemon's shared arena, if offered)
        and map every page of the arena into this process, in a worker thread;
        see ``Client.direct_reads_ready``."""
        return await self._local.direct_reads_ready()

    def _read_shared(self, key: str, out: torch.Tensor | None) -> Fetched | None:
        """The chunk read from the daemon's shared arena (copied on this thread: a
        memory copy, 0.1 ms per MiB at most), or None: ask the daemon."""
        read = self._local.read_shared(key, out)
        if read is None:
            return None
        return Fetched(read[0], memoryview(b"") if out is not None else tensor_view(read[1]))

    async def _shm_call(
        self,
        kind: int,
        request: pb.ShmPutRequest | pb.ShmGetRequest,
        parse: Callable[[bytes], T],
        rpc: Callable[..., Awaitable[T]],
    ) -> T:
        """One ShmPut/ShmGet: over the control channel when it is free, else over gRPC."""
        return await self._local.call(
            kind, request, parse, lambda: self._call(lambda t: rpc(request, metadata=self._metadata, timeout=t))
        )

    async def _shm_put(self, request: pb.ShmPutRequest) -> pb.PutReply:
        return await self._shm_call(KIND_PUT, request, pb.PutReply.FromString, self._stub.ShmPut)

    async def _shm_get(self, request: pb.ShmGetRequest) -> pb.ShmGetReply:
        return await self._shm_call(KIND_GET, request, pb.ShmGetReply.FromString, self._stub.ShmGet)

    @property
    def timeout_s(self) -> float:
        """The deadline of each call, in seconds."""
        return self._retries.timeout_s

    @property
    def uses_shm(self) -> bool:
        return self._local.uses_shm

    @property
    def stream_only(self) -> bool:
        """Payloads go through the byte stream: shared memory is off, or was tried and is unavailable."""
        return self._local.stream_only

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata sent with every call (the bearer token, if any)."""
        return self._metadata

    @property
    def frame_bytes(self) -> int:
        """The data-frame size this client asks for and sends."""
        return self._frame

    async def buffer(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 tensor inside the shared-memory segment (None without one).

        Puts from it and gets into it (``get_into``) skip the client-side copy.
        Free it with :meth:`free_buffer`.
        """
        return await self._local.buffer(nbytes)

    def free_buffer(self, t: torch.Tensor) -> None:
        self._local.free_buffer(t)

    # -- put -----------------------------------------------------------------------
    async def put(self, key: KeyLike, value: Value, *, durable: bool = False) -> str:
        """Store ``value`` (bytes or a tensor) under ``key``; returns the tier it landed in."""
        return (await self.put_many([(key, value)], durable=durable))[0]

    async def put_many(self, items: Sequence[tuple[KeyLike, Value]], *, durable: bool = False) -> list[str]:
        """Store several chunks: written into the daemon's memory (one request
        per group of chunks, kvstore/client/arena_writes.py), else in one
        request (one stream, or one shared-memory call).  The tier of each, in
        order.  When it raises, the chunks before the group it failed in may
        have been stored."""
        if not items:
            return []
        seg = await self._local.ready()
        if seg is not None:
            written = await self._arena_put_many(items, durable)
            if written is not None:
                rest = not_written(written)
                tiers = await self._put_through_daemon(seg, [items[i] for i in rest], durable) if rest else []
                return filled(written, rest, tiers)
        return await self._put_through_daemon(seg, items, durable)

    async def _put_through_daemon(
        self, seg: ClientSegment | None, items: Sequence[tuple[KeyLike, Value]], durable: bool
    ) -> list[str]:
        """Put through the segment (the daemon copies) when there is one, else over the stream."""
        # Over shared memory the daemon checksums the bytes itself: skip our pass.
        prepared = [(key_text(k), *to_payload(v, with_checksum=seg is None), v) for k, v in items]
        if seg is not None:
            try:
                out = await segment_io.put(seg, prepared, durable, self._shm_put)
            except NotFound:
                self._local.forget(seg)
                out = None
            if out is not None:
                return out
            prepared = [(k, *to_payload(v), v) for k, _, _, v in prepared]
        return await self._put_stream([(k, m, d) for k, m, d, _ in prepared], durable)

    async def _arena_put_many(self, items: Sequence[tuple[KeyLike, Value]], durable: bool) -> list[str | None] | None:
        """Direct writes (see the module docstring), in a worker thread: for each
        item, the tier it went to or None (put it another way); None: put them
        all another way (off, not offered, the connection busy with another
        call or gone, or values :func:`direct_items` turns away)."""
        return await self._local.put_direct([key_text(k) for k, _ in items], [v for _, v in items], durable)

    async def put_chunks(
        self, items: Sequence[tuple[KeyLike, ChunkMeta, memoryview]], *, durable: bool = False
    ) -> list[str]:
        """Store chunks whose metadata is already known (codec, dtype, shape kept as is), over the stream.

        For chunks that come from another store (the ``peer`` tier): :meth:`put_many`
        derives metadata from a value and would lose the codec.  The daemon checks
        each payload against ``meta.checksum``.
        """
        prepared = []
        for k, meta, data in items:
            view = memoryview(data).cast("B")
            if view.nbytes != meta.nbytes:
                raise InvalidArgument(
                    f"put_chunks: the payload of {k} is {view.nbytes} bytes, its metadata says {meta.nbytes}"
                )
            prepared.append((key_text(k), meta, view))
        return await self._put_stream(prepared, durable) if prepared else []

    async def _put_stream(self, prepared: list[tuple[str, ChunkMeta, memoryview]], durable: bool) -> list[str]:
        """Put over the byte stream: the HTTP/2 connection when it is free, else grpcio."""
        if self.h2 is not None and self._http2_put and not self.h2.busy:  # busy: no trip to a thread
            tiers = await h2calls.in_thread(
                self.h2, self.h2.put, prepared, durable=durable, metadata=self._metadata, timeout_s=self.timeout_s
            )
            if tiers is not None:
                return tiers
        return await self._call(lambda t: self._stream.put(prepared, durable, t))

    # -- get -----------------------------------------------------------------------
    async def get(self, key: KeyLike) -> Fetched | None:
        """The chunk under ``key`` (metadata + bytes), or None."""
        return (await self.get_many([key]))[0]

    async def get_bytes(self, key: KeyLike) -> bytes | None:
        got = await self.get(key)
        return None if got is None else bytes(got.data)

    async def get_tensor(self, key: KeyLike, device: str | torch.device = "cpu") -> torch.Tensor | None:
        got = await self.get(key)
        return None if got is None else got.tensor(device)

    async def get_many(self, keys: Iterable[KeyLike]) -> list[Fetched | None]:
        texts = [key_text(k) for k in keys]
        if not texts:
            return []
        seg = await self._local.ready()
        if seg is not None:
            try:
                return await self._get_shm(seg, texts)
            except NotFound:
                self._local.forget(seg)
        return await self._get_stream(texts)

    async def _get_shm(self, seg: ClientSegment, texts: list[str]) -> list[Fetched | None]:
        out: list[Fetched | None] = []
        for key in texts:
            got = await self._get_shm_one(seg, key, None)
            out.append(got)
        return out

    async def _get_shm_one(self, seg: ClientSegment, key: str, out: torch.Tensor | None) -> Fetched | None:
        """One key from the shared arena, else through the segment: into ``out`` if
        it lives there, else a slice then a copy."""
        read = self._read_shared(key, out)
        if read is not None:
            return read
        done, fetched = await segment_io.get(seg, key, out, self._shm_get)
        if done:
            return fetched
        got = (await self._get_stream([key]))[0]
        if got is not None and out is not None:
            copy_into(out, got)
            return Fetched(got.meta, memoryview(b""))
        return got

    async def get_into(self, key: KeyLike, out: torch.Tensor) -> ChunkMeta | None:
        """Copy the chunk's payload bytes into ``out`` (contiguous, CPU); returns its meta or None.

        With ``out`` from :meth:`buffer`, the daemon writes straight into it.
        """
        if out.device.type != "cpu" or not out.is_contiguous():
            raise InvalidArgument("get_into needs a contiguous CPU tensor")
        text = key_text(key)
        seg = await self._local.ready()
        if seg is not None:
            try:
                got = await self._get_shm_one(seg, text, out)
                return None if got is None else got.meta
            except NotFound:
                self._local.forget(seg)
        fetched = (await self._get_stream([text], into=out))[0]
        return None if fetched is None else fetched.meta

    async def _get_stream(self, texts: list[str], into: torch.Tensor | None = None) -> list[Fetched | None]:
        """Get over the byte stream (the HTTP/2 connection when it is free, else grpcio);
        with ``into`` (one key) the payload lands straight in it."""
        if self.h2 is not None and self._http2_get and not self.h2.busy:
            got = await h2calls.in_thread(
                self.h2, h2calls.get, self.h2, texts, into, frame_bytes=self._frame, metadata=self._metadata,
                timeout_s=self.timeout_s,
            )
            if got is not None:
                return got
        return await self._call(lambda t: self._stream.get(texts, t, into=into))

    @property
    def http2_gets(self) -> int:
        """Get calls carried by the HTTP/2 connection (the others went through grpcio or shared memory)."""
        return 0 if self.h2 is None else self.h2.served

    @property
    def http2_puts(self) -> int:
        """Put calls (``put`` or ``put_many``) carried by the HTTP/2 connection."""
        return 0 if self.h2 is None else self.h2.puts

    # -- small RPCs ------------------------------------------------------------------
    async def lookup(self, keys: Sequence[KeyLike]) -> LookupResult:
        """How many leading keys the daemon has (in any tier), and where."""
        req = pb.LookupRequest(keys=[key_text(k) for k in keys])
        reply = await self._call(lambda t: self._stub.Lookup(req, metadata=self._metadata, timeout=t))
        return LookupResult(reply.count, list(reply.tiers))

    async def exists(self, keys: Sequence[KeyLike]) -> list[bool]:
        req = pb.ExistsRequest(keys=[key_text(k) for k in keys])
        reply = await self._call(lambda t: self._stub.Exists(req, metadata=self._metadata, timeout=t))
        return list(reply.present)

    async def delete(self, keys: Sequence[KeyLike]) -> list[bool]:
        req = pb.DeleteRequest(keys=[key_text(k) for k in keys])
        reply = await self._call(lambda t: self._stub.Delete(req, metadata=self._metadata, timeout=t))
        return list(reply.found)

