"""encode_chunk / decode_chunk: what tiers and clients call."""

from __future__ import annotations

import pytest
import torch

from kvstore.chunk import Chunk, ChunkMeta
from kvstore.codecs import codec_names
from kvstore.codecs.chunk_io import decode_chunk, encode_chunk
from kvstore.errors import CodecError


@pytest.mark.parametrize("codec", ["raw", "zstd", "kivi", "cachegen"])
def test_round_trip_through_chunk_meta(small_kv: torch.Tensor, codec: str) -> None:
    payload, meta = encode_chunk(small_kv, codec)
    assert meta.codec == codec and meta.shape == tuple(small_kv.shape) and meta.dtype == "float16"
    # The metadata survives its own binary encoding and the payload its checksum.
    meta2, _ = ChunkMeta.decode(meta.encode())
    Chunk(meta2, memoryview(payload)).verify()
    out = decode_chunk(meta2, payload)
    assert out.shape == small_kv.shape and out.dtype == small_kv.dtype
    if codec in ("raw", "zstd"):
        assert torch.equal(out, small_kv)


def test_raw_payload_is_the_canonical_bytes(small_kv: torch.Tensor) -> None:
    payload, meta = encode_chunk(small_kv, "raw")
    assert payload == small_kv.numpy().tobytes() and meta.nbytes == small_kv.numel() * 2


def test_metadata_must_match_the_payload(small_kv: torch.Tensor) -> None:
    payload, meta = encode_chunk(small_kv, "cachegen")
    wrong_codec = ChunkMeta(meta.nbytes, meta.checksum, "kivi", meta.codec_version, meta.dtype, meta.shape)
    with pytest.raises(CodecError, match="does not match"):
        decode_chunk(wrong_codec, payload)
    wrong_shape = ChunkMeta(meta.nbytes, meta.checksum, "cachegen", 1, meta.dtype, (1, 2, 3, 4, 5))
    with pytest.raises(CodecError):
        decode_chunk(wrong_shape, payload)
    with pytest.raises(CodecError, match="bytes"):
        decode_chunk(meta, payload[:-1])


def test_every_registered_codec_is_reachable() -> None:
    x = torch.zeros(1, 2, 4, 1, 32, dtype=torch.bfloat16)
    for name in codec_names():
        payload, meta = encode_chunk(x, name)
        assert decode_chunk(meta, payload).shape == x.shape
