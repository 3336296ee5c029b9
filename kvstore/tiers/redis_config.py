"""Configuration of the ``redis`` tier: its URL and its options.

URLs (see :func:`parse_url`)
    ``redis://[user:password@]host[:port][/db]``; ``rediss://`` for TLS;
    ``redis+cluster://host:port[,host:port...]`` (or ``rediss+cluster://``,
    or ``?cluster=true``) for a Redis Cluster, given one or more seed nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from kvstore.errors import ConfigError
from kvstore.tiers.breaker import BreakerConfig

__all__ = ["RedisEndpoint", "RedisTierConfig", "parse_url", "redact"]

_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}
_PREFIX_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:._-/|#@")


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
        raise ConfigError(f"redis.url: missing host in {redact(url)!r}")
    if not port_text:
        return host, 6379
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"redis.url: port must be in [1, 65535], got {port_text!r}")
    return host, int(port_text)




def redact(url: str) -> str:
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
