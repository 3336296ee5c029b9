"""Pick a compression level per chunk, or recompute, from bandwidth and a TTFT target.

CacheGen's adaptation (section 5.3 of the paper): the KV of a long context is
fetched chunk by chunk; before each chunk the loader knows the bandwidth it
has been getting and the time left before the first token is due.  It takes
the best-quality level whose transfer (plus decode) still leaves room for the
remaining chunks at the smallest level; when even the smallest level would
miss the target and the engine can prefill the chunk's tokens faster than the
network can carry its KV, it recomputes (sends text) instead.

Connectors call :meth:`LevelController.plan` with the chunks they are about
to fetch, or :meth:`LevelController.choose` chunk by chunk with a fresh
bandwidth estimate (:class:`BandwidthEstimator` keeps one).  Nothing here does
I/O: sizes come from each level's measured bits per element.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvstore.errors import ConfigError


@dataclass(frozen=True)
class LevelProfile:
    """One way to ship a chunk: codec, level, and what it costs."""

    codec: str
    level: int
    bits_per_element: float
    """All-in encoded size (docs/codecs.md measures it on SmolLM2)."""
    quality: float
    """Lower is better: the KL divergence it caused on the reference model."""

    def __post_init__(self) -> None:
        if self.bits_per_element <= 0:
            raise ConfigError(f"LevelProfile.bits_per_element must be positive, got {self.bits_per_element}")


# Measured on SmolLM2-135M KV, float16, 256-token chunks (docs/codecs.md).
DEFAULT_PROFILES: tuple[LevelProfile, ...] = (
    LevelProfile("cachegen", 0, 7.57, 0.0000),
    LevelProfile("cachegen", 1, 4.66, 0.0026),
    LevelProfile("cachegen", 2, 3.28, 0.0178),
    LevelProfile("cachegen", 3, 2.35, 0.0500),
    LevelProfile("cachegen", 4, 1.85, 0.0773),
    LevelProfile("cachegen", 5, 1.52, 0.1303),
)


@dataclass(frozen=True)
class ControllerConfig:
    """Inputs that do not change per request."""

    ttft_target_s: float
    """Time allowed from the start of the fetch to the first token."""
    profiles: tuple[LevelProfile, ...] = DEFAULT_PROFILES
    decode_bytes_per_s: float = 500e6
    """Decode speed, in bytes of decoded float16 KV per second."""
    recompute_tokens_per_s: float | None = None
    """Prefill speed of the engine; None when recompute is not an option."""

    def __post_init__(self) -> None:
        if self.ttft_target_s <= 0:
            raise ConfigError(f"ControllerConfig.ttft_target_s must be positive, got {self.ttft_target_s}")
        if not self.profiles:
            raise ConfigError("ControllerConfig.profiles must name at least one level")
        if self.decode_bytes_per_s <= 0:
            raise ConfigError("ControllerConfig.decode_bytes_per_s must be positive")
        if self.recompute_tokens_per_s is not None and self.recompute_tokens_per_s <= 0:
            raise ConfigError("ControllerConfig.recompute_tokens_per_s must be positive or None")


@dataclass(frozen=True)
class ChunkSpec:
    """What the controller needs to know about a chunk."""

    elements: int
    """KV elements (layers x 2 x tokens x kv_heads x head_dim)."""
    tokens: int


@dataclass(frozen=True)
class Choice:
    """The decision for one chunk."""

    recompute: bool
    profile: LevelProfile | None
    est_seconds: float

    @property
    def codec(self) -> str | None:
        return self.profile.codec if self.profile else None

    @property
    def level(self) -> int | None:
        return self.profile.level if self.profile else None


@dataclass
class BandwidthEstimator:
    """Exponentially weighted throughput of recent transfers (bytes per second)."""

    initial: float
    weight: float = 0.3
    _value: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.initial <= 0 or not 0 < self.weight <= 1:
            raise ConfigError("BandwidthEstimator needs initial > 0 and 0 < weight <= 1")
        self._value = self.initial

    def observe(self, nbytes: int, seconds: float) -> None:
        """Fold in one finished transfer."""
        if seconds > 0 and nbytes > 0:
            self._value = (1 - self.weight) * self._value + self.weight * (nbytes / seconds)

    @property
    def bytes_per_s(self) -> float:
        return self._value


class LevelController:
    """Chooses, for each chunk, a level or recompute (see the module docstring)."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        # Best quality first; among equal quality, the smaller one.
        self._by_quality = sorted(config.profiles, key=lambda p: (p.quality, p.bits_per_element))
        self._smallest = min(config.profiles, key=lambda p: p.bits_per_element)

    def cost(self, chunk: ChunkSpec, profile: LevelProfile, bandwidth: float) -> float:
        """Seconds to fetch and decode ``chunk`` at ``profile``."""
        transfer = chunk.elements * profile.bits_per_element / 8 / bandwidth
        decode = chunk.elements * 2 / self.config.decode_bytes_per_s
        return transfer + decode

    def recompute_cost(self, chunk: ChunkSpec) -> float | None:
        rate = self.config.recompute_tokens_per_s
        return None if rate is None else chunk.tokens / rate

    def _cheapest(self, chunk: ChunkSpec, bandwidth: float) -> Choice:
        best = Choice(False, self._smallest, self.cost(chunk, self._smallest, bandwidth))
        rc = self.recompute_cost(chunk)
        if rc is not None and rc < best.est_seconds:
            return Choice(True, None, rc)
        return best

    def choose(self, chunk: ChunkSpec, bandwidth: float, budget_s: float, reserve_s: float = 0.0) -> Choice:
        """Best-quality choice for one chunk that fits ``budget_s`` after setting aside
        ``reserve_s`` for the chunks still to come; the cheapest option if none fits."""
        if bandwidth <= 0:
            raise ConfigError(f"bandwidth must be positive, got {bandwidth}")
        for profile in self._by_quality:
            t = self.cost(chunk, profile, bandwidth)
            if t + reserve_s <= budget_s:
                return Choice(False, profile, t)
        return self._cheapest(chunk, bandwidth)

    def plan(self, chunks: Sequence[ChunkSpec], bandwidth: float, elapsed_s: float = 0.0) -> list[Choice]:
        """Choices for ``chunks`` in fetch order, given the bandwidth estimate now."""
        budget = self.config.ttft_target_s - elapsed_s
        floor = [self._cheapest(c, bandwidth).est_seconds for c in chunks]
        remaining_floor = sum(floor)
        out = []
        for chunk, own_floor in zip(chunks, floor):
            remaining_floor -= own_floor
            choice = self.choose(chunk, bandwidth, budget, remaining_floor)
            out.append(choice)
            budget -= choice.est_seconds
        return out
