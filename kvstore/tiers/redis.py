"""The ``redis`` tier: chunks in Redis or Valkey, shared by many daemons.

Daemons on different hosts that point at the same Redis deployment (and use
the same ``key_prefix``) see each other's chunks: that is how KV computed on
one inference host is reused on another.  The tier is *unmanaged*
(``managed = False``): Redis evicts on its own (``maxmemory`` with
``allkeys-lru``, see docs/remote.md), so the store asks it for presence with
:meth:`RedisTier.contains_many` instead of tracking what it holds.

The parts of the tier, one module each:

* :mod:`kvstore.tiers.redis_config`: the URL (standalone, TLS, cluster) and
  :class:`RedisTierConfig`;
* :mod:`kvstore.tiers.redis_layout`: key names and the :class:`Manifest`;
* :mod:`kvstore.tiers.redis_parts`: receiving parts straight into one buffer;
* :mod:`kvstore.tiers.redis_writes`: sending parts without copying them, and
  the order of a put's commands;
* :mod:`kvstore.tiers.redis_connection`: reaching the server (the redis-py
  client, the part reader and writer, calls bounded through the breaker,
  cluster nodes);
* this module: the tier (put, get, presence, delete).

Writes
    The manifest is written *last*, so a reader that finds it finds a whole
    write: on one node (a server, or a cluster chunk kept together) parts and
    manifest go in one pipeline and a script writes the manifest only if all
    its parts are there; on a cluster with spread parts the manifest follows
    once every node has acknowledged its parts.  The parts go through the
    :class:`~kvstore.tiers.redis_writes.PartWriter` (one connection per node,
    nodes in parallel, no copy), or through redis-py when it cannot serve.

Reads
    The manifest through redis-py, then the parts it names through the
    :class:`~kvstore.tiers.redis_parts.PartReader` (pipelined per node, nodes
    in parallel, bytes received in place), or through redis-py when the part
    reader cannot serve (TLS, a cluster redirection).

Cluster placement
    By default (``cluster_parts="spread"``) parts have no hash tag, so they
    land on nodes by their own hash: one get fetches its parts from all
    masters at once, which is what makes a cluster faster than one server for
    large chunks.  The cost: losing a master without a replica makes most
    multi-part chunks unreadable, not a third of them.
    ``cluster_parts="together"`` hash-tags the parts with their manifest's key
    (one node per chunk, chunks spread by key).  The manifest records the
    placement, so readers need no setting.

Expiry and eviction
    Every key gets the TTL ``ttl_s``; parts get ``ttl_s`` plus the put's time
    budget, so a manifest never outlives its parts.  A part that Redis evicted
    anyway (``allkeys-lru`` picks keys, not chunks) makes the chunk a miss and
    the manifest is removed — only if it is still the one that was read.

Faults
    Every call is bounded (``timeout_s`` plus the payload at ``min_rate``)
    and goes through a :class:`~kvstore.tiers.breaker.CircuitBreaker`.  When
    Redis is down or slow, gets and lookups miss quickly, puts raise
    :class:`~kvstore.errors.RemoteUnavailable` (the store counts the dropped
    write-through), and nothing partial or corrupt is ever served.  The
    client reconnects on its own once the server is back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

from kvstore.chunk import Chunk
from kvstore.errors import CorruptChunk, RemoteUnavailable
from kvstore.keys import ChunkKey
from kvstore.tiers.redis_config import RedisEndpoint, RedisTierConfig, parse_url
from kvstore.tiers.redis_connection import RedisConnection
from kvstore.tiers.redis_layout import DISCARD_LUA, HEAD_SIZE, Manifest, manifest_key, part_keys
from kvstore.tiers.redis_parts import BufferPool, Fallback
from kvstore.tiers.redis_writes import Command, PartsWrite

__all__ = ["RedisEndpoint", "RedisTier", "RedisTierConfig", "Manifest", "parse_url"]

log = logging.getLogger(__name__)


class RedisTier(RedisConnection):
    """Chunks in Redis / Valkey (standalone or cluster); see the module docstring."""

    kind: ClassVar[str] = "redis"

    def __init__(self, name: str, config: RedisTierConfig) -> None:
        super().__init__(name, config)
        self._prefix = config.key_prefix
        self._ttl_ms = int(config.ttl_s * 1000)
        #: Chunks whose manifest was found but a part was gone (evicted or overwritten).
        self.partial = 0
        #: Multi-part reads the part reader handed to redis-py (TLS not counted: it never tries).
        self.fallbacks = 0
        #: Multi-part puts the part writer handed to redis-py (TLS not counted).
        self.write_fallbacks = 0
        self._pool = BufferPool(config.buffer_pool_bytes)

    # -- keys ----------------------------------------------------------------------
    def manifest_key(self, key: ChunkKey) -> str:
        return manifest_key(self._prefix, key)

    def part_keys(self, key: ChunkKey, manifest: Manifest) -> list[str]:
        return part_keys(self._prefix, key, manifest)

    # -- put -------------------------------------------------------------------------
    async def put(self, key: ChunkKey, chunk: Chunk) -> None:
        """Write parts, then the manifest; raises :class:`RemoteUnavailable` on failure.

        Never partly visible: the manifest is written only once all its parts
        are stored (see :mod:`kvstore.tiers.redis_writes`).  A put that fails
        midway may leave parts without a manifest: invisible, and gone when
        their TTL runs out.  As with any network write, a put that timed out
        or was cancelled after its bytes were on the wire may still land —
        whole.
        """
        client = self._redis()
        meta = chunk.meta
        n = meta.nbytes
        inline = n <= self.config.inline_bytes
        part = self.config.part_bytes
        manifest = Manifest(
            meta=meta,
            nonce=os.urandom(8),
            part_count=0 if inline else -(-n // part),
            part_bytes=part,
            inline=inline,
            # One part lands on one node either way: tagged with its manifest,
            # both go in one pipeline (one round trip).
            together=self._endpoint.cluster and (self.config.cluster_parts == "together" or -(-n // part) == 1),
        )
        header = manifest.encode()
        mkey = self.manifest_key(key)
        payload = chunk.payload.cast("B")  # byte offsets, whatever the caller's view
        if inline:
            ttl = {"px": self._ttl_ms} if self._ttl_ms else {}
            old = await self._call("put", n, lambda: client.set(mkey, header + bytes(payload), get=True, **ttl))
        else:
            parts = zip(self.part_keys(key, manifest), range(0, n, part), strict=True)
            write = PartsWrite(
                manifest_key=mkey,
                manifest=header,
                parts=[(pkey, payload[off : off + part]) for pkey, off in parts],
                ttl_ms=self._ttl_ms,
                # Parts outlive the manifest by this put's whole time budget.
                part_ttl_ms=self._ttl_ms + int(self.config.budget(n) * 1000) + 1000 if self._ttl_ms else 0,
                one_node=not self._endpoint.cluster or manifest.together,
            )
            old = await self._write_parts(write, n)
        self.counters.puts += 1
        self.counters.bytes_written += n
        if old is not None:
            await self._drop_old_parts(key, old, manifest.nonce)

    async def _write_parts(self, write: PartsWrite, n: int) -> bytes | None:
        """Parts, then the manifest; returns the manifest it replaced (None if none)."""
        if self._writer is not None:
            try:
                return await self._call("put", n, lambda: self._write_direct(write))
            except Fallback as exc:
                self.write_fallbacks += 1
                log.debug("%s: part writer: %s; writing through redis-py", self.breaker.name, exc)
        return await self._call("put", n, lambda: self._write_redis_py(write))

    async def _write_direct(self, write: PartsWrite) -> bytes | None:
        """Through the part writer: one connection per node, nodes in parallel."""
        assert self._writer is not None
        home = self._node_of(write.manifest_key)
        if write.one_node:
            # One node runs one connection's commands in order: the manifest
            # script runs after every part's SET, in the same round trip.
            batches: dict[tuple[str, int], list[Command]] = {
                home: [*(write.part_command(k, v) for k, v in write.parts), write.manifest_command()]
            }
        else:
            spread: dict[tuple[str, int], list[Command]] = {}
            for k, v in write.parts:
                spread.setdefault(self._node_of(k), []).append(write.part_command(k, v))
            await self._direct(spread)  # every node has acknowledged its parts ...
            batches = {home: [write.manifest_command()]}  # ... before the manifest is sent
        old = (await self._direct(batches))[home][-1]
        return old if isinstance(old, bytes) else None

    async def _write_redis_py(self, write: PartsWrite) -> bytes | None:
        """The same commands through redis-py (TLS, redirections, errors)."""
        client = self._redis()
        pipe = self._pipeline()
        for k, v in write.parts:
            pipe.execute_command(*write.part_command(k, v))
        if write.one_node:
            # One node, in order (on a cluster: hash-tagged, one connection).
            pipe.execute_command(*write.manifest_command())
            old = (await pipe.execute())[-1]
        else:
            # Spread: one pipeline per node, in parallel; the manifest after all.
            await pipe.execute()
            old = await client.execute_command(*write.manifest_command())
        return old if isinstance(old, bytes) else None

    async def _drop_old_parts(self, key: ChunkKey, old: bytes, new_nonce: bytes) -> None:
        """Delete the parts of the manifest a put replaced (they would only wait for their TTL)."""
        try:
            prev = Manifest.decode(old)
        except CorruptChunk:
            return  # replaced garbage: nothing of it can be found
        if prev.inline or prev.nonce == new_nonce:
            return
        keys = self.part_keys(key, prev)

        async def delete() -> None:
            pipe = self._pipeline()
            for k in keys:
                pipe.delete(k)
            await pipe.execute()

        try:
            await self._call("delete old parts", 0, delete)
        except RemoteUnavailable:
            # Counted by the breaker; the new value is in place and the old
            # parts, unreachable now, expire with their TTL.
            pass

    # -- get -------------------------------------------------------------------------
    async def get(self, key: ChunkKey) -> Chunk | None:
        """The chunk, or None: missing, partial, corrupt, or the remote unavailable."""
        try:
            # Twice at most: a part can vanish because a writer replaced the
            # chunk while we read; the second read then finds the new manifest.
            for _ in range(2):
                chunk, retry = await self._get_once(key)
                if not retry:
                    break
        except RemoteUnavailable:
            chunk = None
        if chunk is None:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        self.counters.bytes_read += chunk.meta.nbytes
        return chunk

    async def _get_once(self, key: ChunkKey) -> tuple[Chunk | None, bool]:
        """(chunk, whether a retry may find it)."""
        client = self._redis()
        mkey = self.manifest_key(key)
        raw = await self._call("get", 0, lambda: client.get(mkey))
        if raw is None:
            return None, False
        try:
            manifest = Manifest.decode(raw)
        except CorruptChunk as exc:
            log.debug("%s: %s: %s", self.breaker.name, key, exc)
            self.counters.corrupt += 1
            await self._discard(mkey, bytes(raw[:HEAD_SIZE]))
            return None, False
        header = bytes(raw[: manifest.header_len])
        if manifest.inline:
            chunk = Chunk(manifest.meta, memoryview(raw)[manifest.header_len :])
        else:
            try:
                got = await self._read_parts(manifest, self.part_keys(key, manifest))
            except CorruptChunk as exc:
                log.debug("%s: %s: %s", self.breaker.name, key, exc)
                self.counters.corrupt += 1
                await self._discard(mkey, header)
                return None, False
            if got is None:
                self.partial += 1
                # Still the manifest we read: its parts are gone for good.
                # Replaced meanwhile: read again.
                return None, not await self._discard(mkey, header)
            chunk = got
        try:
            chunk.verify()
        except CorruptChunk as exc:
            chunk.release()
            log.debug("%s: %s: %s", self.breaker.name, key, exc)
            self.counters.corrupt += 1
            await self._discard(mkey, header)
            return None, False
        return chunk, False

    async def _read_parts(self, manifest: Manifest, keys: list[str]) -> Chunk | None:
        """The parts joined in one receive buffer (verified by the caller); None if one is gone."""
        n = manifest.meta.nbytes
        buf = self._pool.take(n)
        view = memoryview(buf)
        step = manifest.part_bytes
        slots = [view[off : min(off + step, n)] for off in range(0, n, step)]
        try:
            found: list[bool] | None = None
            if self._reader is not None:
                try:
                    found = await self._call("get", n, lambda: self._read_direct(keys, slots))
                except Fallback as exc:
                    self.fallbacks += 1
                    log.debug("%s: part reader: %s; reading through redis-py", self.breaker.name, exc)
            if found is None:
                found = await self._call("get", n, lambda: self._read_redis_py(keys, slots))
        except BaseException:
            # Nothing writes into the buffer any more: the part reader aborts
            # its connection on any failure or cancellation.
            self._pool.give(buf)
            raise
        if not all(found):
            self._pool.give(buf)
            return None
        return Chunk(manifest.meta, view[:n], lambda: self._pool.give(buf))

    async def _read_redis_py(self, keys: list[str], slots: list[memoryview]) -> list[bool]:
        """Parts into their slots through redis-py (one pipeline, per node on a cluster)."""
        client = self._redis()
        if len(keys) == 1:
            parts: list[bytes | None] = [await client.get(keys[0])]  # a pipeline object costs more than it saves
        else:
            pipe = self._pipeline()
            for k in keys:
                pipe.get(k)
            parts = list(await pipe.execute())
        found: list[bool] = []
        for p, slot in zip(parts, slots, strict=True):
            if p is not None and len(p) != len(slot):
                raise CorruptChunk(f"redis part {len(found)} is {len(p)} bytes, its manifest says {len(slot)}")
            if p is not None:
                slot[:] = p
            found.append(p is not None)
        return found

    async def _discard(self, mkey: str, header: bytes) -> bool:
        """Delete the manifest if it still starts with ``header``; True if deleted."""
        client = self._redis()
        deleted = await self._call("discard", 0, lambda: client.eval(DISCARD_LUA, 1, mkey, header, len(header)))
        return bool(deleted)

    # -- presence / delete ---------------------------------------------------------------
    async def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which manifests exist, in one round trip (per node); all False when unavailable."""
        if not keys:
            return []
        mkeys = [self.manifest_key(k) for k in keys]

        async def exists() -> list[Any]:
            pipe = self._pipeline()
            for k in mkeys:
                pipe.exists(k)
            return list(await pipe.execute())

        try:
            return [bool(x) for x in await self._call("exists", 0, exists)]
        except RemoteUnavailable:
            return [False] * len(keys)

    async def delete(self, key: ChunkKey) -> int:
        """Remove the chunk; returns its size (0 if absent).  Raises RemoteUnavailable."""
        client = self._redis()
        mkey = self.manifest_key(key)
        raw = await self._call("delete", 0, lambda: client.getdel(mkey))
        if raw is None:
            return 0
        self.counters.deletes += 1
        try:
            manifest = Manifest.decode(raw)
        except CorruptChunk:
            return 0
        if not manifest.inline:
            await self._drop_old_parts(key, raw, b"")
        return manifest.meta.nbytes
