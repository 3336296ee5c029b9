"""Tensors and bytes <-> chunk payloads.

A tensor travels as its bytes (C order) with dtype and shape in the chunk
metadata, so any reader rebuilds it exactly; bfloat16 and the float8 types
round-trip bit for bit.
"""

from __future__ import annotations

import torch

from kvstore.chunk import CANONICAL_LAYOUT, DTYPE_SIZES, Chunk, ChunkMeta, checksum
from kvstore.errors import InvalidArgument
from kvstore.tiers.memory import as_uint8_tensor, tensor_view

# A Chunk carries an already encoded payload with its metadata (codec, shape).
Value = bytes | bytearray | memoryview | torch.Tensor | Chunk


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise InvalidArgument(f"tensors of dtype {name} are not supported; use one of {sorted(DTYPE_SIZES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise InvalidArgument(f"dtype {name!r} is not available in this torch build")
    return dt


def to_payload(
    value: Value, *, layout: str = CANONICAL_LAYOUT, with_checksum: bool = True
) -> tuple[ChunkMeta, memoryview]:
    """Metadata and a byte view of ``value`` (a CPU copy for device tensors).

    ``with_checksum=False`` leaves the checksum 0, for paths where the daemon
    computes it (shared memory)."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        view = tensor_view(t)
        meta = ChunkMeta(
            nbytes=view.nbytes,
            checksum=checksum(view) if with_checksum else 0,
            dtype=dtype_name(t.dtype),
            shape=tuple(int(d) for d in t.shape),
            layout=layout,
        )
        return meta, view
    if isinstance(value, Chunk):
        return value.meta, value.payload.cast("B")
    if isinstance(value, bytes | bytearray | memoryview):
        view = memoryview(value).cast("B")
        return ChunkMeta(nbytes=view.nbytes, checksum=checksum(view) if with_checksum else 0), view
    raise InvalidArgument(f"a value must be bytes, bytearray, memoryview, a torch.Tensor or a Chunk, not {type(value).__name__}")


def to_tensor(meta: ChunkMeta, data: bytes | bytearray | memoryview, device: str | torch.device = "cpu") -> torch.Tensor:
    """Rebuild the tensor a raw payload holds (shape () with dtype uint8 = plain bytes)."""
    if meta.codec != "raw":
        from kvstore.codecs import decode_chunk  # lazy: codecs pull in heavier code

        return decode_chunk(meta, memoryview(data), device=device)  # type: ignore[no-any-return]
    flat = as_uint8_tensor(memoryview(data))
    shape = meta.shape or (meta.nbytes // DTYPE_SIZES[meta.dtype],)
    t = flat.view(torch_dtype(meta.dtype)).reshape(shape)
    return t.to(device) if torch.device(device).type != "cpu" else t
