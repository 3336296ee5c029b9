"""The daemon's configuration schema: frozen dataclasses, each checking its fields.

One dataclass per component (``server``, ``server.tls``, ``server.limits``,
each tier, the whole daemon), validated in ``__post_init__`` with errors that
name the field and what it accepts; and the parsers of single values (sizes,
booleans, integers and numbers in a range, paths) that those checks and the
loading (loading.py) share.

Sizes accept integers of bytes or strings such as ``512MiB``, ``4GiB``, ``1.5GB``.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvstore.errors import ConfigError, InvalidArgument
from kvstore.keys import Namespace
from kvstore.store import TierSettings

DEFAULT_PORT = 51061
DEFAULT_FRAME_BYTES = 4 << 20
TIER_KINDS = ("gpu", "cpu", "disk", "redis", "peer")

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object, field_name: str) -> int:
    """Bytes from an int or a string like '4GiB'; ConfigError naming ``field_name``."""
    if isinstance(value, bool):
        raise ConfigError(f"{field_name}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{field_name}: size must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(f"{field_name}: expected a size such as 1048576, '512MiB' or '4GiB', got {value!r}")


def format_size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % (scale // 1024 or 1) == 0:
            return f"{n / scale:g}{unit}"
    return f"{n}B"


def parse_bool(value: object, field_name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{field_name}: expected true or false, got {value!r}")


def parse_int(value: object, field_name: str, lo: int, hi: int) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError  # int() would silently truncate 80.5 to 80
        out = int(value)  # type: ignore[call-overload]
        assert isinstance(out, int)
    except (TypeError, ValueError):
        raise ConfigError(f"{field_name}: expected an integer in [{lo}, {hi}], got {value!r}") from None
    if not lo <= out <= hi:
        raise ConfigError(f"{field_name}: expected an integer in [{lo}, {hi}], got {out}")
    return out


def parse_seconds(value: object, field_name: str) -> float:
    return _in_range(value, field_name, 3600.0, "seconds in (0, 3600]")


def parse_share(value: object, field_name: str) -> float:
    return _in_range(value, field_name, 1.0, "a fraction in (0, 1] such as 0.5")


def _in_range(value: object, field_name: str, hi: float, expected: str) -> float:
    """A number in (0, ``hi``]; ConfigError saying ``expected`` otherwise."""
    try:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{field_name}: expected {expected}, got {value!r}") from None
    if not 0 < out <= hi:
        raise ConfigError(f"{field_name}: expected {expected}, got {out}")
    return out


def parse_str(value: object, field_name: str) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(f"{field_name}: expected a string, got {value!r}")
    return str(value)


def _path(value: object, field_name: str) -> Path:
    return Path(os.path.expanduser(parse_str(value, field_name)))


def parse_opt_path(value: object, field_name: str) -> Path | None:
    return None if value in (None, "") else _path(value, field_name)


#: TierConfig field -> its name in a config file, for the remote-tier options.
_REMOTE_NAMES = {
    "key_prefix": "key_prefix", "ttl_s": "ttl", "part_bytes": "part_size", "max_connections": "max_connections",
    "timeout_s": "timeout", "token_file": "token_file", "tls_ca": "tls_ca", "tls_cert": "tls_cert", "tls_key": "tls_key",
}


def _redact_url(url: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``."""
    return re.sub(r"^([a-z+]+://[^:/@]*):[^@/]*@", r"\1:***@", url)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path | None = None
    key: Path | None = None
    #: CA bundle that client certificates must chain to; set it for mutual TLS.
    client_ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("server.tls: cert and key must be given together")
        if self.client_ca is not None and self.cert is None:
            raise ConfigError("server.tls.client_ca needs server.tls.cert and server.tls.key")
        for name in ("cert", "key", "client_ca"):
            p = getattr(self, name)
            if p is not None and not p.is_file():
                raise ConfigError(f"server.tls.{name}: {p} is not a readable file")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``server.limits``: what the daemon refuses under load (kvstore/server/limits.py)."""

    #: Bound on the daemon's resident memory (RssAnon + RssFile); a put that could pass
    #: it is refused with RESOURCE_EXHAUSTED.  0 = no bound.
    max_memory_bytes: int = 0
    #: Bytes of puts being received at once (receive buffers).
    max_inflight_bytes: int = 2 << 30
    #: Put/Get streams one client connection may have open; more are refused at once.
    max_streams_per_client: int = 64
    #: How long a new stream waits when server.max_concurrent_streams are open, then is refused.
    stream_wait_s: float = 10.0
    #: tenant -> bytes its chunks (all models) may take in each managed tier.
    tenant_quotas: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.max_memory_bytes and self.max_memory_bytes < 64 << 20:
            raise ConfigError(
                f"server.limits.max_memory: expected 0 (no bound) or at least 64MiB, got {self.max_memory_bytes}"
            )
        parse_int(self.max_inflight_bytes, "server.limits.max_inflight", 1 << 20, 1 << 40)
        parse_int(self.max_streams_per_client, "server.limits.max_streams_per_client", 1, 1 << 16)
        if not 0 < self.stream_wait_s <= 3600:
            raise ConfigError(f"server.limits.stream_wait_s: expected seconds in (0, 3600], got {self.stream_wait_s}")
        for tenant, limit in self.tenant_quotas:
            try:
                Namespace(tenant, "m")  # validates the tenant's spelling
            except InvalidArgument as exc:
                raise ConfigError(f"server.limits.tenant_quotas: {exc}") from None
            if limit <= 0:
                raise ConfigError(f"server.limits.tenant_quotas.{tenant}: a quota must be a positive size, got {limit}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: Largest gRPC data frame the daemon sends; clients may ask for smaller.
    frame_bytes: int = DEFAULT_FRAME_BYTES
    #: Largest chunk accepted by Put.
    max_chunk_bytes: int = 4 << 30
    #: Most keys in one batched request.
    max_batch: int = 65536
    #: Token file (YAML: tokens: [{token, tenant, role}]); unset = no authentication.
    token_file: Path | None = None
    tls: TLSConfig = field(default_factory=TLSConfig)
    #: Allow the shared-memory fast path for clients on this host.
    shm: bool = True
    #: Let those clients read chunks in the CPU tier straight from its memory (read-only),
    #: skipping a request per get; only without token_file (kvstore/tiers/shared_arena.py).
    shm_direct_reads: bool = True
    #: ... and write chunks into it themselves, in blocks the daemon reserves for them: one copy
    #: and one round trip a put (kvstore/server/direct_writes.py); needs shm_direct_reads,
    #: only without token_file; the daemon trusts their checksums.
    shm_direct_writes: bool = True
    #: The share of the CPU tier's capacity that the blocks reserved for direct writes (for
    #: clients' next puts, holding no chunk yet) may take, all clients together; past it,
    #: puts go through the daemon.  Bounds what many idle clients can take from the cache.
    shm_reserved_share: float = 0.5
    #: Serve Get also on a listener of kvstore's own (HTTP/2, the same gRPC method, without
    #: grpcio's per-call costs; kvstore/server/h2get.py), whose port the daemon tells clients.
    http2_get: bool = True
    #: Its port on ``host``; 0 = any free port (clients learn it from the daemon).  Set a fixed
    #: one where a firewall or a Kubernetes Service must let it through (the Helm chart: 51062).
    http2_get_port: int = 0
    #: Most streams in flight at once (across clients); more wait.
    max_concurrent_streams: int = 256
    #: Seconds to let streams in flight finish on SIGTERM before cancelling them.
    grace_s: float = 30.0
    #: Prometheus metrics over HTTP (GET /metrics) on metrics_host:metrics_port; 0 = off.
    #: Off by default so that several daemons (one per GPU, test fixtures) can share a
    #: host; the Helm chart turns it on (9400).  No authentication: keep it on loopback
    #: or a network only the scraper reaches.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("server.host must not be empty")
        parse_int(self.port, "server.port", 0, 65535)
        parse_int(self.http2_get_port, "server.http2_get_port", 0, 65535)
        if self.http2_get and self.http2_get_port and self.http2_get_port == self.port:
            raise ConfigError(f"server.http2_get_port: {self.http2_get_port} is server.port too; pick another (or 0)")
        parse_int(self.frame_bytes, "server.frame_bytes", 4096, 64 << 20)
        parse_int(self.max_chunk_bytes, "server.max_chunk_bytes", 1, 1 << 40)
        parse_int(self.max_batch, "server.max_batch", 1, 1 << 24)
        parse_int(self.max_concurrent_streams, "server.max_concurrent_streams", 1, 1 << 16)
        parse_share(self.shm_reserved_share, "server.shm_reserved_share")
        if not 0 <= self.grace_s <= 3600:
            raise ConfigError(f"server.grace_s: expected seconds in [0, 3600], got {self.grace_s}")
        parse_int(self.metrics_port, "server.metrics_port", 0, 65535)
        if not self.metrics_host:
            raise ConfigError("server.metrics_host must not be empty")
        if self.token_file is not None and not self.token_file.is_file():
            raise ConfigError(f"server.token_file: {self.token_file} is not a readable file")


@dataclass(frozen=True, slots=True)
class TierConfig:
    name: str
    kind: str
    capacity_bytes: int = 0
    path: Path | None = None
    url: str | None = None
    settings: TierSettings = field(default_factory=TierSettings)
    #: Codec applied when chunks are written to this tier ("raw" = as given).
    codec: str = "raw"
    #: Remote tiers only (None = the tier's default; docs/remote.md).  redis:
    #: key_prefix, ttl_s, part_bytes, max_connections; peer: token_file; both:
    #: timeout_s and the TLS files (rediss:// or kvstores:// URLs).
    key_prefix: str | None = None
    ttl_s: float | None = None
    part_bytes: int | None = None
    max_connections: int | None = None
    timeout_s: float | None = None
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        where = f"tiers.{self.name}"
        remote_only = {
            "key_prefix": ("redis",), "ttl_s": ("redis",), "part_bytes": ("redis",), "max_connections": ("redis",),
            "token_file": ("peer",), "timeout_s": ("redis", "peer"), "tls_ca": ("redis", "peer"),
            "tls_cert": ("redis", "peer"), "tls_key": ("redis", "peer"),
        }
        for fname, kinds in remote_only.items():
            if getattr(self, fname) is not None and self.kind not in kinds:
                raise ConfigError(
                    f"{where}.{_REMOTE_NAMES[fname]} applies only to {' and '.join(kinds)} tiers, not {self.kind!r}"
                )
        if not re.match(r"^[a-z][a-z0-9_-]{0,31}$", self.name):
            raise ConfigError(f"{where}.name must match [a-z][a-z0-9_-]{{0,31}}, got {self.name!r}")
        if self.kind not in TIER_KINDS:
            raise ConfigError(f"{where}.kind must be one of {list(TIER_KINDS)}, got {self.kind!r}")
        if self.kind in ("cpu", "gpu", "disk") and self.capacity_bytes < 1 << 20:
            raise ConfigError(f"{where}.capacity must be at least 1MiB, got {self.capacity_bytes}")
        if self.kind == "disk" and self.path is None:
            raise ConfigError(f"{where}.path is required for a disk tier")
        if self.kind in ("redis", "peer") and not self.url:
            raise ConfigError(f"{where}.url is required for a {self.kind} tier")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    server: ServerConfig
    tiers: tuple[TierConfig, ...]
    quotas: tuple[tuple[str, int], ...] = ()
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ConfigError("tiers: at least one tier is required")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ConfigError(f"tiers: names must be unique, got {names}")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        bound = self.server.limits.max_memory_bytes
        arenas = sum(t.capacity_bytes for t in self.tiers if t.kind == "cpu")
        if bound and bound < arenas + (256 << 20):
            # The cpu tiers' arenas are resident from the start: a bound below them refuses every put.
            raise ConfigError(
                f"server.limits.max_memory ({format_size(bound)}) must exceed the cpu tiers' capacity "
                f"({format_size(arenas)}) by at least 256MiB"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for printing the effective config."""

        def clean(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [clean(x) for x in v]
            return v

        d = clean(asdict(self))
        d["quotas"] = {ns: format_size(q) for ns, q in self.quotas}
        lim = self.server.limits
        d["server"]["limits"] = {  # under their file names, so the printed config loads back
            "max_memory": format_size(lim.max_memory_bytes), "max_inflight": format_size(lim.max_inflight_bytes),
            "max_streams_per_client": lim.max_streams_per_client, "stream_wait_s": lim.stream_wait_s,
            "tenant_quotas": {t: format_size(q) for t, q in lim.tenant_quotas},
        }
        for t in d["tiers"]:
            t["capacity"] = format_size(t.pop("capacity_bytes"))
            if t.get("url"):
                t["url"] = _redact_url(t["url"])  # the effective config is printed at start
            # Remote-tier options under their file names, and only those set.
            for field_name, file_name in _REMOTE_NAMES.items():
                value = t.pop(field_name)
                if value is not None:
                    t[file_name] = format_size(value) if field_name == "part_bytes" else value
        return d  # type: ignore[no-any-return]
