"""What the scheduler-side connector tells the workers for one step.

Small plain dataclasses (vLLM ships them to worker processes with the
scheduler output).  Chunks are named by their token digests only; each worker
adds the namespace and its own shard's layout fingerprint to make the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(slots=True)
class LoadSpec:
    """Load tokens ``[start, end)`` of a request from chunks ``first_chunk ...``."""

    req_id: str
    digests: list[str]
    first_chunk: int
    start: int
    end: int
    block_ids: list[int]


@dataclass(slots=True)
class SaveSpec:
    """Save chunks ``first_chunk ... first_chunk + len(digests) - 1`` of a request."""

    req_id: str
    digests: list[str]
    first_chunk: int
    block_ids: list[int]


@dataclass(slots=True)
class KVStoreConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]  # vLLM is untyped here
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
