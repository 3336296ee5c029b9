"""Tiers, and the one registry that builds them from config.

Implementations are imported lazily: a host without CUDA never imports the
GPU tier's dependencies, one without Redis never imports redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvstore.errors import ConfigError
from kvstore.tiers.base import Tier, TierCounters, TierStats

if TYPE_CHECKING:
    from kvstore.config import TierConfig

__all__ = ["Tier", "TierCounters", "TierStats", "make_tier", "TIER_KINDS"]

TIER_KINDS = ("gpu", "cpu", "disk", "redis", "peer")


def make_tier(cfg: TierConfig) -> Tier:
    """Build the tier ``cfg`` describes."""
    if cfg.kind == "cpu":
        from kvstore.tiers.cpu import CpuTier, CpuTierConfig

        return CpuTier(cfg.name, CpuTierConfig(capacity_bytes=cfg.capacity_bytes))
    if cfg.kind == "gpu":
        from kvstore.tiers.gpu import GpuTier, GpuTierConfig

        return GpuTier(cfg.name, GpuTierConfig(capacity_bytes=cfg.capacity_bytes))
    if cfg.kind == "disk":
        from kvstore.tiers.disk import DiskTier
        from kvstore.tiers.disk_config import DiskTierConfig

        assert cfg.path is not None  # checked by TierConfig
        return DiskTier(cfg.name, DiskTierConfig(path=cfg.path, capacity_bytes=cfg.capacity_bytes))
    if cfg.kind == "redis":
        from kvstore.tiers.redis import RedisTier, RedisTierConfig

        assert cfg.url is not None  # checked by TierConfig
        options: dict[str, Any] = {
            "key_prefix": cfg.key_prefix, "ttl_s": cfg.ttl_s, "part_bytes": cfg.part_bytes,
            "max_connections": cfg.max_connections, "timeout_s": cfg.timeout_s,
            "tls_ca": cfg.tls_ca, "tls_cert": cfg.tls_cert, "tls_key": cfg.tls_key,
        }
        try:
            rcfg = RedisTierConfig(url=cfg.url, **_set(options))
        except ConfigError as exc:
            raise ConfigError(f"tiers.{cfg.name}: {exc}") from None
        return RedisTier(cfg.name, rcfg)
    if cfg.kind == "peer":
        from kvstore.tiers.peer import PeerTier, PeerTierConfig

        assert cfg.url is not None  # checked by TierConfig
        options = {
            "token_file": cfg.token_file, "timeout_s": cfg.timeout_s,
            "tls_ca": cfg.tls_ca, "tls_cert": cfg.tls_cert, "tls_key": cfg.tls_key,
        }
        try:
            pcfg = PeerTierConfig(url=cfg.url, **_set(options))
        except ConfigError as exc:
            raise ConfigError(f"tiers.{cfg.name}: {exc}") from None
        return PeerTier(cfg.name, pcfg)
    raise ConfigError(
        f"tiers.{cfg.name}.kind {cfg.kind!r} is not available in this build; available: {', '.join(TIER_KINDS)}"
    )


def _set(options: dict[str, Any]) -> dict[str, Any]:
    """The options a config file set (None = keep the tier's default); the tier's config validates them."""
    return {k: v for k, v in options.items() if v is not None}
