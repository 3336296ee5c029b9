"""Worker side of the vLLM connector: moves chunks between the paged KV and the store.

Runs in each vLLM worker process.  Per step:

* ``start_load_kv`` (before the forward pass): fetch the step's chunks in one
  batched get, check each (present, checksum, codec, shape, dtype) and scatter
  the needed tokens into the request's blocks.  A chunk that fails any check
  marks its blocks as failed (:meth:`WorkerSide.take_failed_blocks`); vLLM then
  recomputes from the first failed block (``kv_load_failure_policy:
  "recompute"``) or fails the request (``"fail"``).  Never wrong output: a
  failed chunk's tokens are never treated as computed.
* ``wait_for_save`` (after the forward pass): gather every chunk completed in
  this step into a CPU tensor and hand it to the :class:`Saver` thread.

Loads are synchronous and complete before the forward pass, so
``wait_for_layer_load`` and ``save_kv_layer`` have nothing to do: on CPU there
is no copy engine to overlap with, and a chunk holds all layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstore.chunk import DTYPE_SIZES
from kvstore.client import Client, Fetched
from kvstore.connectors.chunking import TokenChunker
from kvstore.connectors.paged import KVLayout, PagedKV, slot_mapping
from kvstore.connectors.saver import Saver
from kvstore.connectors.vllm.metadata import KVStoreConnectorMetadata, LoadSpec, SaveSpec
from kvstore.errors import CodecError, ConfigError, CorruptChunk, KVStoreError
from kvstore.keys import ChunkKey, LayoutFingerprint, Namespace

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadStats:
    chunks_loaded: int = 0
    tokens_loaded: int = 0
    chunks_failed: int = 0
    blocks_failed: int = 0


class WorkerSide:
    def __init__(
        self,
        client: Client,
        saver: Saver | None,
        *,
        namespace: Namespace,
        layout: LayoutFingerprint,
        chunker: TokenChunker,
        block_size: int,
    ) -> None:
        self._client = client
        self._saver = saver
        self._ns = namespace
        self._layout = layout
        self._fp = layout.digest
        self._chunker = chunker
        self._block_size = block_size
        self._paged: PagedKV | None = None
        self._failed: set[int] = set()
        self.stats = LoadStats()

    # -- setup ---------------------------------------------------------------------
    def register(self, layers: Sequence[torch.Tensor], kv_layout: KVLayout) -> None:
        paged = PagedKV.from_layers(layers, kv_layout)
        s = paged.shape
        want = self._layout
        got = (str(s.dtype).removeprefix("torch."), s.num_layers, s.num_kv_heads, s.head_dim)
        if got != (want.dtype, want.num_layers, want.num_kv_heads, want.head_dim) or s.block_size != self._block_size:
            raise ConfigError(
                f"kvstore: the engine's KV cache (dtype, layers, kv heads, head dim, block) = {got + (s.block_size,)} "
                f"differs from the model config {(want.dtype, want.num_layers, want.num_kv_heads, want.head_dim, self._block_size)}"
            )
        self._paged = paged

    @property
    def paged(self) -> PagedKV:
        if self._paged is None:
            raise ConfigError("kvstore: register_kv_caches was not called before a load or save")
        return self._paged

    def _key(self, digest: str) -> ChunkKey:
        return ChunkKey(self._ns, self._fp, digest)

    # -- loads ---------------------------------------------------------------------
    def load(self, meta: KVStoreConnectorMetadata) -> None:
        for spec in meta.loads:
            self._load_one(spec)

    def _fetch(self, keys: list[ChunkKey]) -> list[Fetched | None | KVStoreError]:
        """Every chunk, or the error that stopped it.  One batched get; if the
        batch fails on one corrupt chunk, the keys are fetched one by one so
        that good chunks before and after it still load."""
        try:
            return list(self._client.get_many(keys))
        except CorruptChunk:
            pass
        except KVStoreError as exc:
            return [exc] * len(keys)
        out: list[Fetched | None | KVStoreError] = []
        for key in keys:
            try:
                out.append(self._client.get(key))
            except KVStoreError as exc:
                out.append(exc)
        return out

    def _decode(self, got: Fetched | None | KVStoreError) -> torch.Tensor:
        if isinstance(got, KVStoreError):
            raise got
        if got is None:
            raise CorruptChunk("chunk is missing (evicted or never stored)")
        shape = self.paged.shape.chunk_shape(self._chunker.chunk_size)
        meta = got.meta
        if tuple(meta.shape) != shape or meta.dtype not in DTYPE_SIZES:
            raise CorruptChunk(f"chunk has shape {list(meta.shape)} {meta.dtype}, expected {list(shape)}")
        try:
            kv = got.tensor("cpu")
        except (ValueError, RuntimeError) as exc:  # a malformed payload the codec rejected
            raise CodecError(f"chunk cannot be decoded: {exc}") from exc
        if tuple(kv.shape) != shape:
            raise CorruptChunk(f"chunk decoded to shape {list(kv.shape)}, expected {list(shape)}")
        if kv.dtype != self.paged.shape.dtype:
            kv = kv.to(self.paged.shape.dtype)
        return kv

    def _load_one(self, spec: LoadSpec) -> None:
        keys = [self._key(d) for d in spec.digests]
        fetched = self._fetch(keys)
        paged = self.paged
        for i, got in enumerate(fetched):
            c0, c1 = self._chunker.span(spec.first_chunk + i)
            lo, hi = max(c0, spec.start), min(c1, spec.end)
            if lo >= hi:
                continue
            try:
                kv = self._decode(got)
                slots = slot_mapping(spec.block_ids, self._block_size, lo, hi)
                part = kv if (lo, hi) == (c0, c1) else kv[:, :, lo - c0 : hi - c0]
                paged.scatter(slots, part)
                self.stats.chunks_loaded += 1
                self.stats.tokens_loaded += hi - lo
            except KVStoreError as exc:
                blocks = spec.block_ids[lo // self._block_size : (hi - 1) // self._block_size + 1]
                self._failed.update(blocks)
                self.stats.chunks_failed += 1
                self.stats.blocks_failed += len(blocks)
                log.warning(
                    "kvstore: chunk %d of request %s (tokens %d-%d) not loaded, %d block(s) will be recomputed: %s",
                    spec.first_chunk + i, spec.req_id, lo, hi, len(blocks), exc,
                )

    def take_failed_blocks(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    # -- saves ---------------------------------------------------------------------
    def save(self, meta: KVStoreConnectorMetadata) -> None:
        if self._saver is None or not meta.saves:
            return
        for spec in meta.saves:
            self._save_one(spec)

    def _save_one(self, spec: SaveSpec) -> None:
        assert self._saver is not None
        paged = self.paged
        items: list[tuple[ChunkKey, torch.Tensor]] = []
        pin = paged.device.type == "cuda"
        last = None
        for i, digest in enumerate(spec.digests):
            start, end = self._chunker.span(spec.first_chunk + i)
            slots = slot_mapping(spec.block_ids, self._block_size, start, end)
            host = torch.empty(paged.shape.chunk_shape(end - start), dtype=paged.shape.dtype, pin_memory=pin)
            last = paged.gather_to_host(slots, host) or last
            items.append((self._key(digest), host))
        if last is not None:
            # Copies are stream-ordered: the last one done means all are.
            last.synchronize()
        self._saver.submit(items)

    def close(self) -> None:
        if self._saver is not None:
            self._saver.close()
        self._client.close()
