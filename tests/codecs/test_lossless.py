"""raw and zstd: exact round trips of real KV in every dtype, and their failure modes."""

from __future__ import annotations

import pytest
import torch

from kvstore.codecs import format as fmt
from kvstore.codecs import get_codec
from kvstore.errors import CodecError
from tests.codecs.conftest import RealKV


@pytest.mark.parametrize("name", ["raw", "zstd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bit_exact(real_kv: RealKV, name: str, dtype: torch.dtype) -> None:
    chunk = real_kv.chunk(2, dtype)
    codec = get_codec(name)
    for level in codec.levels:
        out = codec.decode(codec.encode(chunk, level=level))
        assert out.dtype == dtype and out.shape == chunk.shape
        assert torch.equal(out.view(torch.uint8), chunk.view(torch.uint8))


def test_zstd_shuffle_helps_on_real_kv(real_kv: RealKV) -> None:
    chunk = real_kv.chunk(2)
    zstd = get_codec("zstd")
    shuffled, plain = len(zstd.encode(chunk, level=1)), len(zstd.encode(chunk, level=2))
    assert shuffled < plain < chunk.numel() * 2


def test_zstd_frame_claiming_more_than_the_header_is_refused(small_kv: torch.Tensor) -> None:
    codec = get_codec("zstd")
    bigger = codec.encode(torch.cat([small_kv, small_kv], 2))
    header, sections = fmt.unpack(bigger)
    forged = fmt.pack(fmt.Header(header.codec_id, 0, header.dtype, tuple(small_kv.shape), "LKTHD"), [sections[0]])
    with pytest.raises(CodecError):
        codec.decode(forged)


def test_raw_size_mismatch_is_refused(small_kv: torch.Tensor) -> None:
    codec = get_codec("raw")
    _, sections = fmt.unpack(codec.encode(small_kv))
    forged = fmt.pack(fmt.Header(codec.codec_id, 0, torch.float16, (1, 2, 33, 3, 64), "LKTHD"), [sections[0]])
    with pytest.raises(CodecError):
        codec.decode(forged)
