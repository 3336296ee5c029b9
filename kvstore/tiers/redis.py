"""The ``redis`` tier: chunks in Redis or Valkey, shared by many daemons.

Daemons on different hosts that point at the same Redis deployment (and use
the same ``key_prefix``) see each other's chunks: that is how KV computed on
one inference host is reused on another.  The tier is *unmanaged*
(``managed = False``): Redis evicts on its own (``maxmemory`` with
``allkeys-lru``, see docs/remote.md), so the store asks it for presence with
:meth:`RedisTier.contains_many` instead of tracking what it holds.

URLs (see :func:`parse_url`)
    ``redis://[user:password@]host[:port][/db]``; ``rediss://`` for TLS;
    ``redis+cluster://host:port[,host:port...]`` (or ``rediss+cluster://``,
    or ``?cluster=true``) for a Redis Cluster, given one or more seed nodes.

Keys
    With ``P`` the deployment's ``key_prefix`` and ``W`` the key's wire form
    (``tenant/model/fingerprint/digest``)::

        P m:{W}                 the manifest
        P p:W:<nonce>:<i>       part i of the write tagged <nonce> (spread)
        P p:{W}:<nonce>:<i>     the same, parts kept with their manifest

    The manifest is written *last*, so a reader that finds it finds a whole
    write: on one server parts and manifest go in one MULTI/EXEC (atomic, one
    round trip); on a cluster the manifest follows once every node has
    acknowledged its parts.  Each write draws a fresh 8-byte nonce that names its parts, so a
    reader never mixes parts of two writes to the same key: it reads the
    manifest, then exactly the parts that manifest names.

Manifest (versioned binary, no pickle)::

    "KVRM" | u8 version | u8 flags | u16 0 | 8-byte nonce | u32 part count |
    u32 part size | ChunkMeta.encode() | u32 crc32 of all before | [inline payload]

    A chunk of at most ``inline_bytes`` rides inside its manifest (one key,
    one round trip each way).  Larger ones are split into parts of
    ``part_bytes``: a few MiB keeps any one Redis reply (and the server's
    output buffer) small, and lets a cluster serve one chunk from many nodes.

Cluster placement
    By default (``cluster_parts="spread"``) parts have no hash tag, so they
    land on nodes by their own hash: one get fetches its parts from all
    masters at once (redis-py runs a cluster pipeline per node in parallel),
    which is what makes a cluster faster than one server for large chunks.
    The cost: losing a master without a replica makes most multi-part chunks
    unreadable, not a third of them.  ``cluster_parts="together"`` hash-tags
    the parts with their manifest's key (one node per chunk, chunks spread by
    key).  The manifest records the placement, so readers need no setting.

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

import asyncio
import logging
import os
import struct
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.errors import Closed, ConfigError, CorruptChunk, RemoteUnavailable
from kvstore.keys import ChunkKey
from kvstore.tiers.base import Tier
from kvstore.tiers.breaker import BreakerConfig, CircuitBreaker

__all__ = ["RedisEndpoint", "RedisTier", "RedisTierConfig", "Manifest", "parse_url"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAGIC = b"KVRM"
_VERSION = 1
_HEAD = struct.Struct("<4sBBH8sII")  # magic, version, flags, reserved, nonce, part count, part size
_CRC = struct.Struct("<I")
_INLINE = 0x01
_TOGETHER = 0x02
_MAX_PARTS = 1 << 20
_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}
_PREFIX_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:._-/|#@")
# Deletes the manifest only if it still starts with the header that was read:
# a concurrent writer's newer manifest (new nonce) must survive a reader that
# found the older one incomplete.
_DISCARD_LUA = (
    "if redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1) == ARGV[1] "
    "then return redis.call('DEL', KEYS[1]) else return 0 end"
)


# -- configuration ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RedisEndpoint:
    """Where a ``redis`` tier connects, parsed from its URL."""

    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    cluster: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_url(url: str) -> RedisEndpoint:
    """Parse a ``redis`` tier URL; :class:`ConfigError` names what is wrong.

    * ``redis://[[user]:password@]host[:port][/db]`` — one server (port 6379);
    * ``rediss://...`` — the same over TLS;
    * ``redis+cluster://host:port[,host:port...]`` and ``rediss+cluster://`` —
      a Redis Cluster, discovered from any of the seed nodes; ``?cluster=true``
      on a ``redis://`` / ``rediss://`` URL means the same.
    """
    if not isinstance(url, str) or not url:
        raise ConfigError("redis.url must be a non-empty string such as 'redis://127.0.0.1:6379/0'")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(f"redis.url scheme must be one of {sorted(_SCHEMES)}, got {parts.scheme!r}")
    tls, cluster = _SCHEMES[scheme]
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name != "cluster":
            raise ConfigError(f"redis.url: unknown query parameter {name!r}; allowed: ['cluster']")
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"redis.url: cluster must be true or false, got {value!r}")
        cluster = cluster or value.lower() in ("true", "1", "yes")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    nodes = tuple(_parse_host(h, url) for h in hosts.split(","))
    path = parts.path.strip("/")
    db = 0
    if path:
        if not path.isdigit() or int(path) > 1 << 16:
            raise ConfigError(f"redis.url: database must be a number, got {path!r}")
        db = int(path)
    if cluster and db:
        raise ConfigError("redis.url: a Redis Cluster has only database 0")
    if not cluster and len(nodes) > 1:
        raise ConfigError("redis.url: several hosts need a cluster URL (redis+cluster://...)")
    return RedisEndpoint(nodes, tls=tls, cluster=cluster, db=db, username=username, password=password)


def _parse_host(text: str, url: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [v6::addr]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ConfigError(f"redis.url: missing host in {_redact(url)!r}")
    if not port_text:
        return host, 6379
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"redis.url: port must be in [1, 65535], got {port_text!r}")
    return host, int(port_text)


def _redact(url: str) -> str:
    head, sep, tail = url.partition("@")
    if not sep:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"


@dataclass(frozen=True, slots=True)
class RedisTierConfig:
    """Options of a ``redis`` tier (docs/remote.md explains each one)."""

    url: str = field(repr=False)
    #: Prepended to every key: one prefix per deployment (or per cache generation).
    key_prefix: str = "kvstore:"
    #: Lifetime of a chunk in Redis; 0 = no TTL (only ``maxmemory`` evicts).
    ttl_s: float = 3600.0
    #: Chunks above ``inline_bytes`` are split into parts of this size.
    part_bytes: int = 4 << 20
    #: Chunks up to this size are stored inside their manifest.
    inline_bytes: int = 256 << 10
    #: Bound of one round trip; a call moving N bytes gets ``timeout_s + N / min_rate``.
    timeout_s: float = 1.0
    #: Slowest transfer rate (bytes/s) that is still "working", for the time bound.
    min_rate: int = 50_000_000
    #: Most Redis calls in flight at once from this tier (per node in a cluster).
    max_connections: int = 32
    #: Receive buffers kept for reuse by gets of multi-part chunks (0 = none).
    buffer_pool_bytes: int = 256 << 20
    #: Cluster only: "spread" parts over the nodes, or keep them "together".
    cluster_parts: Literal["spread", "together"] = "spread"
    #: Override the URL's user name and password (AUTH).
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: TLS (``rediss://``): CA bundle, client certificate and key for mutual TLS.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_check_hostname: bool = True
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    def __post_init__(self) -> None:
        endpoint = parse_url(self.url)
        prefix: object = self.key_prefix
        if not isinstance(prefix, str) or len(prefix) > 64 or not set(prefix) <= _PREFIX_OK:
            raise ConfigError(
                f"redis.key_prefix must be at most 64 characters from A-Z a-z 0-9 : . _ - / | # @ "
                f"(no braces: they would pin every key to one cluster slot), got {prefix!r}"
            )
        _number(self.ttl_s, "redis.ttl_s", 0, 365 * 86400)
        _number(self.timeout_s, "redis.timeout_s", 0.001, 3600)
        _integer(self.part_bytes, "redis.part_bytes", 64 << 10, 512 << 20)
        _integer(self.inline_bytes, "redis.inline_bytes", 0, self.part_bytes)
        _integer(self.min_rate, "redis.min_rate", 1 << 20, 1 << 40)
        _integer(self.max_connections, "redis.max_connections", 1, 4096)
        _integer(self.buffer_pool_bytes, "redis.buffer_pool_bytes", 0, 1 << 40)
        if self.cluster_parts not in ("spread", "together"):
            raise ConfigError(f"redis.cluster_parts must be 'spread' or 'together', got {self.cluster_parts!r}")
        if not isinstance(self.breaker, BreakerConfig):
            raise ConfigError("redis.breaker must be a BreakerConfig")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            p = getattr(self, name)
            if p is None:
                continue
            if not endpoint.tls:
                raise ConfigError(f"redis.{name} needs a TLS URL (rediss:// or rediss+cluster://)")
            if not Path(p).is_file():
                raise ConfigError(f"redis.{name}: {p} is not a readable file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("redis.tls_cert and redis.tls_key must be given together")

    @property
    def endpoint(self) -> RedisEndpoint:
        return parse_url(self.url)

    def budget(self, nbytes: int) -> float:
        """Seconds a call moving ``nbytes`` may take before it counts as failed."""
        return self.timeout_s + nbytes / self.min_rate


def _number(value: object, name: str, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")


def _integer(value: object, name: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


# -- manifest -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Manifest:
    """What a reader needs to find and check a chunk's parts."""

    meta: ChunkMeta
    nonce: bytes
    part_count: int
    part_bytes: int
    inline: bool
    together: bool
    #: Length of the encoded header (the inline payload follows it).
    header_len: int = 0

    def encode(self) -> bytes:
        flags = (_INLINE if self.inline else 0) | (_TOGETHER if self.together else 0)
        head = _HEAD.pack(_MAGIC, _VERSION, flags, 0, self.nonce, self.part_count, self.part_bytes) + self.meta.encode()
        return head + _CRC.pack(zlib.crc32(head))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Manifest:
        """Parse a stored manifest (and check it); :class:`CorruptChunk` if malformed."""
        view = memoryview(data)
        if len(view) < _HEAD.size + _CRC.size:
            raise CorruptChunk("redis manifest truncated")
        magic, version, flags, _, nonce, count, part_bytes = _HEAD.unpack_from(view, 0)
        if magic != _MAGIC:
            raise CorruptChunk("redis manifest has a bad magic")
        if version != _VERSION:
            raise CorruptChunk(f"redis manifest version {version} is not supported (this build reads {_VERSION})")
        meta, used = ChunkMeta.decode(view[_HEAD.size :])
        end = _HEAD.size + used
        if len(view) < end + _CRC.size:
            raise CorruptChunk("redis manifest truncated")
        (crc,) = _CRC.unpack_from(view, end)
        if zlib.crc32(view[:end]) != crc:
            raise CorruptChunk("redis manifest fails its crc32")
        inline = bool(flags & _INLINE)
        header_len = end + _CRC.size
        if inline:
            if count != 0 or len(view) - header_len != meta.nbytes:
                raise CorruptChunk("redis manifest: inline payload has the wrong size")
        elif part_bytes <= 0 or count != -(-meta.nbytes // part_bytes) or count > _MAX_PARTS:
            raise CorruptChunk("redis manifest: part count does not match the chunk size")
        return cls(meta, bytes(nonce), count, part_bytes, inline, bool(flags & _TOGETHER), header_len)


class _BufferPool:
    """Receive buffers for multi-part gets, reused once their chunk is released.

    Joining parts into fresh memory pays a page fault per 4 KiB: 32 MiB took
    16 ms here, a third of the whole GET, against about 3 ms into memory that
    is already mapped.  Buffers are sized in whole MiB so that chunks of one
    model (all about the same size) share them; at most ``max_bytes`` are kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._free: dict[int, list[bytearray]] = {}
        self._kept = 0

    def take(self, nbytes: int) -> bytearray:
        size = -(-nbytes // (1 << 20)) << 20
        free = self._free.get(size)
        if free:
            self._kept -= size
            return free.pop()
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        # May run from Chunk.__del__ (any thread): list and dict operations are atomic.
        if self._kept + len(buf) > self._max:
            return
        self._kept += len(buf)
        self._free.setdefault(len(buf), []).append(buf)


# -- the tier -----------------------------------------------------------------------
class RedisTier(Tier):
    """Chunks in Redis / Valkey (standalone or cluster); see the module docstring."""

    kind: ClassVar[str] = "redis"
    managed: ClassVar[bool] = False

    def __init__(self, name: str, config: RedisTierConfig) -> None:
        super().__init__(name)
        self.config = config
        self._endpoint = config.endpoint
        self._prefix = config.key_prefix
        self._ttl_ms = int(config.ttl_s * 1000)
        import redis.exceptions

        self.breaker = CircuitBreaker(
            f"tier {name!r} ({_redact(config.url)})",
            config.breaker,
            (redis.exceptions.RedisError, OSError),
            self.counters,
        )
        self._client: Any = None
        self._slots = asyncio.Semaphore(config.max_connections)
        #: Chunks whose manifest was found but a part was gone (evicted or overwritten).
        self.partial = 0
        self._pool = _BufferPool(config.buffer_pool_bytes)

    # -- lifecycle ----------------------------------------------------------------
    async def open(self) -> None:
        """Create the client and try the server once; a server that is down is not fatal."""
        self._client = self._make_client()
        try:
            await self._call("connect", 0, self._client.ping)
        except RemoteUnavailable as exc:
            # The daemon serves from its local tiers meanwhile; the breaker
            # probes and the client reconnects once the server is back.
            log.warning("%s: not reachable at start (%s); continuing without it", self.breaker.name, exc)

    def _make_client(self) -> Any:
        import redis.asyncio
        import redis.asyncio.cluster
        from redis.backoff import ExponentialBackoff, NoBackoff
        from redis.retry import Retry

        cfg, ep = self.config, self._endpoint
        common: dict[str, Any] = {
            "username": cfg.username if cfg.username is not None else ep.username,
            "password": cfg.password if cfg.password is not None else ep.password,
            "socket_connect_timeout": cfg.timeout_s,
            # Reads are bounded by the breaker's per-call deadline, which
            # scales with the payload; a fixed socket timeout would not.
            "socket_timeout": None,
            "socket_keepalive": True,
            # Large replies: fewer, bigger reads (1.4x faster 4 MiB GETs here).
            "socket_read_size": 1 << 20,
            "decode_responses": False,
        }
        if ep.tls:
            common.update(
                ssl=True,
                ssl_ca_certs=str(cfg.tls_ca) if cfg.tls_ca else None,
                ssl_certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
                ssl_keyfile=str(cfg.tls_key) if cfg.tls_key else None,
                ssl_check_hostname=cfg.tls_check_hostname,
            )
        if ep.cluster:
            nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in ep.nodes]
            return redis.asyncio.cluster.RedisCluster(
                startup_nodes=nodes,
                max_connections=cfg.max_connections,
                # A few quick retries let MOVED / a node restart resolve inside
                # one call; anything longer is the breaker's business.
                retry=Retry(ExponentialBackoff(cap=0.05, base=0.005), 2),
                **common,
            )
        host, port = ep.nodes[0]
        return redis.asyncio.Redis(
            host=host,
            port=port,
            db=ep.db,
            max_connections=cfg.max_connections,
            # One immediate retry replaces a pooled connection that died with a
            # restarted server; no backoff, so a down server fails fast.
            retry=Retry(NoBackoff(), 1),
            **common,
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- sizes: unknown, Redis evicts on its own ------------------------------------
    @property
    def capacity_bytes(self) -> int:
        """0: the tier does not know; Redis' ``maxmemory`` bounds it (see INFO memory)."""
        return 0

    @property
    def used_bytes(self) -> int:
        return 0

    def __len__(self) -> int:
        return 0

    def fits(self, nbytes: int) -> bool:
        return True

    def contains(self, key: ChunkKey) -> bool:
        """Always False: the tier keeps no local index; use :meth:`contains_many`."""
        return False

    def entries(self) -> Iterable[tuple[ChunkKey, int]]:
        return ()

    # -- keys ----------------------------------------------------------------------
    def manifest_key(self, key: ChunkKey) -> str:
        return f"{self._prefix}m:{{{key}}}"

    def part_keys(self, key: ChunkKey, manifest: Manifest) -> list[str]:
        nonce = manifest.nonce.hex()
        base = f"{self._prefix}p:{{{key}}}:{nonce}:" if manifest.together else f"{self._prefix}p:{key}:{nonce}:"
        return [f"{base}{i}" for i in range(manifest.part_count)]

    # -- plumbing --------------------------------------------------------------------
    def _redis(self) -> Any:
        if self._client is None:
            raise Closed(f"tier {self.name!r} is closed")
        return self._client

    async def _call(self, what: str, nbytes: int, fn: Callable[[], Awaitable[T]]) -> T:
        """One bounded call through the breaker and the concurrency limit."""
        if self.breaker.refusing():
            raise self.breaker.refuse()  # before queueing for a slot: fail fast
        try:
            if self._slots.locked():  # wait_for costs a task: only when we must wait
                await asyncio.wait_for(self._slots.acquire(), self.config.timeout_s)
            else:
                await self._slots.acquire()
        except TimeoutError:
            # Our own concurrency limit, not the server: no breaker failure.
            raise RemoteUnavailable(f"{self.breaker.name}: too many calls in flight") from None
        try:
            async with self.breaker.guard(self.config.budget(nbytes), what):
                return await fn()
        finally:
            self._slots.release()

    def _pipeline(self) -> Any:
        client = self._redis()
        return client.pipeline() if self._endpoint.cluster else client.pipeline(transaction=False)

    # -- put -------------------------------------------------------------------------
    async def put(self, key: ChunkKey, chunk: Chunk) -> None:
        """Write parts, then the manifest; raises :class:`RemoteUnavailable` on failure.

        Never partly visible: on one server a put that fails midway leaves
        nothing (MULTI/EXEC); on a cluster it may leave parts without a
        manifest, invisible and gone when their TTL runs out.  As with any
        network write, a put that timed out or was cancelled after its bytes
        were on the wire may still land — whole.
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
            together=self._endpoint.cluster and self.config.cluster_parts == "together",
        )
        header = manifest.encode()
        mkey = self.manifest_key(key)
        ttl = {"px": self._ttl_ms} if self._ttl_ms else {}
        payload = chunk.payload

        async def write() -> Any:
            if inline:
                return await client.set(mkey, header + bytes(payload), get=True, **ttl)
            # Parts outlive the manifest by this put's whole time budget.
            part_ttl = {"px": self._ttl_ms + int(self.config.budget(n) * 1000) + 1000} if self._ttl_ms else {}
            parts = zip(self.part_keys(key, manifest), range(0, n, part), strict=True)
            if not self._endpoint.cluster:
                # One server: parts and manifest (last) in one MULTI/EXEC, so
                # the write is atomic and costs one round trip.  Redis refuses
                # the whole transaction if any command is refused when queued
                # (e.g. OOM under noeviction).
                pipe = client.pipeline(transaction=True)
                for pkey, off in parts:
                    pipe.set(pkey, payload[off : off + part], **part_ttl)
                pipe.set(mkey, header, get=True, **ttl)
                return (await pipe.execute())[-1]
            # Cluster: parts go to their nodes in parallel (one pipeline per
            # node); only once every node has acknowledged them does the
            # manifest make the write visible.
            if manifest.part_count == 1:
                pkey, off = next(parts)
                await client.set(pkey, payload, **part_ttl)  # a cluster pipeline costs more than it saves
            else:
                pipe = client.pipeline()
                for pkey, off in parts:
                    pipe.set(pkey, payload[off : off + part], **part_ttl)
                await pipe.execute()
            return await client.set(mkey, header, get=True, **ttl)

        old = await self._call("put", n, write)
        self.counters.puts += 1
        self.counters.bytes_written += n
        if old is not None:
            await self._drop_old_parts(key, old, manifest.nonce)

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
            await self._discard(mkey, bytes(raw[: _HEAD.size]))
            return None, False
        header = bytes(raw[: manifest.header_len])
        if manifest.inline:
            chunk = Chunk(manifest.meta, memoryview(raw)[manifest.header_len :])
        else:
            keys = self.part_keys(key, manifest)

            async def fetch() -> list[bytes | None]:
                if len(keys) == 1:
                    return [await client.get(keys[0])]  # a pipeline object costs more than it saves
                pipe = self._pipeline()
                for k in keys:
                    pipe.get(k)
                return list(await pipe.execute())

            parts = await self._call("get", manifest.meta.nbytes, fetch)
            if any(p is None for p in parts):
                self.partial += 1
                # Still the manifest we read: its parts are gone for good.
                # Replaced meanwhile: read again.
                return None, not await self._discard(mkey, header)
            chunk = self._assemble(manifest.meta, [p for p in parts if p is not None])
        try:
            chunk.verify()
        except CorruptChunk as exc:
            chunk.release()
            log.debug("%s: %s: %s", self.breaker.name, key, exc)
            self.counters.corrupt += 1
            await self._discard(mkey, header)
            return None, False
        return chunk, False

    def _assemble(self, meta: ChunkMeta, parts: list[bytes]) -> Chunk:
        """One contiguous payload from the parts (verified by the caller)."""
        if len(parts) == 1:
            return Chunk(meta, memoryview(parts[0]))
        if sum(len(p) for p in parts) != meta.nbytes:
            return Chunk(meta, memoryview(b""))  # fails verify(): counted as corrupt
        buf = self._pool.take(meta.nbytes)
        view = memoryview(buf)
        off = 0
        for p in parts:
            view[off : off + len(p)] = p
            off += len(p)
        return Chunk(meta, view[: meta.nbytes], lambda: self._pool.give(buf))

    async def _discard(self, mkey: str, header: bytes) -> bool:
        """Delete the manifest if it still starts with ``header``; True if deleted."""
        client = self._redis()
        deleted = await self._call("discard", 0, lambda: client.eval(_DISCARD_LUA, 1, mkey, header, len(header)))
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
