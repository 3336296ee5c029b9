"""Gather a chunk's KV out of an engine's paged buffers, and scatter it back.

Engines keep KV in *pages* (blocks) of ``block_size`` tokens; a request owns a
list of block ids, and token ``t`` of the request lives in slot
``block_ids[t // block_size] * block_size + t % block_size``.  kvstore keeps a
chunk in the canonical layout ``LKTHD`` (``[layers, 2, tokens, kv_heads,
head_dim]``, see :mod:`kvstore.chunk`).  :class:`PagedKV` moves between the two.

It works on per-layer *views* ``K[layer]`` and ``V[layer]`` of logical shape
``[num_blocks, kv_heads, block_size, head_dim]`` whatever the physical layout,
so one gather/scatter serves every engine:

* :attr:`KVLayout.CHANNELS`: each layer is ``[num_blocks, H, N, 2*D]`` (vLLM's
  standard per-layer view; flash-attn, triton, flashinfer on CUDA): a token's K is
  ``C[:D]`` and its V ``C[D:]``.
* :attr:`KVLayout.ROWS`: the same ``[num_blocks, H, N, 2*D]`` tensor, but the
  attention kernel reads each (block, head) page as ``[2*N, D]``: the first ``N``
  rows are K and the last ``N`` rows V (vLLM's CPU backend).
* :meth:`PagedKV.from_kv` takes separate K and V tensors of any stride
  (``[num_blocks, N, H, D]`` or ``[num_blocks, H, N, D]``) for other engines.

Two copy paths, chosen per call:

* block-aligned (the chunk starts on a block boundary and covers whole blocks,
  the common case: chunk 256, block 16/128): one ``index_select`` of whole
  blocks per layer and K/V, then a strided copy into the chunk.  Each block is
  one contiguous run of memory, so this is close to a memory copy;
* any other slot list: advanced indexing by ``(slot // N, slot % N)``.

Both run on CPU and CUDA (torch kernels; on CUDA they are device-to-device
gathers into a staging buffer, then one copy to pinned host memory, see
:meth:`PagedKV.gather_to_host`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvstore.errors import InvalidArgument


class KVLayout(enum.Enum):
    """How K and V share the last dimension of an engine's per-layer tensor."""

    CHANNELS = "channels"
    ROWS = "rows"


@dataclass(frozen=True, slots=True)
class PagedShape:
    """Shape of the paged KV of one model shard."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def chunk_shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        """Canonical ``LKTHD`` shape of ``tokens`` tokens."""
        return (self.num_layers, 2, tokens, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def slot_mapping(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots (int64, CPU) of tokens ``[start, end)`` of a request owning ``block_ids``."""
    if not 0 <= start <= end:
        raise InvalidArgument(f"token range [{start}, {end}) is invalid")
    if end > len(block_ids) * block_size:
        raise InvalidArgument(
            f"token range [{start}, {end}) needs {-(-end // block_size)} blocks, the request has {len(block_ids)}"
        )
    pos = torch.arange(start, end, dtype=torch.int64)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
    return blocks[pos // block_size] * block_size + pos % block_size


class PagedKV:
    """Per-layer K/V views of an engine's paged KV cache; gathers and scatters chunks."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """``keys[l]`` / ``values[l]``: views of logical shape ``[num_blocks, H, N, D]``."""
        if not keys or len(keys) != len(values):
            raise InvalidArgument("PagedKV needs the same non-zero number of K and V layers")
        first = keys[0]
        if first.dim() != 4:
            raise InvalidArgument(f"K/V views must be [num_blocks, H, N, D], got shape {tuple(first.shape)}")
        for i, t in enumerate([*keys, *values]):
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise InvalidArgument(
                    f"all K/V views must share shape, dtype and device; view {i} has "
                    f"{tuple(t.shape)} {t.dtype} {t.device}, the first {tuple(first.shape)} {first.dtype} {first.device}"
                )
        nb, h, n, d = (int(x) for x in first.shape)
        self._k = list(keys)
        self._v = list(values)
        self.shape = PagedShape(len(keys), nb, n, h, d, first.dtype)
        self.device = first.device

    # -- construction --------------------------------------------------------------
    @classmethod
    def from_layers(cls, layers: Sequence[torch.Tensor], layout: KVLayout) -> PagedKV:
        """From vLLM-style per-layer tensors ``[num_blocks, H, N, 2*D]`` (see :class:`KVLayout`)."""
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for i, t in enumerate(layers):
            if t.dim() != 4 or t.shape[-1] % 2:
                raise InvalidArgument(
                    f"layer {i}: expected a [num_blocks, kv_heads, block_size, 2*head_dim] tensor, got {tuple(t.shape)}"
                )
            nb, h, n, c = (int(x) for x in t.shape)
            d = c // 2
            if layout is KVLayout.CHANNELS:
                keys.append(t[..., :d])
                values.append(t[..., d:])
            else:
                # The page of (block, head) is read as [2N, D]: needs N and C dense.
                if t.stride(3) != 1 or t.stride(2) != c:
                    raise InvalidArgument(
                        f"layer {i}: the rows layout needs each (block, head) page dense, got strides {t.stride()}"
                    )
                rows = t.as_strided((nb, h, 2 * n, d), (t.stride(0), t.stride(1), d, 1))
                keys.append(rows[:, :, :n])
                values.append(rows[:, :, n:])
        return cls(keys, values)

    @classmethod
    def from_kv(cls, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *, heads_first: bool) -> PagedKV:
        """From separate K and V tensors per layer: ``[num_blocks, H, N, D]`` when
        ``heads_first``, else ``[num_blocks, N, H, D]``."""
        if heads_first:
            return cls(keys, values)
        return cls([t.transpose(1, 2) for t in keys], [t.transpose(1, 2) for t in values])

    # -- copies ----------------------------------------------------------------------
    def _check(self, slots: torch.Tensor, chunk: torch.Tensor | None) -> None:
        if slots.dim() != 1 or slots.dtype != torch.int64:
            raise InvalidArgument(f"slots must be a 1-D int64 tensor, got {slots.dtype} {tuple(slots.shape)}")
        if chunk is not None:
            want = self.shape.chunk_shape(int(slots.numel()))
            if tuple(chunk.shape) != want:
                raise InvalidArgument(f"chunk has shape {tuple(chunk.shape)}, expected {want} (LKTHD)")
            if chunk.dtype != self.shape.dtype:
                raise InvalidArgument(f"chunk has dtype {chunk.dtype}, the paged KV {self.shape.dtype}")

    def _aligned_blocks(self, slots: torch.Tensor) -> torch.Tensor | None:
        """The block ids when ``slots`` are whole blocks in order, else None."""
        n = self.shape.block_size
        t = int(slots.numel())
        if t == 0 or t % n:
            return None
        s = slots.to("cpu") if slots.device.type != "cpu" else slots
        grid = s.view(-1, n)
        starts = grid[:, 0]
        if bool((starts % n).ne(0).any()) or not bool(grid.eq(starts[:, None] + torch.arange(n)).all()):
            return None
        return (starts // n).to(self.device)

    def gather(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The KV of ``slots`` as an ``LKTHD`` chunk (into ``out`` when given, same device)."""
        self._check(slots, out)
        t = int(slots.numel())
        if out is None:
            out = torch.empty(self.shape.chunk_shape(t), dtype=self.shape.dtype, device=self.device)
        blocks = self._aligned_blocks(slots)
        if blocks is not None:
            n, h, d = self.shape.block_size, self.shape.num_kv_heads, self.shape.head_dim
            # Whole blocks into a [nblk, H, N, D] staging buffer (each (block,
            # head) page is one dense run on every backend we know), then one
            # strided copy into the chunk's [tokens, H, D]: two passes, no
            # per-token indexing.  index_select straight into the transposed
            # output is pathological on CPU (milliseconds per block).
            staging = torch.empty((int(blocks.numel()), h, n, d), dtype=self.shape.dtype, device=self.device)
            for layer in range(self.shape.num_layers):
                for kv, views in ((0, self._k), (1, self._v)):
                    torch.index_select(views[layer], 0, blocks, out=staging)
                    out[layer, kv].view(-1, n, h, d).copy_(staging.transpose(1, 2))
            return out
        idx = slots.to(self.device)
        blk = idx // self.shape.block_size
        off = idx % self.shape.block_size
        for layer in range(self.shape.num_layers):
            out[layer, 0] = self._k[layer][blk, :, off]
            out[layer, 1] = self._v[layer][blk, :, off]
        return out

    def scatter(self, slots: torch.Tensor, chunk: torch.Tensor) -> None:
        """Write an ``LKTHD`` chunk (any device) into ``slots``."""
        self._check(slots, chunk)
        if chunk.device != self.device:
            chunk = chunk.to(self.device, non_blocking=True)
        blocks = self._aligned_blocks(slots)
        if blocks is not None:
            n, h, d = self.shape.block_size, self.shape.num_kv_heads, self.shape.head_dim
            for layer in range(self.shape.num_layers):
                for kv, views in ((0, self._k), (1, self._v)):
                    views[layer].index_copy_(0, blocks, chunk[layer, kv].view(-1, n, h, d).transpose(1, 2))
            return
        idx = slots.to(self.device)
        blk = idx // self.shape.block_size
        off = idx % self.shape.block_size
        for layer in range(self.shape.num_layers):
            self._k[layer][blk, :, off] = chunk[layer, 0]
            self._v[layer][blk, :, off] = chunk[layer, 1]

    def gather_to_host(
        self, slots: torch.Tensor, host: torch.Tensor, staging: torch.Tensor | None = None
    ) -> torch.cuda.Event | None:
        """Gather into ``host`` (a CPU tensor; pinned for an asynchronous copy).

        On CUDA the gather runs on the current stream into ``staging`` (a device
        tensor of the chunk's shape, allocated when None) and the device-to-host
        copy is queued behind it; the returned event completes when ``host``
        holds the data.  On CPU the gather writes ``host`` directly and returns None.
        """
        if self.device.type != "cuda":
            self.gather(slots, host)
            return None
        staged = self.gather(slots, staging)
        host.copy_(staged, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return event
