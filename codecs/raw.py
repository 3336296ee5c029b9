"""``raw``: the tensor's bytes, unchanged (lossless reference, zero CPU)."""

from __future__ import annotations

import torch

from kvstore.codecs import format as fmt
from kvstore.codecs.base import Codec
from kvstore.codecs.tensor_bytes import bytes_to_tensor, tensor_to_bytes
from kvstore.errors import CodecError


class RawCodec(Codec):
    """Stores the C-order bytes of the tensor in one section."""

    name = "raw"
    codec_id = 1
    lossless = True

    def max_expansion(self, header: fmt.Header) -> float:
        return 1.0

    def _encode_sections(self, kv: torch.Tensor, level: int) -> list[bytes]:
        return [tensor_to_bytes(kv)]

    def _decode_sections(
        self, header: fmt.Header, sections: list[memoryview], device: torch.device
    ) -> torch.Tensor:
        if len(sections) != 1 or sections[0].nbytes != header.nbytes:
            raise CodecError(f"raw payload holds {sum(s.nbytes for s in sections)} bytes, header needs {header.nbytes}")
        return bytes_to_tensor(sections[0], header.dtype, header.shape, device)
