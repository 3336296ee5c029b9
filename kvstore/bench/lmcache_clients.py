"""LMCache's client classes as the LMCache peer worker drives them, and its JSON channel.

Runs in the peer virtualenv, imported by ``lmcache_worker.py`` and
``lmcache_findings.py`` (never by kvstore: see the worker's docstring):

* :func:`emit`: one JSON object on its own line of the real stdout; importing
  this module sends everything else written to stdout (LMCache's logging and
  printing) to stderr;
* :class:`TCPClient`: LMCache's ``LMCServerConnector`` for the raw-TCP server;
* :class:`MPClient`: a simulated engine worker of the multiprocess server.

LMCache is imported inside the methods, after the channel is set up.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from typing import Any

MIB = 1 << 20
# One value is one LMCache chunk: 8 KV heads x 128 dims x fp16 x (K, V) is
# 4 KiB per token and layer, so a 256-token chunk is 1 MiB per layer.
_HEADS = 8
_HEAD_DIM = 128
_BLOCK_TOKENS = 16
_HELLO_TOKEN = 9906
#: Source values (MP: chunk-sized block ranges) the workloads put in rotation.
SOURCE_SLOTS = 4

# Keep the JSON channel clean: LMCache and its dependencies log (and may
# print) freely; only _OUT writes to the real stdout.
_OUT = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
os.environ.setdefault("LMCACHE_DISABLE_BANNER", "1")
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")


def emit(obj: dict[str, Any]) -> None:
    _OUT.write(json.dumps(obj) + "\n")
    _OUT.flush()


def flush() -> None:
    """Flush what :func:`emit` wrote (at exit)."""
    _OUT.flush()


# --------------------------------------------------------------------------
# Raw-TCP server (lmcache_server) through LMCServerConnector
# --------------------------------------------------------------------------


class TCPClient:
    """LMCServerConnector plus the local CPU backend it allocates from."""

    def __init__(self, host: str, port: int, pool_bytes: int) -> None:
        import torch
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        config = LMCacheEngineConfig.from_legacy(chunk_size=256, backend="cpu")
        # Room for the source values plus the values being received.
        config.max_local_cpu_size = max(0.25, pool_bytes / (1 << 30))
        metadata = LMCacheMetadata(
            model_name="kvbench",
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.uint8,
            kv_shape=(1, 2, 256, 1, 1),
        )
        self.backend = LocalCPUBackend(config, metadata)
        self.loop = asyncio.new_event_loop()
        self.conn = LMCServerConnector(host, port, self.loop, self.backend)
        self.base = random.randrange(1 << 40, 1 << 48)

    def key(self, i: int) -> Any:
        import torch
        from lmcache.utils import CacheEngineKey

        return CacheEngineKey("kvbench", 1, 0, self.base + i, torch.uint8)

    def value(self, size: int) -> Any:
        """A memory object of ``size`` random bytes in LMCache's KV format."""
        import torch
        from lmcache.v1.memory_management import MemoryFormat

        if size % 512:
            raise ValueError(f"value size must be a multiple of 512 bytes, got {size}")
        obj = self.backend.allocate(
            torch.Size([2, 1, 256, size // 512]), torch.uint8, MemoryFormat.KV_2LTD
        )
        if obj is None:
            raise RuntimeError("LMCache local CPU backend could not allocate a value")
        obj.tensor.view(-1).copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))
        return obj

    def put(self, key: Any, obj: Any) -> None:
        self.loop.run_until_complete(self.conn.put(key, obj))

    def exists(self, key: Any) -> bool:
        return bool(self.loop.run_until_complete(self.conn.exists(key)))

    def get(self, key: Any) -> Any:
        return self.loop.run_until_complete(self.conn.get(key))

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


# --------------------------------------------------------------------------
# Multiprocess server (lmcache server) through its engine-driven client
# --------------------------------------------------------------------------


class MPClient:
    """One simulated engine worker of the MP server, sized for one value size.

    ``size`` bytes per chunk: the registered paged KV cache has ``size / 1 MiB``
    layers and ``slots`` chunk-sized block ranges; slot ``slots - 1`` is the
    scratch range gets are retrieved into.
    """

    # Instance ids are per process on the server side; a reused id with a
    # different KV layout is not re-checked there, so never reuse one.
    _next_instance = random.randrange(1 << 20, 1 << 30)

    def __init__(
        self,
        host: str,
        port: int,
        size: int,
        slots: int,
        timeout_s: float = 10.0,
        req_client: Any = None,
    ) -> None:
        import torch
        import zmq
        from lmcache.utils import EngineType
        from lmcache.v1.multiprocess.group_view import EngineGroupInfo
        from lmcache.v1.multiprocess.transfer_context import EngineDrivenTransferContext
        from lmcache.v1.multiprocess.transport.factory import RequestClientFactory

        self.timeout_s = timeout_s
        self._own_ctx = None
        if req_client is None:
            self._own_ctx = zmq.Context()
            self._own_ctx.setsockopt(zmq.LINGER, 0)
            req_client = RequestClientFactory.create(
                f"tcp://{host}:{port}", context=self._own_ctx
            )
        self.rc = req_client
        self.chunk = int(self.rc.get_chunk_size().result(timeout=timeout_s))
        per_layer = self.chunk * 2 * _HEADS * _HEAD_DIM * 2
        if size % per_layer:
            raise ValueError(
                f"MP value size must be a multiple of {per_layer} bytes "
                f"(one layer of a {self.chunk}-token chunk), got {size}"
            )
        self.layers = size // per_layer
        self.blocks_in_chunk = self.chunk // _BLOCK_TOKENS
        self.slots = slots
        num_blocks = self.blocks_in_chunk * slots
        self.kv = {
            f"layer.{i}": torch.randn(
                (2, num_blocks, _BLOCK_TOKENS, _HEADS, _HEAD_DIM), dtype=torch.float16
            )
            for i in range(self.layers)
        }
        MPClient._next_instance += 1
        self.instance_id = MPClient._next_instance
        self.model = f"kvbench-{size}"
        self.tc = EngineDrivenTransferContext(self.instance_id, self.rc)
        self.tc.register(
            self.kv,
            self.model,
            1,
            self.blocks_in_chunk,
            timeout_s,
            layout_hints={"kv_layout": "NHD"},
            engine_group_infos=[
                EngineGroupInfo(
                    engine_group_id=0,
                    layer_indices=tuple(range(self.layers)),
                    tokens_per_block=_BLOCK_TOKENS,
                )
            ],
            engine_type=EngineType.VLLM,
        )
        self.transfer = type(self.tc.engine_driven_context).__name__
        self.base = random.randrange(1 << 20, 1 << 30)
        self._rid = 0

    def _key(self, i: int, worker_id: int | None, request_id: str | None = None) -> Any:
        from lmcache.v1.multiprocess.custom_types import IPCCacheServerKey

        self._rid += 1
        return IPCCacheServerKey(
            model_name=self.model,
            world_size=1,
            worker_id=worker_id,
            num_kv_readers=1,
            token_ids=(self.base + i,) + (_HELLO_TOKEN,) * (self.chunk - 1),
            start=0,
            end=self.chunk,
            request_id=request_id or f"kvbench-{self.instance_id}-{self._rid}",
        )

    def blocks(self, slot: int) -> list[list[int]]:
        first = slot * self.blocks_in_chunk
        return [list(range(first, first + self.blocks_in_chunk))]

    def slot_bytes(self, slot: int) -> Any:
        import torch

        b = slot * self.blocks_in_chunk
        return torch.stack(
            [t[:, b : b + self.blocks_in_chunk].view(torch.int16) for t in self.kv.values()]
        )

    def zero_slot(self, slot: int) -> None:
        b = slot * self.blocks_in_chunk
        for t in self.kv.values():
            t[:, b : b + self.blocks_in_chunk].zero_()

    def store(self, i: int, slot: int) -> bool:
        key = self._key(i, 0)
        fut = self.tc.submit_store(
            key.request_id, key, self.kv, self.blocks(slot), None, self.blocks_in_chunk
        )
        ok = bool(fut.result(timeout=self.timeout_s))
        self.end_session(key.request_id)
        return ok

    def lookup(self, i: int) -> tuple[int, str]:
        """Chunks found for key ``i`` (0 or 1) and the session to retrieve in."""
        key = self._key(i, None)
        self.rc.lookup(key, 1).result(timeout=self.timeout_s)
        hit = self.rc.wait_prefetch_status(key.request_id, self.timeout_s).result(
            timeout=self.timeout_s + 1
        )
        return int(hit or 0), key.request_id

    def retrieve(self, i: int, slot: int, request_id: str) -> bool:
        # The retrieve belongs to the session the lookup opened.
        key = self._key(i, 0, request_id)
        fut = self.tc.submit_retrieve(
            request_id, key, self.kv, self.blocks(slot), None, self.blocks_in_chunk
        )
        return bool(fut.result(timeout=self.timeout_s))

    def get(self, i: int, slot: int) -> bool:
        hit, rid = self.lookup(i)
        ok = hit == 1 and self.retrieve(i, slot, rid)
        return ok

    def end_session(self, request_id: str) -> None:
        self.rc.end_session(request_id).result(timeout=self.timeout_s)

    def close(self) -> None:
        try:
            fut = self.tc.unregister()
            if fut is not None:
                fut.result(timeout=self.timeout_s)
        except Exception as exc:  # a wedged server never answers; still clean up here
            print(f"unregister failed: {exc!r}", file=sys.stderr)
        self.tc.close()
        if self._own_ctx is not None:
            self.rc.close()
            self._own_ctx.term()


