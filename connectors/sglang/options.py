"""Options of the SGLang HiCache backend, read once from SGLang's extra config.

SGLang hands a backend its ``--hicache-storage-backend-extra-config`` JSON as
``storage_config.extra_config``.  :meth:`HiCacheOptions.from_extra_config`
validates it at that edge into a frozen dataclass; nothing further in reads
the dict.  Unknown keys are refused (a typo must not silently fall back to a
default), except the keys SGLang itself puts there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kvstore.config import parse_size
from kvstore.errors import ConfigError

Mode = Literal["daemon", "local"]
ShmMode = bool | Literal["auto"]

#: Keys of the extra config that belong to SGLang (the dynamic loader's and
#: the cache controller's), accepted and ignored here.
SGLANG_KEYS = frozenset(
    {
        "backend_name",
        "module_path",
        "class_name",
        "interface_v1",
        "tp_lcm_size",
        "prefetch_threshold",
        "prefetch_timeout_base",
        "prefetch_timeout_per_ki_token",
        "hicache_storage_pass_prefix_keys",
    }
)

DEFAULT_ADDRESS = "127.0.0.1:51061"


@dataclass(frozen=True, slots=True)
class HiCacheOptions:
    """Every option of :class:`KVStoreHiCacheStorage` (see docs/sglang.md)."""

    #: ``daemon``: a kvstore daemon at ``address``; ``local``: an in-process store.
    mode: Mode = "daemon"
    #: host:port of the daemon (default: $KVSTORE_ADDRESS, else 127.0.0.1:51061).
    address: str = DEFAULT_ADDRESS
    #: Tenant part of the namespace.
    tenant: str = "sglang"
    #: Model part of the namespace; None = SGLang's model name.
    model: str | None = None
    #: Bearer token when the daemon has a token file (default: $KVSTORE_TOKEN).
    token: str | None = None
    #: Deadline of each daemon call, retries included.
    timeout_s: float = 5.0
    #: Retries of a call that got UNAVAILABLE (within ``timeout_s``).
    retries: int = 1
    #: Shared memory with a same-host daemon: "auto", true (required) or false.
    shm: ShmMode = "auto"
    #: Size of this process's shared-memory segment.
    shm_bytes: int = 512 << 20
    #: Most bytes staged per request (pages are sent in groups of at most this).
    batch_bytes: int = 64 << 20
    #: Consecutive failed calls that make the backend fail fast (misses) ...
    breaker_failures: int = 1
    #: ... for this long before it probes the daemon again (doubling to 30 s).
    breaker_reset_s: float = 1.0
    #: Wait for write-through tiers (disk) before a set returns.
    durable: bool = False
    #: Ask the store whether pages exist before a batch set and skip those.
    skip_existing: bool = True
    #: ``local`` mode: a kvstore YAML config (the daemon's format) for the tiers;
    #: None = a single CPU tier of ``local_capacity``.
    local_config: Path | None = None
    local_capacity: int = 4 << 30

    def __post_init__(self) -> None:
        if self.mode not in ("daemon", "local"):
            raise ConfigError(f"extra_config.mode must be 'daemon' or 'local', got {self.mode!r}")
        if not isinstance(self.address, str) or ":" not in self.address:
            raise ConfigError(f"extra_config.address must be 'host:port', got {self.address!r}")
        if not 0 < self.timeout_s <= 600:
            raise ConfigError(f"extra_config.timeout_s must be in (0, 600] seconds, got {self.timeout_s!r}")
        if not 0 <= self.retries <= 10:
            raise ConfigError(f"extra_config.retries must be in [0, 10], got {self.retries!r}")
        if self.shm not in (True, False, "auto"):
            raise ConfigError(f"extra_config.shm must be true, false or 'auto', got {self.shm!r}")
        if self.shm_bytes < 16 << 20:
            raise ConfigError(f"extra_config.shm_bytes must be at least 16 MiB, got {self.shm_bytes}")
        if not 1 << 20 <= self.batch_bytes <= 4 << 30:
            raise ConfigError(f"extra_config.batch_bytes must be in [1 MiB, 4 GiB], got {self.batch_bytes}")
        if not 1 <= self.breaker_failures <= 1000:
            raise ConfigError(f"extra_config.breaker_failures must be in [1, 1000], got {self.breaker_failures!r}")
        if not 0.001 <= self.breaker_reset_s <= 30:
            raise ConfigError(f"extra_config.breaker_reset_s must be in [0.001, 30] seconds, got {self.breaker_reset_s!r}")
        if self.local_capacity <= 0:
            raise ConfigError(f"extra_config.local_capacity must be a positive size, got {self.local_capacity}")

    @classmethod
    def from_extra_config(
        cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> HiCacheOptions:
        """Validate SGLang's extra config; errors name the offending key."""
        env = os.environ if environ is None else environ
        d = dict(extra or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known - SGLANG_KEYS)
        if unknown:
            raise ConfigError(f"extra_config: unknown key(s) {unknown}; kvstore accepts {sorted(known)}")
        kw: dict[str, Any] = {}
        if "mode" in d:
            kw["mode"] = _str(d["mode"], "mode")
        kw["address"] = _str(d.get("address", env.get("KVSTORE_ADDRESS", DEFAULT_ADDRESS)), "address")
        for name in ("tenant", "model", "token"):
            if d.get(name) is not None:
                kw[name] = _str(d[name], name)
        if "token" not in kw and env.get("KVSTORE_TOKEN"):
            kw["token"] = env["KVSTORE_TOKEN"]
        for name in ("timeout_s", "breaker_reset_s"):
            if name in d:
                kw[name] = _float(d[name], name)
        for name in ("retries", "breaker_failures"):
            if name in d:
                kw[name] = _int(d[name], name)
        for name in ("durable", "skip_existing"):
            if name in d:
                kw[name] = _bool(d[name], name)
        if "shm" in d:
            kw["shm"] = "auto" if d["shm"] == "auto" else _bool(d["shm"], "shm")
        for name in ("shm_bytes", "batch_bytes", "local_capacity"):
            if name in d:
                kw[name] = parse_size(d[name], f"extra_config.{name}")
        if d.get("local_config") is not None:
            kw["local_config"] = Path(_str(d["local_config"], "local_config")).expanduser()
        return cls(**kw)


def _str(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"extra_config.{name} must be a non-empty string, got {value!r}")
    return value


def _float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"extra_config.{name} must be a number, got {value!r}")
    return float(value)


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"extra_config.{name} must be an integer, got {value!r}")
    return value


def _bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise ConfigError(f"extra_config.{name} must be true or false, got {value!r}")
