"""kv_connector_extra_config is validated at the edge, errors naming the field."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def test_defaults_and_sizes() -> None:
    from kvstore.connectors.vllm.config import ConnectorConfig

    cfg = ConnectorConfig.from_extra({"embedded_capacity": "64MiB", "codec": "cachegen", "codec_level": 2})
    assert cfg.embedded_capacity == 64 << 20 and cfg.chunk_size == 256 and cfg.codec == "cachegen"
    assert cfg.backlog_policy(producer_only=True) == "block"
    assert cfg.backlog_policy(producer_only=False) == "drop"
    assert str(cfg.namespace_for("/tmp/models/SmolLM2 135M")) == "default/tmp/models/SmolLM2-135M"
    assert str(ConnectorConfig(namespace="acme/llama").namespace_for("x")) == "acme/llama"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"chunk_size": 8}, "chunk_size"),
        ({"codec": "gzip"}, "codec"),
        ({"address": "nohost"}, "address"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"shm": "yes"}, "shm"),
        ({"save_backlog": "wait"}, "save_backlog"),
        ({"namespace": "no-slash"}, "namespace"),
        ({"embedded": "true"}, "embedded"),
        ({"chunksize": 256}, "unknown field"),
    ],
)
def test_bad_values_name_the_field(extra: dict[str, object], field: str) -> None:
    from kvstore.connectors.vllm.config import ConnectorConfig
    from kvstore.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        ConnectorConfig.from_extra(extra)
