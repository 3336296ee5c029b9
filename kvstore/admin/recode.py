"""Re-encode one chunk's payload with another codec or level (the Admin ``Recode``).

Pure CPU work on bytes, safe to run in a worker thread: the daemon decodes
the stored payload by the codec its metadata names and encodes the tensor
again (:func:`kvstore.codecs.encode_chunk` / ``decode_chunk``).  A chunk is
left as it is when it is in that codec and level already.
"""

from __future__ import annotations

from kvstore.chunk import ChunkMeta
from kvstore.codecs import format as fmt
from kvstore.codecs import get_codec
from kvstore.codecs.chunk_io import decode_chunk, encode_chunk
from kvstore.errors import CodecError


def target_level(codec: str, level: int | None) -> int:
    """The level ``codec`` will use; InvalidArgument for an unknown codec or level."""
    return int(get_codec(codec).level_or_default(level))


def current_level(meta: ChunkMeta, payload: memoryview) -> int:
    """The level a stored payload was encoded at (raw: 0)."""
    if meta.codec == "raw":
        return 0
    header, _ = fmt.unpack(payload)
    return int(header.level)


def recode(meta: ChunkMeta, payload: memoryview, codec: str, level: int) -> tuple[bytes, ChunkMeta] | None:
    """The payload encoded with ``codec`` at ``level`` and its metadata, or None
    when it is so already.  Raises CodecError when the payload cannot be
    decoded and InvalidArgument when the codec cannot take the tensor."""
    if meta.codec == codec and current_level(meta, payload) == level:
        return None
    tensor = decode_chunk(meta, payload)
    payload_out, meta_out = encode_chunk(tensor, codec, level, layout=meta.layout)
    if meta_out.codec != codec:
        raise CodecError(f"encoder produced {meta_out.codec!r}, not {codec!r}")
    return payload_out, meta_out
