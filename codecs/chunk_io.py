"""Encode a KV chunk for the store, and decode what a tier hands back.

``encode_chunk`` returns the payload and its :class:`~kvstore.chunk.ChunkMeta`,
which names the codec, so any reader can decode it with ``decode_chunk``
without knowing how it was written.  Codec ``raw`` keeps the store's canonical
raw payload (the tensor's bytes, no header), so raw chunks stay readable by
code that never heard of codecs.
"""

from __future__ import annotations

import torch

from kvstore.chunk import CANONICAL_LAYOUT, ChunkMeta, checksum
from kvstore.codecs import codec_name_for_id, get_codec
from kvstore.codecs import format as fmt
from kvstore.codecs.tensor_bytes import bytes_to_tensor, tensor_to_bytes
from kvstore.errors import CodecError, InvalidArgument


def encode_chunk(
    tensor: torch.Tensor, codec: str = "cachegen", level: int | None = None, layout: str = CANONICAL_LAYOUT
) -> tuple[bytes, ChunkMeta]:
    """Encode ``tensor`` with ``codec`` at ``level`` (None: the codec's default).

    Returns the payload and the metadata to store next to it.
    """
    if tensor.dtype not in fmt.DTYPE_NAMES:
        raise InvalidArgument(f"cannot encode dtype {tensor.dtype}; use float16, bfloat16 or float32")
    if codec == "raw":
        payload = tensor_to_bytes(tensor)
        version = 1
    else:
        payload = get_codec(codec).encode(tensor, layout=layout, level=level)
        version = fmt.FORMAT_VERSION
    meta = ChunkMeta(
        nbytes=len(payload),
        checksum=checksum(payload),
        codec=codec,
        codec_version=version,
        dtype=fmt.DTYPE_NAMES[tensor.dtype],
        shape=tuple(int(d) for d in tensor.shape),
        layout=layout,
    )
    return payload, meta


def decode_chunk(
    meta: ChunkMeta, payload: bytes | bytearray | memoryview, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Decode a payload described by ``meta`` onto ``device``; CodecError if they disagree."""
    view = memoryview(payload).cast("B")
    if view.nbytes != meta.nbytes:
        raise CodecError(f"payload is {view.nbytes} bytes, metadata says {meta.nbytes}")
    dtypes = {name: dt for dt, name in fmt.DTYPE_NAMES.items()}
    if meta.dtype not in dtypes:
        raise CodecError(f"chunk dtype {meta.dtype} is not a KV dtype")
    dev = torch.device(device)
    if meta.codec == "raw":
        return bytes_to_tensor(view, dtypes[meta.dtype], meta.shape, dev)
    header, _ = fmt.unpack(view)
    name = codec_name_for_id(header.codec_id)
    if name != meta.codec or header.shape != meta.shape or header.dtype != dtypes[meta.dtype]:
        raise CodecError(
            f"payload header ({name}, {header.dtype}, {list(header.shape)}) does not match its metadata "
            f"({meta.codec}, {meta.dtype}, {list(meta.shape)})"
        )
    return get_codec(name).decode(view, dev)
