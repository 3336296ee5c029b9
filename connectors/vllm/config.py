"""Settings of the vLLM connector, built once from ``kv_connector_extra_config``.

Every field is validated here, at the edge; an error names the field
(``kv_connector_extra_config.<field>``) and the allowed values.  Nothing else
reads the free-form dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from kvstore.config import parse_size
from kvstore.errors import ConfigError, InvalidArgument
from kvstore.keys import DEFAULT_CHUNK_SIZE, Namespace

PREFIX = "kv_connector_extra_config"
CODECS = ("raw", "zstd", "kivi", "cachegen")
DEFAULT_ADDRESS = "127.0.0.1:51061"

SaveBacklog = Literal["block", "drop"]


def _sanitize_model(name: str) -> str:
    """A model path or name as a namespace model id (``/models/x`` -> ``models/x``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._/+-]", "-", name).strip("/")
    cleaned = re.sub(r"/+", "/", cleaned)
    cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)
    return cleaned[:256] or "model"


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """What ``kv_connector_extra_config`` may hold (all optional)."""

    #: ``host:port`` of the kvstore daemon (``kvstore serve``).
    address: str = DEFAULT_ADDRESS
    #: Run the store inside the engine instead: the scheduler process starts a
    #: daemon on ``address`` (loopback) with a CPU tier of ``embedded_capacity``
    #: bytes; workers connect to it.  For single-host use without a separate daemon.
    embedded: bool = False
    embedded_capacity: int = 2 << 30
    #: ``tenant/model``; default ``default/<served model name>``.
    namespace: str | None = None
    #: Tokens per chunk (the unit of lookup, save and load).
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Codec of saved chunks: raw (exact), zstd (lossless), kivi, cachegen (lossy).
    codec: str = "raw"
    #: Codec level (None: the codec's default).
    codec_level: int | None = None
    #: Also save the KV of generated tokens, as each chunk fills (multi-turn reuse).
    save_decode_tokens: bool = False
    #: Bearer token when the daemon has a token file.
    token: str | None = None
    #: Deadline of each load/save call, seconds (retries included).
    timeout_s: float = 30.0
    #: Deadline of the scheduler's lookup, seconds: a slow daemon must not stall scheduling.
    lookup_timeout_s: float = 2.0
    #: Shared memory with a same-host daemon: "auto", true (require) or false.
    shm: bool | Literal["auto"] = "auto"
    #: Bytes of gathered KV waiting to be encoded and sent before ``save_backlog`` applies.
    max_pending_save_bytes: int = 1 << 30
    #: When the backlog is full: "block" the step until it drains (default for
    #: kv_producer, whose saves must arrive), or "drop" the new save (a cache miss later).
    save_backlog: SaveBacklog | None = None
    #: Seconds a consumer waits for chunks a producer announced in
    #: ``kv_transfer_params`` (``kvstore_chunks``) before recomputing instead.
    wait_for_producer_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not re.match(r"^[^\s:]+:\d{1,5}$|^unix:", self.address):
            raise ConfigError(f"{PREFIX}.address must be 'host:port' (or 'unix:path'), got {self.address!r}")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or not 16 <= self.chunk_size <= 1 << 16:
            raise ConfigError(f"{PREFIX}.chunk_size must be an integer in [16, 65536], got {self.chunk_size!r}")
        if self.codec not in CODECS:
            raise ConfigError(f"{PREFIX}.codec must be one of {list(CODECS)}, got {self.codec!r}")
        if self.codec_level is not None and (not isinstance(self.codec_level, int) or not 0 <= self.codec_level <= 9):
            raise ConfigError(f"{PREFIX}.codec_level must be null or an integer in [0, 9], got {self.codec_level!r}")
        for name in ("timeout_s", "lookup_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 3600:
                raise ConfigError(f"{PREFIX}.{name} must be a number of seconds in (0, 3600], got {value!r}")
        if not isinstance(self.wait_for_producer_s, int | float) or not 0 <= self.wait_for_producer_s <= 3600:
            raise ConfigError(f"{PREFIX}.wait_for_producer_s must be in [0, 3600], got {self.wait_for_producer_s!r}")
        if self.shm not in ("auto", True, False):
            raise ConfigError(f"{PREFIX}.shm must be 'auto', true or false, got {self.shm!r}")
        if self.save_backlog not in (None, "block", "drop"):
            raise ConfigError(f"{PREFIX}.save_backlog must be 'block' or 'drop', got {self.save_backlog!r}")
        if not isinstance(self.max_pending_save_bytes, int) or self.max_pending_save_bytes < 1 << 20:
            raise ConfigError(f"{PREFIX}.max_pending_save_bytes must be at least 1 MiB, got {self.max_pending_save_bytes!r}")
        if not isinstance(self.embedded_capacity, int) or self.embedded_capacity < 16 << 20:
            raise ConfigError(f"{PREFIX}.embedded_capacity must be at least 16 MiB, got {self.embedded_capacity!r}")
        for name in ("embedded", "save_decode_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{PREFIX}.{name} must be true or false, got {getattr(self, name)!r}")
        if self.namespace is not None:
            try:
                Namespace.parse(self.namespace)
            except InvalidArgument as exc:
                raise ConfigError(f"{PREFIX}.namespace: {exc}") from None

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        """Build from ``kv_connector_extra_config``; unknown keys are errors (typos would be silent)."""
        extra = dict(extra or {})
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - allowed)
        if unknown:
            raise ConfigError(f"{PREFIX}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        for name in ("embedded_capacity", "max_pending_save_bytes"):
            if isinstance(extra.get(name), str):
                extra[name] = parse_size(extra[name], f"{PREFIX}.{name}")
        return cls(**extra)

    def namespace_for(self, model: str) -> Namespace:
        """The namespace of this engine's chunks."""
        if self.namespace is not None:
            return Namespace.parse(self.namespace)
        return Namespace("default", _sanitize_model(model))

    def backlog_policy(self, producer_only: bool) -> SaveBacklog:
        if self.save_backlog is not None:
            return self.save_backlog
        return "block" if producer_only else "drop"
