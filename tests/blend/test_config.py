"""BlendConfig validation: each bad field is named."""

from __future__ import annotations

from typing import Any

import pytest

from kvstore.blend import BlendConfig
from kvstore.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ratio": 1.5}, "blend.ratio"),
        ({"ratio": -0.1}, "blend.ratio"),
        ({"ratio": True}, "blend.ratio"),
        ({"check_layers": [1]}, "blend.check_layers"),
        ({"check_layers": (3, 1)}, "blend.check_layers"),
        ({"check_layers": (1, 1)}, "blend.check_layers"),
        ({"check_layers": (-1,)}, "blend.check_layers"),
        ({"check_layers": ()}, "blend.check_layers"),  # recompute requested with no check layer
        ({"separator": (1, -2)}, "blend.separator"),
        ({"separator": [1]}, "blend.separator"),
        ({"min_segment_tokens": 0}, "blend.min_segment_tokens"),
        ({"prefetch_layers": 0}, "blend.prefetch_layers"),
    ],
)
def test_bad_fields_are_named(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        BlendConfig(**kwargs)


def test_ratio_schedule_narrows_to_the_ratio() -> None:
    assert BlendConfig().ratio_at(0) == pytest.approx(0.15)
    cfg = BlendConfig(ratio=0.04, check_layers=(1, 3))
    assert cfg.ratio_at(0) == pytest.approx(0.2)
    assert cfg.ratio_at(1) == pytest.approx(0.04)
    assert BlendConfig(ratio=0.0, check_layers=()).ratio == 0.0  # naive reuse is allowed
