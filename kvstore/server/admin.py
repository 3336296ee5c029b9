"""The ``kvstore.v1.Admin`` gRPC service: see and steer what the cache holds.

Served next to ``kvstore.v1.KVStore`` on the daemon's port.  Every call
needs the admin role when the daemon has a token file (``Principal.require_admin``).
Each handler validates its request, acts through the store's public methods
(:meth:`TieredStore.evict`, ``evict_to``, ``move``, ``set_policy``,
``set_capacity``, ``replace_in``, ``clear``...) and maps expected failures
(:class:`~kvstore.errors.KVStoreError`) to their one gRPC status.  Figures
come from :class:`~kvstore.metrics.Metrics`, the same snapshot Prometheus
exports.  The request and reply fields are documented in
``proto/kvstore/v1/admin.proto``.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc

from kvstore.admin import recode as recoding
from kvstore.chunk import Chunk
from kvstore.errors import CodecError, InvalidArgument, KVStoreError
from kvstore.keys import ChunkKey, Namespace
from kvstore.metrics import Metrics, TierSnapshot
from kvstore.server.auth import Principal, TokenTable, principal_of
from kvstore.server.messages import lenient, parse_key
from kvstore.server.shm import FailedPrecondition
from kvstore.store import Evicted, TieredStore
from kvstore.v1 import admin_pb2 as apb
from kvstore.v1 import admin_pb2_grpc as apb_grpc

T = TypeVar("T")
SERVICE_NAME = apb.DESCRIPTOR.services_by_name["Admin"].full_name
DEFAULT_PAGE = 100
MAX_PAGE = 10_000
#: Most entries listed in a reply (freed chunks, recode failures); counts stay exact.
MAX_REPORTED = 1000


class AdminService(apb_grpc.AdminServicer):
    """See the module docstring."""

    def __init__(self, store: TieredStore, *, tokens: TokenTable | None, metrics: Metrics) -> None:
        self._store = store
        self._tokens = tokens
        self._metrics = metrics

    # -- plumbing ------------------------------------------------------------
    def _principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        return principal_of(self._tokens, context.invocation_metadata())

    async def _run(self, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], Awaitable[T]]) -> T:
        try:
            self._principal(context).require_admin()
            return await fn()
        except KVStoreError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.status, grpc.StatusCode.UNKNOWN), str(exc))
            raise  # unreachable: abort raises

    def _tier(self, name: str, field: str) -> str:
        if not name:
            raise InvalidArgument(f"{field} is required: one of {[t.name for t in self._store.tiers]}")
        self._store.tier(name)  # InvalidArgument naming the tiers
        return name

    def _select(self, sel: apb.Selector, *, among: Iterable[ChunkKey] | None = None) -> list[ChunkKey]:
        """The keys ``sel`` names, in a stable order; ``among`` replaces the
        held chunks as the candidates (e.g. the pinned keys)."""
        tier = self._tier(sel.tier, "selector.tier") if sel.tier else None
        ns = _namespace(sel.namespace, "selector.namespace") if sel.namespace else None
        prefix = sel.key_prefix
        if sel.keys:
            parsed = (parse_key(k, f"selector.keys[{i}]") for i, k in enumerate(sel.keys))
            candidates: Iterable[ChunkKey] = dict.fromkeys(parsed)  # in order, once each
        elif among is not None:
            candidates = among
        else:
            candidates = list(self._store.keys(tier))  # a snapshot: the store changes across awaits
        out = []
        for key in candidates:
            if ns is not None and key.namespace != ns:
                continue
            if prefix and not str(key).startswith(prefix):
                continue
            if tier is not None and (sel.keys or among is not None) and tier not in dict(self._store.holders(key)):
                continue
            out.append(key)
        return out

    # -- Stats / ListChunks -------------------------------------------------
    async def Stats(self, request: apb.StatsRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.StatsReply:
        async def run() -> apb.StatsReply:
            snap = self._metrics.snapshot()
            return apb.StatsReply(
                tiers=[tier_to_pb(t) for t in snap.tiers],
                namespaces=[
                    apb.NamespaceStats(
                        namespace=n.namespace, bytes=n.bytes, chunks=n.chunks, quota_bytes=n.quota_bytes,
                        tiers=[apb.NamespaceTierUsage(tier=t, bytes=b, chunks=c) for t, b, c in n.tiers],
                        pinned_chunks=n.pinned_chunks, hits=n.hits, misses=n.misses, evictions=n.evictions,
                        promotions=n.promotions, demotions=n.demotions,
                        read_bytes=n.reads.bytes, write_bytes=n.writes.bytes,
                        read_bandwidth=n.reads.bandwidth, write_bandwidth=n.writes.bandwidth,
                    )
                    for n in snap.namespaces
                ],
                gets=snap.gets, hits=snap.hits, misses=snap.misses, hit_ratio=snap.hit_ratio,
                pins=snap.pins, uptime_s=snap.uptime_s,
            )

        return await self._run(context, run)

    async def ListChunks(
        self, request: apb.ListChunksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.ListChunksReply:
        async def run() -> apb.ListChunksReply:
            size = request.page_size or DEFAULT_PAGE
            if size > MAX_PAGE:
                raise InvalidArgument(f"page_size must be at most {MAX_PAGE}, got {size}")
            by_text = {str(k): k for k in self._select(request.selector)}
            texts = sorted(by_text)
            # The token is the last key of the previous page: pages stay
            # consistent while chunks come and go (none is listed twice).
            start = bisect.bisect_right(texts, request.page_token) if request.page_token else 0
            page = texts[start : start + size]
            chunks = []
            for text in page:
                key = by_text[text]
                held = self._store.holders(key)
                chunks.append(
                    apb.ChunkInfo(
                        key=text, tiers=[t for t, _ in held], nbytes=held[0][1] if held else 0,
                        pin_remaining_s=self._store.pins.remaining(key),
                    )
                )
            more = start + size < len(texts)
            token = page[-1] if more and page else ""
            return apb.ListChunksReply(chunks=chunks, next_page_token=token, total=len(texts))

        return await self._run(context, run)

    # -- Evict / Clear --------------------------------------------------------
    async def Evict(self, request: apb.EvictRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.EvictReply:
        async def run() -> apb.EvictReply:
            sel = request.selector
            if request.use_watermark:
                tier = self._tier(sel.tier, "selector.tier (the tier to bring down to the watermark)")
                if sel.keys or sel.key_prefix:
                    raise InvalidArgument("a watermark eviction takes selector.tier (and selector.namespace) only")
                ns = _namespace(sel.namespace, "selector.namespace") if sel.namespace else None
                freed, reached = await self._store.evict_to(
                    tier, request.watermark_bytes, namespace=ns, force=request.force, demote=not request.drop
                )
                reply = _evict_reply(freed)
                reply.watermark_reached = reached
                reply.used_bytes = self._store.tier(tier).used_bytes
                return reply
            if not (sel.keys or sel.key_prefix or sel.namespace or sel.tier):
                raise InvalidArgument("name keys, a key prefix, a namespace or a tier (Clear empties everything)")
            freed = []
            skipped = 0
            for key in self._select(sel):
                if self._store.pins.is_pinned(key):
                    if not request.force:
                        skipped += 1
                        continue
                    if not sel.tier:
                        self._store.pins.unpin(key)  # it leaves the cache: the lease has nothing left to keep
                freed.extend(await self._store.evict(key, sel.tier or None, demote=not request.drop))
            reply = _evict_reply(freed)
            reply.skipped_pinned = skipped
            return reply

        return await self._run(context, run)

    async def Clear(self, request: apb.ClearRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.ClearReply:
        async def run() -> apb.ClearReply:
            if request.all and (request.tier or request.namespace):
                raise InvalidArgument("all clears everything: give it alone, or name a tier and/or a namespace")
            if not (request.all or request.tier or request.namespace):
                raise InvalidArgument("name a tier, a namespace, or all")
            tier = self._tier(request.tier, "tier") if request.tier else None
            ns = _namespace(request.namespace, "namespace") if request.namespace else None
            if not request.confirm:
                scope = " in ".join(filter(None, [str(ns) if ns else "", tier or ""]))
                what = "every chunk" if request.all else f"the chunks of {scope}"
                raise FailedPrecondition(f"Clear drops {what}; set confirm to go ahead")
            chunks, nbytes = await self._store.clear(tier, ns)
            return apb.ClearReply(chunks=chunks, bytes=nbytes)

        return await self._run(context, run)

    # -- Pin / Unpin ---------------------------------------------------------------
    async def Pin(self, request: apb.PinRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.PinReply:
        async def run() -> apb.PinReply:
            if not (math.isfinite(request.ttl_s) and request.ttl_s > 0):
                raise InvalidArgument(f"ttl_s must be a positive number of seconds, got {request.ttl_s}")
            keys = self._select(request.selector)
            held = [k for k in keys if self._store.locate(k) is not None]
            for key in held:  # the first pin checks ttl_s against the table's longest lease
                self._store.pin(key, request.ttl_s)
            missing = [str(k) for k in keys if self._store.locate(k) is None]
            return apb.PinReply(pinned=len(held), missing=missing, ttl_s=request.ttl_s)

        return await self._run(context, run)

    async def Unpin(self, request: apb.UnpinRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.UnpinReply:
        async def run() -> apb.UnpinReply:
            pinned = [k for k, _ in self._store.pins.pinned() if isinstance(k, ChunkKey)]
            keys = self._select(request.selector, among=pinned)
            return apb.UnpinReply(unpinned=sum(self._store.pins.unpin(k) for k in keys))

        return await self._run(context, run)

    # -- Move / SetPolicy / Recode ---------------------------------------------------
    async def Move(self, request: apb.MoveRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.MoveReply:
        async def run() -> apb.MoveReply:
            to_tier = self._tier(request.to_tier, "to_tier")
            from_tier = self._tier(request.from_tier, "from_tier") if request.from_tier else None
            sel = request.selector
            if from_tier is None and sel.tier:
                from_tier = sel.tier
            reply = apb.MoveReply()
            for key in self._select(sel):
                size = dict(self._store.holders(key)).get(from_tier or self._store.locate(key) or "", 0)
                outcome = await self._store.move(key, to_tier, from_tier)
                if outcome == "moved":
                    reply.moved += 1
                    reply.bytes += size
                elif outcome == "already":
                    reply.already_there += 1
                elif len(reply.failed) < MAX_REPORTED:
                    reply.failed.append(f"{key}: {'no room' if outcome == 'no_room' else 'not held there'}")
            return reply

        return await self._run(context, run)

    async def SetPolicy(
        self, request: apb.SetPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.SetPolicyReply:
        async def run() -> apb.SetPolicyReply:
            needs_tier = request.tier or request.eviction_policy or request.set_capacity
            tier = self._tier(request.tier, "tier") if needs_tier else None
            quotas = [
                (_namespace(q.namespace, f"quotas[{i}].namespace"), q.bytes) for i, q in enumerate(request.quotas)
            ]
            evicted: list[Evicted] = []
            if tier is not None and request.eviction_policy:
                await self._store.set_policy(tier, request.eviction_policy)
            if tier is not None and request.set_capacity:
                evicted += await self._store.set_capacity(tier, request.capacity_bytes or None)
            for ns, limit in quotas:
                self._store.set_quota(ns, limit or None)
                evicted += await self._store.enforce_quota(ns)
            snap = self._metrics.snapshot()
            reply = apb.SetPolicyReply(
                evicted_chunks=len(evicted),
                evicted_bytes=sum(e.nbytes for e in evicted),
                quotas=self._store.stats().quotas,
            )
            if tier is not None:
                reply.tier.CopyFrom(tier_to_pb(next(t for t in snap.tiers if t.name == tier)))
            return reply

        return await self._run(context, run)

    async def Recode(self, request: apb.RecodeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.RecodeReply:
        async def run() -> apb.RecodeReply:
            tier = self._tier(request.selector.tier, "selector.tier (the tier whose chunks to re-encode)")
            if not request.codec:
                raise InvalidArgument("codec is required")
            level = recoding.target_level(request.codec, request.level if request.set_level else None)
            reply = apb.RecodeReply()
            for key in self._select(request.selector):
                try:
                    await self._recode_one(key, tier, request.codec, level, reply)
                except (CodecError, InvalidArgument) as exc:
                    if len(reply.failed) < MAX_REPORTED:
                        reply.failed.append(apb.RecodeFailure(key=str(key), reason=str(exc)))
            return reply

        return await self._run(context, run)

    async def _recode_one(self, key: ChunkKey, tier: str, codec: str, level: int, reply: apb.RecodeReply) -> None:
        chunk = await self._store.read_from(key, tier)
        if chunk is None:
            raise InvalidArgument("no longer held in the tier")
        with chunk:
            old = chunk.meta
            # Decoding and encoding are CPU-bound: off the event loop.
            out = await asyncio.to_thread(recoding.recode, old, chunk.payload, codec, level)
        if out is None:
            reply.unchanged += 1
            return
        payload, meta = out
        if not await self._store.replace_in(key, tier, Chunk(meta, memoryview(payload)), expect=old.checksum):
            raise InvalidArgument("changed, left the tier, or found no room while being re-encoded; left as it was")
        reply.recoded += 1
        reply.bytes_before += old.nbytes
        reply.bytes_after += meta.nbytes


def tier_to_pb(t: TierSnapshot) -> apb.TierStats:
    return apb.TierStats(
        name=t.name, kind=t.kind, eviction_policy=t.eviction_policy, capacity_bytes=t.capacity_bytes,
        max_capacity_bytes=t.max_capacity_bytes, used_bytes=t.used_bytes, chunks=t.chunks,
        pinned_chunks=t.pinned_chunks, pinned_bytes=t.pinned_bytes, hits=t.hits, misses=t.misses,
        evictions=t.evictions, evicted_bytes=t.evicted_bytes, promotions=t.promotions, demotions=t.demotions,
        errors=t.errors, read_bytes=t.reads.bytes, write_bytes=t.writes.bytes,
        read_bandwidth=t.reads.bandwidth, write_bandwidth=t.writes.bandwidth, healthy=t.healthy,
        write_through=t.write_through,
    )


def _evict_reply(freed: list[Evicted]) -> apb.EvictReply:
    return apb.EvictReply(
        chunks=len(freed),
        bytes=sum(e.nbytes for e in freed),
        freed=[
            apb.FreedChunk(key=str(e.key), tier=e.tier, nbytes=e.nbytes, demoted_to=e.demoted_to or "")
            for e in freed[:MAX_REPORTED]
        ],
    )


def _namespace(text: str, field: str) -> Namespace:
    try:
        return Namespace.parse(text)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{field}: {exc}") from None


def admin_handlers(service: AdminService) -> Any:
    """The Admin service's gRPC handlers (a ``grpc.GenericRpcHandler``)."""
    methods = apb.DESCRIPTOR.services_by_name["Admin"].methods
    handlers = {}
    for m in methods:
        req: Any = getattr(apb, m.input_type.name)
        rep: Any = getattr(apb, m.output_type.name)
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            _checked(getattr(service, m.name)),
            request_deserializer=lenient(req),
            response_serializer=rep.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _checked(fn: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, InvalidArgument):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        return await fn(request, context)

    return handle
