"""The ``kvstore.v1.KVStore`` gRPC service.

Every handler authenticates, validates everything it was sent, and maps
expected failures (:class:`~kvstore.errors.KVStoreError`) to their one gRPC
status with a message that says what was wrong.  Nothing becomes visible
before its bytes are complete and match their checksum; a handler that fails
leaves what was stored before it unchanged.  Checksums and large copies run
in worker threads (xxhash and torch release the GIL), off the event loop.

The shared-memory side (registered segments, the control channel, the shared
arena, direct writes) is :class:`~kvstore.server.shm_service.SharedMemory`;
``RegisterSegment``, ``ReleaseSegment``, ``ShmPut`` and ``ShmGet`` here
authenticate the caller and hand over to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from kvstore.chunk import Chunk, ChunkMeta, checksummer
from kvstore.config import LimitsConfig
from kvstore.errors import CapacityError, CorruptChunk, InvalidArgument, KVStoreError
from kvstore.keys import ChunkKey
from kvstore.metrics import Metrics
from kvstore.server.auth import Principal, TokenTable, principal_of
from kvstore.server.buffers import RecvBuffer
from kvstore.server.frames import HeaderWithData
from kvstore.server.limits import Limits
from kvstore.server.messages import meta_from_pb, meta_to_pb, parse_key
from kvstore.server.shm_service import SharedMemory
from kvstore.store import TieredStore
from kvstore.tiers.copier import Copier
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

T = TypeVar("T")

MIN_FRAME = 64 << 10
#: Largest data frame a Put may carry: the largest ``frame_bytes`` a client
#: may choose (client/aio.py), whatever frame size this daemon sends.
MAX_PUT_FRAME = 64 << 20
#: Largest data frame sent to a Get that names no frame size: a gRPC client
#: with default options refuses messages over 4 MiB, tag and length included.
PLAIN_CLIENT_FRAME = (4 << 20) - 64
#: Payloads at least this large are checksummed / copied in a worker thread.
THREAD_MIN = 8 << 20


class KVStoreService(pb_grpc.KVStoreServicer):
    def __init__(
        self,
        store: TieredStore,
        *,
        tokens: TokenTable | None,
        frame_bytes: int,
        max_chunk_bytes: int,
        max_batch: int,
        shm: bool,
        shm_direct_reads: bool = True,
        shm_direct_writes: bool = True,
        shm_reserved_share: float = 0.5,
        max_inflight_bytes: int = 2 << 30,
        max_concurrent_streams: int = 256,
        threads: int = 2,
        metrics: Metrics | None = None,
        limits: LimitsConfig | None = None,
    ) -> None:
        self._store = store
        #: Traffic figures (kvstore.metrics): the daemon's, exported; else private.
        self._metrics = metrics if metrics is not None else Metrics(store)
        self._tokens = tokens
        self._frame = frame_bytes
        self._max_chunk = max_chunk_bytes
        self._max_batch = max_batch
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvstore-rpc")
        if limits is None:
            limits = LimitsConfig(max_inflight_bytes=max_inflight_bytes)
        #: Stream slots, receive buffers and the memory bound, tenant quotas (kvstore/server/limits.py,
        #: tenant_quotas.py):
        #: a flood of puts gets RESOURCE_EXHAUSTED instead of growing the daemon's memory.
        self.limits = Limits(
            limits, store, max_concurrent_streams=max_concurrent_streams, frame_bytes=frame_bytes,
            client_mapped=lambda: self.shm.mapped_bytes,
        )
        self.requests = 0
        #: Segments, the control channel, the shared arena, direct writes (shm_service.py).
        self.shm = SharedMemory(
            store, self.limits, self._metrics, tokens=tokens, enabled=shm, direct_reads=shm_direct_reads,
            direct_writes=shm_direct_writes, reserved_share=shm_reserved_share, max_chunk_bytes=max_chunk_bytes,
            max_batch=max_batch, copier=Copier(self._pool, threads, inline_max=THREAD_MIN),
            check_meta=self._check_meta, offload=self._offload, fetch=self._fetch,
        )

    async def drain(self, timeout_s: float | None) -> None:
        """Let the shared-memory requests being served finish and refuse new ones (see ShmChannel.drain)."""
        await self.shm.drain(timeout_s)

    def close(self) -> None:
        self.shm.close()
        self._pool.shutdown(wait=True)

    # -- plumbing ----------------------------------------------------------
    def _principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        return principal_of(self._tokens, context.invocation_metadata())

    async def _run(self, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], Awaitable[T]]) -> T:
        self.requests += 1
        try:
            return await fn()
        except KVStoreError as exc:
            code = getattr(grpc.StatusCode, exc.status, grpc.StatusCode.UNKNOWN)
            await context.abort(code, str(exc))
            raise  # unreachable: abort raises

    async def _offload(self, n: int, fn: Callable[..., T], *args: Any) -> T:
        if n < THREAD_MIN:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _keys(self, texts: Sequence[str], principal: Principal, *, write: bool = False) -> list[ChunkKey]:
        if len(texts) > self._max_batch:
            raise InvalidArgument(f"{len(texts)} keys in one request; at most {self._max_batch}")
        keys = [parse_key(t, f"keys[{i}]") for i, t in enumerate(texts)]
        for k in keys:
            principal.check_key(k, write=write)
        return keys

    def _check_meta(self, meta: ChunkMeta, where: str) -> None:
        if meta.nbytes > self._max_chunk:
            raise CapacityError(
                f"{where}: chunk of {meta.nbytes} bytes exceeds the daemon's max_chunk_bytes ({self._max_chunk})"
            )

    # -- Put -----------------------------------------------------------------
    async def Put(
        self, request_iterator: AsyncIterator[pb.PutFrame | memoryview], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PutReply:
        async def run() -> pb.PutReply:
            principal = self._principal(context)
            with await self.limits.stream(context.peer(), put=True):
                return await self._put_stream(request_iterator, principal)

        return await self._run(context, run)

    async def _put_stream(
        self, frames: AsyncIterator[pb.PutFrame | memoryview], principal: Principal
    ) -> pb.PutReply:
        """Frames arrive as PutFrame headers, or (fast path, see frames.py) as
        memoryviews of data; a PutFrame carrying data is accepted too."""
        results: list[pb.PutResult] = []
        # State of the chunk being received (header seen, bytes still coming).
        key: ChunkKey | None = None
        meta: ChunkMeta | None = None
        durable = False
        summed = checksummer()
        buf: RecvBuffer | None = None  # set together with meta, released exactly once
        filled = 0
        started = 0.0  # when the current chunk's header arrived
        try:
            async for frame in frames:
                if isinstance(frame, memoryview):
                    part, data = "data", frame
                else:
                    part = frame.WhichOneof("part")
                    data = memoryview(frame.data)
                if part == "header":
                    assert isinstance(frame, pb.PutFrame)
                    if meta is not None:
                        raise InvalidArgument(
                            f"chunk {len(results)}: new header after {filled} of {meta.nbytes} bytes"
                        )
                    header = frame.header
                    started = time.perf_counter()
                    where = f"chunk {len(results)}"
                    key = parse_key(header.key, f"{where}.key")
                    principal.check_key(key, write=True)
                    if not header.HasField("meta"):
                        raise InvalidArgument(f"{where}: header has no meta")
                    new_meta = meta_from_pb(header.meta, f"{where}.meta")
                    self._check_meta(new_meta, where)
                    await self.limits.quotas.make_room_for_tenant(key, new_meta.nbytes)
                    buf = self.limits.take_buffer(new_meta.nbytes)  # or RESOURCE_EXHAUSTED, nothing taken
                    meta = new_meta
                    durable = header.durable
                    filled = 0
                    summed = checksummer()
                elif part == "data":
                    if meta is None or buf is None:
                        raise InvalidArgument("data frame before any header: send a PutHeader first")
                    if len(data) > MAX_PUT_FRAME:
                        raise InvalidArgument(f"data frame of {len(data)} bytes; frames may be at most {MAX_PUT_FRAME}")
                    if filled + len(data) > meta.nbytes:
                        raise InvalidArgument(
                            f"chunk {len(results)}: {filled + len(data)} bytes received, header said {meta.nbytes}"
                        )
                    buf.write(filled, data)
                    # The checksum of the bytes as they arrive, while they are in the cache
                    # (a second pass over the whole chunk at the end would read it from memory).
                    summed.update(data)
                    filled += len(data)
                    self.limits.wrote(buf, filled)
                else:
                    raise InvalidArgument("empty PutFrame: set header or data")
                if meta is not None and buf is not None and key is not None and filled == meta.nbytes:
                    done, done_meta = buf, meta
                    meta, buf = None, None
                    try:
                        results.append(await self._commit(key, done_meta, done, durable, summed.intdigest()))
                        elapsed = time.perf_counter() - started
                        self._metrics.record_write(key, results[-1].tier, done_meta.nbytes, elapsed)
                    finally:
                        self.limits.give_buffer(done, done_meta.nbytes)
        finally:
            if buf is not None:
                # An unfinished chunk: its bytes are dropped and nothing is stored.
                self.limits.give_buffer(buf, filled)
        if meta is not None:
            raise InvalidArgument(f"stream ended inside chunk {len(results)}: {filled} of {meta.nbytes} bytes received")
        return pb.PutReply(results=results)

    async def _commit(self, key: ChunkKey, meta: ChunkMeta, buf: RecvBuffer, durable: bool, got: int) -> pb.PutResult:
        """Store a received chunk whose bytes have the checksum ``got``."""
        view = buf.payload(meta.nbytes)
        if got != meta.checksum:
            raise CorruptChunk(f"chunk {key}: payload fails its checksum ({got:#x}, header {meta.checksum:#x}; see docs/api.md, 'The checksum')")
        tier = await self._store.put(key, Chunk(meta, view), durable=durable, verified=True)
        return pb.PutResult(key=str(key), tier=tier)

    # -- Get -----------------------------------------------------------------
    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[pb.GetFrame | memoryview | HeaderWithData, None]:
        self.requests += 1
        try:
            principal = self._principal(context)
            keys = self._keys(request.keys, principal)
            frame = self._reply_frame(request)
            slot = await self.limits.stream(context.peer())
        except KVStoreError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
            return
        with slot:
            for i, key in enumerate(keys):
                started, tier = time.perf_counter(), self._store.locate(key)
                with contextlib.ExitStack() as held:
                    try:
                        chunk = await self._fetch(key, held)
                    except KVStoreError as exc:
                        await context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
                        return
                    if chunk is None:
                        self._metrics.record_miss(key)
                        yield pb.GetFrame(header=pb.GetHeader(index=i, key=request.keys[i], found=False))
                        continue
                    with chunk:
                        # Each item is encoded (copied) or written when sent, before we resume.
                        for item in chunk_reply(request, i, chunk, frame):
                            yield item
                self._metrics.record_read(key, tier, chunk.meta.nbytes, time.perf_counter() - started)

    def _reply_frame(self, request: pb.GetRequest) -> int:
        """Payload bytes per Get reply message."""
        if request.frame_bytes == 0:
            return min(self._frame, PLAIN_CLIENT_FRAME)
        return max(MIN_FRAME, min(self._frame, request.frame_bytes))

    def principal(self, metadata: Sequence[tuple[str, str]]) -> Principal:
        """Who sends a call with this metadata (UNAUTHENTICATED without a valid token)."""
        return principal_of(self._tokens, metadata)

    def get_resident(
        self, request: pb.GetRequest, principal: Principal
    ) -> list[tuple[ChunkKey, Chunk, list[pb.GetFrame | memoryview | HeaderWithData]]] | None:
        """Get's whole reply at once, when every key's chunk is in the top tier's host
        memory (views: nothing to read or wait for): each key, its chunk and the
        items :meth:`Get` would yield for it; None when any is elsewhere or
        missing (serve the call with :meth:`Get`).  Release the chunks once their
        items are sent, then count the call with :meth:`resident_served`.  Holds no
        stream slot: the caller sends it without yielding the event loop.  Raises
        what :meth:`Get` would report for the keys (a bad key, a denied tenant)."""
        keys = self._keys(request.keys, principal)
        frame = self._reply_frame(request)
        got: list[tuple[ChunkKey, Chunk, list[pb.GetFrame | memoryview | HeaderWithData]]] = []
        for i, key in enumerate(keys):
            chunk = self._store.get_resident(key)
            if chunk is None:
                for _, held, _ in got:
                    held.release()
                return None
            got.append((key, chunk, list(chunk_reply(request, i, chunk, frame))))
        return got

    def resident_served(self, got: list[tuple[ChunkKey, Chunk, Any]], seconds: float) -> None:
        """Count a call served from :meth:`get_resident` (its chunks released)."""
        self.requests += 1
        tier = self._store.top_tier_name()
        for key, chunk, _ in got:
            self._metrics.record_read(key, tier, chunk.meta.nbytes, seconds / len(got))

    async def _fetch(self, key: ChunkKey, held: contextlib.ExitStack) -> Chunk | None:
        """``key``'s chunk for a get, or None; when it is a copy made for this get
        (read from disk, Redis, a peer, device memory), its memory is charged
        against the daemon's bound until ``held`` closes (Limits.hold_read), and
        a get that could take the daemon past it is refused."""
        cost = self._store.read_copy_bytes(key)
        if cost:
            held.enter_context(self.limits.hold_read(cost, what=f"a get of {cost} bytes read from a lower tier"))
        chunk = await self._store.get(key)
        if chunk is not None and cost is None:
            # Found where the store cannot tell the size beforehand (Redis, a peer): a copy.
            try:
                n = chunk.meta.nbytes
                held.enter_context(self.limits.hold_read(n, what=f"a get of {n} bytes read from a remote tier"))
            except BaseException:
                chunk.release()
                raise
        return chunk

    # -- small batched RPCs ----------------------------------------------------
    async def Lookup(self, request: pb.LookupRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.LookupReply:
        async def run() -> pb.LookupReply:
            keys = self._keys(request.keys, self._principal(context))
            res = await self._store.lookup(keys)
            self._metrics.record_lookup(len(keys), res.count)
            return pb.LookupReply(count=res.count, tiers=res.tiers)

        return await self._run(context, run)

    async def Exists(self, request: pb.ExistsRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ExistsReply:
        async def run() -> pb.ExistsReply:
            keys = self._keys(request.keys, self._principal(context))
            return pb.ExistsReply(present=await self._store.exists_many(keys))

        return await self._run(context, run)

    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.DeleteReply:
        async def run() -> pb.DeleteReply:
            keys = self._keys(request.keys, self._principal(context), write=True)
            return pb.DeleteReply(found=[await self._store.delete(k) for k in keys])

        return await self._run(context, run)

    # -- shared memory (shm_service.py) ---------------------------------------------
    async def RegisterSegment(
        self, request: pb.RegisterSegmentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterSegmentReply:
        return await self._run(context, lambda: self.shm.register(request, self._principal(context)))

    async def ReleaseSegment(
        self, request: pb.ReleaseSegmentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseSegmentReply:
        async def run() -> pb.ReleaseSegmentReply:
            # A daemon without the path says so before it looks at who asks.
            self.shm.segments().release(request.segment_id, self._principal(context).tenant)
            return pb.ReleaseSegmentReply()

        return await self._run(context, run)

    async def ShmPut(self, request: pb.ShmPutRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.PutReply:
        return await self._run(context, lambda: self.shm.put(request, self._principal(context)))

    async def ShmGet(self, request: pb.ShmGetRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ShmGetReply:
        return await self._run(context, lambda: self.shm.get(request, self._principal(context)))


def chunk_reply(
    request: pb.GetRequest, i: int, chunk: Chunk, frame: int
) -> Iterator[pb.GetFrame | memoryview | HeaderWithData]:
    """The Get reply's items for the found chunk of ``request.keys[i]``: its header
    (with the first ``frame`` bytes inside when the request asks ``inline_data``),
    then data frames of at most ``frame`` bytes: views of ``chunk.payload``."""
    header = pb.GetHeader(index=i, key=request.keys[i], found=True, meta=meta_to_pb(chunk.meta))
    payload = chunk.payload
    first = 0
    if request.inline_data:
        first = min(frame, chunk.meta.nbytes)
        if not request.frame_bytes:
            # A plain gRPC client: header and data within its default 4 MiB receive limit.
            first = min(frame - header.ByteSize() - 16, first)
        yield HeaderWithData(header, payload[:first])
    else:
        yield pb.GetFrame(header=header)
    for off in range(first, chunk.meta.nbytes, frame):
        yield payload[off : off + frame]

