"""KV codecs: one interface, one registry, one wire format.

``get_codec(name)`` returns a codec instance; ``decode(data, device)`` decodes
any encoded tensor by the codec id in its header; ``encode_chunk`` /
``decode_chunk`` (from :mod:`kvstore.codecs.chunk_io`) are the helpers tiers
and clients call.  Codec modules are imported on first use, so importing this
package costs nothing (no zstandard, no compiled kernel, no CUDA).

==========  ==  =======================================================
name        id  what
==========  ==  =======================================================
raw         1   the tensor's bytes
zstd        2   zstandard over byte planes, lossless
kivi        3   KIVI 8/4/2-bit asymmetric quantization
cachegen    4   CacheGen: anchor/delta, layer-wise bins, per-channel rANS
==========  ==  =======================================================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvstore.errors import CodecError, InvalidArgument

if TYPE_CHECKING:
    import torch

    from kvstore.codecs.base import Codec

# name -> (wire id, module, class).  The only place codecs are registered.
_REGISTRY: dict[str, tuple[int, str, str]] = {
    "raw": (1, "kvstore.codecs.raw", "RawCodec"),
    "zstd": (2, "kvstore.codecs.zstd", "ZstdCodec"),
    "kivi": (3, "kvstore.codecs.kivi", "KiviCodec"),
    "cachegen": (4, "kvstore.codecs.cachegen", "CachegenCodec"),
}
_BY_ID: dict[int, str] = {cid: name for name, (cid, _, _) in _REGISTRY.items()}


def codec_names() -> list[str]:
    """Names of every registered codec."""
    return list(_REGISTRY)


def get_codec(name: str, **options: Any) -> Codec:
    """A codec instance by name; ``options`` go to its constructor (e.g. kivi ``group_size``)."""
    try:
        _, module, cls = _REGISTRY[name]
    except KeyError:
        raise InvalidArgument(f"unknown codec {name!r}; choose one of {codec_names()}") from None
    codec: Codec = getattr(importlib.import_module(module), cls)(**options)
    return codec


def codec_name_for_id(codec_id: int) -> str:
    """Registry name of a wire codec id; CodecError if unknown."""
    try:
        return _BY_ID[codec_id]
    except KeyError:
        raise CodecError(f"unknown codec id {codec_id}") from None


def decode(data: bytes | bytearray | memoryview, device: str | torch.device = "cpu") -> torch.Tensor:
    """Decode any encoded tensor, whichever codec made it."""
    from kvstore.codecs import format as fmt

    view = memoryview(data).cast("B")
    if view.nbytes < 7 or view[:4].tobytes() != fmt.MAGIC:
        raise CodecError("not an encoded KV tensor (bad magic)")
    return get_codec(codec_name_for_id(view[6])).decode(view, device)


def __getattr__(name: str) -> Any:
    # encode_chunk / decode_chunk without importing torch at package import.
    if name in ("encode_chunk", "decode_chunk"):
        from kvstore.codecs import chunk_io

        return getattr(chunk_io, name)
    raise AttributeError(name)


__all__ = ["codec_names", "codec_name_for_id", "decode", "decode_chunk", "encode_chunk", "get_codec"]
