"""The level controller: scenarios at a few bandwidths and targets."""

from __future__ import annotations

import pytest

from kvstore.codecs.controller import (
    DEFAULT_PROFILES,
    BandwidthEstimator,
    ChunkSpec,
    ControllerConfig,
    LevelController,
)
from kvstore.errors import ConfigError

# One 256-token chunk of SmolLM2 KV: 30 layers x 2 x 256 x 3 x 64.
CHUNK = ChunkSpec(elements=30 * 2 * 256 * 3 * 64, tokens=256)


def test_plenty_of_bandwidth_gets_the_best_level() -> None:
    ctl = LevelController(ControllerConfig(ttft_target_s=1.0))
    plan = ctl.plan([CHUNK] * 8, bandwidth=10e9)
    assert all(c.level == 0 and not c.recompute for c in plan)


def test_scarce_bandwidth_steps_down_and_meets_the_target() -> None:
    ctl = LevelController(ControllerConfig(ttft_target_s=0.5))
    bw = 12.5e6  # 100 Mbit/s
    plan = ctl.plan([CHUNK] * 8, bandwidth=bw)
    levels = [c.level for c in plan]
    assert all(lv is not None and lv > 0 for lv in levels)
    assert sum(c.est_seconds for c in plan) <= 0.5
    # Earlier chunks never get a worse level than later ones (budget spent front to back).
    assert levels == sorted(levels, key=lambda lv: -1 if lv is None else lv) or len(set(levels)) <= 2


def test_hopeless_bandwidth_recomputes_when_prefill_is_faster() -> None:
    ctl = LevelController(ControllerConfig(ttft_target_s=0.1, recompute_tokens_per_s=20000))
    plan = ctl.plan([CHUNK] * 4, bandwidth=1e6)
    assert all(c.recompute and c.codec is None for c in plan)


def test_without_recompute_the_smallest_level_is_the_fallback() -> None:
    ctl = LevelController(ControllerConfig(ttft_target_s=0.01))
    choice = ctl.choose(CHUNK, bandwidth=1e6, budget_s=0.01)
    smallest = min(DEFAULT_PROFILES, key=lambda p: p.bits_per_element)
    assert choice.profile == smallest and not choice.recompute


def test_bandwidth_estimator_tracks_recent_transfers() -> None:
    est = BandwidthEstimator(initial=1e9, weight=0.5)
    est.observe(100_000_000, 1.0)
    assert est.bytes_per_s == pytest.approx(0.55e9)
    est.observe(0, 0.0)  # ignored
    assert est.bytes_per_s == pytest.approx(0.55e9)


def test_config_is_validated_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match="ttft_target_s"):
        ControllerConfig(ttft_target_s=0)
    with pytest.raises(ConfigError, match="recompute_tokens_per_s"):
        ControllerConfig(ttft_target_s=1, recompute_tokens_per_s=-1)
