"""What crosses a client's API: keys, values put (tensors and bytes <->
chunk payloads), and chunks fetched.

A tensor travels as its bytes (C order) with dtype and shape in the chunk
metadata, so any reader rebuilds it exactly; bfloat16 and the float8 types
round-trip bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.chunk import CANONICAL_LAYOUT, DTYPE_SIZES, Chunk, ChunkMeta, checksum
from kvstore.errors import CorruptChunk, InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.tiers.memory import as_uint8_tensor, tensor_view

# A Chunk carries an already encoded payload with its metadata (codec, shape).
Value = bytes | bytearray | memoryview | torch.Tensor | Chunk
#: A key as clients take it: a ChunkKey or its string form.
KeyLike = ChunkKey | str


def key_text(key: KeyLike) -> str:
    """The key's canonical string form (checked)."""
    if isinstance(key, ChunkKey):
        return str(key)
    if isinstance(key, str):
        return str(ChunkKey.parse(key))
    raise InvalidArgument(f"a key must be a ChunkKey or its string form, not {type(key).__name__}")


@dataclass(frozen=True, slots=True)
class Fetched:
    """A chunk fetched from the daemon: metadata and payload bytes."""

    meta: ChunkMeta
    data: memoryview

    def tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return to_tensor(self.meta, self.data, device)


def fetched(meta: ChunkMeta, buf: memoryview, key: str) -> Fetched:
    """The chunk received for ``key``, once its bytes match ``meta.checksum``;
    raises CorruptChunk if they do not."""
    if checksum(buf) != meta.checksum:
        raise CorruptChunk(f"chunk {key} arrived corrupted (checksum mismatch)")
    return Fetched(meta, buf)


def copy_into(out: torch.Tensor, got: Fetched) -> None:
    """Copy a fetched chunk's bytes into ``out`` (contiguous, CPU); InvalidArgument if it has too little room."""
    room = out.numel() * out.element_size()
    if got.meta.nbytes > room:
        raise InvalidArgument(f"output has room for {room} bytes, the chunk has {got.meta.nbytes}")
    if got.meta.nbytes:
        out.reshape(-1).view(torch.uint8)[: got.meta.nbytes].copy_(torch.frombuffer(got.data, dtype=torch.uint8))


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
    """Rebuild the tensor a raw payload holds.  Shape () is a 0-d tensor when the
    payload is one element of a dtype other than uint8; otherwise (plain bytes
    are uint8 with shape ()) the payload comes back flat."""
    if meta.codec != "raw":
        from kvstore.codecs import decode_chunk  # lazy: codecs pull in heavier code

        return decode_chunk(meta, memoryview(data), device=device)  # type: ignore[no-any-return]
    flat = as_uint8_tensor(memoryview(data))
    size = DTYPE_SIZES[meta.dtype]
    scalar = not meta.shape and meta.dtype != "uint8" and meta.nbytes == size
    shape = meta.shape if meta.shape or scalar else (meta.nbytes // size,)
    t = flat.view(torch_dtype(meta.dtype)).reshape(shape)
    return t.to(device) if torch.device(device).type != "cpu" else t
