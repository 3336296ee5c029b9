"""kvstore as a vLLM KV connector (needs vLLM; the rest of kvstore.connectors does not).

``kv_connector_module_path: "kvstore.connectors.vllm"`` with
``kv_connector: "KVStoreConnector"``; see docs/vllm.md.
"""

from kvstore.connectors.vllm.config import ConnectorConfig
from kvstore.connectors.vllm.connector import KVStoreConnector

__all__ = ["ConnectorConfig", "KVStoreConnector"]
