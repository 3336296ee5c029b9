"""The ``peer`` tier: another kvstore daemon as this daemon's remote tier.

For sites without Redis: daemons on several hosts point a ``peer`` tier at
one shared daemon (a hub with large CPU and disk tiers) and write through to
it, so a chunk put on one host is found by the others.  The tier speaks the
daemon's own gRPC API through :class:`~kvstore.client.AsyncClient` (byte
stream, never shared memory: the peer is assumed to be on another host), with
an optional bearer token and TLS.

URL: ``kvstore://host:port`` (plain gRPC) or ``kvstores://host:port`` (TLS,
with ``tls_ca`` and for mutual TLS ``tls_cert`` + ``tls_key``).

Like the ``redis`` tier it is unmanaged (the peer evicts on its own), every
call is bounded and goes through a circuit breaker, and a peer that is down
or slow makes gets and lookups miss quickly while puts raise
:class:`~kvstore.errors.RemoteUnavailable`.  Chunks arrive with the peer's
metadata and are checked against their checksum before they are served.

Peers must form no cycle (A -> B -> A): a miss on A would ask B, whose miss
would ask A again, until the time bound runs out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar
from urllib.parse import urlsplit

from kvstore.chunk import Chunk
from kvstore.errors import (
    Closed,
    ConfigError,
    CorruptChunk,
    DeadlineExceeded,
    PermissionDenied,
    RemoteUnavailable,
    Unauthenticated,
)
from kvstore.keys import ChunkKey
from kvstore.tiers.base import UnmanagedTier
from kvstore.tiers.breaker import BreakerConfig, CircuitBreaker

if TYPE_CHECKING:
    from kvstore.client.aio import AsyncClient

__all__ = ["PeerTier", "PeerTierConfig"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PeerTierConfig:
    """Options of a ``peer`` tier (docs/remote.md)."""

    url: str
    #: Bearer token for a peer that authenticates (or ``token_file`` holding it).
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Name in the peer's certificate when it differs from the URL's host.
    tls_server_name: str | None = None
    #: Bound of one round trip; a call moving N bytes gets ``timeout_s + N / min_rate``.
    timeout_s: float = 1.0
    min_rate: int = 50_000_000
    #: Largest chunk a get expects: the size is unknown until the peer's
    #: header arrives, so a get is bounded by ``timeout_s + max_chunk_bytes / min_rate``.
    max_chunk_bytes: int = 256 << 20
    #: gRPC data frame size for payloads.
    frame_bytes: int = 4 << 20
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    def __post_init__(self) -> None:
        self.address  # noqa: B018 - validates the URL
        _check(self.timeout_s, "peer.timeout_s", 0.001, 3600, "seconds")
        _check(self.min_rate, "peer.min_rate", 1 << 20, 1 << 40, "bytes/s", integer=True)
        _check(self.max_chunk_bytes, "peer.max_chunk_bytes", 0, 1 << 40, "bytes", integer=True)
        _check(self.frame_bytes, "peer.frame_bytes", 4096, 64 << 20, "bytes", integer=True)
        if self.token is not None and self.token_file is not None:
            raise ConfigError("peer.token and peer.token_file are exclusive")
        if self.token_file is not None and not Path(self.token_file).is_file():
            raise ConfigError(f"peer.token_file: {self.token_file} is not a readable file")
        tls = self.url.startswith("kvstores://")
        if tls and self.tls_ca is None:
            raise ConfigError("peer.tls_ca is required for a kvstores:// URL")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            p = getattr(self, name)
            if p is None:
                continue
            if not tls:
                raise ConfigError(f"peer.{name} needs a kvstores:// URL")
            if not Path(p).is_file():
                raise ConfigError(f"peer.{name}: {p} is not a readable file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("peer.tls_cert and peer.tls_key must be given together")
        if not isinstance(self.breaker, BreakerConfig):
            raise ConfigError("peer.breaker must be a BreakerConfig")

    @property
    def address(self) -> str:
        """``host:port`` of the peer daemon."""
        parts = urlsplit(self.url) if isinstance(self.url, str) else None
        if parts is None or parts.scheme not in ("kvstore", "kvstores"):
            raise ConfigError(f"peer.url must look like kvstore://host:port or kvstores://host:port, got {self.url!r}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"peer.url must look like kvstore://host:port or kvstores://host:port, got {self.url!r}")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{host}:{port}"

    def budget(self, nbytes: int) -> float:
        """Seconds a call moving ``nbytes`` may take before it counts as failed."""
        return self.timeout_s + nbytes / self.min_rate


def _check(value: object, name: str, lo: float, hi: float, unit: str, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {what} of {unit} in [{lo:g}, {hi:g}], got {value!r}")


class PeerTier(UnmanagedTier):
    """Another daemon, reached over gRPC; see the module docstring.  Sizes unknown:
    the peer evicts on its own."""

    kind: ClassVar[str] = "peer"

    def __init__(self, name: str, config: PeerTierConfig) -> None:
        super().__init__(name)
        self.config = config
        # Reachability and credentials failures trip the breaker; a corrupt
        # or refused chunk does not (the peer answered).
        self.breaker = CircuitBreaker(
            f"tier {name!r} (peer {config.address})",
            config.breaker,
            (RemoteUnavailable, DeadlineExceeded, Unauthenticated, PermissionDenied, OSError),
            self.counters,
        )
        self._client: AsyncClient | None = None

    async def open(self) -> None:
        self._client = self._make_client()

    def _make_client(self) -> AsyncClient:
        from kvstore.client.aio import AsyncClient
        from kvstore.client.channel import ClientTLS

        cfg = self.config
        token = cfg.token
        if cfg.token_file is not None:
            token = Path(cfg.token_file).read_text().strip()
        tls = None
        if cfg.tls_ca is not None:
            tls = ClientTLS(ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key, server_name=cfg.tls_server_name)
        return AsyncClient(
            cfg.address,
            token=token,
            tls=tls,
            # The breaker's per-call deadline (which grows with the payload)
            # bounds every call; the client's own must not cut in first.
            timeout_s=3600.0,
            retries=0,
            frame_bytes=cfg.frame_bytes,
            shm=False,
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _peer(self) -> AsyncClient:
        if self._client is None:
            raise Closed(f"tier {self.name!r} is not open")
        return self._client

    async def _call(self, what: str, nbytes: int, fn: Callable[[], Awaitable[T]]) -> T:
        async with self.breaker.guard(self.config.budget(nbytes), what):
            if self.breaker.state == "half-open":
                # This call probes a peer that failed.  A fresh channel connects
                # at once; the old one would wait out gRPC's reconnect backoff,
                # which grows towards two minutes while the peer is down.
                old, self._client = self._peer(), self._make_client()
                await old.close()
            return await fn()

    # -- operations ------------------------------------------------------------------------------
    async def put(self, key: ChunkKey, chunk: Chunk) -> None:
        """Store the chunk on the peer, metadata intact; raises RemoteUnavailable on failure."""
        self._peer()
        # put_chunks sends our ChunkMeta as is (codec, dtype, shape): put()
        # derives metadata from a value and would lose the codec.
        await self._call(
            "put", chunk.meta.nbytes, lambda: self._peer().put_chunks([(key, chunk.meta, chunk.payload)])
        )
        self.counters.puts += 1
        self.counters.bytes_written += chunk.meta.nbytes

    async def get(self, key: ChunkKey) -> Chunk | None:
        """The chunk, or None: missing, corrupt in transit, or the peer unavailable."""
        self._peer()
        try:
            # The size is unknown until the header arrives: budget for the
            # largest chunk expected.
            got = (
                await self._call("get", self.config.max_chunk_bytes, lambda: self._peer().get_many([str(key)]))
            )[0]
        except RemoteUnavailable:
            got = None
        except CorruptChunk as exc:
            log.debug("%s: %s", self.breaker.name, exc)
            self.counters.corrupt += 1
            got = None
        if got is None:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        self.counters.bytes_read += got.meta.nbytes
        return Chunk(got.meta, got.data)

    async def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Presence on the peer (any of its tiers); all False when unavailable."""
        if not keys:
            return []
        self._peer()
        try:
            return await self._call("exists", 0, lambda: self._peer().exists([str(k) for k in keys]))
        except RemoteUnavailable:
            return [False] * len(keys)

    async def delete(self, key: ChunkKey) -> int:
        """Remove the chunk from the peer.  Raises RemoteUnavailable.

        The peer does not report sizes: returns 1 when it had the key (so the
        store counts it as found), 0 otherwise.
        """
        self._peer()
        found = (await self._call("delete", 0, lambda: self._peer().delete([str(key)])))[0]
        if found:
            self.counters.deletes += 1
        return 1 if found else 0
