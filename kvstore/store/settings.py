"""How the store uses each tier: :class:`TierSettings`, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvstore.errors import ConfigError

OnEvict = Literal["demote", "drop"]
OnFull = Literal["block", "drop"]


@dataclass(frozen=True, slots=True)
class TierSettings:
    """How the store uses one tier (the tier's own options live in its config)."""

    #: Copy every put into this tier in the background (ignored for the top tier).
    write_through: bool = False
    #: What happens to a chunk evicted from this tier.
    on_evict: OnEvict = "demote"
    eviction: str = "lru"
    #: Bound of the write-through queue, and what a put does when it is full.
    queue_depth: int = 256
    on_full: OnFull = "block"
    workers: int = 2

    def __post_init__(self) -> None:
        if self.on_evict not in ("demote", "drop"):
            raise ConfigError(f"on_evict must be 'demote' or 'drop', got {self.on_evict!r}")
        if self.on_full not in ("block", "drop"):
            raise ConfigError(f"on_full must be 'block' or 'drop', got {self.on_full!r}")
        if not isinstance(self.queue_depth, int) or not 1 <= self.queue_depth <= 1_000_000:
            raise ConfigError(f"queue_depth must be in [1, 1000000], got {self.queue_depth!r}")
        if not isinstance(self.workers, int) or not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be in [1, 64], got {self.workers!r}")
