"""``KVStoreConnector``: kvstore as a vLLM (v1) KV connector.

Load it with::

    --kv-transfer-config '{"kv_connector": "KVStoreConnector",
                           "kv_connector_module_path": "kvstore.connectors.vllm",
                           "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"address": "127.0.0.1:51061"}}'

vLLM builds one instance per process and role: the scheduler-side one
(:mod:`.scheduler`) decides what to load and save, the worker-side one
(:mod:`.worker`) moves the bytes.  This class only dispatches to them.

Roles: ``kv_producer`` saves and never loads (a prefill engine),
``kv_consumer`` loads and never saves (a decode engine), ``kv_both`` does both
(prefix reuse across engines and restarts).  Options: see
:class:`~kvstore.connectors.vllm.config.ConnectorConfig` and docs/vllm.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvstore.client import Client
from kvstore.connectors.chunking import TokenChunker
from kvstore.connectors.embedded import EmbeddedDaemon
from kvstore.connectors.paged import KVLayout
from kvstore.connectors.saver import Saver
from kvstore.connectors.vllm.config import ConnectorConfig
from kvstore.connectors.vllm.metadata import KVStoreConnectorMetadata
from kvstore.connectors.vllm.scheduler import SchedulerSide
from kvstore.connectors.vllm.worker import WorkerSide
from kvstore.errors import ConfigError
from kvstore.keys import LayoutFingerprint

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

#: Attention backends whose per-layer view is [blocks, heads, block_size, 2*head_dim]
#: with K = C[:D] and V = C[D:] per token.
_CHANNEL_BACKENDS = {"FLASH_ATTN", "TRITON_ATTN", "FLASHINFER", "FLEX_ATTENTION", "ROCM_ATTN", "ROCM_AITER_FA"}
_ROW_BACKENDS = {"CPU_ATTN"}


def model_layout(vllm_config: VllmConfig, chunk_size: int, tp_rank: int) -> LayoutFingerprint:
    """The layout fingerprint of one shard, from the model config (both sides agree)."""
    from vllm.utils.torch_utils import get_kv_cache_torch_dtype

    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    dtype = get_kv_cache_torch_dtype(vllm_config.cache_config.cache_dtype, mc.dtype)
    return LayoutFingerprint(
        dtype=str(dtype).removeprefix("torch."),
        num_layers=mc.get_num_layers(pc),
        num_kv_heads=mc.get_num_kv_heads(pc),
        head_dim=mc.get_head_size(),
        tp_rank=tp_rank,
        tp_size=pc.tensor_parallel_size,
        chunk_size=chunk_size,
    )


def _backend_layout(vllm_config: VllmConfig, layer_names: list[str]) -> KVLayout:
    ctx = vllm_config.compilation_config.static_forward_context
    names = set()
    for name in layer_names:
        backend = getattr(ctx.get(name), "attn_backend", None)
        names.add(backend.get_name() if backend is not None else "unknown")
    if names <= _ROW_BACKENDS:
        return KVLayout.ROWS
    if names <= _CHANNEL_BACKENDS:
        return KVLayout.CHANNELS
    raise ConfigError(
        f"kvstore: attention backend(s) {sorted(names)} are not supported by KVStoreConnector; "
        f"supported: {sorted(_ROW_BACKENDS | _CHANNEL_BACKENDS)}"
    )


def _layer_index(name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return int(extract_layer_index(name))


class KVStoreConnector(KVConnectorBase_V1):  # type: ignore[misc]  # vLLM is untyped here
    """kvstore behind vLLM's ``KVConnectorBase_V1``; see the module docstring."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        tc = self._kv_transfer_config
        cfg = ConnectorConfig.from_extra(tc.kv_connector_extra_config)
        self._cfg = cfg
        self._loads = bool(tc.is_kv_consumer)
        self._saves = bool(tc.is_kv_producer)
        self._block_size = int(vllm_config.cache_config.block_size)
        served = vllm_config.model_config.served_model_name
        model = served[0] if isinstance(served, list) else (served or vllm_config.model_config.model)
        namespace = cfg.namespace_for(str(model))
        chunker = TokenChunker(cfg.chunk_size)
        self._embedded: EmbeddedDaemon | None = None
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise ConfigError("kvstore: pipeline parallelism is not supported by KVStoreConnector")
        if role == KVConnectorRole.SCHEDULER:
            if cfg.embedded:
                host, _, port = cfg.address.rpartition(":")
                self._embedded = EmbeddedDaemon(host, int(port), cfg.embedded_capacity)
            client = Client(cfg.address, token=cfg.token, timeout_s=cfg.lookup_timeout_s, retries=1, shm=False)
            self._scheduler = SchedulerSide(
                client,
                namespace=namespace,
                layout=model_layout(vllm_config, cfg.chunk_size, 0),
                chunker=chunker,
                block_size=self._block_size,
                loads=self._loads,
                saves=self._saves,
                save_decode_tokens=cfg.save_decode_tokens,
                wait_for_producer_s=cfg.wait_for_producer_s,
            )
            if self._loads and tc.kv_load_failure_policy != "recompute":
                log.warning(
                    "kvstore: kv_load_failure_policy is %r: a chunk that fails to load fails its request. "
                    "Set \"kv_load_failure_policy\": \"recompute\" to recompute those tokens instead.",
                    tc.kv_load_failure_policy,
                )
            log.info(
                "kvstore: connector on %s%s, namespace %s, chunk %d, codec %s, role %s",
                cfg.address, " (embedded)" if cfg.embedded else "", namespace, cfg.chunk_size, cfg.codec, tc.kv_role,
            )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            client = Client(cfg.address, token=cfg.token, timeout_s=cfg.timeout_s, shm=cfg.shm)
            saver = None
            if self._saves:
                saver = Saver(
                    client.put_many,
                    codec=cfg.codec,
                    level=cfg.codec_level,
                    max_pending_bytes=cfg.max_pending_save_bytes,
                    backlog=cfg.backlog_policy(producer_only=not self._loads),
                )
            self._worker = WorkerSide(
                client,
                saver,
                namespace=namespace,
                layout=model_layout(vllm_config, cfg.chunk_size, get_tensor_model_parallel_rank()),
                chunker=chunker,
                block_size=self._block_size,
            )

    # -- helpers ----------------------------------------------------------------------
    def _sched(self) -> SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError("kvstore: scheduler-side method called on a worker-side connector")
        return self._scheduler

    def _work(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("kvstore: worker-side method called on a scheduler-side connector")
        return self._worker

    def _meta(self) -> KVStoreConnectorMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata):
            raise TypeError(f"kvstore: unexpected connector metadata {type(meta).__name__}")
        return meta

    # -- worker side ------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_index)
        layout = _backend_layout(self._vllm_config, names)
        self._work().register([kv_caches[n] for n in names], layout)
        log.info("kvstore: registered %d layers, %s layout", len(names), layout.value)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self._loads:
            self._work().load(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv, before the forward pass

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # a chunk holds all layers: saved once per step in wait_for_save

    def wait_for_save(self) -> None:
        if self._saves and self.has_connector_metadata():
            self._work().save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # no asynchronous loads, and saves never hold blocks

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().take_failed_blocks() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
            stats = self._worker.stats
            log.info(
                "kvstore: worker done: %d chunks loaded (%d tokens), %d failed",
                stats.chunks_loaded, stats.tokens_loaded, stats.chunks_failed,
            )
        if self._scheduler is not None:
            self._scheduler.close()
        if self._embedded is not None:
            self._embedded.close()
            self._embedded = None

    # -- scheduler side ---------------------------------------------------------------
    def on_new_request(self, request: Request) -> None:
        self._sched().track(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._sched().num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._sched().after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched().build_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().finished(request)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # saves copy the KV out in the step that completes a chunk
