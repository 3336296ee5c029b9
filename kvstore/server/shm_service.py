"""The KVStore service's shared-memory side, for clients on the daemon's host.

:class:`SharedMemory` holds the segments clients register (shm.py), the
control channel that carries their ShmPut / ShmGet without gRPC
(shm_channel.py), the CPU tier's memory shared with them for direct reads,
and direct writes (direct_writes.py).  The servicer (service.py) composes it:
its ``RegisterSegment``, ``ReleaseSegment``, ``ShmPut`` and ``ShmGet``
authenticate the caller and hand over here; the control channel calls
:meth:`SharedMemory.put` and :meth:`SharedMemory.get` for a principal it
authenticated itself, so both paths run the same checks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from kvstore.chunk import Chunk, ChunkMeta, checksum
from kvstore.errors import CorruptChunk, InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.metrics import Metrics
from kvstore.server.auth import Principal, TokenTable
from kvstore.server.direct_writes import DirectWrites
from kvstore.server.limits import Limits
from kvstore.server.messages import meta_from_pb, meta_to_pb, parse_key
from kvstore.server.shm import FailedPrecondition, SegmentTable
from kvstore.server.shm_channel import ShmChannel
from kvstore.store import TieredStore
from kvstore.tiers.copier import Copier, finish, when_done
from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")


class Offload(Protocol):
    """Runs ``fn(*args)``, in a worker thread when ``n`` bytes make that worth it."""

    def __call__(self, n: int, fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...


class SharedMemory:
    """Segments, the control channel, the shared arena and direct writes of one daemon.

    ``check_meta``, ``offload`` and ``fetch`` are the servicer's: a chunk put or
    got through shared memory is checked, checksummed and read (and charged
    against the memory bound) exactly as one sent over Put or Get."""

    def __init__(
        self,
        store: TieredStore,
        limits: Limits,
        metrics: Metrics,
        *,
        tokens: TokenTable | None,
        enabled: bool,
        direct_reads: bool,
        direct_writes: bool,
        reserved_share: float,
        max_chunk_bytes: int,
        max_batch: int,
        copier: Copier,
        check_meta: Callable[[ChunkMeta, str], None],
        offload: Offload,
        fetch: Callable[[ChunkKey, contextlib.ExitStack], Awaitable[Chunk | None]],
    ) -> None:
        self._store = store
        self._limits = limits
        self._metrics = metrics
        self._tokens = tokens
        self._max_batch = max_batch
        self._segments = SegmentTable() if enabled else None
        self._direct_reads = direct_reads
        self._direct_writes = direct_writes
        #: ShmPut/ShmGet over a Unix socket (shm_channel.py), started on the first RegisterSegment.
        self._shm_channel: ShmChannel | None = None
        #: Shared-memory gets: the copy into the client's segment, split over the pool's threads.
        self._copier = copier
        self._check_meta = check_meta
        self._offload = offload
        self._fetch = fetch
        #: Puts local clients write into the CPU tier's memory themselves (direct_writes.py).
        self.direct_writes = DirectWrites(
            store, limits, metrics, max_chunk_bytes=max_chunk_bytes, max_batch=max_batch,
            reserved_share=reserved_share, why_not=self._why_no_direct_writes,
        )

    @property
    def mapped_bytes(self) -> int:
        """Bytes of clients' segments the daemon has mapped (not its own memory)."""
        return 0 if self._segments is None else self._segments.mapped_bytes

    async def drain(self, timeout_s: float | None) -> None:
        """Let the shared-memory requests being served finish and refuse new ones (see ShmChannel.drain)."""
        if self._shm_channel is not None:
            await self._shm_channel.drain(timeout_s)

    def close(self) -> None:
        if self._shm_channel is not None:
            self._shm_channel.close()
        if self._segments is not None:
            self._segments.close()

    def _channel(self) -> ShmChannel:
        if self._shm_channel is None:
            self._shm_channel = ShmChannel(
                self.segments().authenticate, self.put, self.get, self._metrics.observe_rpc,
                attach=self.shared_arena, touched=self.note_shared_reads, writes=self.direct_writes,
            )
        return self._shm_channel

    def shared_arena(self, principal: Principal, writable: bool = False) -> tuple[bytes, tuple[int, int]]:
        """What a local client needs to read chunks from the CPU tier's memory
        itself (kvstore/tiers/shared_arena.py), or FailedPrecondition saying why not;
        ``writable``: it asks to write into it too (direct writes), granted when offered."""
        if self._tokens is not None:
            raise FailedPrecondition(
                "direct reads are off: the daemon has a token file, and its memory holds every tenant's chunks"
            )
        if not self._direct_reads:
            raise FailedPrecondition("direct reads are off (server.shm_direct_reads: false)")
        tier = self._store.shared_tier()
        if tier is None or tier.shared is None:
            raise FailedPrecondition("no tier shares its memory (that takes an unpinned cpu tier on x86-64)")
        writable = writable and self.direct_writes.offered()
        return tier.shared.describe(writable=writable), tier.shared.client_fds(writable=writable)

    def _why_no_direct_writes(self) -> str | None:
        if self._tokens is not None:
            return "the daemon has a token file, and its memory holds every tenant's chunks"
        if not self._direct_writes:
            return "server.shm_direct_writes is false"
        if not self._direct_reads:
            return "they come with direct reads, and server.shm_direct_reads is false"
        if self._store.writable_tier() is None:
            return "the top tier does not share its memory (that takes an unpinned cpu tier on x86-64)"
        return None

    def note_shared_reads(self, reads: list[tuple[str, float]], principal: Principal) -> None:
        """Count reads a client made from the shared arena, as gets served from its tier."""
        for text, seconds in reads:
            try:
                key = parse_key(text, "key")
            except InvalidArgument:
                continue
            read = self._store.note_shared_read(key)
            if read is not None:
                self._metrics.record_read(key, *read, seconds)
                self._metrics.shared_reads += 1

    def segments(self) -> SegmentTable:
        """The registered segments, or FailedPrecondition when the shared-memory path is off."""
        if self._segments is None:
            raise FailedPrecondition("the shared-memory path is disabled on this daemon (server.shm: false)")
        return self._segments

    async def register(self, request: pb.RegisterSegmentRequest, principal: Principal) -> pb.RegisterSegmentReply:
        """RegisterSegment for an authenticated caller: map its segment, start the control channel."""
        seg_id = self.segments().register(request.name, request.size, request.nonce, principal)
        try:
            control = await self._channel().ensure_started()
        except OSError as exc:
            log.warning("shared-memory control channel unavailable (%s); clients use ShmPut/ShmGet", exc)
            control = ""
        return pb.RegisterSegmentReply(segment_id=seg_id, control_socket=control)

    async def put(self, request: pb.ShmPutRequest, principal: Principal) -> pb.PutReply:
        """ShmPut for a caller already authenticated (over gRPC, or the shm channel)."""
        segs = self.segments()
        if len(request.items) > self._max_batch:
            raise InvalidArgument(f"{len(request.items)} items in one request; at most {self._max_batch}")
        staged = []
        for i, item in enumerate(request.items):
            where = f"items[{i}]"
            key = parse_key(item.key, f"{where}.key")
            principal.check_key(key, write=True)
            meta = meta_from_pb(item.meta, f"{where}.meta")
            self._check_meta(meta, where)
            await self._limits.quotas.make_room_for_tenant(key, meta.nbytes)
            if item.slice.length != meta.nbytes:
                raise InvalidArgument(
                    f"{where}: slice length {item.slice.length} differs from meta.nbytes {meta.nbytes}"
                )
            seg = segs.get(item.slice.segment_id, principal.tenant)
            staged.append((key, meta, seg.view(item.slice.offset, item.slice.length), item.daemon_checksum))
        # Every item is checked before any is stored: a failed request stores nothing.
        # Items whose checksum the daemon computes are checksummed as stored, by the
        # tier, over its own copy (Tier.put_summing): the checksum then describes the
        # bytes stored even if the client rewrites its segment meanwhile.
        started = time.perf_counter()
        checked = []
        for i, (key, meta, view, ours) in enumerate(staged):
            if not ours:
                got = await self._offload(meta.nbytes, checksum, view)
                if got != meta.checksum:
                    raise CorruptChunk(f"items[{i}]: chunk {key}: payload fails its checksum")
            checked.append((key, meta, view, ours))
        results = []
        for key, meta, view, ours in checked:
            tier = await self._store.put(key, Chunk(meta, view), durable=request.durable, verified=True, summing=ours)
            results.append(pb.PutResult(key=str(key), tier=tier))
        elapsed = time.perf_counter() - started
        written = [(k, r.tier, m.nbytes) for (k, m, _, _), r in zip(checked, results, strict=True)]
        self._metrics.record_writes(written, elapsed)
        return pb.PutReply(results=results)

    async def get(self, request: pb.ShmGetRequest, principal: Principal) -> pb.ShmGetReply:
        """ShmGet for a caller already authenticated (over gRPC, or the shm channel)."""
        segs = self.segments()
        if len(request.items) > self._max_batch:
            raise InvalidArgument(f"{len(request.items)} items in one request; at most {self._max_batch}")
        targets = []
        for i, item in enumerate(request.items):
            key = parse_key(item.key, f"items[{i}].key")
            principal.check_key(key)
            seg = segs.get(item.slice.segment_id, principal.tenant)
            targets.append((key, seg.view(item.slice.offset, item.slice.length)))
        results = []
        for key, dst in targets:
            started, tier = time.perf_counter(), self._store.locate(key)
            with contextlib.ExitStack() as held:
                chunk = await self._fetch(key, held)
                if chunk is None:
                    self._metrics.record_miss(key)
                    results.append(pb.ShmGetResult(found=False))
                    continue
                n = chunk.meta.nbytes
                if n > dst.nbytes:
                    chunk.release()
                    results.append(pb.ShmGetResult(found=True, meta=meta_to_pb(chunk.meta), written=False))
                    continue
                await self._copy_out(chunk, dst[:n])
            results.append(pb.ShmGetResult(found=True, meta=meta_to_pb(chunk.meta), written=True))
            self._metrics.record_read(key, tier, n, time.perf_counter() - started)
        return pb.ShmGetReply(results=results)

    async def _copy_out(self, chunk: Chunk, dst: memoryview) -> None:
        """Copy ``chunk``'s payload into ``dst`` and release the chunk, only once no
        copy thread reads it any more (also when this call is cancelled)."""
        if not dst.nbytes:
            chunk.release()
            return
        try:
            copying = self._copier.start(dst, chunk.payload)
        except BaseException:
            chunk.release()
            raise
        try:
            await finish(copying)
        finally:
            when_done(copying, chunk.release)
